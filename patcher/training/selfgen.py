"""自生成训练文本：让模型从训练文本的片段出发自己续写，作为修复与 MTP 训练的额外数据。

为什么：两种训练的瓶颈都是数据。SmolLM2 在一本书（约 17 万 token）上修复 6 轮后，训练损失还在降（0.13），
留出窗口上的 KL 却停在 0.28：学生记住了这本书。老师（修复）或基座（MTP）从书中随机片段出发采样续写，得到与书
同一类、但不重复的新文本；这些文本本身就来自老师的分布（序列级蒸馏），对 MTP 来说正是投机解码时要猜的那种文本。

提示只取自训练窗口，评估文本从不参与。续写时从不选结束符，每个新窗口都写满。

对话（``generate_dialogues``，Magpie，Xu 等 2024）：对话模型按自己的对话模板从"用户"一轮的开头写起，会写出一个
像样的用户请求；请求写完（或到长度上限）后补上模板的助手开头，模型再作答，答完又补上下一轮用户开头，如此直到
窗口写满。这样得到的是模型在对话中真正会写的回答，没有用到任何评估提示。
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
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


def _draw(logits: torch.Tensor, temperature: float, generator: torch.Generator) -> torch.Tensor:
    """One token per row (column vector): sampled at ``temperature``, greedy at 0."""
    if temperature <= 0:
        return logits.argmax(-1, keepdim=True)
    # inverse-CDF draw: torch.multinomial's sampler took a sixth of the time on CPU
    cdf = torch.softmax(logits / temperature, -1).cumsum(-1)
    u = torch.rand(len(cdf), 1, generator=generator).to(cdf.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).clamp_max(cdf.shape[1] - 1)


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
        nxt = _draw(logits, temperature, generator)
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
    new, seconds = _in_batches(model, count, batch_size, "自生成训练文本", progress,
                               lambda s, n: continue_text(model, prompts[s:s + n], seq, temperature, generator))
    return new, {"windows": count, "tokens": int(new.numel()), "new_tokens": count * (seq - prompts.shape[1]),
                 "temperature": temperature, "seconds": seconds}


def _in_batches(model, count: int, batch_size: int, title: str, progress, write) -> tuple[torch.Tensor, float]:
    """``write(start, n)``'s rows for ``count`` rows, ``batch_size`` at a time, the model in eval mode (then as it
    was); and the seconds it took."""
    was_training = model.training
    model.eval()
    batches = range(0, count, batch_size)
    if progress:
        progress.start(title, len(batches))
    t0 = time.perf_counter()
    out = []
    for s in batches:
        out.append(write(s, min(batch_size, count - s)))
        if progress:
            progress.advance()
    model.train(was_training)
    return torch.cat(out), time.perf_counter() - t0


@dataclass(frozen=True)
class ChatTurns:
    """A chat template's fixed parts as token ids: a dialogue's opening (up to the first user message), what
    follows a user message up to the reply, and what follows a reply up to the next user message. The first id
    of each separator ends a turn: a row that writes it goes on with the rest of that separator."""

    opening: tuple[int, ...]
    to_assistant: tuple[int, ...]
    to_user: tuple[int, ...]


def chat_turns(tokenizer) -> ChatTurns | None:
    """``tokenizer``'s chat template cut around placeholder messages; None without a template (or one whose
    second user turn does not repeat the first dialogue's layout)."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    u1, a1, u2 = "@@dsopt-user-1@@", "@@dsopt-reply@@", "@@dsopt-user-2@@"
    one = tokenizer.apply_chat_template([{"role": "user", "content": u1}], add_generation_prompt=True,
                                        tokenize=False)
    two = tokenizer.apply_chat_template([{"role": "user", "content": u1}, {"role": "assistant", "content": a1},
                                         {"role": "user", "content": u2}], add_generation_prompt=True, tokenize=False)
    if one.count(u1) != 1 or a1 not in two or u2 not in two or not two.startswith(one[: one.index(u1)]):
        return None
    opening, to_assistant = one.split(u1)
    to_user = two[two.index(a1) + len(a1): two.index(u2)]
    if not to_assistant or not to_user:
        return None

    def ids(text):
        return tuple(tokenizer(text, add_special_tokens=False)["input_ids"])
    return ChatTurns(ids(opening), ids(to_assistant), ids(to_user))


@torch.no_grad()
def write_dialogues(model, turns: ChatTurns, count: int, length: int, temperature: float,
                    generator: torch.Generator, user_temperature: float = 1.0, max_user_tokens: int = 64) -> torch.Tensor:
    """``count`` dialogues of ``length`` tokens written by ``model`` alone: the user's messages sampled at
    ``user_temperature`` (at most ``max_user_tokens`` each), the replies at ``temperature`` (0: greedy)."""
    device = next(model.parameters()).device
    ends = {turns.to_assistant[0], turns.to_user[0]}
    banned = [i for i in _end_ids(model) if i not in ends]  # other end tokens would stop the dialogue
    ids = torch.tensor([list(turns.opening)] * count)
    replying = [False] * count  # per row: in a reply (else in a user message)
    queue = [[] for _ in range(count)]  # per row: separator ids still to write
    user_len = [0] * count
    cache = DynamicCache()
    step_in = ids.to(device)
    while ids.shape[1] < length:
        logits = model(input_ids=step_in, cache=cache, use_cache=True).logits[:, -1].float()
        logits[:, banned] = float("-inf")
        drawn = [_draw(logits, t, generator).flatten().tolist() for t in (user_temperature, temperature)]
        nxt = []
        for r in range(count):
            if queue[r]:
                t = queue[r].pop(0)
            else:
                # a request as long as allowed ends here; else the model's own token
                cut = not replying[r] and user_len[r] >= max_user_tokens
                t = turns.to_assistant[0] if cut else drawn[replying[r]][r]
                user_len[r] += not replying[r]
                if t == (turns.to_user[0] if replying[r] else turns.to_assistant[0]):
                    queue[r] = list(turns.to_user[1:] if replying[r] else turns.to_assistant[1:])
                    replying[r], user_len[r] = not replying[r], 0
            nxt.append(t)
        step_in = torch.tensor(nxt, device=device)[:, None]
        ids = torch.cat([ids, step_in.cpu()], 1)
    return ids[:, :length]


def generate_dialogues(model, turns: ChatTurns, seq: int, n_tokens: int, temperature: float, seed: int = 0,
                       batch_size: int = 64, progress=None) -> tuple[torch.Tensor, dict]:
    """New training windows of ``seq`` tokens, each a dialogue ``model`` writes alone (``write_dialogues``),
    ``n_tokens`` in all; and a summary for the report."""
    count = max(1, n_tokens // seq)
    generator = torch.Generator().manual_seed(seed + 1)
    new, seconds = _in_batches(model, count, batch_size, "自生成对话", progress,
                               lambda s, n: write_dialogues(model, turns, n, seq, temperature, generator))
    return new, {"windows": count, "tokens": int(new.numel()), "new_tokens": count * (seq - len(turns.opening)),
                 "temperature": temperature, "seconds": seconds}


def windows_for(path: Path | None, resume: bool, make) -> tuple[torch.Tensor, dict]:
    """``make()``'s windows and summary, kept in ``path`` (a training state folder's file) so that ``--resume``
    trains on the same text instead of writing it again."""
    from safetensors import safe_open

    from .loop import save_file_atomic

    if resume and path is not None and path.exists():
        with safe_open(str(path), "pt") as f:
            return f.get_tensor("windows"), json.loads(f.metadata()["summary"])
    windows, summary = make()
    if path is not None:
        save_file_atomic(path, {"windows": windows.contiguous()}, metadata={"summary": json.dumps(summary)})
    return windows, summary


def extended(model, windows: torch.Tensor, opts, seed: int, state_dir: Path | None, resume: bool,
             progress=None, chat: ChatTurns | None = None, chat_share: float = 0.0) -> tuple[torch.Tensor, dict | None]:
    """``windows`` plus ``opts.generate_tokens`` of ``model``'s own writing (kept in the training state folder for
    ``--resume``): continuations of the training text, and a ``chat_share`` of dialogues in ``chat``'s template;
    and the generation summary. Unchanged when ``opts`` asks for none."""
    if not opts.generate_tokens:
        return windows, None
    if chat_share > 0 and chat is None:
        raise ValueError("自生成对话需要分词器带对话模板（chat_template）；这个分词器没有可用的模板")
    n_chat = round(opts.generate_tokens * chat_share)

    def make():  # the summary's windows, tokens, new_tokens and seconds count both kinds of text
        parts = []
        summary = {"windows": 0, "tokens": 0, "new_tokens": 0, "temperature": opts.generate_temperature,
                   "seconds": 0.0}
        if opts.generate_tokens - n_chat > 0:
            new, summary = generate_windows(model, windows, opts.generate_tokens - n_chat, opts.generate_temperature,
                                            seed, progress=progress)
            parts.append(new)
        if n_chat > 0:
            new, talk = generate_dialogues(model, chat, windows.shape[1], n_chat, opts.generate_temperature, seed,
                                           progress=progress)
            parts.append(new)
            summary = {**summary, "dialogues": talk, **{k: summary[k] + talk[k] for k in ("windows", "tokens",
                                                                                        "new_tokens", "seconds")}}
        return torch.cat(parts), summary

    new, summary = windows_for(state_dir / FILE if state_dir is not None else None, resume, make)
    return torch.cat([windows, new]), summary
