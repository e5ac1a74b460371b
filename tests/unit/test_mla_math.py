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
