"""训练共用部件：混合精度的选择（auto 只在 bf16 有硬件支持时启用），autocast 只改变前向的计算精度。"""

import pytest
import torch
from torch import nn

from patcher.training.loop import autocast, fast_bf16, uses_bf16

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
