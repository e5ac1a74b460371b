"""MTP 训练（基座冻结）与逐头接受率的测量。

训练建立在 accelerate 上：同一条命令在 CPU、单卡或多卡（``accelerate launch``）上运行。目标是基座自己的
预测分布（``distill``，自蒸馏：MTP 学的正是投机解码要猜中的东西）或文本中的真实 token（``text``）。
输出头很大（SmolLM2 的词表有 49k），所以每个序列只在抽样的一部分位置上算损失。
训练 token 数可以超过文本：多出的部分按轮次（epoch）重复这些窗口，每轮顺序不同。重复时基座最后一层的
隐藏状态只算一次、留在内存里（基座冻结，它们不变），之后每一步只跑 MTP 模块，所以多轮训练比第一轮快得多；
缓存放不下（超过 ``CACHE_BYTES``）时每步重算。
``generate_tokens``：基座先从训练文本的随机片段出发续写这么多 token，与原文一起训练（见 ``selfgen``）。
``max_minutes`` 给训练设时间上限：到时停在当前步；余弦学习率的终点按实测的每步耗时移到时间用完之前（``fit_to_budget``）。
可续训：每 ``save_every`` 步把优化器、调度器、随机状态与步数写到 ``<OUT>/mtp-train/``，``--resume`` 从那里接着训。
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..data.text import read_text, token_windows
from ..runtime.mtp import DraftHead, body_of, choose_draft_vocab
from . import selfgen
from .loop import autocast, factor, fit_to_budget, past_budget, precision_label, reshuffled_epochs, save_state, start

STATE_DIR = "mtp-train"
CACHE_BYTES = 4 << 30  # base hidden states kept for later epochs up to this size (fp32 bytes)


def mtp_hiddens(model, ids: torch.Tensor, base_hidden: torch.Tensor) -> list[torch.Tensor]:
    """Teacher-forced MTP hidden states: depth k at position i reads depth k−1 at i and the token at i+k."""
    emb = model.get_input_embeddings()(ids)
    prev, out = base_hidden, []
    t = ids.shape[1]
    for k, mod in enumerate(model.mtp, start=1):
        g = mod(model, prev[:, : t - k], emb[:, k:], torch.arange(t - k, device=ids.device))
        out.append(g)
        prev = g
    return out


class MTPObjective(nn.Module):
    """The training step as a module (so accelerate/DDP can wrap it): the loss of every MTP depth."""

    def __init__(self, model, target: str, loss_positions: float):
        super().__init__()
        self.model, self.target, self.loss_positions = model, target, loss_positions

    def forward(self, ids: torch.Tensor, generator: torch.Generator | None = None,
                base_h: torch.Tensor | None = None):
        model = self.model
        head = model.get_output_embeddings()
        if base_h is None:
            base_h = base_hidden(model, ids)
        losses, accs = [], []
        t = ids.shape[1]
        for k, (mod, g) in enumerate(zip(model.mtp, mtp_hiddens(model, ids, base_h)), start=1):
            n = t - k - 1  # positions whose target (token i+k+1) lies inside the window
            pick = torch.randperm(n, generator=generator)[: max(1, int(n * self.loss_positions))].sort().values
            pick = pick.to(ids.device)
            # only the draft vocabulary: drafts come from it, and the head shrinks (8192 of 49k rows for SmolLM2);
            # the teacher is the base's distribution conditioned on that vocabulary
            draft = DraftHead(head, mod.draft_ids)
            logits = draft.logits(mod.norm(g[:, pick])).float()
            with torch.no_grad():
                teacher = draft.logits(base_h[:, pick + k]).float()  # the base's prediction of token i+k+1
            if self.target == "distill":
                loss = F.kl_div(logits.log_softmax(-1), teacher.log_softmax(-1), log_target=True,
                                reduction="batchmean") / len(pick)
            else:
                loss = F.cross_entropy(head(mod.norm(g[:, pick])).float().flatten(0, 1),
                                       ids[:, pick + k + 1].flatten())
            losses.append(loss)
            accs.append((logits.argmax(-1) == teacher.argmax(-1)).float().mean())
        return torch.stack(losses).sum(), torch.stack(losses).detach(), torch.stack(accs).detach()


@torch.no_grad()
def base_hidden(model, ids: torch.Tensor) -> torch.Tensor:
    """The frozen base's last hidden states (what MTP depth 1 reads and the teacher's logits come from)."""
    return body_of(model)(input_ids=ids, use_cache=False).last_hidden_state


class HiddenCache:
    """Base hidden states per training window, computed on first use and kept when the windows repeat."""

    def __init__(self, model, windows: torch.Tensor, keep: bool):
        self.model, self.windows, self.keep, self.store = model, windows, keep, {}

    def __call__(self, rows: torch.Tensor, device) -> torch.Tensor:
        missing = [int(r) for r in rows if int(r) not in self.store]
        if missing:
            fresh = base_hidden(self.model, self.windows[missing].to(device))
            if not self.keep:
                self.store.clear()
            self.store.update(zip(missing, fresh))
        return torch.stack([self.store[int(r)] for r in rows])


def training_order(n_windows: int, batch_size: int, tokens: int, seq_len: int) -> tuple[torch.Tensor, int]:
    """Window indices for every step (epochs repeat the windows in a new order each) and the number of epochs."""
    steps = max(1, math.ceil(max(tokens, 1) / (batch_size * seq_len)))
    order = reshuffled_epochs(n_windows, steps * batch_size)
    return order.view(steps, batch_size), math.ceil(steps * batch_size / n_windows)


@torch.no_grad()
def mtp_acceptance(model, windows: torch.Tensor) -> list[float]:
    """Per depth k: how often its greedy guess equals the base's greedy token (teacher forcing, held-out text).

    This is the chance that draft k is accepted given that drafts 1..k−1 were.
    """
    head = model.get_output_embeddings()
    hits = [0.0] * len(model.mtp)
    count = [0] * len(model.mtp)
    for w in windows:
        ids = w[None]
        base_h = base_hidden(model, ids)
        base_top = head(base_h).argmax(-1)
        for k, (mod, g) in enumerate(zip(model.mtp, mtp_hiddens(model, ids, base_h)), start=1):
            draft = DraftHead(head, mod.draft_ids)
            guess = draft.token_ids(draft.logits(mod.norm(g)).argmax(-1))  # position i guesses token i+k+1
            hits[k - 1] += float((guess == base_top[:, k:]).sum())
            count[k - 1] += guess.numel()
    return [h / max(c, 1) for h, c in zip(hits, count)]


def expected_tokens_per_step(acceptance: list[float]) -> float:
    """Tokens per verification step if each depth is accepted with its (conditional) rate: 1 + a1 + a1·a2 + …"""
    total, run = 1.0, 1.0
    for a in acceptance:
        run *= a
        total += run
    return total


def train_mtp(model, windows: torch.Tensor, opts, state_dir: Path | None, resume: bool = False,
              progress=None, chat: selfgen.ChatTurns | None = None) -> dict:
    """Train ``model.mtp`` for ``opts.train_tokens`` tokens on ``windows`` (N × seq_len token ids, repeated in
    epochs when the budget is larger) with the base frozen; returns a summary. ``chat``: the tokenizer's chat
    template, for the dialogues ``opts.generate_chat`` asks the base to write."""
    from accelerate import Accelerator

    acc = Accelerator()
    t0 = time.perf_counter()  # the time budget counts the base's writing too
    windows, generated = selfgen.extended(model, windows, opts, 0, state_dir, resume, progress, chat,
                                          opts.generate_chat)
    for p in model.parameters():
        p.requires_grad_(False)
    params = [p for p in model.mtp.parameters()]
    for p in params:
        p.requires_grad_(True)
    model.mtp.float()  # MTP modules train in fp32 even when the base is half precision
    choose_draft_vocab(model, windows)  # the training text is the best estimate of which tokens drafts need
    objective = MTPObjective(model, opts.target, opts.loss_positions)
    batch_size = min(opts.batch_size, len(windows))
    order, epochs = training_order(len(windows), batch_size, opts.train_tokens or windows.numel(), windows.shape[1])
    steps = len(order)
    objective, optimizer, schedule, saved, done = start(acc, objective, params, opts.lr, steps, state_dir, resume)
    if resume:
        model.mtp.load_state_dict(saved)
    model.train()
    hidden = HiddenCache(model, windows,
                         keep=epochs > 1 and windows.numel() * model.config.hidden_size * 4 <= CACHE_BYTES)
    history = []
    if progress:
        progress.start("训练 MTP", steps, done)
    loop_t0 = time.perf_counter()
    for step in range(done, steps):
        rows = order[step]
        batch = windows[rows].to(acc.device)
        gen = torch.Generator().manual_seed(1 + step)  # loss positions depend on the step only: resumable exactly
        with autocast(opts.precision, acc.device):
            loss, per_head, accs = objective(batch, gen, hidden(rows, acc.device))
        acc.backward(loss)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        history.append({"step": step + 1, "loss": per_head.tolist(), "accuracy": accs.tolist()})
        fit_to_budget(schedule, steps, len(history), loop_t0, t0, opts.max_minutes, step + 1)
        if progress:
            progress.update(step + 1, float(loss.detach()), accs.tolist())
        out_of_time = past_budget(t0, opts.max_minutes)
        last = step + 1 == steps or out_of_time
        if state_dir is not None and acc.is_main_process and ((step + 1) % opts.save_every == 0 or last):
            save_state(state_dir, model.mtp.state_dict(), optimizer, schedule, step + 1, steps,
                       keep=(selfgen.FILE,))
        if out_of_time:
            break
    model.eval()
    for p in params:
        p.requires_grad_(False)
    model.mtp.to(next(body_of(model).parameters()).dtype)
    ran = done + len(history)
    return {"steps": ran, "planned_steps": steps, "lr_horizon": factor(schedule).steps, "resumed_from_step": done,
            "tokens": ran * batch_size * windows.shape[1],
            "distinct_tokens": int(windows.numel()), "epochs": epochs, "hidden_cached": hidden.keep,
            "seconds": time.perf_counter() - t0, "target": opts.target, "generated": generated,
            "precision": precision_label(opts.precision, acc.device),
            "final_loss": history[-1]["loss"] if history else None,
            "final_train_accuracy": history[-1]["accuracy"] if history else None}


def measure_mtp(model: nn.Module, eval_ids: torch.Tensor, new_tokens: int = 48) -> dict:
    """Per-head acceptance on held-out text, and one greedy generation with and without MTP, timed side by side."""
    acceptance = mtp_acceptance(model, eval_ids[:2])
    prompt = eval_ids[:1, :64]
    with torch.no_grad():
        t = time.perf_counter()
        plain = model.generate(prompt, use_mtp=False, max_new_tokens=new_tokens, do_sample=False)
        plain_s = time.perf_counter() - t
        # both stop at end-of-turn; the MTP modules alone first, then with context lookup drafts (generate's default)
        spec = model.generate(prompt, max_new_tokens=new_tokens, do_sample=False, mtp_lookup=0)
        stats = model.last_mtp_stats
        hybrid = model.generate(prompt, max_new_tokens=new_tokens, do_sample=False)
        hstats = model.last_mtp_stats
    return {"head_acceptance_teacher_forced": acceptance,
            "expected_tokens_per_step": expected_tokens_per_step(acceptance),
            "accepted_per_step": stats["accepted_per_step"], "head_acceptance": stats["head_acceptance"],
            "tokens_per_s_mtp": stats["tokens_per_s"], "tokens_per_s_plain": (plain.shape[1] - 64) / plain_s,
            "with_lookup": {"accepted_per_step": hstats["accepted_per_step"], "tokens_per_s": hstats["tokens_per_s"],
                            "lookup_steps": hstats["lookup_steps"], "mtp_steps": hstats["mtp_steps"]},
            "greedy_identical": bool(torch.equal(plain, spec) and torch.equal(plain, hybrid)),
            "measured_with": f"eval prompt of 64 tokens, {new_tokens} new tokens, greedy, batch 1, "
                             f"draft tree widths {getattr(model, 'DRAFT_BRANCHES', 1)} per module"}


def mtp_windows(tokenizer, recipe) -> torch.Tensor:
    """MTP training windows: ``--mtp-data`` (default: the calibration text), ``--mtp-train-tokens`` of them."""
    o = recipe.mtp
    text = read_text(o.data or recipe.calibration.data, "calibration")
    return token_windows(tokenizer, text, o.train_tokens, o.seq_len, recipe.calibration.seed)
