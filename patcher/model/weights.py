"""读取定位到的角色：投影的权重（统一成 nn.Linear 的 (out, in) 方向，按定位器给出的行取子集）与旋转位置编码的角度。"""

from __future__ import annotations

import torch
from torch import nn

from ..runtime.modeling import rotary_cos_sin
from .locate import Projection


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


def rope_angles(rotary: nn.Module, rot: int, layer_type: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(θ_i, scale_i) of the source rotary for each of its rot/2 pairs, read from its cos/sin at positions 0 and 1
    (tables in interleaved order are read in rotate-half order; ``layer_type`` for rotaries that depend on it)."""
    like = torch.zeros(1, 2, rot, dtype=torch.float32)
    extra = {"layer_type": layer_type} if layer_type is not None else {}
    cos, sin = rotary_cos_sin(rotary, like, torch.arange(2)[None], **extra)
    columns = table_columns(rotary, rot, layer_type)
    if columns is not None:
        cos, sin = cos[..., columns], sin[..., columns]
    half = rot // 2
    theta = torch.atan2(sin[0, 1, :half].double(), cos[0, 1, :half].double())
    return theta, cos[0, 0, :half].double()


def table_columns(rotary: nn.Module, rot: int, layer_type: str | None = None) -> list[int] | None:
    """Columns that put the rotary's cos/sin tables in rotate-half order (θ_0..θ_{h-1}, θ_0..θ_{h-1}), or None when
    they already are: families with interleaved RoPE return tables as θ_0, θ_0, θ_1, θ_1, … (Cohere) or in
    half order, converting inside their own apply function (GLM)."""
    like = torch.zeros(1, 2, rot, dtype=torch.float32)
    extra = {"layer_type": layer_type} if layer_type is not None else {}
    cos = rotary_cos_sin(rotary, like, torch.arange(2)[None], **extra)[0][0, 1]
    if rot >= 4 and torch.allclose(cos[0::2], cos[1::2]) and not torch.allclose(cos[: rot // 2], cos[rot // 2:]):
        return list(range(0, rot, 2)) + list(range(1, rot, 2))
    return None
