"""读取定位到的投影的权重：统一成 nn.Linear 的 (out, in) 方向，按定位器给出的行取子集。"""

from __future__ import annotations

import torch
from torch import nn

from patcher.locate import Projection


def weight_of(layer: nn.Module, proj: Projection, rows: bool = True):
    """(weight, bias) of a located projection; Conv1D (stored in, out) is transposed; ``rows`` picks its rows."""
    mod = layer.get_submodule(proj.module)
    w = mod.weight.detach()
    w = w.t() if proj.conv1d else w
    b = mod.bias.detach() if getattr(mod, "bias", None) is not None else None
    if rows and proj.rows:
        idx = torch.tensor(proj.flat_rows, dtype=torch.long)
        w = w[idx]
        b = b[idx] if b is not None else None
    return w, b
