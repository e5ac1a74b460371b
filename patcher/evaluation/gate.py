"""``dsopt check``：把报告变成 CI 门禁。报告的顶层指标是最差领域的值，所以门禁按最差的领域判断。"""

from __future__ import annotations

from ..errors import RecipeError
from .render import interval


def check(report: dict, max_ppl_increase: float | None = None, min_top1: float | None = None,
          max_kl: float | None = None, max_kv_ratio: float | None = None, sure: bool = False) -> list[str]:
    """CI 门禁：返回未通过的阈值说明（空列表表示全部通过）；一个阈值都没给是 ``RecipeError``（门禁形同虚设）。

    ``sure``：困惑度上升按每个领域 95 % 区间的上界判定，而不只是最差领域的点估计——点估计贴着阈值时，
    换一份同样大小的评估文本结论就可能翻过来。"""
    if all(v is None for v in (max_ppl_increase, min_top1, max_kl, max_kv_ratio)):
        raise RecipeError("dsopt check 没有给任何阈值，什么也不会检查：请至少给出 --max-ppl-increase、--min-top1、"
                          "--max-kl 或 --max-kv-ratio 之一")
    if sure and max_ppl_increase is None:
        raise RecipeError("--sure 只作用于困惑度上升的区间：请同时给出 --max-ppl-increase")
    f = report.get("fidelity")
    failures = []
    wants_fidelity = any(v is not None for v in (max_ppl_increase, min_top1, max_kl))
    if wants_fidelity and not f:
        return ["报告中没有保真度指标（转换时用了 --no-eval？）"]
    where = f"，最差领域 {f['worst_domain']}" if f and f.get("worst_domain") else ""
    if max_ppl_increase is not None and f["ppl_increase_pct"] > max_ppl_increase:
        failures.append(f"困惑度上升 {f['ppl_increase_pct']:.2f} % 超过上限 {max_ppl_increase} %"
                        f"（{f['ppl_base']:.3f} → {f['ppl_patched']:.3f}{where}）")
    if sure and f:
        failures += _upper_bounds(f, max_ppl_increase)
    if min_top1 is not None and f["top1_agreement"] < min_top1:
        failures.append(f"top-1 一致率 {f['top1_agreement']:.4f} 低于下限 {min_top1}")
    if max_kl is not None and f["kl_mean"] > max_kl:
        failures.append(f"平均 KL {f['kl_mean']:.5f} 超过上限 {max_kl}")
    if max_kv_ratio is not None:
        kv = report.get("kv_cache")
        if not kv:
            failures.append("报告中没有 KV 缓存测量")
        elif kv["ratio"] > max_kv_ratio:
            failures.append(f"KV 缓存比例 {kv['ratio']:.3f} 超过上限 {max_kv_ratio}")
    return failures


def _upper_bounds(f: dict, limit: float) -> list[str]:
    """Each domain whose 95 % interval reaches above ``limit`` (the pooled text when the report has no domains)."""
    parts = f.get("domains") or {"全部文本": f}
    unknown = [name for name, d in parts.items() if not d.get("ppl_increase_ci95_pct")]
    if unknown:
        return [f"报告中没有困惑度上升的区间（{'、'.join(unknown)}；旧版本的报告，或评估文本不足两块 "
                f"128 个 token），--sure 无从判断：请用当前版本重新评估"]
    over = [f"{name} {d['ppl_increase_pct']:+.2f} %（区间 {interval(d)}）" for name, d in parts.items()
            if d["ppl_increase_ci95_pct"][1] > limit]
    if not over:
        return []
    return [f"困惑度上升的 95 % 区间上界超过上限 {limit} %：{'；'.join(over)}。评估文本更多时区间更窄"
            f"（--eval-tokens）"]
