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
