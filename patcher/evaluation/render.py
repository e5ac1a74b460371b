"""把报告 dict 渲染成人读的形式：fidelity.md 与图（PNG）。"""

from __future__ import annotations

from pathlib import Path

import torch

from .metrics import BLOCK


def plots(folder: Path, report: dict) -> list[str]:
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
        ax.set_xticks(x, [(r["module"].split(".")[-2] if "." in r["module"] else r["module"])
                          + ("a" if r.get("kind") == "attention" else "") for r in rows], fontsize=6)
        ax.set_xlabel("layer (a: attention)")
        ax.set_ylabel("relative error vs teacher module")
        ax.set_title("Healing, stage 1: layer-wise reconstruction of the converted modules (held-out tokens)")
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
    """fidelity.md: the summary table, then one section per part of the report that is present."""
    lines = []
    for section in (_summary, _domains, _notes, _healing, _resources, _moe_balance, _mtp, _decoupled_rope, _export, _layers):
        lines += section(report)
    for name in plots or []:
        lines += ["", f"![{name}]({name})"]
    cal = report.get("calibration") or {}
    if cal:
        lines += ["", f"校准：{cal.get('tokens')} 个 token，来源 {cal.get('data')}；评估来源 "
                      f"{(report.get('eval') or {}).get('data')}。"]
    return "\n".join(lines) + "\n"




def _summary(report: dict) -> list[str]:
    """Title, techniques and the base-vs-converted table."""
    f = report.get("fidelity") or {}
    kv = report.get("kv_cache") or {}
    lines = [f"# 保真度报告 · {report.get('source', '')}", "",
             f"技术：{', '.join(report.get('techniques', [])) or '无'}；配方：`{report.get('recipe_name', '')}`", ""]
    if f:
        where = f"最差领域 {f['worst_domain']}，" if f.get("worst_domain") else ""
        lines += ["| 指标 | 基座 | 转换后 |", "|---|---|---|",
                  f"| 困惑度（{where}{f['tokens']} 个评估 token） | {f['ppl_base']:.4f} | {f['ppl_patched']:.4f} "
                  f"（{f['ppl_increase_pct']:+.2f} %，95 % 区间 {interval(f)}） |",
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
    return lines


def interval(d: dict) -> str:
    """困惑度上升的约 95 % 抽样区间（文字）；旧报告或只有一个块时为破折号。"""
    ci = d.get("ppl_increase_ci95_pct")
    return f"{ci[0]:+.2f} … {ci[1]:+.2f} %" if ci else "—"


def _domain_rows(f: dict) -> list[str]:
    rows = [f"| {name}{' ⚠ 最差' if name == f.get('worst_domain') else ''} | {d['tokens']} | {d['ppl_base']:.3f} | "
            f"{d['ppl_patched']:.3f} | {d['ppl_increase_pct']:+.2f} % | {interval(d)} | {d['kl_mean']:.5f} | "
            f"{100 * d['top1_agreement']:.2f} % |" for name, d in f["domains"].items()]
    p = f["pooled"]
    return rows + [f"| （全部合并） | {p['tokens']} | {p['ppl_base']:.3f} | {p['ppl_patched']:.3f} | "
                   f"{p['ppl_increase_pct']:+.2f} % | {interval(p)} | {p['kl_mean']:.5f} | "
                   f"{100 * p['top1_agreement']:.2f} % |"]


def _domains(report: dict) -> list[str]:
    """Each evaluation domain; the summary above shows the worst of them, not the mean."""
    f = report.get("fidelity") or {}
    if not f.get("domains"):
        return []
    return ["", "## 逐领域保真度", "", "摘要表取最差的领域（困惑度上升与 KL 取最大，top-1 取最小），不取平均。",
            f"“95 % 区间”是评估文本有限带来的抽样误差（按 {BLOCK} token 的块估计）：区间重叠的两个数字分不出高低；"
            "要更窄的区间，加大 `--eval-tokens`。", "",
            "| 领域 | token | 基座困惑度 | 转换后 | 上升 | 上升的 95 % 区间 | KL | top-1 |",
            "|---|---|---|---|---|---|---|---|",
            *_domain_rows(f)]


def _notes(report: dict) -> list[str]:
    notes = report.get("notes") or []
    return ["", "## 配方调整", "", *[f"- {n}" for n in notes]] if notes else []


def _healing(report: dict) -> list[str]:
    """The healing section: before and after, its budget and data."""
    lines = []
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
    return lines


def _resources(report: dict) -> list[str]:
    """Conversion time and peak memory."""
    lines = []
    r = report.get("resources") or {}
    if r:
        lines += ["", f"转换耗时 {r['conversion_seconds']:.1f} s，峰值常驻内存 {r['peak_rss_mib']:.0f} MiB。"]
    return lines


def _moe_balance(report: dict) -> list[str]:
    """Tokens per expert on held-out text, per MoE layer."""
    lines = []
    balance = (report.get("moe") or {}).get("balance") or []
    if balance:
        lines += ["", "## MoE 负载（留出文本上每个专家的 token 数）", "", "| 层 | 最大/平均 | 归一化熵 |",
                  "|---|---|---|"]
        lines += [f"| {b['layer']} | {b['max_over_mean']:.2f} | {b['entropy']:.3f} |" for b in balance]
    return lines


def _mtp(report: dict) -> list[str]:
    """MTP acceptance per head, tokens per step and speed, training."""
    lines = []
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
    return lines


def _decoupled_rope(report: dict) -> list[str]:
    """The decoupled-RoPE choice (DeepSeek-V3 layout)."""
    lines = []
    mla = (report.get("plan") or {}).get("mla") or {}
    if mla.get("rope") == "decoupled":
        lines += ["", "## 解耦 RoPE（DeepSeek-V3 布局）", "",
                  f"保留位置的频率（方法 `{mla['rope_method']}`）：源 RoPE 频率对 {mla['rope_pairs']}，"
                  f"qk_rope_head_dim = {mla['qk_rope_head_dim']}，kv_lora_rank = {mla['kv_lora_rank']}。"
                  "其余频率不带位置进入潜在向量（低频）或丢弃（实测代价更小的一种）；各层共享旋转键所含的"
                  "（查询加权）键能量见逐层表。"]
    return lines


def _export(report: dict) -> list[str]:
    """What loading the native export with stock transformers showed."""
    lines = []
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
    return lines


def _layers(report: dict) -> list[str]:
    """Per-layer plan and errors on the calibration inputs."""
    lines = []
    layers = report.get("layers") or []
    if layers and "rope_shared_key_energy" in layers[0]:
        lines += ["", "## 逐层误差（校准输入上）", "",
                  "| 层 | 潜在秩 | K 相对误差（对源 K） | V 相对误差 | 共享旋转键能量 | 失去旋转的部分 |",
                  "|---|---|---|---|---|---|"]
        for l in layers:
            lost = (f"拟合因子平均 \\|c\\| {l['rope_residual_factor_mean_abs']:.3f}" if "rope_residual_factor_mean_abs" in l
                    else f"{l.get('nope_pairs_unrotated', 0)} 对不带位置保留")
            lines.append(f"| {l['layer']} | {l['rank']} | {l['k_rel_error']:.4f} | {l['v_rel_error']:.4f} | "
                         f"{l['rope_shared_key_energy']:.3f} | {lost} |")
    elif layers and "rank" in layers[0]:
        lines += ["", "## 逐层计划与误差（校准输入上）", "",
                  "| 层 | 潜在秩 | 源 K+V 宽度 | K 相对误差 | V 相对误差 |", "|---|---|---|---|---|"]
        lines += [f"| {l['layer']} | {l['rank']} | {l['kv_width']} | {l['k_rel_error']:.4f} | {l['v_rel_error']:.4f} |"
                  for l in layers]
    return lines


def _local_lines(local: dict | None) -> list[str]:
    """The report line on healing's layer-wise reconstruction stage (``reconstruct``), if it ran."""
    if not local or not local["layers"]:
        return []
    labels = {"mlp": "MoE MLP（对老师稠密 MLP）", "attention": "注意力（对老师的注意力）"}
    parts = [f"{n} 个{labels[kind]}输出的相对误差平均 {before:.4f} → {after:.4f}"
             for kind, n, before, after in errors_by_kind(local)]
    return ["", f"KL 之前的逐层重建：每个模块 {local['steps_per_layer']} 步（{local['tokens']} 个 token，每步约 "
                f"{local['batch_rows']} 个 token），" + "；".join(parts) + f"，用时 {local['seconds']:.0f} s（计入时间预算）"
                + (f"；时间用完，{local['skipped_layers']} 个模块未做" if local["skipped_layers"] else "") + "。"]


def _generated_lines(g: dict | None, writer: str) -> list[str]:
    """The report line on self-generated training text (``selfgen``), if the training had any."""
    if not g:
        return []
    talk = g.get("dialogues")
    return [f"训练数据中{writer}自己写的文本：{g['windows']} 个窗口、{g['tokens']} 个 token（温度 {g['temperature']}"
            + (f"；其中对话 {talk['windows']} 个窗口、{talk['tokens']} 个 token" if talk else "")
            + f"），生成用时 {g['seconds']:.0f} s（计入时间预算）。"]


def errors_by_kind(summary: dict) -> list[tuple[str, int, float, float]]:
    """(kind, modules, mean error before, after) of a ``reconstruct`` summary, MLPs first, kinds that ran only."""
    out = []
    for kind in ("mlp", "attention"):
        rows = [l for l in summary["layers"] if l.get("kind", "mlp") == kind]
        if rows:
            out.append((kind, len(rows), *mean_errors({"layers": rows})))
    return out


def mean_errors(summary: dict) -> tuple[float, float]:
    """The layers' mean relative error (before, after) of a ``reconstruct`` summary with at least one layer."""
    n = len(summary["layers"])
    return (sum(l["error_before"] for l in summary["layers"]) / n, sum(l["error_after"] for l in summary["layers"]) / n)
