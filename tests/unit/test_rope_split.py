"""解耦 RoPE 的部件：等比候选集、频率选择、跨头 PCA、潜在向量的线性区缩放。"""

import math

import torch

from converters import rope_split
from patcher.runtime.mtp import RMSNorm


def test_candidate_sets_are_exactly_the_geometric_subsets():
    sets = rope_split.candidate_sets(8, 3)
    assert [0, 1, 2] in sets and [5, 6, 7] in sets and [0, 2, 4] in sets and [1, 4, 7] in sets
    assert all(s[2] - s[1] == s[1] - s[0] > 0 and s[2] <= 7 for s in sets)
    assert len(sets) == len({tuple(s) for s in sets}) == 6 + 4 + 2  # strides 1, 2, 3


def test_choose_pairs():
    gain = torch.tensor([0.0, 5.0, 0.0, 5.0, 0.0, 5.0, 1.0, 1.0])
    assert rope_split.choose_pairs("high", gain, 8, 3) == [0, 1, 2]
    assert rope_split.choose_pairs("low", gain, 8, 3) == [5, 6, 7]
    assert rope_split.choose_pairs("calibrated", gain, 8, 3) == [1, 3, 5]  # stride 2 catches every 5


def test_shared_key_is_exact_when_groups_hold_rotated_copies_of_one_key():
    torch.manual_seed(0)
    d, half = 12, 4
    base = torch.complex(torch.randn(half, d, dtype=torch.float64), torch.randn(half, d, dtype=torch.float64))
    mult = torch.polar(torch.rand(2, half, dtype=torch.float64) + 0.5, torch.rand(2, half, dtype=torch.float64) * 6)
    kc = mult[:, :, None] * base[None]  # group g = a complex multiple of one key at every frequency
    qc = torch.complex(torch.randn(4, half, d, dtype=torch.float64), torch.randn(4, half, d, dtype=torch.float64))
    sk = rope_split.shared_keys(qc, kc, None, torch.eye(d, dtype=torch.float64))
    assert torch.allclose(sk.captured, torch.ones(half, dtype=torch.float64))
    approx = sk.factor[:, :, None] * sk.rows[None]
    assert torch.allclose(approx, kc, atol=1e-10)


def test_latent_scale_makes_rmsnorm_linear():
    torch.manual_seed(0)
    down = torch.randn(16, 32, dtype=torch.float64)
    cov = torch.eye(32, dtype=torch.float64)
    eps = 1e-6
    alpha = rope_split.latent_scale(down, cov, eps)
    x = torch.randn(64, 32, dtype=torch.float64)
    c = x @ down.T
    norm = RMSNorm(16, eps).double()
    with torch.no_grad():
        norm.weight.fill_(math.sqrt(eps) / alpha)
        out = norm(alpha * c)
    assert (out - c).abs().max() / c.abs().max() < 1e-3


def test_fitted_factor_recovers_a_known_complex_factor():
    torch.manual_seed(1)
    per, p, t, half = 2, 5, 30, 3
    probs = torch.softmax(torch.randn(per, p, t), -1)
    z = torch.complex(torch.randn(per, p, t, half), torch.randn(per, p, t, half))
    c0 = torch.complex(torch.randn(per, 1, 1, half), torch.randn(per, 1, 1, half))
    y = (c0 * z).real + 3.0  # a constant shift per query does not matter to softmax
    factor, cost = rope_split._fit_factor(rope_split._weighted_moments(probs, z, y))
    assert torch.allclose(factor, c0[:, 0, 0].to(factor.dtype), atol=1e-4)
    assert cost.abs().max() < 1e-4  # float32 moments; the residual variance itself is about 1 per query


def _split_setup(seed: int, t: int):
    """A 4-head, 2-group, head-width-8 attention on random inputs: its weights, shared keys and frequency costs."""
    from types import SimpleNamespace

    torch.manual_seed(seed)
    heads, groups, hd, d = 4, 2, 8, 16
    lm = SimpleNamespace(num_heads=heads, num_kv_heads=groups, head_dim=hd, scaling=hd ** -0.5)
    wq, wk = torch.randn(heads * hd, d), torch.randn(groups * hd, d)
    half = hd // 2
    theta = 10000.0 ** (-torch.arange(half, dtype=torch.float64) / half)
    qc, kc = rope_split.complex_rows(wq, heads, hd, half), rope_split.complex_rows(wk, groups, hd, half)
    sk = rope_split.shared_keys(qc, kc, None, torch.eye(d, dtype=torch.float64))
    costs = rope_split.frequency_costs(torch.randn(2, t, d), wq, None, wk, None, sk, theta, lm, hd)
    return lm, wq, wk, qc, sk, costs


def test_fitted_residual_costs_no_more_than_including_or_dropping_it():
    lm, _, _, _, _, costs = _split_setup(2, 48)
    heads, half = lm.num_heads, lm.head_dim // 2
    for kind in ("keep", "nope"):
        best = torch.minimum(costs[kind + "_inc"], costs[kind + "_drop"])
        assert (costs[kind + "_fit"] <= best * (1 + 1e-6) + 1e-9).all()
        assert costs[kind + "_factor"].shape == (heads, half)
    # the slowest frequency barely turns within 48 tokens: its factor is close to 1 (include as it is)
    assert abs(costs["nope_factor"][:, -1].mean() - 1) < 0.1


def test_default_rope_dim_is_a_fifth_of_the_cache_budget_within_the_rotary_width():
    from types import SimpleNamespace as N

    from converters.mla import rope_dim

    def lm(kv_heads, hd):
        rows = N(flat_rows=range(kv_heads * hd))
        return N(k=rows, v=rows, rotary_dim=hd)

    opts = N(rope_dim=None, kv_lora_rank=None, kv_keep=0.6)
    assert rope_dim(opts, lm(3, 64)) == 48  # SmolLM2: 230 numbers per token, 48 of them the rotary key
    assert rope_dim(N(rope_dim=None, kv_lora_rank=None, kv_keep=0.5), lm(3, 64)) == 32
    assert rope_dim(opts, lm(8, 128)) == 128  # a large budget keeps every source frequency
    assert rope_dim(N(rope_dim=None, kv_lora_rank=100, kv_keep=0.6), lm(3, 64)) == 64
    assert rope_dim(N(rope_dim=24, kv_lora_rank=None, kv_keep=0.6), lm(3, 64)) == 24


def test_decoupled_query_rows_carry_the_fitted_factor_or_the_plain_choice():
    lm, wq, wk, qc, sk, costs = _split_setup(3, 40)
    heads, groups, hd, d = lm.num_heads, lm.num_kv_heads, lm.head_dim, wq.shape[1]
    half = hd // 2
    pairs, scale = [0, 1], torch.ones(half, dtype=torch.float64)
    for residual in ("fitted", "choose"):
        q, k_rot, _, k_nope = rope_split.decoupled_weights(wq, wk, sk, pairs, costs, lm, hd, scale, 1.0, residual)
        q = q.view(heads, hd + 4, d)
        assert k_rot.shape == (4, d) and k_nope.shape == (groups * hd, d)
        i, h = 2, 1  # a frequency whose position is not kept, in head 1
        c = costs["nope_factor"][h, i] if residual == "fitted" else (
            1.0 if costs["nope_inc"][i] < costs["nope_drop"][i] else 0.0)
        want = qc[h, i] * c
        assert torch.allclose(q[h, i], want.real) and torch.allclose(q[h, i + half], want.imag)
