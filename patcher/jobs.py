"""作业：CLI 与 Python 共用的入口。

- ``convert``：加载来源、选后端（内存或流式）、跑管线、原子写出；``patch_model``：在已加载的模型上跑管线；
- ``heal_checkpoint``：以源模型为老师修复输出目录中的模型；
- ``train_mtp_checkpoint``：训练输出目录中模型的 MTP 模块；
- ``generate``：用输出目录中的模型生成文本（有 MTP 模块时走无损投机解码）。
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch
from torch import nn

from .data.text import check_unseen, mixed_windows, read_domains, recipe_eval
from .errors import RecipeError, SourceError
from .evaluation.metrics import compare, evaluate_base
from .evaluation.report import read_report, write_report
from .files import atomic_dir, check_output
from .formats import deepseek_v3, folder
from .model import sources
from .pipeline import run as pipeline
from .pipeline.memory import MemoryBackend
from .pipeline.preflight import preflight
from .pipeline.progress import NullProgress
from .pipeline.streaming import StreamingBackend, wanted
from .recipe import Recipe, parse_recipe
from .runtime.mtp import parse_widths
from .training import draft_heads, heal, selfgen


def patch_model(model: nn.Module, recipe, tokenizer, progress=None, source_name: str = "in-memory"):
    """就地转换一个已加载的 transformers 因果语言模型，返回 (补丁模型, 报告 dict)。

    补丁模型是 ``Dsopt<家族>ForCausalLM`` 的实例（与从输出目录加载得到的类相同）；
    ``tokenizer`` 用于切分校准与评估文本。
    """
    recipe = pipeline.as_recipe(recipe)
    checked = preflight(model.config, recipe, _patch)
    backend = MemoryBackend(model, tokenizer, source_name)
    report = pipeline.run(backend, recipe, progress, checked)
    return backend.patched, report


def _patch(model: nn.Module, recipe, tokenizer):
    """The pipeline without the preflight: what the preflight itself runs on the miniature."""
    backend = MemoryBackend(model, tokenizer, "preflight")
    report = pipeline.run(backend, recipe, None, {"miniature": True})
    return backend.patched, report


def convert(source: str, recipe=None, out: str | Path | None = None, progress=None, resume: bool = False) -> dict:
    """加载来源、转换、把检查点与报告原子地写到 ``out``；返回报告。

    源权重大于 2 GiB（或 ``--streaming on``）时走流式转换：逐层读入与写出，内存约为一层；
    ``resume`` 让中断的流式转换从最后完成的层接着做。
    """
    recipe = pipeline.as_recipe(recipe or Recipe())
    out = Path(out or f"{Path(source).name}-dsopt")
    check_output(out, recipe.output.overwrite, keep=(source,))  # before any expensive work
    read_domains(recipe.calibration.data, "calibration")  # a missing or non-text file fails now, not after loading
    if recipe.eval.enabled:
        read_domains(recipe.eval.data, "evaluation")
    src = sources.resolve(source)
    folder_path = sources.local_folder(src)
    checked = preflight(sources.read_config(folder_path, recipe.output.trust_remote_code), recipe, _patch)
    # a local path is recorded absolute: heal and train-mtp find the teacher from any working folder
    name = str(Path(source).expanduser().resolve()) if src.kind != "hub" and source not in sources.ALIASES else source
    if wanted(sources.weight_bytes(src), recipe):
        backend = StreamingBackend(folder_path, out, resume, source_name=name)
        return pipeline.run(backend, recipe, progress, checked)
    if resume:
        raise RecipeError("--resume 只用于流式转换（--streaming on，或源权重大于 2 GiB 时自动开启）")
    t = time.perf_counter()
    model, tokenizer, src = sources.load(source, trust_remote_code=recipe.output.trust_remote_code)
    backend = MemoryBackend(model, tokenizer, name, out, load_seconds=time.perf_counter() - t)
    return pipeline.run(backend, recipe, progress, checked)


def train_mtp_checkpoint(out: str | Path, opts, resume: bool = False, progress=None) -> dict:
    """训练输出目录 ``out`` 中模型的 MTP 模块（基座冻结），把权重与报告原子地写回 ``out``；返回 MTP 报告。

    可续训的状态在 ``out/mtp-train/``；``resume`` 从那里接着训。
    """
    out = Path(out)
    model, tokenizer, _ = sources.load(str(out))
    if getattr(model, "mtp", None) is None:
        raise RecipeError(f"{out} 没有 MTP 模块：先用 dsopt convert ... --mtp N 追加")
    report = read_report(out)
    recipe = parse_recipe(report["recipe"])
    recipe = recipe.model_copy(update={"mtp": opts})
    windows = draft_heads.mtp_windows(tokenizer, recipe)
    eval_ids, _ = recipe_eval(tokenizer, recipe)
    training = draft_heads.train_mtp(model, windows, opts, out / draft_heads.STATE_DIR, resume,
                                     progress or NullProgress(), selfgen.chat_turns(tokenizer))
    report["mtp"] = {**(report.get("mtp") or {}), "training": training, **draft_heads.measure_mtp(model, eval_ids)}
    report["recipe"]["mtp"] = opts.model_dump(mode="json")
    with atomic_dir(out, overwrite=True) as tmp:
        folder.write_checkpoint(model, tokenizer, tmp, recipe.output.max_shard_size)
        for item in out.iterdir():  # everything else the folder held: recipe, model card, training state, report
            if not (tmp / item.name).exists():
                (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
        write_report(tmp, report)
    return report["mtp"]


def heal_checkpoint(out: str | Path, opts=None, resume: bool = False, progress=None) -> dict:
    """修复输出目录 ``out`` 中的模型：以源模型为老师做 KL 蒸馏，权重与报告原子地写回 ``out``；返回修复记录。

    报告中 ``fidelity`` 变为修复后的值（``dsopt check`` 据此判断），转换后的值保存在 ``fidelity_converted``。
    可续训的状态在 ``out/heal-train/``。
    """
    opts = opts or heal.HealOptions()
    out = Path(out)
    report = read_report(out)
    recipe = parse_recipe(report["recipe"])
    student, tokenizer, _ = sources.load(str(out))
    teacher_name = opts.teacher or report["source"]
    if not opts.teacher and not Path(teacher_name).expanduser().exists() and \
            (teacher_name.startswith((".", "/", "~")) or "/" in teacher_name and Path(teacher_name).suffix == ".gguf"):
        raise SourceError(f"报告记录的来源 {teacher_name!r} 从当前目录找不到（转换时给的是相对路径，或来源已移动）："
                          "请用 --teacher 给出源模型")
    teacher, _, _ = sources.load(teacher_name)
    train = read_domains(opts.data or recipe.calibration.data, "calibration")
    check_unseen(train, read_domains(recipe.eval.data, "evaluation"), "--data")
    windows, val = heal.split_validation(
        mixed_windows(tokenizer, train, opts.tokens + opts.val_tokens, opts.seq_len, opts.seed), opts)
    eval_ids, spans = recipe_eval(tokenizer, recipe)
    base_eval = evaluate_base(teacher, eval_ids, spans=spans)
    before = compare(student, base_eval)
    training = heal.distill(student, teacher, windows, opts, out / heal.STATE_DIR, resume, progress or NullProgress(),
                            val)
    after = compare(student, base_eval)
    del teacher
    report.setdefault("fidelity_converted", before)
    report["fidelity"] = after
    report["healing"] = {"teacher": teacher_name, "data": opts.data or recipe.calibration.data or "builtin:calibration",
                         "options": opts.model_dump(mode="json"), **training, "before": before, "after": after}
    with atomic_dir(out, overwrite=True) as tmp:
        if report.get("export"):  # native DeepSeek-V3: stock save, then the untouched MTP weights again
            student.save_pretrained(tmp, max_shard_size=recipe.output.max_shard_size)
            tokenizer.save_pretrained(tmp)
            if (out / "model-mtp.safetensors").exists():
                from safetensors.torch import load_file

                deepseek_v3.append_shard(tmp, "model-mtp.safetensors", load_file(str(out / "model-mtp.safetensors")))
        else:
            folder.write_checkpoint(student, tokenizer, tmp, recipe.output.max_shard_size)
        for item in out.iterdir():  # recipe, model card, training states; never stale weight files
            if item.name.startswith("model") and (item.suffix == ".safetensors" or item.name.endswith(".index.json")):
                continue
            if not (tmp / item.name).exists():
                (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
        write_report(tmp, report)
    return report["healing"]


def generate(out: str | Path, prompt: str, max_new_tokens: int = 64, use_mtp: bool = True, lookup: int = 10,
             branches: str | None = None, temperature: float = 0.0, chat: bool = False) -> dict:
    """用输出目录（或任何本地检查点）中的模型生成文本；有 MTP 模块时缺省走无损投机解码。

    返回 text、new_tokens、seconds、tokens_per_s、accepted_per_step、mtp、head_acceptance、lookup_steps。"""
    try:
        widths = None if branches is None else parse_widths(branches)
    except ValueError:
        raise RecipeError(f"--branches 应是逗号分隔的正整数（如 4,2），得到 {branches!r}") from None
    model, tok, _ = sources.load(str(out))
    if chat and getattr(tok, "chat_template", None):
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tok(prompt, return_tensors="pt")["input_ids"]
    use_mtp = getattr(model, "mtp", None) is not None and use_mtp
    kwargs = {"max_new_tokens": max_new_tokens, "do_sample": temperature > 0}
    if temperature > 0:
        kwargs["temperature"] = temperature
    t = time.perf_counter()
    with torch.no_grad():
        if use_mtp:
            new = model.generate(ids, use_mtp=True, mtp_lookup=lookup, mtp_branches=widths, **kwargs)
        else:
            new = model.generate(ids, **({"use_mtp": False} if hasattr(model, "last_mtp_stats") else {}), **kwargs,
                                 pad_token_id=tok.pad_token_id or tok.eos_token_id)
    seconds = time.perf_counter() - t
    text = tok.decode(new[0, ids.shape[1]:], skip_special_tokens=True)
    n = new.shape[1] - ids.shape[1]
    stats = model.last_mtp_stats if use_mtp else None
    return {"text": text, "new_tokens": n, "seconds": seconds,
            "tokens_per_s": stats["tokens_per_s"] if stats else n / seconds,
            "accepted_per_step": stats["accepted_per_step"] if stats else 1.0, "mtp": use_mtp,
            "head_acceptance": stats["head_acceptance"] if stats else None,
            "lookup_steps": stats["lookup_steps"] if stats else 0}
