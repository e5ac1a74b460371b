"""内存后端：整个模型在内存中，校准统计逐层流过（第 i 层的统计来自已转换的前 i 层）。

支持全部规划方式（全局的敏感度探测、按谱分配秩、解耦 RoPE 的频率选择）与转换时训练 MTP；
输出格式 dsopt 与 deepseek-v3 都能写。阶段序列在 ``run.py``，这里只有内存中才有的做法。
"""

from __future__ import annotations

import time
from pathlib import Path

from torch import nn

from ..data.text import recipe_eval
from ..evaluation.metrics import active_parameters, cache_bytes_per_token, compare, evaluate_base, parameter_count
from ..evaluation.report import write_report
from ..formats import deepseek_v3, folder
from ..recipe import Recipe
from ..training import draft_heads, selfgen
from .calibrate import stream
from .probe import SensitivityProbe
from .progress import peak_rss_mib
from .run import Limits, captures, dsopt_config, needs_probe

PROMPT_TOKENS = 64  # the prompt whose generate() cache is measured


class MemoryBackend:
    """A loaded transformers model converted in place; ``out`` (optional) is where ``save`` writes the folder."""

    limits = Limits()

    def __init__(self, model: nn.Module, tokenizer, source_name: str, out: Path | None = None,
                 load_seconds: float | None = None):
        self.model, self.tokenizer, self.source_name = model, tokenizer, source_name
        self.out, self.load_seconds = out, load_seconds
        self.patched = None

    def open(self, recipe: Recipe, stages) -> None:
        self.model.eval()

    def prepare(self, mm, recipe: Recipe, techs: list, stages) -> None:
        self.layers = self.model.get_submodule(mm.layers_path)

    def measure_base(self, mm, recipe: Recipe, eval_ids, spans, stages) -> dict:
        self.prompt = eval_ids[:1, :PROMPT_TOKENS]
        with stages("evaluate_base"):
            base = {"eval": evaluate_base(self.model, eval_ids, spans=spans) if recipe.eval.enabled else None,
                    "kv": cache_bytes_per_token(self.model, self.prompt),
                    "params": parameter_count(self.model), "active": active_parameters(self.model, mm)}
        # after the base is measured: the conversion includes this change
        self.eps_from = deepseek_v3.adopt_eps(self.model) if recipe.output.format == "deepseek-v3" else None
        return base

    def analyser(self, mm, recipe: Recipe, job, calib_ids, progress):
        def analyse_layers(analysing: list, fill) -> None:
            cal = recipe.calibration
            probe = SensitivityProbe(self.model, mm, calib_ids, cal.probe_tokens, progress) \
                if needs_probe(analysing, recipe) else None
            progress.start("规划：逐层统计", len(self.layers))

            def analyse(i, layer, stats):
                for tech in analysing:
                    fill(tech, i, tech.analyse(job, layer, mm.layers[i], stats, getattr(recipe, tech.section), probe))
                progress.advance()

            stream(self.model, self.layers, calib_ids, cal.batch_size, lambda i: captures(analysing, recipe, mm, i),
                   analyse, progress.step)
        return analyse_layers

    def convert_layers(self, work, calib_ids, eval_ids, progress, stages) -> None:
        if not work.techs:
            return
        with stages("convert"):
            progress.start("转换：" + "+".join(t.section.upper() for t in work.techs), len(self.layers))

            def convert_layer(i, layer, stats):
                work(i, layer, stats)
                progress.advance()

            stream(self.model, self.layers, calib_ids, work.recipe.calibration.batch_size, work.captures,
                   convert_layer, progress.step)

    def finish(self, work, plan: dict, extras: list, calib_ids, progress, stages) -> nn.Module:
        """The converted model as an instance of its dsopt class, built the way loading builds it; then the
        techniques that append modules, and the training some of them ask for at conversion time."""
        recipe = work.recipe
        with stages("convert"):
            config, model_cls = dsopt_config(self.model.config, plan)
            config._attn_implementation = self.model.config._attn_implementation
            dtype = next(self.model.parameters()).dtype
            patched = model_cls(config).to(dtype)
            patched.load_state_dict(self.model.state_dict(), strict=True)
            patched.eval()
            patched.dsopt_model_map = work.mm  # the roles' paths inside a layer, for exporters
            self.attached = {t.section: t.attach(patched, work.mm, getattr(recipe, t.section), work.job, calib_ids)
                             for t in extras}
        self.mtp_training = None
        if recipe.mtp.enabled and recipe.mtp.train_tokens:
            with stages("train_mtp"):
                self.mtp_training = draft_heads.train_mtp(
                    patched, draft_heads.mtp_windows(self.tokenizer, recipe), recipe.mtp, None, progress=progress,
                    chat=selfgen.chat_turns(self.tokenizer))
        self.patched = patched
        return patched

    def verify(self, work, base: dict, eval_ids, extras: list, progress, stages) -> dict:
        patched = self.patched
        with stages("verify"):
            fidelity = compare(patched, base["eval"]) if base["eval"] is not None else None
            patched_kv = cache_bytes_per_token(patched, self.prompt)
            sections = {t.section: t.verify(patched, work.mm, eval_ids, work.infos)
                        for t in work.techs if hasattr(t, "verify")}
            if "mtp" in self.attached:
                sections["mtp"] = {**self.attached["mtp"], "training": self.mtp_training,
                                   **draft_heads.measure_mtp(patched, eval_ids)}
        kv = base["kv"]
        kv_cache = {"base": kv, "patched": patched_kv, "ratio": patched_kv["kv_bytes_per_token"] / kv["kv_bytes_per_token"],
                    "measured_with": f"generate() greedy, prompt {self.prompt.shape[1]} tokens + 8 new"}
        eps = None if self.eps_from is None else {"from": self.eps_from, "to": deepseek_v3.EXPORT_EPS}
        self.model = None  # the source's weights are no longer needed: saving has the memory
        return {"fidelity": fidelity, "kv_cache": kv_cache, "sections": sections,
                "before_layers": {"rms_norm_eps_changed": eps}}

    def save(self, report: dict, recipe: Recipe, notes: list, stages, eval_ids) -> None:
        report["resources"].update(peak_rss_mib=peak_rss_mib(), stage_seconds=stages.seconds)
        if self.out is None:  # patch_model: the caller keeps the model
            return
        report["resources"]["load_seconds"] = self.load_seconds
        with folder.atomic_dir(self.out, recipe.output.overwrite, keep=(self.source_name,)) as tmp:
            t = time.perf_counter()
            if recipe.output.format == "deepseek-v3":  # stock layout: no dsopt code, checked by loading it
                deepseek_v3.write_deepseek_v3(self.patched, self.patched.dsopt_model_map, self.tokenizer, tmp,
                                              recipe.output.max_shard_size)
                ids = recipe_eval(self.tokenizer, recipe.model_copy(update={"eval": recipe.eval.model_copy(
                    update={"tokens": 512, "seq_len": 256})}))[0]
                report["export"] = deepseek_v3.verify_export(tmp, self.patched, ids)
            else:
                folder.write_checkpoint(self.patched, self.tokenizer, tmp, recipe.output.max_shard_size)
            (tmp / "recipe.yaml").write_text(recipe.to_yaml(), encoding="utf-8")
            report["resources"]["save_seconds"] = time.perf_counter() - t
            report["resources"]["peak_rss_mib"] = peak_rss_mib()
            write_report(tmp, report)
            (tmp / "README.md").write_text(folder.model_card(report), encoding="utf-8")

