"""校准与评估文本：读取（.txt / .jsonl / 内置文本）与切成 token 窗口。"""

from __future__ import annotations

import hashlib
import json
import random
from importlib import resources
from pathlib import Path

import torch

from ..errors import DataError


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
