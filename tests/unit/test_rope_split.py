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
