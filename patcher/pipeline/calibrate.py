"""校准：逐层流式统计。

流程（同 GPTQ 一类的顺序管线）：把校准 token 送到第 0 层入口并截住其输入；之后对每一层
i：带钩子运行第 i 层、收集转换器要的统计（线性层输入的协方差），交给回调转换第 i 层，
再用*转换后*的第 i 层算出第 i+1 层的输入。峰值内存约为一层加上激活，误差不会悄悄累积。
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..errors import PlanError


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
    前几个完整序列 (N, T, d)（最多 ``max_rows`` 个 token），供需要 token 间关系（注意力）的转换器使用；
    ``(module, "cov_attended", attention)``：同 ``cov``，但每个 token 按它在 ``attention`` 模块里作为键所受的注意力
    （源模型的注意力概率对头与查询求和）加权，窗口第一个 token（注意力汇）按平均 token 计；为此这一层用 eager
    注意力运行（同样的数，另外给出概率）。
    """
    sums: dict = {}
    counts: dict = {}
    rows: dict = {}
    handles = []
    attended = {}  # attention module -> the (module, kind) keys whose inputs its probabilities weight
    for name, kind, *where in dict.fromkeys(wants):
        if kind == "cov_attended":
            attended.setdefault(where[0], []).append((name, kind))

        def hook(_m, args, name=name, kind=kind):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            key = (name, kind)
            if kind == "cov_attended":  # weighted once the attention module has its probabilities
                rows[key] = args[0].detach().float()
            elif kind == "cov":
                sums[key] = sums.get(key, 0) + (x.T @ x).double()  # float32 per batch, float64 across batches
                counts[key] = counts.get(key, 0) + x.shape[0]
            elif kind == "sequences":
                kept = sum(p.shape[0] * p.shape[1] for p in rows.get(key, []))
                if kept < max_rows:
                    rows.setdefault(key, []).append(args[0].detach().float().clone())
            else:
                rows.setdefault(key, []).append(x.clone())
        handles.append(layer.get_submodule(name).register_forward_pre_hook(hook))
    for where, keys in attended.items():
        def weigh(m, _args, output, where=where, keys=keys):
            probs = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if probs is None or probs.dim() != 4 or probs.shape[-1] != rows[keys[0]].shape[1]:
                raise PlanError(f"注意力模块 {where}（{type(m).__name__}）在 eager 模式下没有给出每个键的注意力概率，"
                                f"无法按所受注意力给校准 token 加权；请用 --mla-token-weighting uniform")
            received = probs.detach().float().sum((1, 2)) / probs.shape[1]  # (batch, keys): mean over heads
            # The window's first token is the attention sink only because the window was cut there; in use it is
            # one fixed token (BOS, the chat template's). Weighted by its attention, its handful of samples bent the
            # factorisation towards them and answers to templated prompts got worse, so it counts as an average
            # token: weight 1, the mean of a window's weights (each query's probabilities sum to one).
            received[:, 0] = 1.0
            for key in keys:
                x = rows.pop(key)
                xw = (x * received[..., None]).reshape(-1, x.shape[-1])
                sums[key] = sums.get(key, 0) + (xw.T @ x.reshape(-1, x.shape[-1])).double()
                counts[key] = counts.get(key, 0) + float(received.sum())
        handles.append(layer.get_submodule(where).register_forward_hook(weigh))
    try:
        with torch.no_grad(), _eager(layer, attended):
            for hidden, kwargs in inputs:
                call_layer(layer, hidden, _causal(kwargs, hidden) if attended else kwargs)
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


class _eager:
    """Run the named attention modules with eager attention, which returns the probabilities (sdpa does not)."""

    def __init__(self, layer: nn.Module, where):
        self.configs = [c for c in (getattr(layer.get_submodule(w), "config", None) for w in where) if c is not None]
        self.saved = []

    def __enter__(self):
        self.saved = [c._attn_implementation for c in self.configs]
        for c in self.configs:
            c._attn_implementation = "eager"

    def __exit__(self, *exc):
        for c, v in zip(self.configs, self.saved):
            c._attn_implementation = v


def _causal(kwargs: dict, hidden: torch.Tensor) -> dict:
    """sdpa may leave the mask out (it is told "causal" instead); eager needs it written out."""
    mask = kwargs.get("attention_mask")
    if mask is not None:
        if mask.dtype == torch.bool:  # True = may attend; eager adds the mask to the scores
            mask = torch.zeros(mask.shape, dtype=hidden.dtype, device=mask.device).masked_fill(
                ~mask, torch.finfo(hidden.dtype).min)
            return {**kwargs, "attention_mask": mask}
        return kwargs
    t = hidden.shape[1]
    mask = torch.full((t, t), torch.finfo(hidden.dtype).min, dtype=hidden.dtype, device=hidden.device).triu(1)
    return {**kwargs, "attention_mask": mask[None, None].expand(hidden.shape[0], 1, t, t)}


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
