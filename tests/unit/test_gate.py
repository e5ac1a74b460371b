"""dsopt check 的门禁：点估计与 ``--sure``（每个领域区间的上界）。"""

import pytest

from patcher.errors import RecipeError
from patcher.evaluation.gate import check


def _report(domains: dict) -> dict:
    """A fidelity report whose domains have the given (point, [low, high]) increases; the worst leads."""
    ds = {n: {"ppl_increase_pct": p, "ppl_increase_ci95_pct": ci, "ppl_base": 10.0, "ppl_patched": 10.0 * (1 + p / 100)}
          for n, (p, ci) in domains.items()}
    worst = max(ds, key=lambda n: ds[n]["ppl_increase_pct"])
    return {"fidelity": {**ds[worst], "worst_domain": worst, "domains": ds}}


def test_check_sure_gates_on_every_domains_upper_bound():
    # the worst point estimate passes 2 %, but another domain's interval reaches above it
    rep = _report({"code": (1.9, [1.0, 2.8]), "chat": (1.2, [0.9, 1.5])})
    assert check(rep, max_ppl_increase=2.0) == []
    failures = check(rep, max_ppl_increase=2.0, sure=True)
    assert len(failures) == 1 and "code" in failures[0] and "chat" not in failures[0] and "+2.80" in failures[0]
    assert check(rep, max_ppl_increase=3.0, sure=True) == []
    # the point estimate failing is reported as before, the interval on top of it
    assert len(check(rep, max_ppl_increase=1.5, sure=True)) == 2


def test_check_sure_refuses_what_it_cannot_judge():
    with pytest.raises(RecipeError, match="--max-ppl-increase"):
        check(_report({"code": (1.0, [0.5, 1.5])}), min_top1=0.5, sure=True)
    old = _report({"code": (1.0, None)})  # a report written before intervals existed
    failures = check(old, max_ppl_increase=2.0, sure=True)
    assert len(failures) == 1 and "没有困惑度上升的区间" in failures[0]
    assert check(old, max_ppl_increase=2.0) == []
