"""修复（healing）：用源模型做老师，在文本上做一小段 KL 蒸馏，把转换后的模型拉回基座的质量。

- 缺省只训练转换改动过的模块（潜在注意力的 KV 投影、MoE 的路由器与专家；``--scope converted``），
  ``all`` 训练除嵌入与输出头外的全部参数，``--lora R`` 改为在这些模块的线性层上加 LoRA、训练后合并回权重
  （检查点格式不变）。MTP 模块的目标是基座自己的预测，修复之后用 ``dsopt train-mtp`` 重新训练它们。
- ``--generate-tokens N``：老师先从训练文本的随机片段出发续写 N 个 token，与原文一起训练（见 ``selfgen``）。
- ``--local-steps S``：KL 蒸馏之前，每个转换过的模块（MoE MLP 与注意力）先单独对齐老师同一位置模块的输出 S 步
  （逐层重建，见 ``reconstruct``）；一个模块只算自己，比端到端的一步便宜得多。
- 老师的 logits 在线计算，或（``--top-k K``）先算一遍每个位置的 top-K 对数概率存盘，之后每轮、续训都从
  磁盘读：KL 在 top-K 上精确计算，其余概率质量合并成一个"其他"类。
- 建立在 accelerate 上（同一条命令在 CPU、单卡、多卡 ``accelerate launch`` 上运行）；每 ``save_every`` 步把
  可训练参数、优化器、调度器与步数原子地写到 ``OUT/heal-train/``，``--resume`` 精确续训。
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from ..evaluation.metrics import compare, evaluate_base
from ..recipe import Precision, Section
from . import reconstruct, selfgen
from .loop import (
    autocast,
    converted_modules,
    converted_parts,
    factor,
    fit_to_budget,
    past_budget,
    precision_label,
    rescale_latents,
    reshuffled_epochs,
    restore_latents,
    save_file_atomic,
    save_state,
    start,
)

STATE_DIR = "heal-train"
class HealOptions(Section):
    """修复的选项（``dsopt heal`` 的参数与 ``heal()`` 的输入是同一个模型）。"""
    teacher: str | None = Field(None, description="老师：源检查点（目录、.gguf 或内置别名）；缺省为转换时的来源")
    data: str | None = Field(None, description="训练文本（.txt/.jsonl）；缺省为转换时的校准文本")
    tokens: int = Field(65536, ge=64, description="训练 token 数（决定步数）；多于文本时按轮次重复整篇文本")
    max_minutes: float = Field(0.0, ge=0.0, description="训练时间上限（分钟，0 表示不限）；学习率在时间用完前降到零，"
                               "到时停在当前步，保留最好的权重")
    lr: float = Field(5e-5, gt=0.0, description="学习率")
    seq_len: int = Field(256, ge=16, description="序列长度")
    batch_size: int = Field(4, ge=1, description="批大小")
    scope: str = Field("converted", pattern="^(converted|all)$",
                       description="训练范围：converted（只训练转换改动过的模块）或 all（除嵌入与输出头外全部）")
    lora: int = Field(0, ge=0, description="LoRA 秩（0 表示直接训练权重）；训练后合并回权重")
    top_k: int = Field(0, ge=0, description="老师 logits 的 top-K 存盘（0 表示每步在线计算完整分布）")
    generate_tokens: int = Field(
        0, ge=0, description="老师从训练文本的随机片段出发自己续写这么多 token，加入训练数据（0 表示不生成）；"
        "生成时间计入 --max-minutes")
    generate_temperature: float = Field(1.0, ge=0.0, description="老师续写时的采样温度（0 为贪心）")
    local_steps: int = Field(
        200, ge=0, description="KL 蒸馏之前，每个转换过的模块（MoE MLP 与注意力，见 --local-attention-lr）先单独对齐"
        "老师同一位置模块的输出这么多步（逐层重建，见 reconstruct；0 表示不做；--lora 时不做）；时间计入 --max-minutes")
    local_attention_lr: float = Field(4e-4, ge=0.0, description="逐层重建中转换过的注意力（潜在 MLA、DeepSeek-V3 注意力）"
                                      "的学习率（0 表示只对齐 MoE MLP）")
    local_tokens: int = Field(32768, ge=64, description="逐层重建用的 token 数（取自训练窗口，在老师的前向里记下各层输入）")
    local_lr: float = Field(2e-3, gt=0.0, description="逐层重建的学习率")
    local_batch: int = Field(1024, ge=1, description="逐层重建每步的 token 行数")
    save_every: int = Field(50, ge=1, description="每隔多少步保存可续训的状态")
    val_tokens: int = Field(2048, ge=0, description="从训练文本中留出、不参与训练的验证 token 数（0 表示不验证）")
    val_every: int = Field(25, ge=1, description="每隔多少步在留出窗口上量一次 KL；最后保留 KL 最小的权重")
    seed: int = Field(0, description="随机种子（窗口顺序）")
    precision: Precision = Field(
        "auto", description="前向精度：auto（硬件支持 bf16 时用 bf16 autocast）、bf16 或 fp32；权重与优化器总是 fp32")

    @model_validator(mode="after")
    def _local_trains_weights(self):
        # with --lora the stage is off (it trains the MoE's own weights); asked for by name, it is refused
        if self.local_steps and self.lora and "local_steps" in self.model_fields_set:
            raise ValueError("逐层重建（--local-steps）直接训练 MoE 自身的权重，不能与 --lora 同用")
        return self


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update B·A (B starts at zero: the model is unchanged)."""

    def __init__(self, base: nn.Linear, rank: int):
        super().__init__()
        self.base = base
        self.lora_a = nn.Parameter(torch.randn(rank, base.in_features, dtype=torch.float32) / math.sqrt(base.in_features))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, dtype=torch.float32))

    def forward(self, x):
        return self.base(x) + F.linear(F.linear(x.float(), self.lora_a), self.lora_b).to(x.dtype)

    def merged(self) -> nn.Linear:
        with torch.no_grad():
            self.base.weight += (self.lora_b @ self.lora_a).to(self.base.weight.dtype)
        return self.base


def select_trainable(model: nn.Module, opts: HealOptions) -> list[nn.Parameter]:
    """Freeze everything, then unfreeze (or wrap with LoRA) what ``opts`` names; return the trainable parameters."""
    for p in model.parameters():
        p.requires_grad_(False)
    if opts.scope == "converted":
        roots = [part for _, m in converted_modules(model) for part in converted_parts(m)]
        if not roots:
            raise ValueError("模型里没有转换过的模块（MLA 注意力或 MoE）：没有可修复的部分；用 --scope all 训练全部")
    else:
        frozen = {id(p) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None
                  for p in m.parameters()}
        mtp = getattr(model, "mtp", None)
        frozen |= {id(p) for p in mtp.parameters()} if mtp is not None else set()
        roots = [model]
    if opts.lora:
        inside = {id(m) for root in roots for m in root.modules()}
        head = model.get_output_embeddings()
        params = []
        for name, child in list(model.named_modules()):
            if isinstance(child, nn.Linear) and id(child) in inside and child is not head \
                    and not name.startswith("mtp"):
                wrapped = LoRALinear(child, min(opts.lora, child.in_features, child.out_features))
                model.set_submodule(name, wrapped)
                params += [wrapped.lora_a, wrapped.lora_b]
        for p in params:
            p.requires_grad_(True)
        return params
    params, seen = [], set()
    for root in roots:
        for p in root.parameters():
            if (opts.scope == "converted" or id(p) not in frozen) and p.is_floating_point() and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    for p in params:
        p.requires_grad_(True)
    return params


def merge_lora(model: nn.Module) -> None:
    for name, mod in list(model.named_modules()):
        if isinstance(mod, LoRALinear):
            model.set_submodule(name, mod.merged())


def teacher_topk(teacher: nn.Module, windows: torch.Tensor, k: int, path: Path | None) -> dict:
    """Top-k log-probabilities of the teacher at every position (cached in ``path`` when given)."""
    from safetensors.torch import load_file

    if path is not None and path.exists():
        cached = load_file(str(path))
        if cached["values"].shape[:2] == windows.shape and cached["values"].shape[-1] == k:
            return cached
    values, indices = [], []
    with torch.no_grad():
        for w in windows:
            lp = torch.log_softmax(teacher(input_ids=w[None], use_cache=False).logits[0].float(), -1)
            v, i = lp.topk(k, dim=-1)
            values.append(v.half())
            indices.append(i.int())
    out = {"values": torch.stack(values), "indices": torch.stack(indices)}
    if path is not None:
        save_file_atomic(path, out)
    return out


def kl_full(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    lt = torch.log_softmax(teacher_logits.float(), -1)
    ls = torch.log_softmax(student_logits.float(), -1)
    return (lt.exp() * (lt - ls)).sum(-1).mean()


def kl_topk(values: torch.Tensor, indices: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """KL over the teacher's top-k tokens plus one class for the rest of the probability mass (exact on that partition)."""
    lt = values.float()
    ls_all = torch.log_softmax(student_logits.float(), -1)
    ls = ls_all.gather(-1, indices.long())
    pt = lt.exp()
    rest_t = (1 - pt.sum(-1)).clamp_min(1e-8)
    rest_s = (1 - ls.exp().sum(-1)).clamp_min(1e-8)
    return ((pt * (lt - ls)).sum(-1) + rest_t * (rest_t.log() - rest_s.log())).mean()


def split_validation(windows: torch.Tensor, opts: HealOptions) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(training windows, held-out validation windows). Training keeps its ``tokens`` when the text has them; a
    shorter text gives validation at most a fifth of its windows. Validation windows are spread evenly over the
    (position-sorted) windows: the end of a book alone can be unlike the rest (a licence, an index)."""
    n_val = min(opts.val_tokens // opts.seq_len, max(len(windows) - opts.tokens // opts.seq_len, len(windows) // 5))
    if not n_val:
        return windows, None
    held = torch.zeros(len(windows), dtype=torch.bool)
    held[torch.arange(n_val) * len(windows) // n_val] = True
    return windows[~held], windows[held]


def epoch_order(n_windows: int, opts: HealOptions) -> torch.Tensor:
    """The order windows are visited in: ``tokens`` worth of them (the whole text at least once), reshuffled each
    time the text runs out."""
    return reshuffled_epochs(n_windows, max(n_windows, opts.tokens // opts.seq_len), opts.seed)


def distill(student: nn.Module, teacher: nn.Module, windows: torch.Tensor, opts: HealOptions,
            state_dir: Path | None = None, resume: bool = False, progress=None, val: torch.Tensor | None = None) -> dict:
    """KL(teacher‖student) distillation on ``windows`` (N × seq_len ids); returns the training summary.

    With ``val`` (held-out windows of the training text), the KL on them is measured before training and every
    ``val_every`` steps, and the weights with the lowest one are kept: healing never leaves the model worse on
    text it did not train on than it found it.
    """
    from accelerate import Accelerator


    acc = Accelerator()
    t0 = time.perf_counter()  # the time budget counts the teacher's writing too
    teacher.eval()
    windows, generated = selfgen.extended(teacher, windows, opts, opts.seed, state_dir, resume, progress)
    local = reconstruct.stage(student, teacher, windows, opts, t0, state_dir, resume, progress)
    rescaled = rescale_latents(student)
    params = select_trainable(student, opts)
    cache = None
    if opts.top_k:
        cache = teacher_topk(teacher, windows, opts.top_k,
                             state_dir / f"teacher-top{opts.top_k}.safetensors" if state_dir else None)
    order = epoch_order(len(windows), opts)
    steps = max(1, math.ceil(len(order) / opts.batch_size))
    student, optimizer, schedule, saved, done = start(acc, student, params, opts.lr, steps, state_dir, resume)
    if resume:
        with torch.no_grad():
            for i, p in enumerate(params):
                p.copy_(saved[f"p{i}"])
    val_base = evaluate_base(teacher, val) if val is not None else None

    def validate():
        student.eval()
        with torch.no_grad():
            kl = compare(student, val_base)["kl_mean"]
        student.train()
        return kl

    # the best weights so far and their validation KL; a resumed run takes them from the saved state
    from_state = resume and "best_kl" in saved
    best = {"step": int(saved["best_step"]) if from_state else done,
            "kl": float(saved["best_kl"]) if from_state else None,
            "params": [saved[f"best{i}"] for i in range(len(params))] if from_state else None}
    val_curve = saved["val_curve"].tolist() if resume and "val_curve" in saved else []
    val_curve = [(int(s), kl) for s, kl in val_curve]
    if val_base is not None and best["kl"] is None:
        best.update(kl=validate(), params=[p.detach().clone() for p in params])
        val_curve.append((done, best["kl"]))
    student.train()
    losses = []
    if progress:
        progress.start("修复：KL 蒸馏", steps, done)
    loop_t0 = time.perf_counter()
    for step in range(done, steps):
        idx = order[step * opts.batch_size:(step + 1) * opts.batch_size]
        batch = windows[idx].to(acc.device)
        with autocast(opts.precision, acc.device):
            logits = student(input_ids=batch, use_cache=False).logits
            if cache is None:
                with torch.no_grad():
                    target = teacher(input_ids=batch, use_cache=False).logits
        if cache is not None:
            loss = kl_topk(cache["values"][idx].to(acc.device), cache["indices"][idx].to(acc.device), logits)
        else:
            loss = kl_full(target, logits)
        acc.backward(loss)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
        fit_to_budget(schedule, steps, len(losses), loop_t0, t0, opts.max_minutes, step + 1)
        if progress:
            progress.update(step + 1, losses[-1], [])
        out_of_time = past_budget(t0, opts.max_minutes)
        last = step + 1 == steps or out_of_time
        if val_base is not None and ((step + 1) % opts.val_every == 0 or last):
            val_curve.append((step + 1, validate()))
            if val_curve[-1][1] < best["kl"]:
                best.update(step=step + 1, kl=val_curve[-1][1], params=[p.detach().clone() for p in params])
        if state_dir is not None and acc.is_main_process and ((step + 1) % opts.save_every == 0 or last):
            kept = {f"best{i}": p for i, p in enumerate(best["params"])} | {
                "best_kl": torch.tensor(best["kl"]), "best_step": torch.tensor(best["step"]),
                "val_curve": torch.tensor(val_curve, dtype=torch.float64)} if best["params"] is not None else {}
            save_state(state_dir, {f"p{i}": p for i, p in enumerate(params)} | kept, optimizer, schedule, step + 1,
                       steps, keep=("teacher-*.safetensors", selfgen.FILE, reconstruct.FILE))  # caches outlive the state
        if out_of_time:
            break
    if best["params"] is not None:
        with torch.no_grad():
            for p, b in zip(params, best["params"]):
                p.copy_(b)
    student = acc.unwrap_model(student).eval()
    for p in params:
        p.requires_grad_(False)
    restore_latents(rescaled)
    if opts.lora:
        merge_lora(student)
    ran = done + len(losses)
    visited = min(len(order), ran * opts.batch_size)  # windows trained on (the last batch may be short)
    return {"steps": ran, "planned_steps": steps, "lr_horizon": factor(schedule).steps, "resumed_from_step": done,
            "tokens": visited * windows.shape[1], "epochs": round(visited / len(windows), 3),
            "trainable_parameters": int(sum(p.numel() for p in params)), "seconds": time.perf_counter() - t0,
            "first_loss": losses[0] if losses else None, "final_loss": losses[-1] if losses else None,
            "loss_curve": losses[:: max(1, len(losses) // 50)], "precision": precision_label(opts.precision, acc.device),
            "teacher_logits": f"top-{opts.top_k} cached" if opts.top_k else "full, on the fly", "generated": generated,
            "local": local,
            "validation": None if val_base is None else {"tokens": int(val.numel()), "kl_curve": val_curve,
                                                         "best_step": best["step"], "best_kl": best["kl"]}}
