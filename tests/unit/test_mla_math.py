import pytest
import torch

from converters.mla import PlanError, allocate, factorize


def test_uniform_allocation_spends_the_budget_evenly():
    spectra = [torch.ones(10)] * 3
    assert allocate(spectra, 16, [10, 10, 10], 1, "uniform") == [6, 5, 5]


def test_global_allocation_gives_rank_where_the_spectrum_is_flat():
    steep = torch.tensor([10.0, 1e-3, 1e-3, 1e-3])
    flat = torch.ones(4)
    ranks = allocate([steep, flat], 5, [4, 4], 1, "energy")
    assert sum(ranks) == 5 and ranks[1] == 4 and ranks[0] == 1


@pytest.mark.parametrize("budget", [1, 100])
def test_impossible_budget_is_refused(budget):
    with pytest.raises(PlanError):
        allocate([torch.ones(4)] * 2, budget, [4, 4], 1, "energy")


def test_whitened_svd_beats_plain_svd_on_the_output_error():
    torch.manual_seed(0)
    d, out, r = 32, 24, 6
    mix = torch.randn(d, d) * torch.logspace(0, -3, d)  # strongly anisotropic inputs
    x = torch.randn(4096, d) @ mix.T
    cov = (x.T @ x / x.shape[0]).double()
    w = torch.randn(out, d).double()
    errs = {}
    for init in ("plain", "whitened"):
        U, S, Vh, L = factorize(w, cov, init)
        down = S[:r, None] * Vh[:r]
        if L is not None:
            down = torch.linalg.solve_triangular(L, down, upper=False, left=False)
        w_hat = U[:, :r] @ down
        errs[init] = float(((x.double() @ (w - w_hat).T) ** 2).sum())
    assert errs["whitened"] < 0.5 * errs["plain"]


def test_layer_weights_steer_the_energy_allocation():
    same = [torch.ones(4), torch.ones(4)]
    assert allocate(same, 6, [4, 4], 1, "energy", layer_weights=[10.0, 1.0]) == [4, 2]
    assert allocate(same, 6, [4, 4], 1, "energy", layer_weights=[1.0, 10.0]) == [2, 4]


def _rotation(theta: torch.Tensor, delta: int, dim: int) -> torch.Tensor:
    """Rotate-half RoPE rotation of the first 2·len(θ) of ``dim`` dims at relative position ``delta``."""
    half = len(theta)
    r = torch.eye(dim, dtype=torch.float64)
    for i in range(half):
        c, s = torch.cos(theta[i] * delta), torch.sin(theta[i] * delta)
        r[i, i], r[i, i + half], r[i + half, i], r[i + half, i + half] = c, -s, s, c
    return r


def test_rope_averaged_is_the_mean_over_causal_relative_positions():
    from converters.mla import rope_averaged
    torch.manual_seed(0)
    a = torch.randn(10, 10, dtype=torch.float64)
    m, theta, span = a @ a.T, torch.rand(3, dtype=torch.float64), 37  # 6 rotated dims, 4 not
    explicit = sum(_rotation(theta, -d, 10).T @ m @ _rotation(theta, -d, 10) for d in range(span)) / span
    assert torch.allclose(rope_averaged(m, theta, span), explicit, atol=1e-12)


def test_attention_cov_weighting_measures_the_position_averaged_score_error():
    """||G_K·ΔK||² (inputs whitened) equals the mean over query heads and causal distances of (qᵀ·R_Δ·Δk)²."""
    from types import SimpleNamespace

    from converters.mla import ROPE_SPAN, weighting
    torch.manual_seed(1)
    heads, kv_heads, hd, hidden = 4, 2, 6, 12
    lm = SimpleNamespace(num_heads=heads, num_kv_heads=kv_heads, head_dim=hd, rotary_dim=hd)
    wq, wk = torch.randn(heads * hd, hidden), torch.randn(kv_heads * hd, hidden)
    wv, wo = torch.randn(kv_heads * hd, hidden), torch.randn(hidden, heads * hd)
    cov, theta = torch.eye(hidden), torch.rand(hd // 2, dtype=torch.float64)
    g = weighting(wq, wk, wv, wo, lm, cov, "attention_cov", theta=theta)
    dk = torch.randn(kv_heads * hd, hidden, dtype=torch.float64)  # an error of W_k; with C = I, E[x xᵀ] = I
    weighted = (g @ torch.cat([dk, torch.zeros_like(wv, dtype=torch.float64)]))[: kv_heads * hd].pow(2).sum()
    score = 0.0
    for d in range(ROPE_SPAN):
        r = _rotation(theta, -d, hd)
        for h in range(heads):
            grp = h // (heads // kv_heads)
            # E over independent query and key inputs of (q_hᵀ R Δk)² = ||W_q,h ᵀ·R·ΔK_g||_F² when both are white
            score += (wq[h * hd:(h + 1) * hd].double().T @ r @ dk[grp * hd:(grp + 1) * hd]).pow(2).sum()
    # the weighting divides K by its own weighted energy: undo that to compare with the raw score error
    k_energy = sum((_sqrt_k(wq, g_, hd, heads, kv_heads, theta) @ wk.double()[g_ * hd:(g_ + 1) * hd]).pow(2).sum()
                   for g_ in range(kv_heads))
    assert torch.allclose(weighted * k_energy, score / ROPE_SPAN, rtol=1e-6)


def _sqrt_k(wq, g_, hd, heads, kv_heads, theta):
    from converters.mla import ROPE_SPAN, _sqrt_psd, rope_averaged
    per = heads // kv_heads
    q = wq.double()[g_ * per * hd:(g_ + 1) * per * hd].view(per, hd, -1)
    return _sqrt_psd(rope_averaged(torch.einsum("hdi,hei->de", q, q), theta, ROPE_SPAN))
