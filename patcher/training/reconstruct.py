"""逐层重建：修复的第一段。每个转换过的模块先单独学着给出老师同一位置模块的输出。

- MoE MLP 对齐老师同一层的稠密 MLP（逐 token 的行；前向仍是硬 top-k，训练时落选专家经直通估计也有梯度，
  见 ``MoEMLP._straight_through``）；
- 转换过的注意力（潜在 MLA、解耦 RoPE、原生 DeepSeek-V3 的注意力；学习率 ``local_attention_lr``，0 为不做）对齐老师同一层
  注意力的输出（整段序列：注意力要看前文）。只训练转换改动过的参数（与 ``--scope converted`` 相同）。

在老师的前向里记下这些模块的输入与输出（一次前向记一组，按内存分组），然后每个模块各自训练，最小化相对
平方误差 ‖student(x) − teacher(x)‖² / ‖teacher(x)‖²。一个模块只做自己的前向与反向，不跑整个模型，所以同样的
CPU 时间能看到多得多的 token；之后的 KL 蒸馏再端到端地收拾层与层之间的误差（分块重建再整体微调，见 BRECQ、
OmniQuant 与剪枝中的逐层重建）。
"""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

import torch
from torch import nn

from .loop import autocast, converted_modules, converted_parts, past_budget, rescale_latents, restore_latents

# inputs and outputs of at most this many bytes are held at once (bf16): the modules are captured in groups that fit
CAPTURE_BYTES = 2 << 30
FILE = "reconstruct.json"  # the stage's summary, kept in the training state: a resumed heal does not redo it
EVAL_ROWS = 4096  # tokens held out of the training to measure the error before and after on (at most 1/8 of them)
MLP_KINDS = ("MoEMLP", "DeepseekV3MoE")
ATTENTION_KINDS = ("LatentAttention", "DecoupledLatentAttention", "DeepseekV3Attention")


def module_pairs(student: nn.Module, teacher: nn.Module, attention: bool = True) -> list[tuple[str, nn.Module, nn.Module]]:
    """(name, the student's converted module, the teacher's module of the same name) for every MoE MLP, and with
    ``attention`` every attention conversion made."""
    kinds = MLP_KINDS + (ATTENTION_KINDS if attention else ())
    pairs = []
    for name, mod in converted_modules(student):
        if type(mod).__name__ in kinds:
            try:
                pairs.append((name, mod, teacher.get_submodule(name)))
            except AttributeError:
                raise ValueError(f"老师没有模块 {name}：逐层重建需要与学生同结构的源模型（--teacher）") from None
    return pairs


def is_attention(module: nn.Module) -> bool:
    return type(module).__name__ in ATTENTION_KINDS


def capture_inputs(teacher: nn.Module, modules: list[nn.Module], windows: torch.Tensor, batch_size: int,
                   precision: str, whole: list[bool] | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs, outputs) as bf16 of each of ``modules`` in the teacher's forward over ``windows``: the inputs and
    the targets of the reconstruction. Rows (tokens × hidden), or where ``whole`` says so whole windows
    (windows × tokens × hidden): an attention's output depends on the tokens before."""
    whole = whole or [False] * len(modules)
    rows = [([], []) for _ in modules]

    def keep(i):
        def hook(_m, args, kwargs, out):
            x = args[0] if args else kwargs["hidden_states"]
            y = out[0] if isinstance(out, tuple) else out
            shape = (-1, *x.shape[-2:]) if whole[i] else (-1, x.shape[-1])
            rows[i][0].append(x.detach().reshape(shape).bfloat16())
            rows[i][1].append(y.detach().reshape(shape[:-1] + (y.shape[-1],)).bfloat16())
        return hook

    hooks = [m.register_forward_hook(keep(i), with_kwargs=True) for i, m in enumerate(modules)]
    try:
        with torch.no_grad(), autocast(precision, windows.device):
            for b in range(0, len(windows), batch_size):
                teacher(input_ids=windows[b:b + batch_size], use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return [(torch.cat(x), torch.cat(y)) for x, y in rows]


def call_arguments(model: nn.Module, modules: list[nn.Module], windows: torch.Tensor) -> list[dict]:
    """The keyword arguments (all but the hidden states: rotary tables, mask, positions) each of ``modules``
    receives in ``model``'s forward over ``windows``; the same for every batch of that shape."""
    got: list[dict] = [{} for _ in modules]

    def keep(i):
        def hook(_m, args, kwargs):
            got[i] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        return hook

    hooks = [m.register_forward_pre_hook(keep(i), with_kwargs=True) for i, m in enumerate(modules)]
    try:
        with torch.no_grad():
            model(input_ids=windows, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return got


def _first(kwargs: dict, n: int, full: int) -> dict:
    """``kwargs`` for the first ``n`` of the ``full`` sequences they were captured for (tensors batched over them
    are cut; shared ones such as (1, T) positions stay)."""
    def cut(v):
        if torch.is_tensor(v) and v.dim() and v.shape[0] == full:
            return v[:n]
        if isinstance(v, tuple):
            return tuple(cut(e) for e in v)
        return v
    return {k: cut(v) for k, v in kwargs.items()} if n != full else kwargs


def attention_apply(kwargs: dict, batch: int):
    """``apply`` for ``fit_layer`` that runs an attention on whole windows, ``batch`` at a time, with the keyword
    arguments it gets in the model's own forward."""
    def apply(mod, xs):
        outs = []
        for b in range(0, len(xs), batch):
            x = xs[b:b + batch]
            outs.append(mod(hidden_states=x, **_first(kwargs, len(x), batch))[0])
        return torch.cat(outs)
    return apply


def _rows_apply(mod, rows):
    return mod(rows[None])[0]


def trained_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The parameters the conversion changed (``CONVERTED``): all of an MoE MLP; the latent attention keeps the
    source's q and o projections."""
    return [p for r in converted_parts(module) for p in r.parameters() if p.is_floating_point()]


def relative_error(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((out.float() - target) ** 2).sum() / (target ** 2).sum().clamp_min(1e-20)


def fit_layer(module: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float, batch: int,
              precision: str, seed: int, apply=None) -> tuple[float, float]:
    """Train ``module``'s converted parameters to give the teacher's outputs ``y`` on the inputs ``x`` (rows, or
    whole windows with ``apply = attention_apply(...)``; ``batch`` of them a step); (error before, after) on
    held-out inputs (the first ``EVAL_ROWS`` tokens of them, at most an eighth, never trained on). A module that
    ends worse on them than it started gets its weights back: the stage never makes a module worse."""
    apply = apply or _rows_apply

    def run(rows):
        with autocast(precision, rows.device):
            return apply(module, rows.to(next(module.parameters()).dtype)).float()

    per = x[0].numel() // x.shape[-1]  # tokens per input (1 for rows)
    n = max(1, min(EVAL_ROWS // per, len(x) // 8))
    held, target_held, x, y = x[:n], y[:n].float(), x[n:], y[n:]
    with torch.no_grad():
        before = float(relative_error(run(held), target_held))
    rescaled = rescale_latents(module)  # tiny-scale latents: Adam steps in unit-scale coordinates
    params = trained_parameters(module)
    start = [p.detach().clone() for p in params]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        pick = torch.randint(0, len(x), (batch,), generator=g)
        loss = relative_error(run(x[pick]), y[pick].float())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    for p in params:
        p.requires_grad_(False)
    with torch.no_grad():
        after = float(relative_error(run(held), target_held))
        if not after <= before:  # NaN too
            for p, s in zip(params, start):
                p.copy_(s)
            after = before
    restore_latents(rescaled)
    return before, after


def reconstruct(student: nn.Module, teacher: nn.Module, windows: torch.Tensor, opts, t0: float,
                progress=None) -> dict | None:
    """Layer-wise reconstruction of every converted module on ``windows`` (``opts.local_steps`` steps each;
    ``opts.local_batch`` tokens a step: rows for an MLP, whole windows for an attention); stops between modules
    when ``opts.max_minutes`` since ``t0`` are spent."""
    pairs = module_pairs(student, teacher, opts.local_attention_lr > 0)
    if not opts.local_steps or not pairs:
        return None
    start = time.perf_counter()
    teacher.eval()
    seq = windows.shape[1]
    span = max(1, min(len(windows), opts.local_batch // seq))  # windows an attention step reads
    found = iter(call_arguments(student, [s for _, s, _ in pairs if is_attention(s)], windows[:span]))
    arguments = [next(found) if is_attention(s) else None for _, s, _ in pairs]  # one per pair; None for an MLP
    d = student.config.hidden_size
    per_module = windows.numel() * d * 2 * 2  # inputs and outputs, bf16
    group = max(1, CAPTURE_BYTES // max(1, per_module))
    layers, skipped = [], 0
    if progress:
        progress.start("修复：逐层重建", len(pairs))
    for g0 in range(0, len(pairs), group):
        chunk = pairs[g0:g0 + group]
        if past_budget(t0, opts.max_minutes):
            skipped += len(pairs) - g0
            break
        inputs = capture_inputs(teacher, [t for _, _, t in chunk], windows, opts.batch_size, opts.precision,
                                [is_attention(s) for _, s, _ in chunk])
        for k, ((name, s_mod, _), (x, y)) in enumerate(zip(chunk, inputs)):
            if past_budget(t0, opts.max_minutes):
                skipped += len(chunk) - k
                break
            attention = is_attention(s_mod)
            if progress:
                numbers = re.findall(r"\d+", name)  # the layer index in the module's name
                progress.step(int(numbers[-1]) if numbers else g0 + k,
                              "注意力对齐老师的注意力" if attention else "MoE 对齐老师的稠密 MLP")
            apply = attention_apply(arguments[g0 + k], span) if attention else None
            before, after = fit_layer(s_mod, x, y, opts.local_steps,
                                      opts.local_attention_lr if attention else opts.local_lr,
                                      span if attention else opts.local_batch, opts.precision, opts.seed + g0 + k, apply)
            layers.append({"module": name, "kind": "attention" if attention else "mlp",
                           "error_before": before, "error_after": after})
            if progress:
                progress.advance()
        del inputs
        if skipped:
            break
    return {"steps_per_layer": opts.local_steps, "tokens": int(windows.numel()), "batch_rows": opts.local_batch,
            "lr": opts.local_lr, "attention_lr": opts.local_attention_lr if opts.local_attention_lr > 0 else None,
            "layers": layers, "skipped_layers": skipped,
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
