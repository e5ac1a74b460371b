"""MLA（潜在模式）：把每层的 K、V 换成一个小潜在向量的上投影。

初始化：对拼接的 [W_k; W_v] 做 SVD。``whitened``（默认）先乘以该层校准输入协方差的
Cholesky 因子 L（SVD-LLM 做法），使截断误差等于输出误差 ||ΔW·X||；``plain`` 直接对权重做 SVD，
仅供对比。偏置留在上投影中，精确保留。秩在一个全局预算下按白化谱逐层分配。
"""

from __future__ import annotations

import copy
import inspect
import math
from dataclasses import dataclass

import torch
from torch import nn

from patcher.errors import PlanError
from patcher.model.locate import LayerMap, ModelMap
from patcher.model.weights import rope_angles, table_columns, weight_of
from patcher.runtime.modeling import DecoupledLatentAttention, LatentAttention

from . import rope_split
from .base import Planning
from .lowrank import BlockDiagonal, factorize, low_rank, quad_diag


def kv_width(lm: LayerMap) -> int:
    """Elements per token that the source caches in this layer (K plus V)."""
    return len(lm.k.flat_rows) + len(lm.v.flat_rows)


def output_weights(layer: nn.Module, lm: LayerMap, cov: torch.Tensor, o, theta: torch.Tensor | None = None,
                   fit_cov: torch.Tensor | None = None) -> BlockDiagonal | None:
    """Output-side weighting of the joint [W_k; W_v] rows of a located layer (see ``weighting``)."""
    return weighting(weight_of(layer, lm.q)[0], weight_of(layer, lm.k)[0], weight_of(layer, lm.v)[0],
                     weight_of(layer, lm.o, rows=False)[0], lm, cov, o.objective, theta=theta, k_weight=o.k_weight,
                     fit_cov=fit_cov)


def fit_covariance(stats: dict, lm: LayerMap, o) -> torch.Tensor | None:
    """The input covariance the factorisation whitens with: tokens all alike (``--mla-token-weighting uniform``),
    weighted by the attention they receive (``attention``), or the mean of the two (``mixed``)."""
    cov, attended = stats.get((lm.k.module, "cov")), stats.get((lm.k.module, "cov_attended"))
    if attended is None or o.token_weighting == "uniform":
        return cov
    return attended if o.token_weighting == "attention" else (cov + attended) / 2


def layer_angles(config, lm: LayerMap, rotary: nn.Module | None) -> torch.Tensor | None:
    """θ of each rotary pair of this layer (its layer type's rotary), or None without RoPE."""
    if not lm.rotary_dim or rotary is None:
        return None
    return rope_angles(rotary, lm.rotary_dim, attention_extras(config, lm, rotary).get("layer_type"))[0]


def rope_averaged(m: torch.Tensor, theta: torch.Tensor, span: int) -> torch.Tensor:
    """E_Δ[R_Δᵀ·M·R_Δ] over Δ = key position − query position, uniform in (−span, 0] (causal: the score is
    qᵀ·R_Δ·k), R_Δ the rotate-half RoPE rotation of the first 2·len(θ) dims (the rest are not rotated).
    Closed form: each entry of M times the mean of a product of two cosines/sines, so no per-position matrices
    are formed."""
    half = len(theta)
    rot = 2 * half
    pos = -torch.arange(span, dtype=torch.float64)[:, None] * theta.double()[None]
    c, s = pos.cos(), pos.sin()
    A, B, D = c.T @ c / span, c.T @ s / span, s.T @ s / span  # E[c_i c_j], E[c_i s_j], E[s_i s_j]
    P, Q, Qt, T = m[..., :half, :half], m[..., :half, half:rot], m[..., half:rot, :half], m[..., half:rot, half:rot]
    out = m.clone()
    out[..., :half, :half] = P * A + Q * B + Qt * B.T + T * D
    out[..., :half, half:rot] = -P * B + Q * A - Qt * D + T * B.T
    out[..., half:rot, :half] = -P * B.T - Q * D + Qt * A + T * B
    out[..., half:rot, half:rot] = P * D - Q * B.T - Qt * B + T * A
    if m.shape[-1] > rot:  # rotated × unrotated blocks: E[R_Δ]ᵀ on one side only
        cm, sm = c.mean(0), s.mean(0)
        r_mean_t = torch.zeros(rot, rot, dtype=torch.float64)
        idx = torch.arange(half)
        r_mean_t[idx, idx] = r_mean_t[idx + half, idx + half] = cm
        r_mean_t[idx, idx + half], r_mean_t[idx + half, idx] = sm, -sm
        out[..., :rot, rot:] = r_mean_t @ m[..., :rot, rot:]
        out[..., rot:, :rot] = out[..., :rot, rot:].transpose(-1, -2)
    return out


def _sqrt_psd(m: torch.Tensor) -> torch.Tensor:
    evals, evecs = torch.linalg.eigh(m)
    return evecs @ torch.diag_embed(evals.clamp_min(1e-12).sqrt()) @ evecs.transpose(-1, -2)


ROPE_SPAN = 512  # relative distances the K weighting averages over: the calibration window


def weighting(wq, wk, wv, wo, lm: LayerMap, cov: torch.Tensor, objective: str,
              k_ref: torch.Tensor | None = None, theta: torch.Tensor | None = None,
              k_weight: float = 1.0, fit_cov: torch.Tensor | None = None) -> BlockDiagonal | None:
    """Output-side weighting of the joint [W_k; W_v] rows for the SVD objective.

    ``kv``：不加权（K 与 V 输出误差的平方和）。``balanced``：K 块与 V 块各自归一到单位能量，
    使两者的相对误差同等重要。``attention``：K 的每一维按对应查询能量加权（注意力分数误差
    q·Δk；RoPE 下同一频率对的两维取平均），V 按 W_o 加权（输出误差 W_o·Δv），再各自归一。
    ``attention_cov``：K 按每个 KV 组的完整查询协方差加权，RoPE 的旋转对相对位置取平均（``theta``；
    低频维的相关性因此保留，高频维退化为 ``attention`` 的对内平均）；没有 ``theta`` 时不做旋转平均。
    ``k_ref``：K 块按这些行（源模型完整的 K）的能量归一——解耦 RoPE 时 no-position 部分可能很小，
    不应被放大到与 V 同等重要。``k_weight``：归一后 K 误差相对 V 误差的权重。``fit_cov``：分解所用的输入协方差
    （按 token 所受注意力加权时），K、V 的能量按它归一；查询协方差总是用 ``cov``（每个查询同等重要）。
    """
    if objective == "kv":
        return None
    c = cov.double()
    k_ref = wk if k_ref is None else k_ref
    nk, nv = wk.shape[0], wv.shape[0]
    gk = [torch.ones(nk, dtype=torch.float64)]
    gv = [torch.ones(nv, dtype=torch.float64)]
    group = lm.num_heads // lm.num_kv_heads
    if objective == "attention":
        q_energy = quad_diag(wq, c).view(lm.num_heads, lm.head_dim)
        rot = lm.rotary_dim
        if rot:
            half = rot // 2
            pair = (q_energy[:, :half] + q_energy[:, half:rot]) / 2
            q_energy = torch.cat([pair, pair, q_energy[:, rot:]], dim=1)
        gk = [q_energy.view(lm.num_kv_heads, group, lm.head_dim).sum(1).clamp_min(1e-12).sqrt().reshape(-1)]
    elif objective == "attention_cov":
        hd = wq.shape[0] // lm.num_heads
        q = wq.float().view(lm.num_heads, hd, -1)
        sigma = torch.einsum("hdi,hei->hde", q @ c.float(), q).double()  # per-head query covariance
        sigma = sigma.view(lm.num_kv_heads, group, hd, hd).sum(1)
        if theta is not None:
            sigma = rope_averaged(sigma, theta, ROPE_SPAN)
        gk = list(_sqrt_psd(sigma))
    if objective in ("attention", "attention_cov"):
        vd = nv // lm.num_kv_heads
        blocks = []
        for g_idx in range(lm.num_kv_heads):
            cols = wo[:, g_idx * group * vd:(g_idx + 1) * group * vd].double().view(wo.shape[0], group, vd)
            m = torch.einsum("ogd,oge->de", cols, cols)
            blocks.append(_sqrt_psd(m))
        gv = blocks
    cf = fit_cov.double() if fit_cov is not None else c
    ek = quad_diag(BlockDiagonal(gk) @ k_ref.double(), cf).sum()
    ev = quad_diag(BlockDiagonal(gv) @ wv.double(), cf).sum()
    kw = k_weight ** 0.5 / ek.sqrt().clamp_min(1e-30)
    return BlockDiagonal([b * kw for b in gk] + [b / ev.sqrt() for b in gv])


def allocate(spectra: list[torch.Tensor], budget: int, caps: list[int], min_rank: int, mode: str,
             layer_weights: list[float] | None = None) -> list[int]:
    """Split a total rank budget over layers; spectra are each layer's (weighted, whitened) singular values.

    ``uniform``：每层同秩。``energy``：取全模型中归一化能量 s²/Σs² 最大的 ``budget`` 个分量，即让各层
    相对误差之和最小。``log``：让各层相对残差的对数之和最小——每加一维秩的收益是残差缩小的比例，
    所以谱尾部仍有分量的层不会被饿死。贪心在这两个目标上都是最优的（收益随秩递减）。
    ``layer_weights`` 给每层的能量乘一个代价系数（敏感度分配：实测的 KL / 相对残差）。
    """
    n = len(caps)
    if budget < n * min_rank or budget > sum(caps):
        raise PlanError(f"秩预算 {budget} 不可能：{n} 层，每层至少 {min_rank}，最多共 {sum(caps)}")
    if mode == "uniform":
        base = [min(budget // n, c) for c in caps]
        extra = budget - sum(base)
        for i in range(n):
            if extra <= 0:
                break
            if base[i] < caps[i]:
                base[i] += 1
                extra -= 1
        return base
    ranks = [min(min_rank, c) for c in caps]
    gains = []
    for i, s in enumerate(spectra):
        e = (s.double() ** 2) / (s.double() ** 2).sum().clamp_min(1e-30)
        residual = e.flip(0).cumsum(0).flip(0)  # residual[j]: energy left when rank j is kept
        for j in range(ranks[i], caps[i]):
            if mode == "energy":
                gains.append((float(e[j]) * (layer_weights[i] if layer_weights else 1.0), i))
            else:
                after = float(residual[j + 1]) if j + 1 < len(residual) else 0.0
                gains.append((math.log(float(residual[j]) + 1e-12) - math.log(after + 1e-12), i))
    gains.sort(key=lambda g: -g[0])
    for _, i in gains[: budget - sum(ranks)]:
        ranks[i] += 1
    return ranks


def attention_extras(config, lm: LayerMap, rotary: nn.Module | None) -> dict:
    """What a family's attention does besides q/k/v/o that the latent form must repeat: soft-capped scores
    (Gemma 2), a rotary that depends on the layer's kind (Gemma 3's local and global bases), a position-dependent
    query scale (Ministral 3) and interleaved rotary tables (Cohere)."""
    extras = {}
    if getattr(config, "attn_logit_softcapping", None):
        extras["softcap"] = float(config.attn_logit_softcapping)
    types = getattr(config, "layer_types", None)
    takes_type = rotary is not None and "layer_type" in inspect.signature(rotary.forward).parameters
    if lm.rotary_dim and isinstance(types, list) and lm.index < len(types) and takes_type:
        extras["layer_type"] = types[lm.index]
    rope_params = getattr(config, "rope_parameters", None) or {}
    if isinstance(rope_params, dict) and rope_params.get("llama_4_scaling_beta"):
        # Ministral 3: queries scaled by 1 + β·log(1 + ⌊pos / original_max⌋), a function of the absolute position
        extras["query_scale"] = [float(rope_params["llama_4_scaling_beta"]),
                                 int(rope_params["original_max_position_embeddings"])]
    if getattr(config, "attn_temperature_tuning", False) and not lm.rotary_dim:
        # Llama 4's NoPE layers: queries scaled by 1 + β·log(1 + ⌊(pos + 1) / floor_scale⌋)
        extras["query_scale"] = [float(config.attn_scale), int(config.floor_scale), 1]
    if lm.rope_order is not None:  # q/k rows were taken in rotate-half order; the tables may need the same
        columns = table_columns(rotary, lm.rotary_dim, extras.get("layer_type"))
        if columns is not None:
            extras["rope_columns"] = columns
    return extras


def _head_ordered(norm: nn.Module, lm: LayerMap) -> nn.Module:
    """The q/k norm for rows taken in ``rope_order`` (interleaved RoPE): a copy whose per-dim weights follow the
    same order within each head; the statistics over a head's dims do not depend on their order."""
    if lm.rope_order is None:
        return norm
    norm = copy.deepcopy(norm)
    order = torch.tensor(lm.rope_order)
    with torch.no_grad():
        for p in norm.parameters(recurse=False):
            p.copy_(p.reshape(-1, lm.head_dim)[:, order].reshape(p.shape))
    return norm


@dataclass
class Analysis:
    """规划轮中一层的结果：白化（加权）谱；按敏感度分配时还有实测的 KL 与探测所用的秩；
    解耦 RoPE 时是每个频率保留位置的实测增益。"""
    spectrum: torch.Tensor | None
    kl: float | None = None
    probe_rank: int | None = None
    rope_gain: torch.Tensor | None = None


def decoupled(o) -> bool:
    return o.rope == "decoupled"


ROPE_SHARE = 0.2  # of the per-token cache budget, for the shared rotary key (chosen on held-out domains)


def rope_dim(o, lm: LayerMap) -> int:
    """qk_rope_head_dim: as asked; else about a fifth of the cache budget (a multiple of 16), at most the source's
    rotary width. Every dimension the rotary key takes is one the latent lacks; with few KV heads the budget is
    small and DeepSeek-V3's own 64 takes too much of it. An explicit ``kv_lora_rank`` keeps 64."""
    if o.rope_dim is not None:
        return o.rope_dim
    if o.kv_lora_rank is not None:
        return min(64, lm.rotary_dim)
    return min(lm.rotary_dim, max(16, 16 * round(ROPE_SHARE * o.kv_keep * kv_width(lm) / 16)))


class MLAConverter:
    """MLA 技术：替换每层的注意力（配方小节 ``mla``，结构记录键 ``attention``）。"""
    section = "mla"
    structure_key = "attention"

    def check(self, lm: LayerMap, o) -> None:
        lm.require("attention", "q", "k", "v", "o")
        if decoupled(o):
            where = f"第 {lm.index} 层注意力 {lm.prefix}.{lm.attention}"
            if not lm.rotary_dim:
                raise PlanError(f"{where} 没有 RoPE（missing role rotary），解耦 RoPE 无从谈起；请用 --mla-rope latent")
            if lm.q_norm or lm.k_norm:
                raise PlanError(f"{where} 对 q/k 做逐头归一化（{lm.q_norm or lm.k_norm}），是非线性的，"
                                f"DeepSeek-V3 的解耦布局无法表达；请用 --mla-rope latent")
            if rope_dim(o, lm) > lm.rotary_dim:
                raise PlanError(f"--rope-dim {o.rope_dim} 超过 {where} 的旋转维数 {lm.rotary_dim}")

    def captures(self, lm: LayerMap, o) -> list[tuple[str, str]]:
        wants = [(lm.k.module, "cov")]  # k and v read the same input: one covariance serves both
        if o.token_weighting != "uniform":  # the same, each token weighted by the attention it receives
            wants.append((lm.k.module, "cov_attended", lm.attention))
        if decoupled(o):  # measured attention-score errors need whole sequences
            wants.append((lm.k.module, "sequences"))
        return wants

    def planning(self, o) -> Planning:
        """Spectra are needed unless every layer gets the same rank (uniform or an explicit kv_lora_rank)."""
        if decoupled(o):
            return Planning("global", "做解耦 RoPE（频率要看完所有层才能选）")
        if o.kv_lora_rank is None and o.allocation != "uniform":
            style = "global_probe" if o.allocation == "sensitivity" else "global"
            return Planning(style, f"按 {o.allocation} 在层间分配秩（要先看完所有层）", {"allocation": "uniform"})
        return Planning("per_layer")

    def analyse(self, job, layer: nn.Module, lm: LayerMap, stats: dict, o, probe=None) -> Analysis:
        """Planning pass: the (whitened, weighted) singular values of [W_k; W_v] of this layer, and, for
        sensitivity allocation, the KL the model pays when only this layer runs at the uniform rank.
        Decoupled RoPE: the measured gain of keeping each frequency's position (the model picks one set)."""
        if decoupled(o):
            return Analysis(None, rope_gain=rope_split.gains(self._rope_parts(job, layer, lm, stats, o)[2],
                                                             o.rope_residual))
        w = torch.cat([weight_of(layer, lm.k)[0], weight_of(layer, lm.v)[0]])
        cov, fcov = stats.get((lm.k.module, "cov")), fit_covariance(stats, lm, o)
        g = output_weights(layer, lm, cov, o, layer_angles(job.config, lm, job.rotary), fcov)
        out = Analysis(factorize(w, fcov, o.init, g)[1].float())
        if probe is not None and self.planning(o).style == "global_probe":
            out.probe_rank = max(o.min_rank, min(len(out.spectrum), round(o.kv_keep * kv_width(lm))))
            module, _, _ = self.build(job.config, layer, lm, cov, out.probe_rank, o, job.rotary, fcov)
            out.kl = probe(lm.index, lm.attention, module)
        return out

    def plan(self, mm: ModelMap, opts, analyses: list[Analysis]) -> list:
        """Per-layer ranks under the global KV budget (decoupled: one rank and one frequency set for all layers)."""
        if decoupled(opts):
            return self._plan_decoupled(mm, opts, analyses)
        spectra = [a.spectrum if a is not None else None for a in analyses]
        caps = [min(kv_width(lm), mm.hidden_size or kv_width(lm)) for lm in mm.layers]  # the most rank a latent can use
        if opts.kv_lora_rank is not None:
            bad = [i for i, c in enumerate(caps) if opts.kv_lora_rank > c]
            if opts.kv_lora_rank < 1 or bad:
                raise PlanError(f"kv_lora_rank={opts.kv_lora_rank} 不可能：须在 1 与 {min(caps)} 之间"
                                f"（K+V 宽度与隐藏维的较小者）")
            return [opts.kv_lora_rank] * len(caps)
        # full rank (the hidden size) already reproduces K and V exactly: a larger budget has nothing to buy
        budget = min(int(round(opts.kv_keep * sum(kv_width(lm) for lm in mm.layers))), sum(caps))
        if opts.allocation != "sensitivity":
            return allocate(spectra, budget, caps, opts.min_rank, opts.allocation)
        weights = []
        for a in analyses:  # cost of a layer's residual energy = measured KL per unit of residual at the probe rank
            e = a.spectrum.double() ** 2
            residual = float(e[a.probe_rank:].sum() / e.sum().clamp_min(1e-30))
            weights.append(max(a.kl, 1e-12) / max(residual, 1e-12))
        return allocate(spectra, budget, caps, opts.min_rank, "energy", layer_weights=weights)

    def build(self, config, layer: nn.Module, lm: LayerMap, cov: torch.Tensor | None, rank: int, o,
              rotary: nn.Module | None, fit_cov: torch.Tensor | None = None):
        """The latent attention of one layer at ``rank``: (module, structure record, K/V errors, measured under
        ``cov``; the factorisation whitens with ``fit_cov`` when given)."""
        fit_cov = cov if fit_cov is None else fit_cov
        wk, bk = weight_of(layer, lm.k)
        wv, bv = weight_of(layer, lm.v)
        wq, bq = weight_of(layer, lm.q)
        wo, bo = weight_of(layer, lm.o, rows=False)
        w = torch.cat([wk, wv])
        if rank >= w.shape[1]:  # full rank is exact: no weighting, factorization or error to measure
            up, down = low_rank(w, fit_cov, rank)
            errors = {"k_rel_error": 0.0, "v_rel_error": 0.0}
        else:
            g = output_weights(layer, lm, cov, o, layer_angles(config, lm, rotary), fit_cov)
            up, down = low_rank(w, fit_cov, rank, o.init, g)
            errors = _relative_errors(w, up @ down, cov, wk.shape[0])
        attn = layer.get_submodule(lm.attention)
        spec = {
            "path": lm.attention, "hidden_size": wq.shape[1], "num_heads": lm.num_heads,
            "num_kv_heads": lm.num_kv_heads, "head_dim": lm.head_dim, "v_head_dim": len(lm.v.rows[0]),
            "rank": rank, "scaling": lm.scaling, "rotary_dim": lm.rotary_dim,
            "sliding_window": getattr(attn, "sliding_window", None), "out_size": wo.shape[0],
            "q_bias": bq is not None, "k_bias": bk is not None, "v_bias": bv is not None, "o_bias": bo is not None,
            "q_norm": lm.q_norm, "k_norm": lm.k_norm, **attention_extras(config, lm, rotary),
        }
        norms = {r: _head_ordered(attn.get_submodule(spec[r]), lm) if spec[r] else None for r in ("q_norm", "k_norm")}
        # OLMo 2 normalises the whole q (k) projection before the head split; Qwen 3 each head with one weight,
        # Cohere each head with its own ((heads, head_dim)): the weight's last dimension tells
        spec["qk_norm_full"] = any(getattr(m, "weight", None) is not None and m.weight.shape[-1] != lm.head_dim
                                   for m in norms.values() if m is not None)
        new = LatentAttention(spec, config, getattr(attn, "layer_idx", lm.index), **norms)
        dtype = wq.dtype
        with torch.no_grad():
            for lin, weight, bias in ((new.q_proj, wq, bq), (new.o_proj, wo, bo),
                                      (new.kv_a_proj, down, None),
                                      (new.k_b_proj, up[: wk.shape[0]], bk), (new.v_b_proj, up[wk.shape[0]:], bv)):
                lin.weight.copy_(weight.to(dtype))
                if bias is not None:
                    lin.bias.copy_(bias)
        new.to(device=wq.device, dtype=dtype)
        new._rotary = rotary
        return new, spec, errors

    def _plan_decoupled(self, mm: ModelMap, opts, analyses: list[Analysis]) -> list[dict]:
        dim = rope_dim(opts, mm.layers[0])
        half, n = mm.layers[0].rotary_dim // 2, dim // 2
        total = sum(a.rope_gain for a in analyses)
        pairs = rope_split.choose_pairs(opts.rope_method, total, half, n)
        widths = [kv_width(lm) for lm in mm.layers]
        rank = opts.kv_lora_rank
        cap = min(min(widths), mm.hidden_size or min(widths))  # the most rank a latent can use
        if rank is None:  # the cache holds latent + shared rotary key: both count against the budget
            # (with many KV heads the budget can exceed the hidden size, where the latent is already exact)
            rank = min(int(round(opts.kv_keep * sum(widths) / len(widths))) - dim, cap)
        if not 1 <= rank <= cap:
            raise PlanError(f"解耦 RoPE 的 kv_lora_rank={rank} 不可能：须在 1 与 {cap} 之间"
                            f"（--kv-keep {opts.kv_keep} 的预算减去 --rope-dim {dim}）")
        gain = [float(total[i]) for i in range(half)]
        return [{"rank": rank, "pairs": pairs, "gain": gain} for _ in mm.layers]

    def _rope_parts(self, job, layer: nn.Module, lm: LayerMap, stats: dict, o):
        """Source weights (q bias folded), shared keys and per-frequency costs of one layer."""
        cov = stats[(lm.k.module, "cov")]
        seqs = stats[(lm.k.module, "sequences")]
        wq, bq = weight_of(layer, lm.q)
        wk, bk = weight_of(layer, lm.k)
        rot = lm.rotary_dim
        theta, scale = rope_angles(job.rotary, rot)
        q_bias_kept = None
        if bq is not None:  # q_proj has no bias in DeepSeek-V3: least-squares fold of the constant into W_q
            flat = seqs.reshape(-1, seqs.shape[-1]).double()
            coef = torch.linalg.solve(cov.double() + 1e-8 * torch.eye(cov.shape[0], dtype=torch.float64),
                                      flat.mean(0))
            wq = wq.double() + torch.outer(bq.double(), coef)
            q_bias_kept = float(flat.mean(0) @ coef)  # share of a constant the inputs can reproduce linearly
        half = rot // 2
        qc = rope_split.complex_rows(wq, lm.num_heads, lm.head_dim, half)
        kc = rope_split.complex_rows(wk, lm.num_kv_heads, lm.head_dim, half)
        bkc = torch.complex(bk.double().view(lm.num_kv_heads, -1)[:, :half],
                            bk.double().view(lm.num_kv_heads, -1)[:, half:rot]) if bk is not None else None
        sk = rope_split.shared_keys(qc, kc, bkc, cov, fit_covariance(stats, lm, o))
        costs = rope_split.frequency_costs(seqs, wq, None, wk, bk, sk, theta, lm, rot)
        return (wq, wk, bk, scale, q_bias_kept), sk, costs

    def build_decoupled(self, job, layer: nn.Module, lm: LayerMap, stats: dict, plan: dict, o):
        """The decoupled-RoPE latent attention of one layer: (module, structure record, errors)."""
        cov = stats[(lm.k.module, "cov")]
        (wq, wk, bk, scale, q_bias_kept), sk, costs = self._rope_parts(job, layer, lm, stats, o)
        wv, bv = weight_of(layer, lm.v)
        wo, bo = weight_of(layer, lm.o, rows=False)
        pairs, rank, hd = plan["pairs"], plan["rank"], lm.head_dim
        rope = 2 * len(pairs)
        ds_scaling = (hd + rope) ** -0.5
        q_rows, k_rot, k_rot_bias, k_nope = rope_split.decoupled_weights(
            wq, wk, sk, pairs, costs, lm, lm.rotary_dim, scale, lm.scaling / ds_scaling, o.rope_residual)
        heads, groups, per = lm.num_heads, lm.num_kv_heads, lm.num_heads // lm.num_kv_heads
        q_nope = q_rows.view(heads, hd + rope, -1)[:, :hd].reshape(-1, q_rows.shape[-1])
        w = torch.cat([k_nope, wv.double()])
        fcov = fit_covariance(stats, lm, o)
        g = weighting(q_nope, k_nope, wv, wo, lm, cov, o.objective, k_ref=wk, k_weight=o.k_weight, fit_cov=fcov)
        up, down = low_rank(w, fcov, rank, o.init, g)
        errors = _relative_errors(w, up @ down, cov, k_nope.shape[0], k_ref=wk)
        eps = DecoupledLatentAttention.KV_NORM_EPS
        alpha = rope_split.latent_scale(down, cov, eps)
        vd = wv.shape[0] // groups
        up_k, up_v = up[: k_nope.shape[0]].view(groups, hd, rank), up[k_nope.shape[0]:].view(groups, vd, rank)
        kv_b = torch.cat([up_k, up_v], 1).repeat_interleave(per, 0).reshape(-1, rank)
        o_bias = bo.double() if bo is not None else None
        if bv is not None:  # attention weights sum to 1, so V's bias reaches the output as W_o·b_v: exact
            bv_heads = bv.double().view(groups, vd).repeat_interleave(per, 0).reshape(-1)
            o_bias = (o_bias if o_bias is not None else 0) + wo.double() @ bv_heads
        attn = layer.get_submodule(lm.attention)
        spec = {"kind": "decoupled", "path": lm.attention, "hidden_size": wq.shape[1], "num_heads": heads,
                "qk_nope_head_dim": hd, "qk_rope_head_dim": rope, "v_head_dim": vd, "rank": rank,
                "scaling": ds_scaling, "rope_pairs": list(pairs), "rope_half": lm.rotary_dim // 2,
                "kv_a_bias": bk is not None, "o_bias": o_bias is not None, "out_size": wo.shape[0],
                "sliding_window": getattr(attn, "sliding_window", None), "rope_method": o.rope_method,
                **attention_extras(job.config, lm, job.rotary)}
        new = DecoupledLatentAttention(spec, job.config, getattr(attn, "layer_idx", lm.index))
        dtype = weight_of(layer, lm.q)[0].dtype
        with torch.no_grad():
            new.q_proj.weight.copy_(q_rows.to(dtype))
            new.kv_a_proj_with_mqa.weight.copy_(torch.cat([down * alpha, k_rot]).to(dtype))
            if bk is not None:
                new.kv_a_proj_with_mqa.bias.copy_(torch.cat([torch.zeros(rank, dtype=torch.float64), k_rot_bias]))
            new.kv_a_layernorm.weight.fill_(math.sqrt(eps) / alpha)
            new.kv_b_proj.weight.copy_(kv_b.to(dtype))
            new.o_proj.weight.copy_(wo)
            if o_bias is not None:
                new.o_proj.bias.copy_(o_bias.to(dtype))
        new.to(device=wq.device, dtype=dtype)
        new._rotary = job.rotary
        info = {**errors, "rope_pairs": list(pairs), "rope_shared_key_energy": float(sk.captured[pairs].mean()),
                "rope_residual": o.rope_residual}
        if o.rope_residual == "choose":
            keep_inc = (costs["keep_inc"] < costs["keep_drop"])[pairs].sum().item()
            nope_inc = [i for i in range(lm.rotary_dim // 2)
                        if i not in pairs and costs["nope_inc"][i] < costs["nope_drop"][i]]
            info.update({"rope_residual_unrotated": int(keep_inc), "nope_pairs_unrotated": len(nope_inc),
                         "nope_pairs_dropped": lm.rotary_dim // 2 - len(pairs) - len(nope_inc)})
        else:  # the fitted factor's size says how much of the unrotated part the query keeps
            kept_c = costs["keep_factor"][:, pairs].abs()
            info["rope_residual_factor_mean_abs"] = float(kept_c.mean())
        if q_bias_kept is not None:
            info["q_bias_share_kept"] = q_bias_kept
        return new, spec, info

    def convert(self, job, layer: nn.Module, lm: LayerMap, stats: dict, rank, o) -> tuple[dict, dict]:
        """Replace layer ``lm.index``'s attention in place; return its structure record and its errors."""
        if decoupled(o):
            new, spec, info = self.build_decoupled(job, layer, lm, stats, rank, o)
            layer.set_submodule(lm.attention, new)
            return spec, {"rank": rank["rank"], "kv_width": kv_width(lm), **info}
        cov = stats.get((lm.k.module, "cov"))
        new, spec, errors = self.build(job.config, layer, lm, cov, rank, o, job.rotary, fit_covariance(stats, lm, o))
        layer.set_submodule(lm.attention, new)
        return spec, {"rank": rank, "kv_width": kv_width(lm), **errors}

    def summary(self, mm: ModelMap, o, ranks: list, specs: dict) -> dict:
        if decoupled(o):
            p = ranks[0]
            dim = 2 * len(p["pairs"])
            return {"rope": "decoupled", "rope_method": o.rope_method, "rope_residual": o.rope_residual,
                    "qk_rope_head_dim": dim,
                    "rope_pairs": p["pairs"], "rope_gain_per_pair": p["gain"], "kv_lora_rank": p["rank"],
                    "objective": o.objective, "init": o.init, "kv_keep": o.kv_keep,
                    "total_rank": sum(r["rank"] + dim for r in ranks),
                    "source_kv_width": sum(kv_width(lm) for lm in mm.layers)}
        return {"rope": "latent", "objective": o.objective, "init": o.init, "allocation": o.allocation, "kv_keep": o.kv_keep,
                "kv_lora_rank": o.kv_lora_rank, "total_rank": sum(ranks),
                "source_kv_width": sum(kv_width(lm) for lm in mm.layers)}


def _relative_errors(w: torch.Tensor, w_hat: torch.Tensor, cov: torch.Tensor | None, k_rows: int,
                     k_ref: torch.Tensor | None = None) -> dict:
    """Relative Frobenius error of the K and V outputs on the calibration inputs: sqrt(tr(ΔW C ΔWᵀ)/tr(W C Wᵀ)).

    ``k_ref``: the K error relative to these rows' energy (decoupled RoPE: the source's whole K)."""
    c = cov.double() if cov is not None else torch.eye(w.shape[1], dtype=torch.float64)
    out = {}
    for name, sl in (("k", slice(0, k_rows)), ("v", slice(k_rows, None))):
        d = (w.double() - w_hat.double())[sl]  # the difference in float64; its energy may be computed in float32
        num = quad_diag(d, c).sum()
        ref = k_ref if (name == "k" and k_ref is not None) else w[sl]
        den = quad_diag(ref.double(), c).sum().clamp_min(1e-30)
        out[f"{name}_rel_error"] = float((num / den).clamp_min(0).sqrt())
    return out

