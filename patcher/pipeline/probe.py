"""敏感度探测：只把一层的一个模块换掉时，整个模型付出的 KL。全局规划（``global_probe``）用它在层间分配预算。"""

from __future__ import annotations

import torch
from torch import nn

from ..evaluation.metrics import compare, evaluate_base


class SensitivityProbe:
    """Measures what one layer's change costs the whole model: KL(base‖model with one module of layer i swapped).

    Runs on the first calibration windows (never the evaluation text), against base log-probs taken once.
    """

    def __init__(self, model, mm, calib_ids: torch.Tensor, tokens: int, progress):
        self.model, self.mm, self.progress = model, mm, progress
        seq = calib_ids.shape[1]
        windows = calib_ids[: max(1, tokens // seq)]
        self.base = evaluate_base(model, windows)

    def layer(self, i: int) -> nn.Module:
        return self.model.get_submodule(self.mm.layers[i].prefix)

    def __call__(self, i: int, path: str, module: nn.Module) -> float:
        """KL with ``path`` (relative to layer i, e.g. its attention or MLP) replaced by ``module``."""
        self.progress.step(i, "探测敏感度")
        layer = self.layer(i)
        old = layer.get_submodule(path)
        layer.set_submodule(path, module)
        try:
            return compare(self.model, self.base)["kl_mean"]
        finally:
            layer.set_submodule(path, old)
