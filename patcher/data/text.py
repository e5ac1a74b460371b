"""校准与评估文本：按领域读取（内置多领域文本、用户的文件或文件夹）与切成 token 窗口。

一个领域就是一个文本文件（文件名即领域名）。校准把各领域的窗口等量混合；评估在每个领域上各取同样多的
窗口，报告逐领域给出指标，并以最差的领域为准。内置文本的来源与许可见 ``patcher/data/PROVENANCE.md``。
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from ..errors import DataError

SUFFIXES = (".txt", ".md", ".jsonl")
KINDS = {"calibration": "校准", "evaluation": "评估"}


@dataclass(frozen=True)
class Domain:
    name: str
    text: str
    origin: str  # the file it came from, or builtin:<kind>/<file>


def builtin_domains(kind: str) -> list[Domain]:
    """Offline defaults shipped with the package: one file per domain (see patcher/data/PROVENANCE.md)."""
    folder = resources.files("patcher.data").joinpath(kind)
    files = sorted((f for f in folder.iterdir() if f.name.endswith(".txt")), key=lambda f: f.name)
    return [Domain(f.name[:-4], f.read_text(encoding="utf-8"), f"builtin:{kind}/{f.name}") for f in files]


def builtin_text(kind: str) -> str:
    return "\n\n".join(d.text for d in builtin_domains(kind))


def _read_file(p: Path, kind: str) -> str:
    data = p.read_bytes()
    raw = data.decode("utf-8", errors="replace")
    # binary files (weights, archives, images) decode to replacement and control characters, not to words
    odd = raw.count("\ufffd") + sum(1 for c in raw[:200_000] if ord(c) < 32 and c not in "\n\r\t\f")
    if b"\x00" in data[:1_000_000] or odd > 0.02 * max(len(raw[:200_000]), 1):
        raise DataError(f"{p} 不像文本（含 NUL 字节或大量非 UTF-8 内容）：{KINDS[kind]}数据应是 .txt/.md 或"
                        " 每行含 \"text\" 字段的 .jsonl")
    if p.suffix == ".jsonl":
        parts = []
        for i, line in enumerate(raw.splitlines(), 1):
            if line.strip():
                try:
                    parts.append(str(json.loads(line)["text"]))
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise DataError(f"{p} 第 {i} 行不是含 \"text\" 字段的 JSON") from None
        raw = "\n\n".join(parts)
    if not raw.strip():
        raise DataError(f"{p} 是空的")
    return raw


def read_domains(spec: str | None, kind: str) -> list[Domain]:
    """``spec``：None（内置多领域文本）、一个文件、一个文件夹（其中每个 .txt/.md/.jsonl 一个领域），或逗号分隔的多个。"""
    if spec is None:
        return builtin_domains(kind)
    domains = []
    for part in [s.strip() for s in str(spec).split(",") if s.strip()]:
        p = Path(part).expanduser()
        if p.is_dir():
            files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix in SUFFIXES)
            if not files:
                raise DataError(f"{KINDS[kind]}数据文件夹 {p} 中没有 .txt/.md/.jsonl 文件")
        elif p.is_file():
            files = [p]
        else:
            raise DataError(f"找不到{KINDS[kind]}数据文件 {part}")
        domains += [Domain(f.stem, _read_file(f, kind), str(f)) for f in files]
    names = [d.name for d in domains]
    if len(set(names)) != len(names):
        raise DataError(f"{KINDS[kind]}数据中有同名的领域（文件名相同）：{names}；请改名以便报告区分")
    return domains


def read_text(spec: str | None, kind: str) -> str:
    """All domains of ``spec`` as one text (for training loops that do not need the domains apart)."""
    return "\n\n".join(d.text for d in read_domains(spec, kind))


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _ids(tokenizer, text: str) -> torch.Tensor:
    return tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]


def token_windows(tokenizer, text: str, n_tokens: int, seq_len: int, seed: int | None) -> torch.Tensor:
    """Windows of ``seq_len`` tokens covering ``n_tokens``: random non-overlapping windows when seeded, else in order."""
    return _windows(_ids(tokenizer, text), max(1, n_tokens // seq_len), seq_len, seed)


def _windows(ids: torch.Tensor, n_windows: int, seq_len: int, seed: int | None, where: str = "文本",
             spread: bool = False) -> torch.Tensor:
    """Non-overlapping windows: random when seeded; else the first ones, or (``spread``) evenly over the text."""
    total = ids.numel() // seq_len
    if total < 1:
        raise DataError(f"{where}只有 {ids.numel()} 个 token，不足一个长度 {seq_len} 的窗口")
    starts = list(range(total))
    if spread and seed is None:
        starts = sorted({k * total // min(n_windows, total) for k in range(min(n_windows, total))})
    elif seed is not None:
        random.Random(seed).shuffle(starts)
    starts = sorted(starts[:n_windows]) if seed is not None else starts[:n_windows]
    return torch.stack([ids[s * seq_len:(s + 1) * seq_len] for s in starts])


def mixed_windows(tokenizer, domains: list[Domain], n_tokens: int, seq_len: int, seed: int) -> torch.Tensor:
    """Calibration windows shared equally between the domains; a domain too short for its share gives the rest
    to the others."""
    ids = [_ids(tokenizer, d.text) for d in domains]
    room = [t.numel() // seq_len for t in ids]
    want = max(1, n_tokens // seq_len)
    if sum(room) < 1:
        raise DataError(f"校准文本不足一个长度 {seq_len} 的窗口")
    share = [0] * len(domains)
    while sum(share) < min(want, sum(room)):
        for k in range(len(domains)):
            if share[k] < room[k] and sum(share) < want:
                share[k] += 1
    parts = [_windows(t, n, seq_len, seed, f"校准领域 {d.name} ") for t, n, d in zip(ids, share, domains) if n]
    return torch.cat(parts)


def eval_windows(tokenizer, domains: list[Domain], n_tokens: int, seq_len: int) -> tuple[torch.Tensor, list]:
    """``n_tokens`` per domain, windows spread evenly over each text; returns the windows and the spans
    [(domain, windows)]."""
    parts, spans = [], []
    for d in domains:
        w = _windows(_ids(tokenizer, d.text), max(1, n_tokens // seq_len), seq_len, None, f"评估领域 {d.name} ",
                     spread=True)  # a file's start alone can be unlike the rest of it
        parts.append(w)
        spans.append((d.name, len(w)))
    return torch.cat(parts), spans


def check_unseen(fitted: list[Domain], evals: list[Domain], flag: str) -> None:
    """No evaluation domain may be byte-equal to a domain the conversion (or healing) was fitted on."""
    seen = {digest(d.text): d.name for d in fitted}
    same = [f"{d.name}={seen[digest(d.text)]}" for d in evals if digest(d.text) in seen]
    if same:
        raise DataError(f"评估文本与校准文本相同（{', '.join(same)}）：保真度必须在未见过的文本上测量，请换一个 {flag}")


def recipe_eval(tokenizer, recipe) -> tuple[torch.Tensor, list]:
    return eval_windows(tokenizer, read_domains(recipe.eval.data, "evaluation"), recipe.eval.tokens,
                        recipe.eval.seq_len)


def recipe_windows(tokenizer, recipe) -> tuple[torch.Tensor, torch.Tensor, list, dict]:
    """Calibration and evaluation windows of a recipe, the evaluation's domain spans, and provenance for the report.

    No evaluation domain may equal a calibration domain: fidelity is measured on text the conversion never saw."""
    calib = read_domains(recipe.calibration.data, "calibration")
    evals = read_domains(recipe.eval.data, "evaluation")
    check_unseen(calib, evals, "--eval-data")
    cal = recipe.calibration
    calib_ids = mixed_windows(tokenizer, calib, cal.tokens, cal.seq_len, cal.seed)
    eval_ids, spans = eval_windows(tokenizer, evals, recipe.eval.tokens, recipe.eval.seq_len)
    provenance = {
        "calibration": {"data": cal.data or "builtin:calibration", "tokens": int(calib_ids.numel()),
                        "seq_len": cal.seq_len, "seed": cal.seed,
                        "domains": [{"name": d.name, "origin": d.origin, "sha256": digest(d.text)} for d in calib]},
        "eval": {"data": recipe.eval.data or "builtin:evaluation", "tokens": int(eval_ids.numel()),
                 "tokens_per_domain": int(eval_ids.numel()) // max(len(evals), 1),
                 "domains": [{"name": d.name, "origin": d.origin, "windows": n, "sha256": digest(d.text)}
                             for d, (_, n) in zip(evals, spans)]},
    }
    return calib_ids, eval_ids, spans, provenance
