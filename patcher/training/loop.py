"""训练循环共用的部件（MTP 训练与修复）：混合精度、带预热的余弦学习率（有时间上限时在时间用完时降到零），
原子保存与精确恢复可续训状态。

混合精度（``precision``）：``auto`` 在 bfloat16 矩阵乘法有硬件支持时（支持 bf16 的 GPU；带 AVX512-BF16 或 AMX
的 CPU）让前向在 bfloat16 autocast 下运行，权重、梯度与优化器状态仍是 fp32，损失在 fp32 中计算；``bf16``
总是这样做，``fp32`` 从不。在本项目的 2 核 CPU（AVX512-BF16）上，SmolLM2-135M 一个修复步快 2.7 倍。

状态目录只放续训需要的东西：被训练的张量（``trainable.safetensors``）、优化器与调度器、步数；
保存先写到同级临时目录再改名，中途崩溃时上一份状态保持完整。
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from torch import nn


def fast_bf16(device: torch.device) -> bool:
    """Whether bfloat16 matrix products run natively on ``device`` (elsewhere autocast would emulate them slowly)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return False


def uses_bf16(precision: str, device: torch.device) -> bool:
    return precision == "bf16" or (precision == "auto" and fast_bf16(device))


def precision_label(precision: str, device: torch.device) -> str:
    """How the forward passes ran, for training summaries."""
    return "bf16 autocast" if uses_bf16(precision, device) else "fp32"


def autocast(precision: str, device: torch.device):
    """The forward-pass context for ``precision`` (``auto``/``bf16``/``fp32``) on ``device``."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=uses_bf16(precision, device))


def past_budget(t0: float, minutes: float) -> bool:
    """Whether a loop started at ``t0`` (``time.perf_counter()``) has used its ``minutes`` (0: no limit)."""
    return minutes > 0 and time.perf_counter() - t0 >= 60 * minutes


class WarmupCosine:
    """Learning-rate factor: linear warm-up over the first 5 % of ``steps``, then cosine decay to zero at ``steps``.

    An object, not a lambda, so that ``fit_to_budget`` can move the horizon while the schedule runs."""

    def __init__(self, steps: int):
        self.steps = steps

    def __call__(self, s: int) -> float:
        warm = max(1, self.steps // 20)
        return min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, self.steps) / self.steps))


def cosine_with_warmup(optimizer, steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(steps))


BUDGET_PROBE_STEPS = 10  # steps timed before the first estimate (the first ones also pay for allocation)


def fit_to_budget(schedule, planned: int, ran: int, loop_t0: float, t0: float, minutes: float, step: int) -> None:
    """Under a time budget, let the cosine reach zero when the time runs out, not at the planned step count that
    the budget cuts short (then the rate would never anneal). The horizon is re-estimated after every step from
    the measured pace (``ran`` steps since ``loop_t0``, validation included) and never exceeds ``planned``.
    Without a budget nothing changes, so runs stay reproducible step for step."""
    if minutes <= 0 or ran < BUDGET_PROBE_STEPS:
        return
    now = time.perf_counter()
    pace = (now - loop_t0) / ran
    left = 60 * minutes - (now - t0)
    factor(schedule).steps = min(planned, step + max(1, int(0.98 * left / pace)))


def factor(schedule) -> WarmupCosine:
    """The learning-rate factor inside a (possibly accelerate-wrapped) schedule."""
    return getattr(schedule, "scheduler", schedule).lr_lambdas[0]


def reshuffled_epochs(n_windows: int, visits: int, seed: int = 0) -> torch.Tensor:
    """Window indices for ``visits`` visits: every window once per epoch, epoch e shuffled with seed ``seed + e``."""
    epochs = math.ceil(visits / n_windows)
    return torch.cat([torch.randperm(n_windows, generator=torch.Generator().manual_seed(seed + e))
                      for e in range(epochs)])[:visits]


def start(acc, module, params: list, lr: float, steps: int, state_dir: Path | None, resume: bool):
    """AdamW (no weight decay) with the warmup-cosine schedule, both prepared by accelerate with ``module``; a
    resumed run also gets its saved tensors and the step it reached. Returns (module, optimizer, schedule, saved,
    done)."""
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = cosine_with_warmup(optimizer, steps)
    module, optimizer, schedule = acc.prepare(module, optimizer, schedule)
    saved, done = load_state(state_dir, optimizer, schedule) if resume else ({}, 0)
    # a resumed run goes on with the planned cosine, not with an earlier budget's (by then annealed) one; a budget
    # of its own fits the horizon again
    factor(schedule).steps = steps
    return module, optimizer, schedule, saved, done


def save_state(state_dir: Path, tensors: dict, optimizer, schedule, step: int, steps: int,
               keep: tuple[str, ...] = ()) -> None:
    """Write the resumable state atomically; files named in ``keep`` (globs) move over from the previous state."""
    from safetensors.torch import save_file

    from ..files import atomic_dir

    carried = [p for pattern in keep for p in state_dir.glob(pattern)] if state_dir.exists() else []
    with atomic_dir(state_dir, overwrite=True) as tmp:
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(tmp / "trainable.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "schedule": schedule.state_dict()}, tmp / "optimizer.pt")
        (tmp / "progress.json").write_text(json.dumps({"step": step, "steps": steps}))
        for path in carried:
            path.rename(tmp / path.name)


def save_file_atomic(path: Path, tensors: dict, metadata: dict | None = None) -> None:
    """Write a safetensors file next to a training state (a cache), renamed into place only once complete."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.rename(path)


def load_state(state_dir: Path | None, optimizer, schedule) -> tuple[dict, int]:
    """(saved tensors, step) of a resumable state; the optimizer and schedule are restored in place."""
    from safetensors.torch import load_file

    if state_dir is None or not (state_dir / "progress.json").exists():
        raise FileNotFoundError(f"没有可续训的状态：{state_dir}/progress.json 不存在")
    opt = torch.load(state_dir / "optimizer.pt", weights_only=True)
    optimizer.load_state_dict(opt["optimizer"])
    schedule.load_state_dict(opt["schedule"])
    step = json.loads((state_dir / "progress.json").read_text())["step"]
    return load_file(str(state_dir / "trainable.safetensors")), step


class _RowScale(nn.Module):
    """weight = stored · scale (per row): lets Adam step in the stored, unit-scale coordinates."""

    def __init__(self, scale: torch.Tensor):
        super().__init__()
        self.register_buffer("scale", scale)

    def forward(self, stored):
        return stored * self.scale[:, None].to(stored.dtype)

    def right_inverse(self, weight):
        return weight / self.scale[:, None].to(weight.dtype)


def rescale_latents(model: nn.Module) -> list[nn.Module]:
    """Give Adam unit-scale coordinates for latents kept in RMSNorm's linear regime.

    A decoupled-RoPE latent is stored tiny (``kv_a_proj_with_mqa`` rows ≈ α·W, α ~ 10⁻⁴) with a large
    ``kv_a_layernorm`` weight (see ``converters.rope_split.latent_scale``). Adam's step is about ``lr`` whatever a
    weight's size, which would wipe those rows out; training them as ``α·V`` with V at the source's scale does not.
    """
    from torch.nn.utils import parametrize

    done = []
    for mod in model.modules():
        norm, proj = getattr(mod, "kv_a_layernorm", None), getattr(mod, "kv_a_proj_with_mqa", None)
        if norm is None or proj is None or float(norm.weight.detach().abs().mean()) < 10:
            continue
        rank = norm.weight.shape[0]
        eps = getattr(norm, "eps", None) or getattr(norm, "variance_epsilon", 1e-6)
        scale = torch.ones(proj.weight.shape[0], dtype=torch.float32)
        scale[:rank] = math.sqrt(eps) / norm.weight.detach().float().abs().clamp_min(1e-12)
        parametrize.register_parametrization(proj, "weight", _RowScale(scale))
        done.append(proj)
    return done


def restore_latents(modules: list[nn.Module]) -> None:
    from torch.nn.utils import parametrize

    for proj in modules:
        parametrize.remove_parametrizations(proj, "weight", leave_parametrized=True)


# the module classes conversion puts in a model (dsopt's own, and their names in a native DeepSeek-V3 export),
# with the parts conversion changed (None: all of it; the latent attention keeps the source's q and o projections)
CONVERTED = {"LatentAttention": ("kv_a_proj", "k_b_proj", "v_b_proj"), "DecoupledLatentAttention": None,
             "MoEMLP": None, "DeepseekV3Attention": None, "DeepseekV3MoE": None}


def converted_parts(module: nn.Module) -> list[nn.Module]:
    """The submodules of a converted ``module`` that conversion changed (``CONVERTED``): all of it, or named parts."""
    parts = CONVERTED[type(module).__name__]
    return [module] if parts is None else [module.get_submodule(n) for n in parts]


def converted_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if type(m).__name__ in CONVERTED
            and not n.startswith("mtp") and ".mtp" not in n]
