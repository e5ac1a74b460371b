"""校准：逐层流式统计。

流程（同 GPTQ 一类的顺序管线）：把校准 token 送到第 0 层入口并截住其输入；之后对每一层
i：带钩子运行第 i 层、收集转换器要的统计（线性层输入的协方差），交给回调转换第 i 层，
再用*转换后*的第 i 层算出第 i+1 层的输入。峰值内存约为一层加上激活，误差不会悄悄累积。
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


class _Stop(Exception):
    pass


def capture_layer_inputs(model: nn.Module, layers: nn.ModuleList, ids: torch.Tensor, batch_size: int):
    """Run the model up to layer 0 for every batch; return [(hidden, kwargs)] as layer 0 receives them."""
    captured = []

    def hook(_mod, args, kwargs):
        captured.append((args[0].detach(), {k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values")}))
        raise _Stop

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for batch in ids.split(batch_size):
                try:
                    model(input_ids=batch, use_cache=False)
                except _Stop:
                    pass
    finally:
        handle.remove()
    return captured


def call_layer(layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def collect(layer: nn.Module, wants: list[tuple[str, str]], inputs, max_rows: int = 8192) -> dict:
    """Statistics of the inputs that named submodules receive while the layer runs on all calibration batches.

    ``(module, "cov")``：E[x xᵀ]（float64）；``(module, "inputs")``：输入本身（float32，最多 ``max_rows`` 行，
    均匀抽取），供需要逐 token 数据的转换器（例如 MoE 切分的共激活聚类）使用；``(module, "sequences")``：
    前几个完整序列 (N, T, d)（最多 ``max_rows`` 个 token），供需要 token 间关系（注意力）的转换器使用。
    """
    sums: dict = {}
    counts: dict = {}
    rows: dict = {}
    handles = []
    for name, kind in dict.fromkeys(wants):
        def hook(_m, args, name=name, kind=kind):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            key = (name, kind)
            if kind == "cov":
                sums[key] = sums.get(key, 0) + (x.T @ x).double()  # float32 per batch, float64 across batches
                counts[key] = counts.get(key, 0) + x.shape[0]
            elif kind == "sequences":
                kept = sum(p.shape[0] * p.shape[1] for p in rows.get(key, []))
                if kept < max_rows:
                    rows.setdefault(key, []).append(args[0].detach().float().clone())
            else:
                rows.setdefault(key, []).append(x.clone())
        handles.append(layer.get_submodule(name).register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for hidden, kwargs in inputs:
                call_layer(layer, hidden, kwargs)
    finally:
        for h in handles:
            h.remove()
    out = {k: sums[k] / counts[k] for k in sums}
    for k, parts in rows.items():
        x = torch.cat(parts)
        if k[1] == "inputs" and x.shape[0] > max_rows:
            x = x[torch.linspace(0, x.shape[0] - 1, max_rows).long()]
        out[k] = x
    return out


def stream(model: nn.Module, layers: nn.ModuleList, ids: torch.Tensor, batch_size: int,
           needs: Callable[[int], list[tuple[str, str]]], on_layer: Callable[[int, nn.Module, dict], None],
           progress: Callable[[int, str], None] | None = None) -> None:
    """Sequential calibration: stats of layer i from the *converted* layers before it, then on_layer(i, ...)."""
    inputs = capture_layer_inputs(model, layers, ids, batch_size)
    for i, layer in enumerate(layers):
        if progress:
            progress(i, "统计输入协方差")
        stats = collect(layer, needs(i), inputs)
        if progress:
            progress(i, "转换")
        on_layer(i, layer, stats)
        with torch.no_grad():
            inputs = [(call_layer(layer, hidden, kwargs), kwargs) for hidden, kwargs in inputs]
