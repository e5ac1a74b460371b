"""``dsopt check``：把报告变成 CI 门禁。"""

from __future__ import annotations


def check(report: dict, max_ppl_increase: float | None = None, min_top1: float | None = None,
          max_kl: float | None = None, max_kv_ratio: float | None = None) -> list[str]:
    """CI 门禁：返回未通过的阈值说明（空列表表示全部通过）。"""
    f = report.get("fidelity")
    failures = []
    wants_fidelity = any(v is not None for v in (max_ppl_increase, min_top1, max_kl))
    if wants_fidelity and not f:
        return ["报告中没有保真度指标（转换时用了 --no-eval？）"]
    if max_ppl_increase is not None and f["ppl_increase_pct"] > max_ppl_increase:
        failures.append(f"困惑度上升 {f['ppl_increase_pct']:.2f} % 超过上限 {max_ppl_increase} %"
                        f"（{f['ppl_base']:.3f} → {f['ppl_patched']:.3f}）")
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
