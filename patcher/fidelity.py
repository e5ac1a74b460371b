"""保真度：指标、报告（fidelity.json / fidelity.md / 图）与 ``dsopt check`` 的阈值。

基座的评估在转换之前完成并保存每个 token 的 log 概率（float16），转换之后在同样的窗口上
比较，所以不需要同时在内存中放两份模型。KV 字节数从真实 ``generate()`` 之后的缓存对象量出，
不按公式推算。
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

REPORT_JSON = "fidelity.json"
REPORT_MD = "fidelity.md"


@dataclass
class BaseEval:
    windows: torch.Tensor
    logprobs: list[torch.Tensor] = field(default_factory=list)  # per window, (T-1, V) float16
    nll: list[torch.Tensor] = field(default_factory=list)
    top1: list[torch.Tensor] = field(default_factory=list)  # from float32, before the float16 rounding


def model_logits(model: nn.Module):
    """The usual source of logits: the whole model on one window (streaming conversion passes its own)."""
    return lambda _i, window: model(input_ids=window[None], use_cache=False).logits[0]


def _logprobs(logits, i: int, window: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(logits(i, window)[:-1].float(), dim=-1)


def evaluate_base(model: nn.Module | None, windows: torch.Tensor, logits=None) -> BaseEval:
    """Per-token log-probs of the base on ``windows``; ``logits(i, window)`` replaces the model when given."""
    logits = logits or model_logits(model)
    ev = BaseEval(windows)
    for i, w in enumerate(windows):
        lp = _logprobs(logits, i, w)
        ev.nll.append(-lp.gather(1, w[1:, None])[:, 0])
        ev.top1.append(lp.argmax(-1))
        ev.logprobs.append(lp.half())
    return ev


def compare(model: nn.Module | None, base: BaseEval, logits=None) -> dict:
    """Perplexity of base and patched, mean KL(base‖patched) per token, top-1 agreement."""
    logits = logits or model_logits(model)
    nll_b, nll_p, kl, agree, n = 0.0, 0.0, 0.0, 0, 0
    for i, (w, lp_b16, nb, top1) in enumerate(zip(base.windows, base.logprobs, base.nll, base.top1)):
        lp_p = _logprobs(logits, i, w)
        lp_b = lp_b16.float()
        nll_b += float(nb.sum())
        nll_p += float(-lp_p.gather(1, w[1:, None]).sum())
        kl += float((lp_b.exp() * (lp_b - lp_p)).sum())
        agree += int((top1 == lp_p.argmax(-1)).sum())
        n += w.numel() - 1
    ppl_b, ppl_p = math.exp(nll_b / n), math.exp(nll_p / n)
    return {"tokens": n, "ppl_base": ppl_b, "ppl_patched": ppl_p,
            "ppl_increase_pct": 100.0 * (ppl_p / ppl_b - 1.0), "kl_mean": kl / n, "top1_agreement": agree / n}


def cache_bytes_per_token(model: nn.Module, prompt_ids: torch.Tensor, new_tokens: int = 8) -> dict:
    """Run a real greedy generate() and measure what its cache object holds, per token and layer summed."""
    with torch.no_grad():
        out = model.generate(prompt_ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             return_dict_in_generate=True, use_cache=True, pad_token_id=0)
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    total, length = 0, 0
    for layer in cache.layers:
        if not isinstance(layer.keys, torch.Tensor):  # a layer the model never wrote to
            continue
        for t in (layer.keys, layer.values):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
        length = max(length, layer.keys.shape[-2])
    tokens = prompt_ids.shape[0] * length
    return {"kv_bytes_per_token": total / tokens, "cached_tokens": tokens, "cache_bytes": total}


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


# ---------------------------------------------------------------- report files

def write_report(folder: Path, report: dict) -> None:
    folder = Path(folder)
    (folder / REPORT_JSON).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    plots = _plots(folder, report)
    (folder / REPORT_MD).write_text(render_markdown(report, plots), encoding="utf-8")


def _plots(folder: Path, report: dict) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    balance = (report.get("moe") or {}).get("balance") or []
    if balance:
        # layers may have different expert counts (per-layer budgets and router kinds): rows padded with NaN
        grid = torch.full((len(balance), max(len(b["tokens_per_expert"]) for b in balance)), float("nan"))
        for row, b in zip(grid, balance):
            counts = torch.tensor(b["tokens_per_expert"])
            row[: len(counts)] = counts / counts.sum().clamp_min(1) * len(counts)  # 1.0 = perfectly even
        fig, ax = plt.subplots(figsize=(9, 4))
        im = ax.imshow(grid.numpy(), aspect="auto", cmap="viridis")
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
        ax.set_yticks(range(len(balance)), [str(b["layer"]) for b in balance])  # dense layers have no row
        ax.set_title("MoE load on held-out text (tokens per expert / mean)")
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        fig.savefig(folder / "moe_balance.png", dpi=110)
        plt.close(fig)
        names.append("moe_balance.png")
    mla = (report.get("plan") or {}).get("mla") or {}
    if mla.get("rope_gain_per_pair"):
        gain, kept = mla["rope_gain_per_pair"], set(mla["rope_pairs"])
        fig, ax = plt.subplots(figsize=(8, 3.5))
        ax.bar(range(len(gain)), gain, color=["#cc6677" if i in kept else "#bbbbbb" for i in range(len(gain))])
        ax.set_yscale("symlog", linthresh=1e-3)
        ax.set_xlabel("source RoPE frequency pair (0 = highest frequency)")
        ax.set_ylabel("score error saved by keeping position")
        ax.set_title(f"Decoupled RoPE: measured gain per frequency, kept pairs in red ({mla['rope_method']})")
        fig.tight_layout()
        fig.savefig(folder / "rope_frequencies.png", dpi=110)
        plt.close(fig)
        names.append("rope_frequencies.png")
    local = (report.get("healing") or {}).get("local") or {}
    if local.get("layers"):
        rows = local["layers"]
        fig, ax = plt.subplots(figsize=(9, 3.5))
        x = torch.arange(len(rows)).numpy()
        ax.bar(x - 0.2, [r["error_before"] for r in rows], 0.4, label="converted", color="#bbbbbb")
        ax.bar(x + 0.2, [r["error_after"] for r in rows], 0.4, label="after reconstruction", color="#4477aa")
        ax.set_xticks(x, [r["module"].split(".")[-2] if "." in r["module"] else r["module"] for r in rows],
                      fontsize=7)
        ax.set_xlabel("layer")
        ax.set_ylabel("relative error vs teacher MLP")
        ax.set_title("Healing, stage 1: layer-wise reconstruction of the MoE MLPs (held rows)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(folder / "heal_local.png", dpi=110)
        plt.close(fig)
        names.append("heal_local.png")
    layers = report.get("layers") or []
    if not layers or "rank" not in layers[0]:
        return names

    idx = [l["layer"] for l in layers]
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    a1.bar(idx, [l["rank"] for l in layers], color="#4477aa")
    a1.axhline(layers[0]["kv_width"], color="gray", ls="--", lw=1, label="source K+V width")
    a1.set_ylabel("latent rank")
    a1.legend(loc="lower right", fontsize=8)
    a2.plot(idx, [l["k_rel_error"] for l in layers], "o-", label="K")
    a2.plot(idx, [l["v_rel_error"] for l in layers], "s-", label="V")
    a2.set_ylabel("relative error")
    a2.set_xlabel("layer")
    a2.legend(fontsize=8)
    fig.suptitle("MLA: per-layer rank and K/V error (calibration inputs)")
    fig.tight_layout()
    fig.savefig(folder / "fidelity_layers.png", dpi=110)
    plt.close(fig)
    return ["fidelity_layers.png"] + names


def render_markdown(report: dict, plots: list[str] | None = None) -> str:
    f = report.get("fidelity") or {}
    kv = report.get("kv_cache") or {}
    lines = [f"# 保真度报告 · {report.get('source', '')}", "",
             f"技术：{', '.join(report.get('techniques', [])) or '无'}；配方：`{report.get('recipe_name', '')}`", ""]
    if f:
        lines += ["| 指标 | 基座 | 转换后 |", "|---|---|---|",
                  f"| 困惑度（{f['tokens']} 个评估 token） | {f['ppl_base']:.4f} | {f['ppl_patched']:.4f} "
                  f"（{f['ppl_increase_pct']:+.2f} %） |",
                  f"| 平均 KL(基座‖转换后) | — | {f['kl_mean']:.5f} |",
                  f"| top-1 一致率 | — | {100 * f['top1_agreement']:.2f} % |"]
    if kv:
        lines.append(f"| 每 token KV 字节（从缓存实测） | {kv['base']['kv_bytes_per_token']:.0f} | "
                     f"{kv['patched']['kv_bytes_per_token']:.0f}（{100 * kv['ratio']:.1f} %） |")
    p = report.get("parameters") or {}
    if p:
        lines.append(f"| 参数量 | {p['base']:,} | {p['patched']:,} |")
        if "patched_active_per_token" in p:
            a, b = p["base_active_per_token"], p["patched_active_per_token"]
            lines.append(f"| 每 token 激活参数 | {a['active']:,} | {b['active']:,}（FFN 激活比例 "
                         f"{100 * b['active_ffn_fraction']:.1f} %，总/激活 = {b['total'] / b['active']:.2f}） |")
            if "flops_per_token" in b:
                lines.append(f"| 每 token 前向 FLOPs（权重部分；其中 FFN） | {a['flops_per_token'] / 1e6:,.1f} M"
                             f"（{a['ffn_flops_per_token'] / 1e6:,.1f} M） | {b['flops_per_token'] / 1e6:,.1f} M"
                             f"（{b['ffn_flops_per_token'] / 1e6:,.1f} M） |")
    h = report.get("healing")
    if h:
        c, a = h["before"], h["after"]
        lines += ["", "## 修复（KL 蒸馏）", "", "| 指标 | 基座 | 转换后 | 修复后 |", "|---|---|---|---|",
                  f"| 困惑度 | {a['ppl_base']:.4f} | {c['ppl_patched']:.4f}（{c['ppl_increase_pct']:+.2f} %） | "
                  f"{a['ppl_patched']:.4f}（{a['ppl_increase_pct']:+.2f} %） |",
                  f"| 平均 KL | — | {c['kl_mean']:.5f} | {a['kl_mean']:.5f} |",
                  f"| top-1 一致率 | — | {100 * c['top1_agreement']:.2f} % | {100 * a['top1_agreement']:.2f} % |", "",
                  f"预算：{h['tokens']} 个 token，{h['steps']} 步，{h['seconds']:.0f} s；训练参数 "
                  f"{h['trainable_parameters']:,}（范围 {h['options']['scope']}"
                  f"{'，LoRA 秩 ' + str(h['options']['lora']) if h['options']['lora'] else ''}）；老师 `{h['teacher']}`，"
                  f"老师 logits：{h['teacher_logits']}；文本 {h['data']}。"]
        lines += _generated_lines(h.get("generated"), "老师")
        lines += _local_lines(h.get("local"))
    r = report.get("resources") or {}
    if r:
        lines += ["", f"转换耗时 {r['conversion_seconds']:.1f} s，峰值常驻内存 {r['peak_rss_mib']:.0f} MiB。"]
    balance = (report.get("moe") or {}).get("balance") or []
    if balance:
        lines += ["", "## MoE 负载（留出文本上每个专家的 token 数）", "", "| 层 | 最大/平均 | 归一化熵 |",
                  "|---|---|---|"]
        lines += [f"| {b['layer']} | {b['max_over_mean']:.2f} | {b['entropy']:.3f} |" for b in balance]
    mtp = report.get("mtp") or {}
    if mtp.get("head_acceptance_teacher_forced") is not None:
        t = mtp.get("training") or {}
        lines += ["", f"## MTP（{mtp['heads']} 个模块，块从第 {mtp['source_layer']} 层初始化）", "",
                  "| 头 | 接受率（留出文本，逐位置） | 接受率（实测生成，每步） |", "|---|---|---|"]
        lines += [f"| {k + 1} | {100 * a:.1f} % | {100 * b:.1f} % |" for k, (a, b) in
                  enumerate(zip(mtp["head_acceptance_teacher_forced"], mtp["head_acceptance"]))]
        lines += ["", f"每个验证步平均产出 {mtp['accepted_per_step']:.2f} 个 token（由逐头接受率推算 "
                      f"{mtp['expected_tokens_per_step']:.2f}）；tokens/s：MTP {mtp['tokens_per_s_mtp']:.1f}，普通 "
                      f"{mtp['tokens_per_s_plain']:.1f}；贪心输出与普通贪心{'一致' if mtp['greedy_identical'] else '不一致'}"
                      f"（{mtp['measured_with']}）。"]
        if mtp.get("with_lookup"):  # reports written before context lookup drafts have none
            w = mtp["with_lookup"]
            lines += ["", f"加上上下文查找草稿（`generate()` 的缺省）：每步 {w['accepted_per_step']:.2f} 个 token，"
                          f"{w['tokens_per_s']:.1f} tokens/s（{w['lookup_steps']} 个查找步、{w['mtp_steps']} 个 MTP 步）。"]
        if t:
            lines.append(f"训练：{t['tokens']} 个 token，{t['steps']} 步，{t['seconds']:.0f} s，目标 {t['target']}。")
            lines += _generated_lines(t.get("generated"), "基座")
    mla = (report.get("plan") or {}).get("mla") or {}
    if mla.get("rope") == "decoupled":
        lines += ["", "## 解耦 RoPE（DeepSeek-V3 布局）", "",
                  f"保留位置的频率（方法 `{mla['rope_method']}`）：源 RoPE 频率对 {mla['rope_pairs']}，"
                  f"qk_rope_head_dim = {mla['qk_rope_head_dim']}，kv_lora_rank = {mla['kv_lora_rank']}。"
                  "其余频率不带位置进入潜在向量（低频）或丢弃（实测代价更小的一种）；各层共享旋转键所含的"
                  "（查询加权）键能量见逐层表。"]
    ex = report.get("export") or {}
    if ex:
        kvs = ex["stock_kv_cache"]["kv_bytes_per_token"]
        lines += ["", f"## 导出：{ex['format']}", "",
                  f"- 标准 transformers 以 `{ex['class']}` 加载；与 dsopt 自己的前向相比 logits 最大差 "
                  f"{ex['max_abs_logit_diff_vs_dsopt']:.2e}（logits 量级 {ex['logit_scale']:.1f}），top-1 一致 "
                  f"{100 * ex['top1_agreement_vs_dsopt']:.2f} %。",
                  f"- 标准模型缓存实测每 token {kvs:.0f} 字节；旋转：`{ex['rope_parameters']}`。"]
        if "mtp_generate_identical_to_greedy" in ex:
            lines.append(f"- `generate(use_mtp=True)`：输出与普通贪心"
                         f"{'一致' if ex['mtp_generate_identical_to_greedy'] else '不一致'}。")
    layers = report.get("layers") or []
    if layers and "rope_shared_key_energy" in layers[0]:
        lines += ["", "## 逐层误差（校准输入上）", "",
                  "| 层 | 潜在秩 | K 相对误差（对源 K） | V 相对误差 | 共享旋转键能量 | 不带位置保留的频率对 |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {l['layer']} | {l['rank']} | {l['k_rel_error']:.4f} | {l['v_rel_error']:.4f} | "
                  f"{l['rope_shared_key_energy']:.3f} | {l['nope_pairs_unrotated']} |" for l in layers]
    elif layers and "rank" in layers[0]:
        lines += ["", "## 逐层计划与误差（校准输入上）", "",
                  "| 层 | 潜在秩 | 源 K+V 宽度 | K 相对误差 | V 相对误差 |", "|---|---|---|---|---|"]
        lines += [f"| {l['layer']} | {l['rank']} | {l['kv_width']} | {l['k_rel_error']:.4f} | {l['v_rel_error']:.4f} |"
                  for l in layers]
    for name in plots or []:
        lines += ["", f"![{name}]({name})"]
    cal = report.get("calibration") or {}
    if cal:
        lines += ["", f"校准：{cal.get('tokens')} 个 token，来源 {cal.get('data')}；评估来源 "
                      f"{(report.get('eval') or {}).get('data')}。"]
    return "\n".join(lines) + "\n"


def read_report(folder: Path) -> dict:
    path = Path(folder) / REPORT_JSON
    if not path.exists():
        raise FileNotFoundError(f"{folder} 中没有 {REPORT_JSON}：这不是 dsopt 的输出目录？")
    return json.loads(path.read_text(encoding="utf-8"))


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


def _local_lines(local: dict | None) -> list[str]:
    """The report line on healing's layer-wise reconstruction stage (``reconstruct``), if it ran."""
    if not local or not local["layers"]:
        return []
    from .reconstruct import mean_errors

    n = len(local["layers"])
    before, after = mean_errors(local)
    return ["", f"KL 之前的逐层重建：{n} 个 MoE MLP 各 {local['steps_per_layer']} 步（{local['tokens']} 个 token，"
                f"每步 {local['batch_rows']} 行），对老师稠密 MLP 输出的相对误差平均 {before:.4f} → {after:.4f}，"
                f"用时 {local['seconds']:.0f} s（计入时间预算）"
                + (f"；时间用完，{local['skipped_layers']} 层未做" if local["skipped_layers"] else "") + "。"]


def _generated_lines(g: dict | None, writer: str) -> list[str]:
    """The report line on self-generated training text (``selfgen``), if the training had any."""
    if not g:
        return []
    talk = g.get("dialogues")
    return [f"训练数据中{writer}自己写的文本：{g['windows']} 个窗口、{g['tokens']} 个 token（温度 {g['temperature']}"
            + (f"；其中对话 {talk['windows']} 个窗口、{talk['tokens']} 个 token" if talk else "")
            + f"），生成用时 {g['seconds']:.0f} s（计入时间预算）。"]
