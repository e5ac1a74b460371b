"""管线：recipe → locate → plan → calibrate → convert → verify → save → report。

``patch_model(model, recipe, tokenizer)`` 在内存中的 transformers 模型上跑完整管线，返回
(补丁模型, 报告)；``convert(source, recipe, out)`` 在它前后加上加载与原子写出。两者读同一个
``Recipe``，CLI 也只是把参数填进这个 Recipe。
"""

from __future__ import annotations

import resource
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

import converters
from converters import mtp as mtp_converter

from . import __version__, checkpoint, export_deepseek, modeling, selfgen
from .calibrate import DataError, digest, read_text, recipe_windows, stream, token_windows
from .fidelity import cache_bytes_per_token, compare, evaluate_base, parameter_count, write_report
from .locate import ModelMap, locate
from . import mtp_train
from .mtp_train import expected_tokens_per_step, mtp_acceptance, train_mtp
from .recipe import Recipe, RecipeError, parse_recipe


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class Stages:
    """Wall time per stage, for the report."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t


class _NullProgress:
    def start(self, name: str, total: int, completed: int = 0):
        pass

    def update(self, step: int, loss: float, accuracy: list[float]):
        pass

    def step(self, layer: int, what: str):
        pass

    def advance(self):
        pass


def _as_recipe(recipe) -> Recipe:
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        return parse_recipe(recipe)
    raise RecipeError(f"recipe 须为 Recipe 或 dict，收到 {type(recipe).__name__}")


class Context:
    """What a converter may use besides its layer: the model's config and its rotary embedding."""

    def __init__(self, model: nn.Module, mm: ModelMap):
        self.config = model.config
        self.rotary = model.get_submodule(mm.rotary_path) if mm.rotary_path else None


def patch_model(model: nn.Module, recipe, tokenizer, progress=None, source_name: str = "in-memory"):
    """就地转换一个已加载的 transformers 因果语言模型，返回 (补丁模型, 报告 dict)。

    补丁模型是 ``Dsopt<家族>ForCausalLM`` 的实例（与从输出目录加载得到的类相同）；
    ``tokenizer`` 用于切分校准与评估文本。
    """
    recipe = _as_recipe(recipe)
    if not recipe.techniques():
        raise RecipeError("配方没有启用任何技术：至少给出 --mla、--moe 或 --mtp（或在配方中启用一节）")
    progress = progress or _NullProgress()
    stages = Stages()
    t_start = time.perf_counter()
    model.eval()

    with stages("locate"):
        mm = locate(model)
    layers = model.get_submodule(mm.layers_path)
    ctx = Context(model, mm)
    convs = converters.enabled_converters(recipe)
    for lm in mm.layers:
        for conv in convs:
            conv.check(lm, recipe)  # raises, naming the layer and role, before any work is done

    cal = recipe.calibration
    calib_ids, eval_ids, provenance = recipe_windows(tokenizer, recipe)
    prompt = eval_ids[:1, :64]

    with stages("evaluate_base"):
        base_eval = evaluate_base(model, eval_ids) if recipe.eval.enabled else None
        base_kv = cache_bytes_per_token(model, prompt)
        base_params = parameter_count(model)
        base_active = active_parameters(model, mm)

    eps_from = None
    if recipe.output.format == "deepseek-v3":  # after the base is measured: the conversion includes this change
        eps_from = export_deepseek.adopt_eps(model)

    def captures_of(subset):
        return lambda i: [w for c in subset for w in c.captures(mm.layers[i], recipe)]

    with stages("plan"):
        probe = None
        if any(c.needs_probe(recipe) for c in convs):
            probe = SensitivityProbe(model, mm, calib_ids, cal.probe_tokens, ctx, progress)
        analysing = [c for c in convs if c.needs_analysis(recipe)]
        analyses = {c.section: [None] * len(layers) for c in convs}
        if analysing:
            progress.start("规划：逐层统计", len(layers))

            def analyse(i, layer, stats):
                for conv in analysing:
                    analyses[conv.section][i] = conv.analyse(ctx, layer, mm.layers[i], stats, recipe, probe)
                progress.advance()

            stream(model, layers, calib_ids, cal.batch_size, captures_of(analysing), analyse, progress.step)
        plans = {c.section: c.plan(mm, recipe, analyses[c.section]) for c in convs}
        analyses.clear()  # spectra are not needed past planning
        probe = None

    with stages("convert"):
        specs = {c.structure_key: {} for c in convs}
        infos = [{"layer": i} for i in range(len(layers))]
        if convs:
            progress.start("转换：" + "+".join(c.section.upper() for c in convs), len(layers))

        def convert_layer(i, layer, stats):
            for conv in convs:
                spec, info = conv.convert(ctx, layer, mm.layers[i], stats, plans[conv.section][i], recipe)
                if spec is not None:  # None: the plan keeps this layer's module as it is
                    specs[conv.structure_key][i] = spec
                infos[i].update(info)
            progress.advance()

        if convs:
            stream(model, layers, calib_ids, cal.batch_size, captures_of(convs), convert_layer, progress.step)
        patched = rebuild(model, mm, specs)
        patched.dsopt_model_map = mm  # the roles' paths inside a layer, for exporters (unchanged by patching)
        mtp_record = mtp_converter.attach(patched, mm, recipe.mtp, calib_ids) if recipe.mtp.enabled else None

    mtp_training = None
    if recipe.mtp.enabled and recipe.mtp.train_tokens:
        with stages("train_mtp"):
            mtp_training = train_mtp(patched, mtp_windows(tokenizer, recipe), recipe.mtp, None, progress=progress,
                                     chat=selfgen.chat_turns(tokenizer))

    with stages("verify"):
        fidelity = compare(patched, base_eval) if base_eval is not None else None
        patched_kv = cache_bytes_per_token(patched, prompt)
        extra = {c.section: c.verify(patched, mm, eval_ids, infos) for c in convs if hasattr(c, "verify")}
        if mtp_record is not None:
            extra["mtp"] = {**mtp_record, "training": mtp_training, **measure_mtp(patched, eval_ids)}

    report = {
        "dsopt_version": __version__,
        "source": source_name,
        "model_type": mm.model_type,
        "techniques": recipe.techniques(),
        "recipe_name": recipe.name,
        "recipe": recipe.model_dump(mode="json"),
        "fidelity": fidelity,
        "kv_cache": {"base": base_kv, "patched": patched_kv,
                     "ratio": patched_kv["kv_bytes_per_token"] / base_kv["kv_bytes_per_token"],
                     "measured_with": f"generate() greedy, prompt {prompt.shape[1]} tokens + 8 new"},
        "parameters": {"base": base_params, "patched": parameter_count(patched),
                       "base_active_per_token": base_active,
                       "patched_active_per_token": (patched_active := active_parameters(patched, mm)),
                       # the --moe-active budget's own measure: FFN parameters a token uses over the dense FFN's
                       "active_ffn_fraction_vs_dense": patched_active["ffn_active"] / max(base_active["ffn_total"], 1)},
        "plan": {c.section: c.summary(mm, recipe, plans[c.section], specs[c.structure_key]) for c in convs},
        "rms_norm_eps_changed": None if eps_from is None else {"from": eps_from, "to": export_deepseek.EXPORT_EPS},
        "layers": infos,
        **extra,
        **provenance,
        "resources": {"conversion_seconds": time.perf_counter() - t_start, "peak_rss_mib": _peak_rss_mib(),
                      "stage_seconds": stages.seconds},
    }
    return patched, report


def active_parameters(model: nn.Module, mm: ModelMap) -> dict:
    """Parameters one token uses (MoE layers count their router, shared part and top-k experts only)."""
    from .modeling import MoEMLP

    total = parameter_count(model)
    inactive, ffn_total, ffn_active = 0, 0, 0
    for lm in mm.layers:
        layer = model.get_submodule(lm.prefix)
        mlp = layer.get_submodule(lm.mlp) if lm.mlp else None
        if mlp is None:
            continue
        n = sum(p.numel() for p in mlp.parameters())
        if isinstance(mlp, MoEMLP):
            unused = mlp.inactive_params()
            inactive += unused
            ffn_total += n
            ffn_active += n - unused
        else:
            ffn_total += n
            ffn_active += n
    # forward FLOPs per token on the weights: 2 per multiply-add of every weight a token uses; the embedding is a
    # lookup, the output head a product (counted again when it shares the embedding's weight); attention over the
    # context, which grows with its length, is not included
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and head.weight.data_ptr() == emb.weight.data_ptr()
    products = total - inactive - emb.weight.numel() + (head.weight.numel() if tied else 0)
    return {"total": total, "active": total - inactive, "ffn_total": ffn_total, "ffn_active": ffn_active,
            "active_ffn_fraction": ffn_active / max(ffn_total, 1),
            "flops_per_token": 2 * products, "ffn_flops_per_token": 2 * ffn_active}


def train_mtp_checkpoint(out: str | Path, opts, resume: bool = False, progress=None) -> dict:
    """训练输出目录 ``out`` 中模型的 MTP 模块（基座冻结），把权重与报告原子地写回 ``out``；返回 MTP 报告。

    可续训的状态在 ``out/mtp-train/``；``resume`` 从那里接着训。
    """
    from .fidelity import read_report

    out = Path(out)
    model, tokenizer, _ = checkpoint.load(str(out))
    if getattr(model, "mtp", None) is None:
        raise RecipeError(f"{out} 没有 MTP 模块：先用 dsopt convert ... --mtp N 追加")
    report = read_report(out)
    recipe = parse_recipe(report["recipe"])
    recipe = recipe.model_copy(update={"mtp": opts})
    windows = mtp_windows(tokenizer, recipe)
    eval_ids = token_windows(tokenizer, read_text(recipe.eval.data, "evaluation"), recipe.eval.tokens,
                             recipe.eval.seq_len, None)
    training = train_mtp(model, windows, opts, out / mtp_train.STATE_DIR, resume, progress or _NullProgress(),
                         selfgen.chat_turns(tokenizer))
    report["mtp"] = {**(report.get("mtp") or {}), "training": training, **measure_mtp(model, eval_ids)}
    report["recipe"]["mtp"] = opts.model_dump(mode="json")
    with checkpoint.atomic_dir(out, overwrite=True) as tmp:
        checkpoint.write_checkpoint(model, tokenizer, tmp, recipe.output.max_shard_size)
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
    from . import heal
    from .fidelity import read_report

    opts = opts or heal.HealOptions()
    out = Path(out)
    report = read_report(out)
    recipe = parse_recipe(report["recipe"])
    student, tokenizer, _ = checkpoint.load(str(out))
    teacher_name = opts.teacher or report["source"]
    teacher, _, _ = checkpoint.load(teacher_name)
    train_text = read_text(opts.data or recipe.calibration.data, "calibration")
    eval_text = read_text(recipe.eval.data, "evaluation")
    if digest(train_text) == digest(eval_text):
        raise DataError("修复用的文本与评估文本相同：保真度必须在未见过的文本上测量，请换一个 --data")
    windows, val = heal.split_validation(
        token_windows(tokenizer, train_text, opts.tokens + opts.val_tokens, opts.seq_len, opts.seed), opts)
    eval_ids = token_windows(tokenizer, eval_text, recipe.eval.tokens, recipe.eval.seq_len, None)
    base_eval = evaluate_base(teacher, eval_ids)
    before = compare(student, base_eval)
    training = heal.distill(student, teacher, windows, opts, out / heal.STATE_DIR, resume, progress or _NullProgress(),
                            val)
    after = compare(student, base_eval)
    del teacher
    report.setdefault("fidelity_converted", before)
    report["fidelity"] = after
    report["healing"] = {"teacher": teacher_name, "data": opts.data or recipe.calibration.data or "builtin:calibration.txt",
                         "options": opts.model_dump(mode="json"), **training, "before": before, "after": after}
    with checkpoint.atomic_dir(out, overwrite=True) as tmp:
        if report.get("export"):  # native DeepSeek-V3: stock save, then the untouched MTP weights again
            student.save_pretrained(tmp, max_shard_size=recipe.output.max_shard_size)
            tokenizer.save_pretrained(tmp)
            if (out / "model-mtp.safetensors").exists():
                from safetensors.torch import load_file

                export_deepseek._append_shard(tmp, "model-mtp.safetensors",
                                              load_file(str(out / "model-mtp.safetensors")))
        else:
            checkpoint.write_checkpoint(student, tokenizer, tmp, recipe.output.max_shard_size)
        for item in out.iterdir():  # recipe, model card, training states; never stale weight files
            if item.name.startswith("model") and (item.suffix == ".safetensors" or item.name.endswith(".index.json")):
                continue
            if not (tmp / item.name).exists():
                (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
        write_report(tmp, report)
    return report["healing"]


def mtp_windows(tokenizer, recipe: Recipe) -> torch.Tensor:
    """MTP training windows: ``--mtp-data`` (default: the calibration text), ``--mtp-train-tokens`` of them."""
    o = recipe.mtp
    text = read_text(o.data or recipe.calibration.data, "calibration")
    return token_windows(tokenizer, text, o.train_tokens, o.seq_len, recipe.calibration.seed)


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


class SensitivityProbe:
    """Measures what one layer's change costs the whole model: KL(base‖model with one module of layer i swapped).

    Runs on the first calibration windows (never the evaluation text), against base log-probs taken once.
    """

    def __init__(self, model, mm: ModelMap, calib_ids: torch.Tensor, tokens: int, ctx: Context, progress):
        self.model, self.mm, self.rotary, self.progress = model, mm, ctx.rotary, progress
        self.config = ctx.config
        seq = calib_ids.shape[1]
        windows = calib_ids[: max(1, tokens // seq)]
        self.base = evaluate_base(model, windows)

    def layer(self, i: int) -> nn.Module:
        return self.model.get_submodule(self.mm.layers[i].prefix)

    def __call__(self, i: int, path: str, module: nn.Module) -> float:
        """KL with ``path`` (relative to layer i, e.g. its attention or MLP) replaced by ``module``."""
        self.progress.step(i, "探测敏感度")
        layer = self.layer(i)
        old = layer.get_submodule(path)
        layer.set_submodule(path, module)
        try:
            return compare(self.model, self.base)["kl_mean"]
        finally:
            layer.set_submodule(path, old)


def structure_plan(mm: ModelMap, specs: dict) -> dict:
    """What ``config.dsopt`` records: enough to rebuild the patched modules at load time without tracing."""
    return {"version": 1, "layers_path": mm.layers_path, "rotary_path": mm.rotary_path,
            **{key: {str(i): spec for i, spec in sorted(per_layer.items())} for key, per_layer in specs.items()}}


def dsopt_config(config, plan: dict):
    """The source config as its family's dsopt config class carrying ``plan``; returns (config, model class)."""
    config_cls, model_cls = modeling.register(config.model_type)
    data = config.to_dict()
    for key in ("model_type", "architectures", "auto_map", "transformers_version", "dsopt"):
        data.pop(key, None)
    return config_cls(**data, dsopt=plan), model_cls


def rebuild(model: nn.Module, mm: ModelMap, specs: dict) -> nn.Module:
    """The converted model as an instance of its dsopt class, built the way loading builds it."""
    config, model_cls = dsopt_config(model.config, structure_plan(mm, specs))
    config._attn_implementation = model.config._attn_implementation
    dtype = next(model.parameters()).dtype
    patched = model_cls(config).to(dtype)
    patched.load_state_dict(model.state_dict(), strict=True)
    return patched.eval()


def convert(source: str, recipe=None, out: str | Path | None = None, progress=None, resume: bool = False) -> dict:
    """加载来源、转换、把检查点与报告原子地写到 ``out``；返回报告。

    源权重大于 2 GiB（或 ``--streaming on``）时走流式转换：逐层读入与写出，内存约为一层；
    ``resume`` 让中断的流式转换从最后完成的层接着做。
    """
    from . import streaming

    recipe = _as_recipe(recipe or Recipe())
    out = Path(out or f"{Path(source).name}-dsopt")
    checkpoint.check_output(out, recipe.output.overwrite)  # before any expensive work
    src = checkpoint.resolve(source)
    if streaming.wanted(checkpoint.weight_bytes(src), recipe):
        return streaming.convert_streaming(checkpoint.local_folder(src), recipe, out, progress or _NullProgress(),
                                           resume, source_name=source)
    if resume:
        raise RecipeError("--resume 只用于流式转换（--streaming on，或源权重大于 2 GiB 时自动开启）")
    t = time.perf_counter()
    model, tokenizer, src = checkpoint.load(source, trust_remote_code=recipe.output.trust_remote_code)
    load_seconds = time.perf_counter() - t
    patched, report = patch_model(model, recipe, tokenizer, progress=progress, source_name=source)
    del model
    report["resources"]["load_seconds"] = load_seconds
    with checkpoint.atomic_dir(out, recipe.output.overwrite) as tmp:
        t = time.perf_counter()
        if recipe.output.format == "deepseek-v3":  # stock layout: no dsopt code in the folder, checked by loading it
            export_deepseek.write_deepseek_v3(patched, patched.dsopt_model_map, tokenizer, tmp,
                                              recipe.output.max_shard_size)
            ids = token_windows(tokenizer, read_text(recipe.eval.data, "evaluation"), 512, 256, None)
            report["export"] = export_deepseek.verify_export(tmp, patched, ids)
        else:
            checkpoint.write_checkpoint(patched, tokenizer, tmp, recipe.output.max_shard_size)
        (tmp / "recipe.yaml").write_text(recipe.to_yaml(), encoding="utf-8")
        report["resources"]["save_seconds"] = time.perf_counter() - t
        report["resources"]["peak_rss_mib"] = _peak_rss_mib()
        write_report(tmp, report)
        (tmp / "README.md").write_text(checkpoint.model_card(report), encoding="utf-8")
    return report
