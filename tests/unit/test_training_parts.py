"""训练共用部件：混合精度的选择（auto 只在 bf16 有硬件支持时启用），autocast 只改变前向的计算精度；
有时间上限时学习率在时间用完时降到零。"""

import pytest
import torch
from torch import nn

from patcher.training import loop
from patcher.training.loop import autocast, cosine_with_warmup, factor, fast_bf16, fit_to_budget, uses_bf16

CPU = torch.device("cpu")


def test_precision_choice():
    assert uses_bf16("bf16", CPU) and not uses_bf16("fp32", CPU)
    assert uses_bf16("auto", CPU) == fast_bf16(CPU)
    assert not fast_bf16(torch.device("meta"))


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_autocast_runs_products_in_the_chosen_precision_and_keeps_fp32_weights(precision, dtype):
    layer = nn.Linear(16, 8)
    x = torch.randn(4, 16)
    with autocast(precision, CPU):
        y = layer(x)
    assert y.dtype == dtype
    y.float().sum().backward()
    assert layer.weight.dtype == torch.float32 and layer.weight.grad.dtype == torch.float32
    torch.testing.assert_close(y.float(), layer(x), atol=0.05, rtol=0.02)  # bf16 keeps ~3 significant digits


def _schedule(planned: int):
    return cosine_with_warmup(torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=1.0), planned)


def test_a_time_budget_ends_the_cosine_when_the_time_runs_out(monkeypatch):
    clock = {"now": 0.0}
    monkeypatch.setattr(loop.time, "perf_counter", lambda: clock["now"])
    schedule = _schedule(1000)
    t0 = 0.0
    clock["now"] = 60.0  # 20 steps in the first minute of a 10-minute budget: about 200 steps fit
    fit_to_budget(schedule, 1000, 20, 0.0, t0, 10.0, 20)
    horizon = factor(schedule).steps
    assert 180 <= horizon <= 200  # a little before the deadline, so the last steps run at a near-zero rate
    assert factor(schedule)(horizon) == 0.0 and factor(schedule)(horizon // 2) == pytest.approx(0.5, abs=0.02)
    fit_to_budget(schedule, 150, 20, 0.0, t0, 10.0, 20)  # never beyond the planned steps
    assert factor(schedule).steps == 150


def test_without_a_budget_or_before_the_pace_is_known_the_schedule_is_left_alone(monkeypatch):
    monkeypatch.setattr(loop.time, "perf_counter", lambda: 60.0)
    schedule = _schedule(1000)
    fit_to_budget(schedule, 1000, 500, 0.0, 0.0, 0.0, 500)  # no budget: reproducible step for step
    fit_to_budget(schedule, 1000, loop.BUDGET_PROBE_STEPS - 1, 0.0, 0.0, 10.0, 9)  # pace not measured yet
    assert factor(schedule).steps == 1000


def test_a_resumed_run_goes_on_with_the_planned_cosine_not_an_earlier_budgets(tmp_path, monkeypatch):
    from accelerate import Accelerator

    clock = {"now": 0.0}
    monkeypatch.setattr(loop.time, "perf_counter", lambda: clock["now"])
    param = nn.Parameter(torch.zeros(1))
    _, optimizer, schedule, _, _ = loop.start(Accelerator(cpu=True), nn.Linear(1, 1), [param], 1.0, 1000, None, False)
    clock["now"] = 60.0
    fit_to_budget(schedule, 1000, 20, 0.0, 0.0, 10.0, 20)  # the first run's budget shortened the cosine
    assert factor(schedule).steps < 1000
    loop.save_state(tmp_path, {"p0": param}, optimizer, schedule, 20, 1000)
    _, _, again, _, done = loop.start(Accelerator(cpu=True), nn.Linear(1, 1), [param], 1.0, 1000, tmp_path, True)
    assert done == 20 and factor(again).steps == 1000
