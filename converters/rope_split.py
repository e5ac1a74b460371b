"""解耦 RoPE（DeepSeek-V2/V3）：决定哪些频率保留位置，并把源注意力拆成 no-position 部分与共享旋转键。

源模型的每个 KV 头在每个 RoPE 频率上都有自己的键（一对维度，视作一个复数）。DeepSeek 的布局只给所有头
一个共享的旋转键，其余部分来自潜在向量、没有位置。做法：

1. **逐频率跨头 PCA**：频率 i 上各 KV 头的键 k_g 用一个共享复数键 s 的倍数 a_g·s 近似（按查询能量加权的
   一阶主成分）。复数倍数与旋转可交换，所以 conj(a_g) 可以精确折进该组每个查询头的查询里；位置信息集中到
   共享旋转键上，剩下的残差 k_g − a_g·s 才是损失。
2. **逐频率的实测代价**（校准文本上）：对每个频率，比较“保留位置”（只丢残差的旋转）与“不保留”（整个键
   失去旋转）时注意力分数的误差，以源注意力概率下的方差 ½·Var_A(Δscore) 计（≈ 该头注意力分布的 KL）。
   失去旋转的部分不带位置放进 no-position 部分，并在查询里乘一个逐头、逐频率拟合的复数因子 c
   （``fitted``，缺省）：真实贡献是 Re(z·e^{jωΔ})，近似为 Re(c·z)，c 在校准文本上按源注意力概率加权的
   最小二乘求得——低频 c≈1（近乎不转），高频时 c 取注意力所在距离上旋转的平均，最近几个 token 的贡献
   因此保留下来。``choose`` 是旧做法：只在 c=1（放进去）与 c=0（丢弃）之间挑代价小的一种。
3. **选择频率**：DeepSeek-V3 的旋转模块只能产生等比数列的频率（``rope_theta``，必要时加线性缩放），所以
   候选是源频率中的等比子集（起点 + 步长）；``calibrated`` 取各层增益之和最大的子集，``high`` / ``low``
   是最高频 / 最低频这两种简单选择，供对比。

复数记法：rotate-half 布局中第 i 对维度是 (i, i + half)，作为复数 re + j·im；旋转即乘 e^{jθ_i·p}；
两个复数的实内积是 Re(q·conj(k))。
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def complex_rows(w: torch.Tensor, heads: int, hd: int, half: int) -> torch.Tensor:
    """(heads, half, d) complex rows of the rotated pairs: row i + j·row (i + half) of each head."""
    w = w.double().view(heads, hd, -1)
    return torch.complex(w[:, :half], w[:, half:2 * half])


@dataclass
class SharedKeys:
    """Per-frequency shared rotary key s_i = rows·x + bias and each KV group's factor a_g,i (k_g ≈ a_g·s)."""
    rows: torch.Tensor      # (half, d) complex
    bias: torch.Tensor      # (half,) complex
    factor: torch.Tensor    # (G, half) complex
    captured: torch.Tensor  # (half,) share of the (query-weighted) key energy the shared key carries


def shared_keys(qc: torch.Tensor, kc: torch.Tensor, bkc: torch.Tensor | None, cov: torch.Tensor,
                key_cov: torch.Tensor | None = None) -> SharedKeys:
    """Query-energy-weighted rank-1 (complex) PCA across KV groups, one frequency at a time.

    ``cov`` weighs the queries (each alike); ``key_cov`` (default ``cov``) the keys, for example by the attention
    each token receives."""
    heads, half, _ = qc.shape
    groups = kc.shape[0]
    c = cov.to(torch.complex128)
    ck = c if key_cov is None else key_cov.to(torch.complex128)
    q_energy = torch.einsum("hid,de,hie->hi", qc, c, qc.conj()).real
    w = q_energy.view(groups, heads // groups, half).sum(1).clamp_min(1e-20)  # (G, half)
    m = torch.einsum("gid,de,kie->igk", kc, ck, kc.conj())  # (half, G, G): E[k_g conj(k_k)]
    root = w.T.sqrt()  # (half, G)
    weighted = root[:, :, None] * m * root[:, None, :]
    evals, evecs = torch.linalg.eigh(weighted)
    u = evecs[:, :, -1]  # (half, G), unit norm
    top = evals[:, -1].clamp_min(1e-30)
    kappa = (m.diagonal(dim1=1, dim2=2).real.mean(1).clamp_min(1e-30) / top).sqrt()  # E|s|² = mean_g E|k_g|²
    b = kappa[:, None] * u.conj() * root  # (half, G): s = Σ_g b_g·k_g
    rows = torch.einsum("ig,gid->id", b, kc)
    bias = torch.einsum("ig,gi->i", b, bkc) if bkc is not None else torch.zeros(half, dtype=torch.complex128)
    factor = (u / (kappa[:, None] * root)).T  # (G, half)
    captured = top / weighted.diagonal(dim1=1, dim2=2).real.sum(1).clamp_min(1e-30)
    return SharedKeys(rows, bias, factor, captured)


def frequency_costs(seqs: torch.Tensor, wq, bq, wk, bk, sk: SharedKeys, theta: torch.Tensor, lm, rot: int,
                    windows: int = 2, queries: int = 64) -> dict:
    """Measured attention-score error per frequency on calibration sequences, for the four ways to treat it.

    ``nope_inc`` / ``nope_drop``：该频率不保留位置，键放进 no-position 部分 / 丢弃；``keep_inc`` / ``keep_drop``：
    保留位置（共享旋转键），PCA 残差放进 no-position 部分 / 丢弃。代价 = Σ_头 mean_查询 Var_A(Δscore)。
    """
    heads, groups, hd = lm.num_heads, lm.num_kv_heads, lm.head_dim
    half, per, scaling = rot // 2, heads // groups, lm.scaling
    names = ("nope_inc", "nope_drop", "keep_inc", "keep_drop")
    out = {n: torch.zeros(half, dtype=torch.float64) for n in names}
    # attention-weighted second moments of (Re z, −Im z, true contribution) per head and frequency, for the fit
    moments = {kind: torch.zeros(6, heads, half, dtype=torch.float64) for kind in ("nope", "keep")}
    seqs = seqs[:windows].double()
    for x in seqs:
        t = x.shape[0]
        q = (x @ wq.double().T + (bq.double() if bq is not None else 0)).view(t, heads, hd)
        k = (x @ wk.double().T + (bk.double() if bk is not None else 0)).view(t, groups, hd)
        qc, kc = torch.complex(q[..., :half], q[..., half:rot]), torch.complex(k[..., :half], k[..., half:rot])
        s = x.to(torch.complex128) @ sk.rows.T + sk.bias  # (t, half)
        r = kc - sk.factor[None] * s[:, None]  # (t, G, half): what the shared key misses
        pos = torch.linspace(t // 8, t - 1, min(queries, t - t // 8)).round().long()
        delta = (pos[:, None] - torch.arange(t)[None]).double()  # (P, t)
        causal = delta >= 0
        spin = torch.polar(torch.ones(1, dtype=torch.float64), delta[..., None] * theta).to(torch.complex64)
        for g in range(groups):  # the heads of one group share its key: one batched product per group
            qg = qc[pos, g * per:(g + 1) * per].transpose(0, 1).to(torch.complex64)[:, :, None, :]  # (per, P, 1, half)
            z_k = qg * kc[:, g].conj().to(torch.complex64)[None, None]  # (per, P, t, half)
            turned = (z_k * spin).real  # each frequency's true contribution to the score
            passed = torch.einsum("hpd,td->hpt", q[pos, g * per:(g + 1) * per, rot:].transpose(0, 1).float(),
                                  k[:, g, rot:].float())
            score = (turned.sum(-1) + passed) * scaling
            probs = torch.softmax(score.masked_fill(~causal, float("-inf")), -1)
            z_r = qg * r[:, g].conj().to(torch.complex64)[None, None]
            turned_r = (z_r * spin).real
            for name, e in (("nope_inc", turned - z_k.real), ("nope_drop", turned),
                            ("keep_inc", turned_r - z_r.real), ("keep_drop", turned_r)):
                e = e * scaling
                mean = torch.einsum("hpt,hpti->hpi", probs, e)
                var = torch.einsum("hpt,hpti->hpi", probs, e * e) - mean * mean
                out[name] += var.double().mean(1).sum(0) / len(seqs)
            for kind, z, y in (("nope", z_k, turned), ("keep", z_r, turned_r)):
                moments[kind][:, g * per:(g + 1) * per] += _weighted_moments(probs, z, y) * scaling ** 2 / (
                    len(pos) * len(seqs))
    for kind in ("nope", "keep"):
        out[kind + "_factor"], out[kind + "_fit"] = _fit_factor(moments[kind])
    return out


def _weighted_moments(probs: torch.Tensor, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Σ over queries of the attention-weighted covariances of u = Re z, v = −Im z and y: (6, per, half) as
    (uu, uv, vv, uy, vy, yy). Re(c·z) = Re(c)·u + Im(c)·v, so these give the least-squares c."""
    feats = (z.real, -z.imag, y)
    means = [torch.einsum("hpt,hpti->hpi", probs, f) for f in feats]
    out = []
    for a, b in ((0, 0), (0, 1), (1, 1), (0, 2), (1, 2), (2, 2)):
        cross = torch.einsum("hpt,hpti->hpi", probs, feats[a] * feats[b]) - means[a] * means[b]
        out.append(cross.double().sum(1))
    return torch.stack(out)


def _fit_factor(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per head and frequency, c = argmin Var_A(y − Re(c·z)); returns (c (heads, half), the cost summed over heads)."""
    uu, uv, vv, uy, vy, yy = m
    ridge = 1e-9 * (uu + vv) + 1e-30
    det = (uu + ridge) * (vv + ridge) - uv * uv
    a = ((vv + ridge) * uy - uv * vy) / det
    b = ((uu + ridge) * vy - uv * uy) / det
    cost = (yy - a * uy - b * vy).clamp_min(0)
    return torch.complex(a, b), cost.sum(0)


def gains(costs: dict, residual: str = "fitted") -> torch.Tensor:
    """Score error saved by keeping each frequency's position (with the residual treatment ``residual``)."""
    if residual == "fitted":
        return costs["nope_fit"] - costs["keep_fit"]
    return torch.minimum(costs["nope_inc"], costs["nope_drop"]) - torch.minimum(costs["keep_inc"], costs["keep_drop"])


def candidate_sets(half: int, n: int) -> list[list[int]]:
    """Every geometric subset of the source frequencies of size n: start + stride·j (what one rope_theta can make)."""
    if n > half:
        return []
    sets = []
    for stride in range(1, (half - 1) // max(n - 1, 1) + 1 if n > 1 else 2):
        for start in range(0, half - (n - 1) * stride):
            sets.append([start + stride * j for j in range(n)])
    return sets


def choose_pairs(method: str, total_gain: torch.Tensor | None, half: int, n: int) -> list[int]:
    """The source frequency pairs (indices, highest frequency first) whose position the shared key keeps."""
    if method == "high":
        return list(range(n))
    if method == "low":
        return list(range(half - n, half))
    return max(candidate_sets(half, n), key=lambda s: float(total_gain[s].sum()))


def decoupled_weights(wq, wk, sk: SharedKeys, pairs: list[int], costs: dict, lm, rot: int, scale: torch.Tensor,
                      ratio: float, residual: str = "fitted"):
    """DeepSeek-layout weights of one layer.

    Returns (q rows (H·(hd+2n), d), shared rotary key rows (2n, d) and bias (2n,), K_nope rows (G·hd, d)).
    Query rows of each head: [no-position part (hd dims); rotary part (2n dims, rotate-half order)];
    ``ratio`` folds the change of softmax scale into the query.
    """
    heads, groups, hd = lm.num_heads, lm.num_kv_heads, lm.head_dim
    half, per, n = rot // 2, heads // groups, len(pairs)
    kept = set(pairs)
    fitted = residual == "fitted"
    keep_inc = costs["keep_inc"] < costs["keep_drop"] if not fitted else torch.ones(half, dtype=torch.bool)
    nope_inc = costs["nope_inc"] < costs["nope_drop"] if not fitted else torch.ones(half, dtype=torch.bool)
    qc = complex_rows(wq, heads, hd, half)
    kc = complex_rows(wk, groups, hd, half)
    wq, wk = wq.double().view(heads, hd, -1), wk.double().view(groups, hd, -1)
    d = wq.shape[-1]
    q_out = torch.zeros(heads, hd + 2 * n, d, dtype=torch.float64)
    k_nope = torch.zeros(groups, hd, d, dtype=torch.float64)
    for g in range(groups):
        for i in range(half):
            if (i in kept and keep_inc[i]) or (i not in kept and nope_inc[i]):
                row = kc[g, i] - sk.factor[g, i] * sk.rows[i] if i in kept else kc[g, i]
                k_nope[g, i], k_nope[g, i + half] = row.real, row.imag
        k_nope[g, rot:] = wk[g, rot:]
    for h in range(heads):
        g = h // per
        for i in range(half):
            if (i in kept and keep_inc[i]) or (i not in kept and nope_inc[i]):
                # the source rotary scales cos/sin (attention_scaling): the unrotated copy keeps that factor
                c = costs["keep_factor" if i in kept else "nope_factor"][h, i] if fitted else 1.0
                row = qc[h, i] * c * scale[i] ** 2
                q_out[h, i], q_out[h, i + half] = row.real, row.imag
        q_out[h, rot:hd] = wq[h, rot:]
        for j, i in enumerate(pairs):
            row = qc[h, i] * sk.factor[g, i].conj()
            q_out[h, hd + j], q_out[h, hd + n + j] = row.real, row.imag
    idx = torch.tensor(pairs, dtype=torch.long)
    k_rot = torch.cat([sk.rows[idx].real, sk.rows[idx].imag])
    k_rot_bias = torch.cat([sk.bias[idx].real, sk.bias[idx].imag])
    return (q_out * ratio).reshape(-1, d), k_rot, k_rot_bias, k_nope.reshape(-1, d)


def latent_scale(down: torch.Tensor, cov: torch.Tensor, eps: float, headroom: float = 1e-4) -> float:
    """α such that the scaled latent's mean square is ``headroom``·eps: RMSNorm(α·c) is then linear in c.

    DeepSeek normalises the latent (``kv_a_layernorm``) before caching it; a per-token RMS would change every
    key and value. In this regime RMSNorm(α·c)·w = c·(1 − headroom/2) with w = √eps/α, so the layer keeps the
    source's function and the cached latent keeps its scale.
    """
    ms = float(torch.einsum("ij,jk,ik->", down.double(), cov.double(), down.double())) / down.shape[0]
    return math.sqrt(headroom * eps / max(ms, 1e-30))
