"""校准：文本读取与逐层流式统计。

流程（同 GPTQ 一类的顺序管线）：把校准 token 送到第 0 层入口并截住其输入；之后对每一层
i：带钩子运行第 i 层、收集转换器要的统计（线性层输入的协方差），交给回调转换第 i 层，
再用*转换后*的第 i 层算出第 i+1 层的输入。峰值内存约为一层加上激活，误差不会悄悄累积。
"""

from __future__ import annotations

import hashlib
import json
import random
from importlib import resources
from pathlib import Path
from typing import Callable

import torch
from torch import nn


class DataError(ValueError):
    """校准或评估数据不可用。"""


def builtin_text(kind: str) -> str:
    """Offline defaults shipped with the package: public-domain text (see patcher/data/PROVENANCE.md)."""
    return resources.files("patcher.data").joinpath(f"{kind}.txt").read_text(encoding="utf-8")


def read_text(path: str | None, kind: str) -> str:
    """.txt 原样读取；.jsonl 取每行的 ``text`` 字段。None 用内置文本。"""
    if path is None:
        return builtin_text(kind)
    p = Path(path)
    if not p.is_file():
        raise DataError(f"找不到{'校准' if kind == 'calibration' else '评估'}数据文件 {path}")
    raw = p.read_text(encoding="utf-8", errors="replace")
    if p.suffix == ".jsonl":
        parts = []
        for i, line in enumerate(raw.splitlines(), 1):
            if line.strip():
                try:
                    parts.append(str(json.loads(line)["text"]))
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise DataError(f"{path} 第 {i} 行不是含 \"text\" 字段的 JSON") from None
        raw = "\n\n".join(parts)
    if not raw.strip():
        raise DataError(f"{path} 是空的")
    return raw


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def token_windows(tokenizer, text: str, n_tokens: int, seq_len: int, seed: int | None) -> torch.Tensor:
    """Windows of ``seq_len`` tokens covering ``n_tokens``: random non-overlapping windows when seeded, else in order."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    n_windows = max(1, n_tokens // seq_len)
    total = ids.numel() // seq_len
    if total < 1:
        raise DataError(f"文本只有 {ids.numel()} 个 token，不足一个长度 {seq_len} 的窗口")
    starts = list(range(total))
    if seed is not None:
        random.Random(seed).shuffle(starts)
    starts = sorted(starts[:n_windows]) if seed is not None else starts[:n_windows]
    return torch.stack([ids[s * seq_len:(s + 1) * seq_len] for s in starts])


def recipe_windows(tokenizer, recipe) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Calibration and evaluation windows of a recipe, and their provenance for the report.

    The evaluation text must differ from the calibration text: fidelity is measured on text the conversion never saw."""
    calib_text = read_text(recipe.calibration.data, "calibration")
    eval_text = read_text(recipe.eval.data, "evaluation")
    if digest(calib_text) == digest(eval_text):
        raise DataError("评估文本与校准文本相同：保真度必须在未见过的文本上测量，请换一个 --eval-data")
    cal = recipe.calibration
    calib_ids = token_windows(tokenizer, calib_text, cal.tokens, cal.seq_len, cal.seed)
    eval_ids = token_windows(tokenizer, eval_text, recipe.eval.tokens, recipe.eval.seq_len, None)
    provenance = {
        "calibration": {"data": cal.data or "builtin:calibration.txt", "tokens": int(calib_ids.numel()),
                        "seq_len": cal.seq_len, "seed": cal.seed, "sha256": digest(calib_text)},
        "eval": {"data": recipe.eval.data or "builtin:evaluation.txt", "tokens": int(eval_ids.numel()),
                 "sha256": digest(eval_text)},
    }
    return calib_ids, eval_ids, provenance


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


def _call(layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
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
                _call(layer, hidden, kwargs)
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
            inputs = [(_call(layer, hidden, kwargs), kwargs) for hidden, kwargs in inputs]
