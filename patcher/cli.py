"""命令行：``dsopt convert / inspect / report / check``（typer + rich）。

``convert`` 的参数由配方模式（``patcher.recipe``）生成：每个带 ``flag`` 的字段一个参数，
用户给出的值覆盖 ``--recipe`` 预设，然后整体校验。CLI 与 ``patch_model`` 因此读同一个模式。
"""

from __future__ import annotations

import inspect
import json
import typing
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markdown import Markdown
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="dsopt：把稠密 LLM 检查点转换为 DeepSeek 风格（MLA 潜在注意力、MoE 混合专家），并给出保真度报告。")
console = Console(stderr=True)


class RichProgress:
    """每层一格的 rich 进度条，描述当前层正在做什么。"""

    def __init__(self, progress: Progress):
        self.progress = progress
        self.task = None
        self.name = ""

    def start(self, name: str, total: int):
        if self.task is not None:
            self.progress.update(self.task, visible=False)
        self.name = name
        self.task = self.progress.add_task(name, total=total)

    def step(self, layer: int, what: str):
        self.progress.update(self.task, description=f"{self.name} · 第 {layer} 层：{what}")

    def advance(self):
        self.progress.advance(self.task)


def _fail(message: str, code: int = 2):
    console.print(f"[bold red]错误：[/]{message}")
    raise typer.Exit(code)


def _option_type(annotation):
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    base = args[0] if args else annotation
    if typing.get_origin(base) is typing.Literal:
        return str
    return base if base in (bool, int, float, str) else str


def _convert_impl(source: str, out: Optional[Path], recipe: Optional[str], **flags):
    from .recipe import RecipeError, flag_fields, load_recipe, with_overrides

    try:
        base = load_recipe(recipe)
        overrides = {(sec, name): flags[f"{sec}__{name}"] for sec, name, _ in flag_fields()
                     if flags.get(f"{sec}__{name}") is not None}
        rec = with_overrides(base, overrides)
    except RecipeError as e:
        _fail(str(e))
    from . import api
    from .calibrate import DataError
    from .checkpoint import OutputError, SourceError
    from .locate import LocateError
    from converters.mla import PlanError

    out = out or Path(f"{Path(source).name}-dsopt")
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    try:
        with Progress(*columns, console=console, transient=False) as progress:
            report = api.convert(source, rec, out, progress=RichProgress(progress))
    except (RecipeError, DataError, OutputError, SourceError, LocateError, PlanError) as e:
        _fail(str(e))
    _print_summary(report, out)


def _build_convert_command():
    from .recipe import flag_fields

    params = [
        inspect.Parameter("source", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=str,
                          default=typer.Argument(..., help="来源：本地 HF 目录、.gguf 文件或内置别名（smollm2-135m）")),
        inspect.Parameter("out", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path],
                          default=typer.Option(None, "-o", "--out", help="输出目录（缺省：<来源名>-dsopt）")),
        inspect.Parameter("recipe", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[str],
                          default=typer.Option(None, "--recipe", help="配方 YAML 路径或预设名（如 mla-kv40）")),
    ]
    for sec, name, field in flag_fields():
        kind = _option_type(field.annotation)
        params.append(inspect.Parameter(
            f"{sec}__{name}", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[kind],
            default=typer.Option(None, *field.json_schema_extra["flag"].split(" "),
                                 help=f"{field.description}（配方键 {sec}.{name}，缺省 {field.default}）",
                                 show_default=False)))

    def convert(**kwargs):
        _convert_impl(kwargs.pop("source"), kwargs.pop("out"), kwargs.pop("recipe"), **kwargs)

    convert.__signature__ = inspect.Signature(params)
    convert.__doc__ = "转换一个检查点：定位 → 规划 → 校准 → 转换 → 验证 → 保存 → 报告。"
    return convert


app.command("convert")(_build_convert_command())


def _print_summary(report: dict, out: Path):
    f = report.get("fidelity") or {}
    kv = report["kv_cache"]
    table = Table(title=f"dsopt 转换完成 → {out}")
    table.add_column("指标")
    table.add_column("值", justify="right")
    if f:
        table.add_row("困惑度 基座 → 转换后", f"{f['ppl_base']:.3f} → {f['ppl_patched']:.3f} ({f['ppl_increase_pct']:+.2f} %)")
        table.add_row("平均 KL", f"{f['kl_mean']:.5f}")
        table.add_row("top-1 一致率", f"{100 * f['top1_agreement']:.2f} %")
    table.add_row("每 token KV 字节", f"{kv['base']['kv_bytes_per_token']:.0f} → {kv['patched']['kv_bytes_per_token']:.0f}"
                  f" ({100 * kv['ratio']:.1f} %)")
    r = report["resources"]
    table.add_row("转换耗时 / 峰值内存", f"{r['conversion_seconds']:.1f} s / {r['peak_rss_mib']:.0f} MiB")
    Console().print(table)


@app.command("inspect")
def inspect_cmd(source: str = typer.Argument(..., help="来源：本地目录、.gguf 或内置别名"),
                trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="信任远程代码"),
                as_json: bool = typer.Option(False, "--json", help="以 JSON 输出")):
    """打印定位器在每层找到的角色（来自 FX 图的数据流），以及找不到的角色。"""
    from .checkpoint import SourceError, load
    from .locate import LocateError, locate

    try:
        model, _, _ = load(source, trust_remote_code=trust_remote_code)
        mm = locate(model)
    except (SourceError, LocateError) as e:
        _fail(str(e))
    if as_json:
        print(json.dumps({"model_type": mm.model_type, "layers_path": mm.layers_path, "rotary_path": mm.rotary_path,
                          "layers": [_layer_row(lm) for lm in mm.layers]}, ensure_ascii=False, indent=1))
        return
    table = Table(title=f"{source}（{mm.model_type}）：{mm.layers_path} × {len(mm.layers)}，RoPE 来自 {mm.rotary_path}")
    cols = ["layer", "attention", "q", "k", "v", "o", "rope", "qk_norm", "gate", "up", "down", "act", "norms", "missing"]
    for c in cols:
        table.add_column(c, overflow="fold")
    for lm in mm.layers:
        row = _layer_row(lm)
        table.add_row(*[str(row[c]) for c in cols])
    Console(width=200).print(table)
    if any(lm.missing for lm in mm.layers):
        console.print("[yellow]有角色未能定位：这些层不能被对应的转换器改写。[/]")


def _layer_row(lm) -> dict:
    def p(x):
        if x is None:
            return "—"
        return f"{x.module}[{len(x.rows)}×{len(x.rows[0])}]" if x.rows else x.module

    return {"layer": lm.index, "attention": lm.attention or "—", "q": p(lm.q), "k": p(lm.k), "v": p(lm.v),
            "o": p(lm.o), "rope": lm.rotary_dim or "无", "qk_norm": ",".join(filter(None, [lm.q_norm, lm.k_norm])) or "—",
            "gate": p(lm.gate), "up": p(lm.up), "down": p(lm.down), "act": lm.activation or "—",
            "norms": ",".join(filter(None, [lm.attn_norm, lm.mlp_norm])) or "—", "missing": ",".join(lm.missing) or "—"}


@app.command("report")
def report_cmd(out: Path = typer.Argument(..., help="dsopt 输出目录"),
               as_json: bool = typer.Option(False, "--json", help="输出 fidelity.json 原文")):
    """打印输出目录中的保真度报告。"""
    from .fidelity import read_report, render_markdown

    try:
        rep = read_report(out)
    except FileNotFoundError as e:
        _fail(str(e))
    if as_json:
        print(json.dumps(rep, ensure_ascii=False, indent=2))
    else:
        Console().print(Markdown(render_markdown(rep)))


@app.command("check")
def check_cmd(out: Path = typer.Argument(..., help="dsopt 输出目录"),
              max_ppl_increase: Optional[float] = typer.Option(None, "--max-ppl-increase", help="困惑度上升上限（%）"),
              min_top1: Optional[float] = typer.Option(None, "--min-top1", help="top-1 一致率下限（0–1）"),
              max_kl: Optional[float] = typer.Option(None, "--max-kl", help="平均 KL 上限"),
              max_kv_ratio: Optional[float] = typer.Option(None, "--max-kv-ratio", help="KV 缓存比例上限（0–1）")):
    """CI 门禁：任一阈值不满足时以非零状态退出，并逐条说明原因。"""
    from .fidelity import check, read_report

    try:
        rep = read_report(out)
    except FileNotFoundError as e:
        _fail(str(e))
    failures = check(rep, max_ppl_increase, min_top1, max_kl, max_kv_ratio)
    if failures:
        for f in failures:
            console.print(f"[bold red]未通过：[/]{f}")
        raise typer.Exit(1)
    Console().print("[green]全部阈值通过[/]")


def main():
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own rich bars say what is happening
    app()


if __name__ == "__main__":
    main()
