"""逐层重建：修复的第一段。每个转换过的 MLP（MoE）先单独学着给出老师同一层稠密 MLP 的输出。

在老师的前向里记下这些层的输入（一次前向记一组层，按内存分组），然后每层各自训练：学生的 MoE 与老师的
稠密 MLP 读同一批 token，最小化相对平方误差 ‖moe(x) − mlp(x)‖² / ‖mlp(x)‖²（前向仍是硬 top-k；训练时落选
专家经直通估计也有梯度，见 ``MoEMLP._straight_through``）。一层只做自己的前向与反向，不跑注意力、不跑整个
模型，所以同样的 CPU 时间能看到多得多的 token；之后的 KL 蒸馏再端到端地收拾层与层之间的误差（分块重建再
整体微调，见 BRECQ、OmniQuant 与剪枝中的逐层重建）。
"""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

import torch
from torch import nn

from .loop import autocast, converted_modules, past_budget

# inputs and outputs of at most this many bytes are held at once (bf16): the layers are captured in groups that fit
CAPTURE_BYTES = 2 << 30
FILE = "reconstruct.json"  # the stage's summary, kept in the training state: a resumed heal does not redo it
EVAL_ROWS = 4096  # rows held out of the training to measure the error before and after on (at most 1/8 of them)


def mlp_pairs(student: nn.Module, teacher: nn.Module) -> list[tuple[str, nn.Module, nn.Module]]:
    """(name, the student's MoE MLP, the teacher's module of the same name) for every MoE MLP conversion made."""
    pairs = []
    for name, mod in converted_modules(student):
        if type(mod).__name__ in ("MoEMLP", "DeepseekV3MoE"):
            try:
                pairs.append((name, mod, teacher.get_submodule(name)))
            except AttributeError:
                raise ValueError(f"老师没有模块 {name}：逐层重建需要与学生同结构的源模型（--teacher）") from None
    return pairs


def capture_inputs(teacher: nn.Module, modules: list[nn.Module], windows: torch.Tensor, batch_size: int,
                   precision: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(rows read, rows given), tokens × hidden as bf16, of each of ``modules`` in the teacher's forward over
    ``windows``: the inputs and the targets of the reconstruction."""
    rows = [([], []) for _ in modules]

    def keep(i):
        def hook(_m, args, out):
            rows[i][0].append(args[0].detach().reshape(-1, args[0].shape[-1]).bfloat16())
            rows[i][1].append(out.detach().reshape(-1, out.shape[-1]).bfloat16())
        return hook

    hooks = [m.register_forward_hook(keep(i)) for i, m in enumerate(modules)]
    try:
        with torch.no_grad(), autocast(precision, windows.device):
            for b in range(0, len(windows), batch_size):
                teacher(input_ids=windows[b:b + batch_size], use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return [(torch.cat(x), torch.cat(y)) for x, y in rows]


def relative_error(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((out.float() - target) ** 2).sum() / (target ** 2).sum().clamp_min(1e-20)


def fit_layer(student_mlp: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float, batch: int,
              precision: str, seed: int) -> tuple[float, float]:
    """Train ``student_mlp``'s parameters to give the teacher's outputs ``y`` on the rows ``x``; (error before,
    after) on held-out rows (the first ``EVAL_ROWS`` of them, at most an eighth, never trained on). A layer that
    ends worse on them than it started gets its weights back: the stage never makes a layer worse."""

    def run(mod, rows):
        with autocast(precision, rows.device):
            return mod(rows[None].to(next(mod.parameters()).dtype))[0].float()

    n = min(EVAL_ROWS, len(x) // 8)
    held, target_held, x, y = x[:n], y[:n].float(), x[n:], y[n:]
    with torch.no_grad():
        before = float(relative_error(run(student_mlp, held), target_held))
    params = [p for p in student_mlp.parameters() if p.is_floating_point()]
    start = [p.detach().clone() for p in params]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        pick = torch.randint(0, len(x), (batch,), generator=g)
        loss = relative_error(run(student_mlp, x[pick]), y[pick].float())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    for p in params:
        p.requires_grad_(False)
    with torch.no_grad():
        after = float(relative_error(run(student_mlp, held), target_held))
        if not after <= before:  # NaN too
            for p, s in zip(params, start):
                p.copy_(s)
            after = before
    return before, after


def reconstruct(student: nn.Module, teacher: nn.Module, windows: torch.Tensor, opts, t0: float,
                progress=None) -> dict | None:
    """Layer-wise reconstruction of every converted MLP on ``windows`` (``opts.local_steps`` steps each, batch
    ``opts.local_batch`` rows); stops between layers when ``opts.max_minutes`` since ``t0`` are spent."""
    pairs = mlp_pairs(student, teacher)
    if not opts.local_steps or not pairs:
        return None
    start = time.perf_counter()
    teacher.eval()
    d = student.config.hidden_size
    per_layer = windows.numel() * d * 2 * 2  # inputs and outputs, bf16
    group = max(1, CAPTURE_BYTES // max(1, per_layer))
    layers, skipped = [], 0
    if progress:
        progress.start("修复：逐层重建 MLP", len(pairs))
    for g0 in range(0, len(pairs), group):
        chunk = pairs[g0:g0 + group]
        if past_budget(t0, opts.max_minutes):
            skipped += len(pairs) - g0
            break
        inputs = capture_inputs(teacher, [t for _, _, t in chunk], windows, opts.batch_size, opts.precision)
        for k, ((name, s_mlp, _), (x, y)) in enumerate(zip(chunk, inputs)):
            if past_budget(t0, opts.max_minutes):
                skipped += len(chunk) - k
                break
            if progress:
                numbers = re.findall(r"\d+", name)  # the layer index in the module's name
                progress.step(int(numbers[-1]) if numbers else g0 + k, "MoE 对齐老师的稠密 MLP")
            before, after = fit_layer(s_mlp, x, y, opts.local_steps, opts.local_lr, opts.local_batch,
                                      opts.precision, opts.seed + g0 + k)
            layers.append({"module": name, "error_before": before, "error_after": after})
            if progress:
                progress.advance()
        del inputs
        if skipped:
            break
    return {"steps_per_layer": opts.local_steps, "tokens": int(windows.numel()), "batch_rows": opts.local_batch,
            "lr": opts.local_lr, "layers": layers, "skipped_layers": skipped,
            "seconds": time.perf_counter() - start}


def stage(student: nn.Module, teacher: nn.Module, windows: torch.Tensor, opts, t0: float, state_dir: Path | None,
          resume: bool, progress=None) -> dict | None:
    """The first stage of healing: ``reconstruct`` on ``opts.local_tokens`` of the training windows (drawn with
    ``opts.seed``). A resumed heal whose state exists already has its result in the saved weights."""
    if not opts.local_steps or opts.lora:
        return None
    saved = state_dir / FILE if state_dir is not None else None
    if resume and state_dir is not None and (state_dir / "progress.json").exists():
        return json.loads(saved.read_text()) if saved.exists() else None
    n = max(1, min(len(windows), opts.local_tokens // windows.shape[1]))
    pick = torch.randperm(len(windows), generator=torch.Generator().manual_seed(opts.seed))[:n]
    summary = reconstruct(student, teacher, windows[pick], opts, t0, progress)
    if saved is not None and summary is not None:
        saved.parent.mkdir(parents=True, exist_ok=True)
        tmp = saved.with_suffix(".tmp")
        tmp.write_text(json.dumps(summary))
        tmp.rename(saved)
    return summary
