"""MLA（潜在模式）：把每层的 K、V 换成一个小潜在向量的上投影。

初始化：对拼接的 [W_k; W_v] 做 SVD。``whitened``（默认）先乘以该层校准输入协方差的
Cholesky 因子 L（SVD-LLM 做法），使截断误差等于输出误差 ||ΔW·X||；``plain`` 直接对权重做 SVD，
仅供对比。偏置留在上投影中，精确保留。秩在一个全局预算下按白化谱逐层分配。
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from patcher.locate import LayerMap, ModelMap
from patcher.modeling import LatentAttention

from . import register
from .weights import weight_of


class PlanError(ValueError):
    """配方中的秩或预算不可能实现时抛出。"""


def kv_width(lm: LayerMap) -> int:
    """Elements per token that the source caches in this layer (K plus V)."""
    return len(lm.k.flat_rows) + len(lm.v.flat_rows)


def whitening(cov: torch.Tensor) -> torch.Tensor:
    """Cholesky factor L of the input covariance (damped until it is positive definite)."""
    cov = cov.double()
    damp = 1e-6 * cov.diagonal().mean().clamp_min(1e-12)
    eye = torch.eye(cov.shape[0], dtype=cov.dtype)
    for _ in range(8):
        L, info = torch.linalg.cholesky_ex(cov + damp * eye)
        if int(info) == 0:
            return L
        damp *= 10
    raise PlanError("校准输入协方差无法分解（全零或含 NaN？）")


def factorize(w: torch.Tensor, cov: torch.Tensor | None, init: str, g: torch.Tensor | None = None):
    """SVD of G·W·L: L whitens the input side (init == 'whitened'), G weights the output side (or None).

    Returns U, S, Vh (of the weighted matrix), L (or None); the rank-r factors are then
    up = G⁻¹·U_r·√S_r and down = √S_r·Vh_r·L⁻¹.
    """
    w = w.double()
    L = whitening(cov) if init == "whitened" else None
    m = w @ L if L is not None else w
    if g is not None:
        m = g @ m
    U, S, Vh = torch.linalg.svd(m, full_matrices=False)
    return U, S, Vh, L


def low_rank(w: torch.Tensor, cov: torch.Tensor | None, rank: int, init: str = "whitened",
             g: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-``rank`` factors (up, down) with W ≈ up·down, minimising the (G-weighted, input-whitened) error."""
    U, S, Vh, L = factorize(w, cov, init, g)
    root = S[:rank].sqrt()
    up = U[:, :rank] * root
    if g is not None:
        up = torch.linalg.solve(g, up)
    down = root[:, None] * Vh[:rank]
    if L is not None:  # undo the whitening on the input side: down · L⁻¹
        down = torch.linalg.solve_triangular(L, down, upper=False, left=False)
    return up, down


def output_weights(layer: nn.Module, lm: LayerMap, cov: torch.Tensor, objective: str) -> torch.Tensor | None:
    """Output-side weighting of the joint [W_k; W_v] rows for the SVD objective.

    ``kv``：不加权（K 与 V 输出误差的平方和）。``balanced``：K 块与 V 块各自归一到单位能量，
    使两者的相对误差同等重要。``attention``：K 的每一维按对应查询能量加权（注意力分数误差
    q·Δk；RoPE 下同一频率对的两维取平均），V 按 W_o 加权（输出误差 W_o·Δv），再各自归一。
    """
    if objective == "kv":
        return None
    wk, _ = weight_of(layer, lm.k)
    wv, _ = weight_of(layer, lm.v)
    c = cov.double()
    nk, nv = wk.shape[0], wv.shape[0]
    gk = torch.ones(nk, dtype=torch.float64)
    gv = torch.eye(nv, dtype=torch.float64)
    if objective == "attention":
        wq, _ = weight_of(layer, lm.q)
        q_energy = torch.einsum("ij,jk,ik->i", wq.double(), c, wq.double()).view(lm.num_heads, lm.head_dim)
        rot = lm.rotary_dim
        if rot:
            half = rot // 2
            pair = (q_energy[:, :half] + q_energy[:, half:rot]) / 2
            q_energy = torch.cat([pair, pair, q_energy[:, rot:]], dim=1)
        group = lm.num_heads // lm.num_kv_heads
        gk = q_energy.view(lm.num_kv_heads, group, lm.head_dim).sum(1).clamp_min(1e-12).sqrt().reshape(-1)
        wo, _ = weight_of(layer, lm.o, rows=False)
        vd = len(lm.v.rows[0])
        blocks = []
        for g_idx in range(lm.num_kv_heads):
            m = torch.zeros(vd, vd, dtype=torch.float64)
            for h in range(g_idx * group, (g_idx + 1) * group):
                cols = wo[:, h * vd:(h + 1) * vd].double()
                m += cols.T @ cols
            evals, evecs = torch.linalg.eigh(m)
            blocks.append(evecs @ torch.diag(evals.clamp_min(1e-12).sqrt()) @ evecs.T)
        gv = torch.block_diag(*blocks)
    ek = torch.einsum("ij,jk,ik->", gk[:, None] * wk.double(), c, gk[:, None] * wk.double())
    ev = torch.einsum("ij,jk,ik->", gv @ wv.double(), c, gv @ wv.double())
    return torch.block_diag(torch.diag(gk) / ek.sqrt(), gv / ev.sqrt())


def allocate(spectra: list[torch.Tensor], budget: int, caps: list[int], min_rank: int, mode: str,
             layer_weights: list[float] | None = None) -> list[int]:
    """Split a total rank budget over layers; spectra are each layer's (weighted, whitened) singular values.

    ``uniform``：每层同秩。``energy``：取全模型中归一化能量 s²/Σs² 最大的 ``budget`` 个分量，即让各层
    相对误差之和最小。``log``：让各层相对残差的对数之和最小——每加一维秩的收益是残差缩小的比例，
    所以谱尾部仍有分量的层不会被饿死。贪心在这两个目标上都是最优的（收益随秩递减）。
    ``layer_weights`` 给每层的能量乘一个代价系数（敏感度分配：实测的 KL / 相对残差）。
    """
    n = len(spectra)
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


@dataclass
class Analysis:
    """规划轮中一层的结果：白化（加权）谱；按敏感度分配时还有实测的 KL 与探测所用的秩。"""
    spectrum: torch.Tensor
    kl: float | None = None
    probe_rank: int | None = None


class MLAConverter:
    section = "mla"
    structure_key = "attention"

    def enabled(self, recipe) -> bool:
        return recipe.mla.enabled

    def check(self, lm: LayerMap) -> None:
        lm.require("attention", "q", "k", "v", "o")

    def captures(self, lm: LayerMap, recipe) -> list[tuple[str, str]]:
        return [(lm.k.module, "cov")]  # k and v read the same input: one covariance serves both

    def needs_analysis(self, recipe) -> bool:
        return True

    def needs_probe(self, recipe) -> bool:
        return recipe.mla.allocation == "sensitivity" and recipe.mla.kv_lora_rank is None

    def analyse(self, layer: nn.Module, lm: LayerMap, stats: dict, recipe, probe=None) -> Analysis:
        """Planning pass: the (whitened, weighted) singular values of [W_k; W_v] of this layer, and, for
        sensitivity allocation, the KL the model pays when only this layer runs at the uniform rank."""
        w = torch.cat([weight_of(layer, lm.k)[0], weight_of(layer, lm.v)[0]])
        cov = stats.get((lm.k.module, "cov"))
        g = output_weights(layer, lm, cov, recipe.mla.objective)
        out = Analysis(factorize(w, cov, recipe.mla.init, g)[1].float())
        if probe is not None and self.needs_probe(recipe):
            out.probe_rank = max(recipe.mla.min_rank, min(len(out.spectrum), round(recipe.mla.kv_keep * kv_width(lm))))
            module, _, _ = self.build(probe.config, layer, lm, cov, out.probe_rank, recipe, probe.rotary)
            out.kl = probe(lm.index, lm.attention, module)
        return out

    def plan(self, mm: ModelMap, recipe, analyses: list[Analysis]) -> list[int]:
        """Per-layer ranks under the global KV budget."""
        opts = recipe.mla
        spectra = [a.spectrum for a in analyses]
        caps = [len(s) for s in spectra]  # min(K+V width, hidden size): the most rank a latent can use
        if opts.kv_lora_rank is not None:
            bad = [i for i, c in enumerate(caps) if opts.kv_lora_rank > c]
            if opts.kv_lora_rank < 1 or bad:
                raise PlanError(f"kv_lora_rank={opts.kv_lora_rank} 不可能：须在 1 与 {min(caps)} 之间"
                                f"（K+V 宽度与隐藏维的较小者）")
            return [opts.kv_lora_rank] * len(caps)
        budget = int(round(opts.kv_keep * sum(kv_width(lm) for lm in mm.layers)))
        if opts.allocation != "sensitivity":
            return allocate(spectra, budget, caps, opts.min_rank, opts.allocation)
        weights = []
        for a in analyses:  # cost of a layer's residual energy = measured KL per unit of residual at the probe rank
            e = a.spectrum.double() ** 2
            residual = float(e[a.probe_rank:].sum() / e.sum().clamp_min(1e-30))
            weights.append(max(a.kl, 1e-12) / max(residual, 1e-12))
        return allocate(spectra, budget, caps, opts.min_rank, "energy", layer_weights=weights)

    def build(self, config, layer: nn.Module, lm: LayerMap, cov: torch.Tensor | None, rank: int, recipe,
              rotary: nn.Module | None):
        """The latent attention of one layer at ``rank``: (module, structure record, K/V errors)."""
        wk, bk = weight_of(layer, lm.k)
        wv, bv = weight_of(layer, lm.v)
        wq, bq = weight_of(layer, lm.q)
        wo, bo = weight_of(layer, lm.o, rows=False)
        w = torch.cat([wk, wv])
        g = output_weights(layer, lm, cov, recipe.mla.objective)
        up, down = low_rank(w, cov, rank, recipe.mla.init, g)
        errors = _relative_errors(w, up @ down, cov, wk.shape[0])
        attn = layer.get_submodule(lm.attention)
        spec = {
            "path": lm.attention, "hidden_size": wq.shape[1], "num_heads": lm.num_heads,
            "num_kv_heads": lm.num_kv_heads, "head_dim": lm.head_dim, "v_head_dim": len(lm.v.rows[0]),
            "rank": rank, "scaling": lm.scaling, "rotary_dim": lm.rotary_dim,
            "sliding_window": getattr(attn, "sliding_window", None), "out_size": wo.shape[0],
            "q_bias": bq is not None, "k_bias": bk is not None, "v_bias": bv is not None, "o_bias": bo is not None,
            "q_norm": lm.q_norm, "k_norm": lm.k_norm,
        }
        norms = {r: (attn.get_submodule(spec[r]) if spec[r] else None) for r in ("q_norm", "k_norm")}
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

    def convert(self, ctx, layer: nn.Module, lm: LayerMap, stats: dict, rank: int, recipe) -> tuple[dict, dict]:
        """Replace layer ``lm.index``'s attention in place; return its structure record and its errors."""
        cov = stats.get((lm.k.module, "cov"))
        new, spec, errors = self.build(ctx.config, layer, lm, cov, rank, recipe, ctx.rotary)
        layer.set_submodule(lm.attention, new)
        return spec, {"rank": rank, "kv_width": kv_width(lm), **errors}

    def summary(self, mm: ModelMap, recipe, ranks: list[int]) -> dict:
        o = recipe.mla
        return {"objective": o.objective, "init": o.init, "allocation": o.allocation, "kv_keep": o.kv_keep,
                "kv_lora_rank": o.kv_lora_rank, "total_rank": sum(ranks),
                "source_kv_width": sum(kv_width(lm) for lm in mm.layers)}


def _relative_errors(w: torch.Tensor, w_hat: torch.Tensor, cov: torch.Tensor | None, k_rows: int) -> dict:
    """Relative Frobenius error of the K and V outputs on the calibration inputs: sqrt(tr(ΔW C ΔWᵀ)/tr(W C Wᵀ))."""
    c = cov.double() if cov is not None else torch.eye(w.shape[1], dtype=torch.float64)
    out = {}
    for name, sl in (("k", slice(0, k_rows)), ("v", slice(k_rows, None))):
        d = (w - w_hat)[sl]
        num = torch.einsum("ij,jk,ik->", d, c, d)
        den = torch.einsum("ij,jk,ik->", w[sl].double(), c, w[sl].double()).clamp_min(1e-30)
        out[f"{name}_rel_error"] = float((num / den).clamp_min(0).sqrt())
    return out


register(MLAConverter())
