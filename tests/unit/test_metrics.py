import math

import torch

from patcher.evaluation.metrics import BLOCK, block_sums, increase_interval
from patcher.evaluation.render import interval


def test_a_constant_difference_has_no_sampling_error():
    se, (low, high) = increase_interval(*block_sums(torch.full((1000,), 0.02, dtype=torch.float64)))
    assert se < 1e-9
    assert math.isclose(low, 100 * (math.exp(0.02) - 1), rel_tol=1e-9) and math.isclose(low, high, rel_tol=1e-9)


def test_the_interval_covers_the_true_increase_about_95_percent_of_the_time():
    g = torch.Generator().manual_seed(0)
    sigma, n, mean, trials, covered, ses = 0.3, 2048, 0.02, 400, 0, []
    for _ in range(trials):
        se, (low, high) = increase_interval(*block_sums(mean + sigma * torch.randn(n, generator=g, dtype=torch.float64)))
        covered += low <= 100 * (math.exp(mean) - 1) <= high
        ses.append(se)
    assert 0.90 <= covered / trials <= 0.99
    # the standard error of a mean of n independent tokens: σ/√n (in percent of the log-ratio)
    assert math.isclose(sum(ses) / trials, 100 * sigma / math.sqrt(n), rel_tol=0.1)


def test_a_single_block_gives_no_interval_and_the_report_shows_a_dash():
    assert increase_interval(*block_sums(torch.randn(BLOCK))) is None
    assert interval({"ppl_increase_ci95_pct": None}) == "—" and interval({}) == "—"
    assert interval({"ppl_increase_ci95_pct": [1.234, 2.5]}) == "+1.23 … +2.50 %"


def _report(domains: dict) -> dict:
    """A fidelity report whose domains have the given (point, [low, high]) increases; the worst leads."""
    ds = {n: {"ppl_increase_pct": p, "ppl_increase_ci95_pct": ci, "ppl_base": 10.0, "ppl_patched": 10.0 * (1 + p / 100)}
          for n, (p, ci) in domains.items()}
    worst = max(ds, key=lambda n: ds[n]["ppl_increase_pct"])
    return {"fidelity": {**ds[worst], "worst_domain": worst, "domains": ds}}


def test_check_sure_gates_on_every_domains_upper_bound():
    from patcher.evaluation.gate import check

    # the worst point estimate passes 2 %, but another domain's interval reaches above it
    rep = _report({"code": (1.9, [1.0, 2.8]), "chat": (1.2, [0.9, 1.5])})
    assert check(rep, max_ppl_increase=2.0) == []
    failures = check(rep, max_ppl_increase=2.0, sure=True)
    assert len(failures) == 1 and "code" in failures[0] and "chat" not in failures[0] and "+2.80" in failures[0]
    assert check(rep, max_ppl_increase=3.0, sure=True) == []
    # the point estimate failing is reported as before, the interval on top of it
    assert len(check(rep, max_ppl_increase=1.5, sure=True)) == 2


def test_check_sure_refuses_what_it_cannot_judge():
    import pytest

    from patcher.errors import RecipeError
    from patcher.evaluation.gate import check

    with pytest.raises(RecipeError, match="--max-ppl-increase"):
        check(_report({"code": (1.0, [0.5, 1.5])}), min_top1=0.5, sure=True)
    old = _report({"code": (1.0, None)})  # a report written before intervals existed
    failures = check(old, max_ppl_increase=2.0, sure=True)
    assert len(failures) == 1 and "没有困惑度上升的区间" in failures[0]
    assert check(old, max_ppl_increase=2.0) == []
