"""自生成训练文本：让模型从训练文本的片段出发自己续写，作为修复与 MTP 训练的额外数据。

为什么：两种训练的瓶颈都是数据。SmolLM2 在一本书（约 17 万 token）上修复 6 轮后，训练损失还在降（0.13），
留出窗口上的 KL 却停在 0.28：学生记住了这本书。老师（修复）或基座（MTP）从书中随机片段出发采样续写，得到与书
同一类、但不重复的新文本；这些文本本身就来自老师的分布（序列级蒸馏），对 MTP 来说正是投机解码时要猜的那种文本。

提示只取自训练窗口，评估文本从不参与。续写时从不选结束符，每个新窗口都写满。
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from transformers import DynamicCache

PROMPT_TOKENS = 32  # each new window starts with this many tokens of the training text
FILE = "generated.safetensors"  # the written text, in a training state folder (carried over each state save)


def _end_ids(model) -> list[int]:
    ids = set()
    for cfg in (getattr(model, "generation_config", None), model.config):
        eos = getattr(cfg, "eos_token_id", None)
        ids |= set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
    return sorted(i for i in ids if i is not None and 0 <= i < model.config.vocab_size)


def prompts_from(windows: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """``count`` prompts of ``PROMPT_TOKENS`` tokens, each from a random place in a random training window."""
    g = torch.Generator().manual_seed(seed)
    n, seq = windows.shape
    width = min(PROMPT_TOKENS, seq - 1)
    rows = torch.randint(n, (count,), generator=g)
    starts = torch.randint(seq - width + 1, (count,), generator=g)
    return torch.stack([windows[r, s:s + width] for r, s in zip(rows.tolist(), starts.tolist())])


@torch.no_grad()
def continue_text(model, prompts: torch.Tensor, length: int, temperature: float,
                  generator: torch.Generator) -> torch.Tensor:
    """Each prompt continued to ``length`` tokens by ``model``: sampled at ``temperature`` (0: greedy).

    Runs in the model's own precision: one token per row per step is too little work for bf16 autocast to pay for
    casting the weights every step (measured on this CPU: 338 tokens/s in fp32, 291 under autocast)."""
    device = next(model.parameters()).device
    ids = prompts.to(device)
    banned = _end_ids(model)
    cache = DynamicCache()
    step_in = ids
    while ids.shape[1] < length:
        logits = model(input_ids=step_in, cache=cache, use_cache=True).logits[:, -1].float()
        logits[:, banned] = float("-inf")
        if temperature > 0:  # inverse-CDF draw: torch.multinomial's sampler took a sixth of the time on CPU
            cdf = torch.softmax(logits / temperature, -1).cumsum(-1)
            u = torch.rand(len(cdf), 1, generator=generator).to(device) * cdf[:, -1:]
            nxt = torch.searchsorted(cdf, u, right=True).clamp_max(cdf.shape[1] - 1)
        else:
            nxt = logits.argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], 1)
        step_in = nxt
    return ids.cpu()


def generate_windows(model, windows: torch.Tensor, n_tokens: int, temperature: float, seed: int = 0,
                     batch_size: int = 64, progress=None) -> tuple[torch.Tensor, dict]:
    """New training windows (as long as ``windows``' rows) written by ``model`` from prompts out of ``windows``,
    ``n_tokens`` in all; and a summary for the report (tokens, seconds, temperature)."""
    seq = windows.shape[1]
    count = max(1, n_tokens // seq)
    prompts = prompts_from(windows, count, seed)
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    batches = range(0, count, batch_size)
    if progress:
        progress.start("自生成训练文本", len(batches))
    t0 = time.perf_counter()
    out = []
    for s in batches:
        out.append(continue_text(model, prompts[s:s + batch_size], seq, temperature, generator))
        if progress:
            progress.advance()
    model.train(was_training)
    new = torch.cat(out)
    seconds = time.perf_counter() - t0
    return new, {"windows": count, "tokens": int(new.numel()), "new_tokens": count * (seq - prompts.shape[1]),
                 "temperature": temperature, "seconds": seconds}


def windows_for(path: Path | None, resume: bool, make) -> tuple[torch.Tensor, dict]:
    """``make()``'s windows and summary, kept in ``path`` (a training state folder's file) so that ``--resume``
    trains on the same text instead of writing it again."""
    from safetensors import safe_open

    from .training import save_file_atomic

    if resume and path is not None and path.exists():
        with safe_open(str(path), "pt") as f:
            return f.get_tensor("windows"), json.loads(f.metadata()["summary"])
    windows, summary = make()
    if path is not None:
        save_file_atomic(path, {"windows": windows.contiguous()}, metadata={"summary": json.dumps(summary)})
    return windows, summary


def extended(model, windows: torch.Tensor, opts, seed: int, state_dir: Path | None, resume: bool,
             progress=None) -> tuple[torch.Tensor, dict | None]:
    """``windows`` plus ``opts.generate_tokens`` of ``model``'s own continuations (kept in the training state folder
    for ``--resume``), and the generation summary; unchanged when ``opts`` asks for none."""
    if not opts.generate_tokens:
        return windows, None
    new, summary = windows_for(
        state_dir / FILE if state_dir is not None else None, resume,
        lambda: generate_windows(model, windows, opts.generate_tokens, opts.generate_temperature, seed,
                                 progress=progress))
    return torch.cat([windows, new]), summary
