"""管线：locate → plan → calibrate → convert → verify → save → report，阶段序列只在这里写一次。

两个后端只提供不同之处（模型从哪来、层怎么打开和写出、层循环、logits、KV 测量、保存）：
``memory.MemoryBackend``（整个模型在内存中）与 ``streaming.StreamingBackend``（逐层从磁盘读入、写出）。
由谁来跑由上层（``patcher.jobs``）选择，两个后端互不导入。

技术按 ``converters.base`` 的协议驱动：它声明自己怎样规划，后端声明自己支持哪些规划方式
（``Limits``），这里据此调整或拒绝配方，不按名字认识任何技术。
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from torch import nn

from converters import registry
from converters.base import JobContext, Target

from ..data.text import recipe_windows
from ..errors import RecipeError
from ..evaluation.metrics import active_parameters, parameter_count
from ..model.locate import ModelMap, locate
from ..recipe import FORMATS, Recipe, parse_recipe
from ..runtime import modeling
from ..version import __version__
from .progress import NullProgress, Stages


@dataclass(frozen=True)
class Limits:
    """What a backend can do: the planning styles it supports, the output formats it writes, and the note it
    gives when it replaces a default to fit."""
    planning: frozenset = frozenset({"none", "per_layer", "global", "global_probe", "whole_model"})
    formats: frozenset = frozenset(FORMATS)
    why: str = ""


def as_recipe(recipe) -> Recipe:
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        return parse_recipe(recipe)
    raise RecipeError(f"recipe 须为 Recipe 或 dict，收到 {type(recipe).__name__}")


def fit(recipe: Recipe, limits: Limits) -> tuple[Recipe, list[str]]:
    """The recipe as a backend can honour it, and what changed. A default that asks for more than the backend can
    do takes the technique's per-layer fallback; an explicit ask is an error that says what to do instead."""
    def refuse(what: str):
        raise RecipeError(f"{limits.why}，不能{what}；请去掉该选项，或用 --streaming off（整个模型须放得进内存）")

    if recipe.output.format not in limits.formats:
        refuse(f"导出 {recipe.output.format} 格式（{FORMATS[recipe.output.format].layout} 的布局要看完所有层才能定）")
    notes, updates = [], {}
    for tech in registry.enabled(recipe):
        opts = getattr(recipe, tech.section)
        planning = tech.planning(opts)
        if planning.style in limits.planning:
            continue
        if not planning.fallback or any(k in opts.model_fields_set for k in planning.fallback):
            refuse(planning.needs)
        changed = opts.model_copy(update=planning.fallback)
        if tech.planning(changed).style not in limits.planning:
            refuse(tech.planning(changed).needs)
        notes += [f"{tech.section}.{k}: {getattr(opts, k)} → {v}（{limits.why}，不做全模型敏感度探测）"
                  for k, v in planning.fallback.items()]
        updates[tech.section] = changed
    return recipe.model_copy(update=updates), notes


def fit_context(recipe: Recipe, config) -> tuple[Recipe, list[str]]:
    """Windows no longer than the model's context: a longer one is clamped, with a note (positions past the
    context would measure the model where it was never trained)."""
    ctx = getattr(config, "max_position_embeddings", None)
    notes, updates = [], {}
    for section in ("calibration", "eval"):
        opts = getattr(recipe, section)
        if ctx and opts.seq_len > ctx:
            notes.append(f"{section}.seq_len: {opts.seq_len} → {ctx}（超过模型的上下文长度 max_position_embeddings）")
            updates[section] = opts.model_copy(update={"seq_len": ctx, "tokens": max(opts.tokens, ctx)})
    return recipe.model_copy(update=updates), notes


def job_context(model: nn.Module, mm: ModelMap, recipe: Recipe) -> JobContext:
    rotary = model.get_submodule(mm.rotary_path) if mm.rotary_path else None
    return JobContext(model.config, rotary, recipe.calibration.seed, target_of(recipe))


def target_of(recipe: Recipe) -> Target:
    return FORMATS[recipe.output.format].target


def check(techs: list, mm: ModelMap, recipe: Recipe) -> None:
    """Every technique's checks on every layer, before any expensive work: errors name the layer and role."""
    for lm in mm.layers:
        for tech in techs:
            if tech.structure_key is not None:
                tech.check(lm, getattr(recipe, tech.section))
    for tech in techs:
        if hasattr(tech, "check_model"):
            tech.check_model(mm, getattr(recipe, tech.section))
        if hasattr(tech, "check_target"):
            tech.check_target(mm, getattr(recipe, tech.section), target_of(recipe))


def captures(techs: list, recipe: Recipe, mm: ModelMap, i: int) -> list[tuple[str, str]]:
    """The statistics ``techs`` need from layer i's calibration inputs."""
    return [w for t in techs for w in t.captures(mm.layers[i], getattr(recipe, t.section))]


@dataclass
class LayerWork:
    """Converting one decoder layer with every layer technique: the same for both backends."""
    techs: list
    recipe: Recipe
    job: JobContext
    mm: ModelMap
    plans: dict
    specs: dict = field(default_factory=dict)
    infos: list = field(default_factory=list)

    def __post_init__(self):
        self.specs = self.specs or {t.structure_key: {} for t in self.techs}

    def opts(self, tech):
        return getattr(self.recipe, tech.section)

    def captures(self, i: int) -> list[tuple[str, str]]:
        return captures(self.techs, self.recipe, self.mm, i)

    def __call__(self, i: int, layer: nn.Module, stats: dict, progress=None) -> dict:
        """Replace layer i's modules in place; returns its report info (also kept in ``infos``)."""
        info = {"layer": i}
        for tech in self.techs:
            if progress is not None:
                progress.step(i, f"转换 {tech.section.upper()}")
            spec, extra = tech.convert(self.job, layer, self.mm.layers[i], stats, self.plans[tech.section][i],
                                       self.opts(tech))
            if spec is not None:  # None: the plan keeps this layer's module as it is
                self.specs[tech.structure_key][i] = spec
            info.update(extra)
        self.infos.append(info)
        return info

    def summaries(self) -> dict:
        return {t.section: t.summary(self.mm, self.opts(t), self.plans[t.section], self.specs[t.structure_key])
                for t in self.techs}


def plan(techs: list, recipe: Recipe, mm: ModelMap, analyse_layers=None) -> dict:
    """Per-layer plans of every layer technique. ``analyse_layers(analysing, fill)`` runs the planning pass over
    the unconverted model, where some technique plans globally (only a backend that holds the model offers it)."""
    n = len(mm.layers)
    analyses = {t.section: [None] * n for t in techs}
    analysing = [t for t in techs if t.planning(getattr(recipe, t.section)).style in ("global", "global_probe")]
    if analysing:
        def fill(tech, i, result):
            analyses[tech.section][i] = result
        analyse_layers(analysing, fill)
    return {t.section: t.plan(mm, getattr(recipe, t.section), analyses[t.section]) for t in techs}


def needs_probe(techs: list, recipe: Recipe) -> bool:
    return any(t.planning(getattr(recipe, t.section)).style == "global_probe" for t in techs)


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


def build_report(source: str, mm: ModelMap, recipe: Recipe, work: LayerWork, fidelity, kv_cache: dict,
                 base_params: int, base_active: dict, patched: nn.Module, sections: dict, provenance: dict,
                 resources: dict, before_layers: dict | None = None) -> dict:
    """The fidelity report: the same keys whichever backend ran."""
    patched_active = active_parameters(patched, mm)
    return {
        "dsopt_version": __version__,
        "source": source,
        "model_type": mm.model_type,
        "techniques": recipe.techniques(),
        "recipe_name": recipe.name,
        "recipe": recipe.model_dump(mode="json"),
        "fidelity": fidelity,
        "kv_cache": kv_cache,
        "parameters": {"base": base_params, "patched": parameter_count(patched),
                       "base_active_per_token": base_active, "patched_active_per_token": patched_active,
                       # the --moe-active budget's own measure: FFN parameters a token uses over the dense FFN's
                       "active_ffn_fraction_vs_dense": patched_active["ffn_active"] / max(base_active["ffn_total"], 1)},
        "plan": work.summaries(),
        **(before_layers or {}),
        "layers": work.infos,
        **sections,
        **provenance,
        "resources": resources,
    }


def run(backend, recipe, progress=None, preflight: dict | None = None) -> dict:
    """Convert with ``backend``: the stage sequence, written once. Returns the report (the backend saved it).

    ``preflight``: what the full-rank check on the family's miniature found (``preflight.py``), for the report."""
    recipe = as_recipe(recipe)
    recipe, notes = fit(recipe, backend.limits)
    techs = registry.enabled(recipe)
    if not techs:
        raise RecipeError("配方没有启用任何技术：至少给出 --mla、--moe 或 --mtp（或在配方中启用一节）")
    progress = progress or NullProgress()
    stages = Stages()
    t_start = time.perf_counter()
    layer_techs = [t for t in techs if t.structure_key is not None]
    extras = [t for t in techs if t.structure_key is None]

    backend.open(recipe, stages)
    recipe, more = fit_context(recipe, backend.model.config)
    notes += more
    with stages("locate"):
        mm = locate(backend.model)
    check(techs, mm, recipe)
    job = job_context(backend.model, mm, recipe)
    calib_ids, eval_ids, spans, provenance = recipe_windows(backend.tokenizer, recipe)
    backend.prepare(mm, recipe, techs, stages)
    base = backend.measure_base(mm, recipe, eval_ids, spans, stages)

    with stages("plan"):
        plans = plan(layer_techs, recipe, mm, backend.analyser(mm, recipe, job, calib_ids, progress))
    work = LayerWork(layer_techs, recipe, job, mm, plans)
    backend.convert_layers(work, calib_ids, eval_ids, progress, stages)
    patched = backend.finish(work, structure_plan(mm, work.specs), extras, calib_ids, progress, stages)

    verified = backend.verify(work, base, eval_ids, extras, progress, stages)
    report = build_report(backend.source_name, mm, recipe, work, verified["fidelity"], verified["kv_cache"],
                          base["params"], base["active"], patched, verified["sections"], provenance,
                          {"conversion_seconds": time.perf_counter() - t_start}, verified.get("before_layers"))
    report["notes"] = notes
    report["preflight"] = preflight
    backend.save(report, recipe, notes, stages, eval_ids)
    return report
