"""命令行：``dsopt convert / heal / train-mtp / generate / inspect / report / check``（typer，进度条用 rich）。

``convert`` 的参数由配方模式（``patcher.recipe``）生成：每个带 ``flag`` 的字段一个参数，
用户给出的值覆盖 ``--recipe`` 预设，然后整体校验。CLI 与 ``patch_model`` 因此读同一个模式。
这里只解析参数、调用 ``patcher.jobs``、打印结果；``DsoptError`` 变成一行清楚的错误与退出码 2。
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

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="dsopt：把稠密 LLM 检查点转换为 DeepSeek 风格（MLA 潜在注意力、MoE 混合专家、MTP 多 token 预测），"
                       "并给出保真度报告。")
console = Console(stderr=True)


class RichProgress:
    """每层一格的 rich 进度条，描述当前层正在做什么。"""

    def __init__(self, progress: Progress):
        self.progress = progress
        self.task = None
        self.name = ""

    def start(self, name: str, total: int, completed: int = 0):
        if self.task is not None:
            self.progress.update(self.task, visible=False)
        self.name = name
        self.task = self.progress.add_task(name, total=total, completed=completed)

    def update(self, step: int, loss: float, accuracy: list[float]):
        heads = " ".join(f"头{k + 1} {100 * a:.0f}%" for k, a in enumerate(accuracy))
        self.progress.update(self.task, completed=step,
                             description=f"{self.name} · 损失 {loss:.4f}" + (f" · 准确率 {heads}" if heads else ""))

    def step(self, layer: int, what: str):
        self.progress.update(self.task, description=f"{self.name} · 第 {layer} 层：{what}")

    def advance(self):
        self.progress.advance(self.task)


def _generated_row(table: Table, g: dict | None):
    if g:
        table.add_row("其中自生成文本 token / 耗时", f"{g['tokens']} / {g['seconds']:.0f} s")


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
    from . import jobs
    from .errors import DsoptError
    from .recipe import flag_fields, load_recipe, with_overrides

    try:
        base = load_recipe(recipe)
        overrides = {(sec, name): flags[f"{sec}__{name}"] for sec, name, _ in flag_fields()
                     if flags.get(f"{sec}__{name}") is not None}
        rec = with_overrides(base, overrides)
    except DsoptError as e:
        _fail(str(e))
    out = out or Path(f"{Path(source).name}-dsopt")
    try:
        with Progress(*_columns(), console=console, transient=False) as progress:
            report = jobs.convert(source, rec, out, progress=RichProgress(progress), resume=flags.get("resume", False))
    except DsoptError as e:
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
        inspect.Parameter("resume", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                          default=typer.Option(False, "--resume", help="流式转换被中断后，从最后完成的层接着做"
                                                                       "（状态在 OUT 旁的 .OUT.partial/ 中）")),
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
    from .evaluation.render import interval

    f = report.get("fidelity") or {}
    kv = report["kv_cache"]
    table = Table(title=f"dsopt 转换完成 → {out}")
    table.add_column("指标")
    table.add_column("值", justify="right")
    if f:
        where = f"，最差领域 {f['worst_domain']}" if f.get("worst_domain") else ""
        table.add_row(f"困惑度 基座 → 转换后{where}",
                      f"{f['ppl_base']:.3f} → {f['ppl_patched']:.3f} ({f['ppl_increase_pct']:+.2f} %)")
        table.add_row("困惑度上升的 95 % 区间", interval(f))
        table.add_row("平均 KL", f"{f['kl_mean']:.5f}")
        table.add_row("top-1 一致率", f"{100 * f['top1_agreement']:.2f} %")
    table.add_row("每 token KV 字节", f"{kv['base']['kv_bytes_per_token']:.0f} → {kv['patched']['kv_bytes_per_token']:.0f}"
                  f" ({100 * kv['ratio']:.1f} %)")
    r = report["resources"]
    table.add_row("转换耗时 / 峰值内存", f"{r['conversion_seconds']:.1f} s / {r['peak_rss_mib']:.0f} MiB")
    Console().print(table)


def _columns():
    return [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]


def _mtp_train_command():
    from .recipe import MTPOptions

    skip = {"heads", "init_layer", "train_tokens", "data"}  # fixed by the checkpoint, or named --data/--tokens here
    params = [
        inspect.Parameter("out", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Path,
                          default=typer.Argument(..., help="带 MTP 模块的 dsopt 输出目录")),
        inspect.Parameter("data", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[str],
                          default=typer.Option(None, "--data", help="训练文本（.txt/.jsonl）；缺省用转换时的校准文本")),
        inspect.Parameter("tokens", inspect.Parameter.KEYWORD_ONLY, annotation=int,
                          default=typer.Option(65536, "--tokens", help="训练 token 数（决定步数）")),
        inspect.Parameter("resume", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                          default=typer.Option(False, "--resume", help="从 OUT/mtp-train/ 中保存的状态接着训练")),
    ]
    for name, field in MTPOptions.model_fields.items():
        if name in skip:
            continue
        params.append(inspect.Parameter(
            name, inspect.Parameter.KEYWORD_ONLY, annotation=Optional[_option_type(field.annotation)],
            default=typer.Option(None, field.json_schema_extra["flag"], help=f"{field.description}（缺省 {field.default}）",
                                 show_default=False)))

    def train_mtp(**kw):
        from pydantic import ValidationError

        from . import jobs
        from .errors import DsoptError
        from .evaluation.report import read_report

        out = kw.pop("out")
        try:
            current = read_report(out)["recipe"].get("mtp") or {}
            opts = MTPOptions(**{**current, **{k: v for k, v in kw.items() if v is not None and k not in
                                               ("tokens", "resume")}, "train_tokens": kw["tokens"]})
        except (FileNotFoundError, DsoptError, ValidationError) as e:
            _fail(str(e))
        try:
            with Progress(*_columns(), console=console, transient=False) as progress:
                rep = jobs.train_mtp_checkpoint(out, opts, kw["resume"], RichProgress(progress))
        except (FileNotFoundError, DsoptError, ValueError) as e:
            _fail(str(e))
        table = Table(title=f"MTP 训练完成 → {out}")
        table.add_column("指标")
        table.add_column("值", justify="right")
        t = rep["training"]
        table.add_row("步数 / token / 耗时", f"{t['steps']} / {t['tokens']} / {t['seconds']:.0f} s")
        _generated_row(table, t.get("generated"))
        table.add_row("逐头接受率（留出文本）", " ".join(f"{100 * a:.1f}%" for a in rep["head_acceptance_teacher_forced"]))
        table.add_row("每步接受 token（实测生成）", f"{rep['accepted_per_step']:.2f}")
        table.add_row("tokens/s：MTP / 普通", f"{rep['tokens_per_s_mtp']:.1f} / {rep['tokens_per_s_plain']:.1f}")
        Console().print(table)

    train_mtp.__signature__ = inspect.Signature(params)
    train_mtp.__doc__ = "训练 MTP 模块（基座冻结，自蒸馏或文本目标），可 --resume；权重与报告写回 OUT。"
    return train_mtp


app.command("train-mtp")(_mtp_train_command())


def _heal_command():
    from .training.heal import HealOptions

    params = [inspect.Parameter("out", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Path,
                                default=typer.Argument(..., help="dsopt 输出目录（dsopt 或 deepseek-v3 格式）")),
              inspect.Parameter("resume", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                                default=typer.Option(False, "--resume", help="从 OUT/heal-train/ 中保存的状态接着训练"))]
    for name, field in HealOptions.model_fields.items():
        params.append(inspect.Parameter(
            name, inspect.Parameter.KEYWORD_ONLY, annotation=Optional[_option_type(field.annotation)],
            default=typer.Option(None, "--" + name.replace("_", "-"), help=f"{field.description}（缺省 {field.default}）",
                                 show_default=False)))

    def heal(**kw):
        from pydantic import ValidationError

        from . import jobs
        from .errors import DsoptError

        out, resume = kw.pop("out"), kw.pop("resume")
        try:
            opts = HealOptions(**{k: v for k, v in kw.items() if v is not None})
        except ValidationError as e:
            _fail(str(e))
        try:
            with Progress(*_columns(), console=console, transient=False) as progress:
                rec = jobs.heal_checkpoint(out, opts, resume, RichProgress(progress))
        except (FileNotFoundError, DsoptError, ValueError) as e:
            _fail(str(e))
        table = Table(title=f"修复完成 → {out}")
        table.add_column("指标")
        table.add_column("值", justify="right")
        b, a = rec["before"], rec["after"]
        from .evaluation.render import errors_by_kind, interval

        table.add_row("困惑度上升 转换后 → 修复后", f"{b['ppl_increase_pct']:+.2f} % → {a['ppl_increase_pct']:+.2f} %")
        table.add_row("修复后上升的 95 % 区间", interval(a))
        table.add_row("平均 KL", f"{b['kl_mean']:.5f} → {a['kl_mean']:.5f}")
        table.add_row("步数 / token / 耗时", f"{rec['steps']} / {rec['tokens']} / {rec['seconds']:.0f} s")
        _generated_row(table, rec.get("generated"))
        local = rec.get("local")
        if local and local["layers"]:
            for kind, n, before, after in errors_by_kind(local):
                label = "MoE MLP" if kind == "mlp" else "注意力"
                table.add_row(f"其中逐层重建：{label} 个数 / 相对误差", f"{n} / {before:.4f} → {after:.4f}")
            table.add_row("逐层重建耗时", f"{local['seconds']:.0f} s")
        Console().print(table)

    heal.__signature__ = inspect.Signature(params)
    heal.__doc__ = "修复：以源模型为老师做 KL 蒸馏（缺省只训练转换改动过的模块），可 --resume；权重与报告写回 OUT。"
    return heal


app.command("heal")(_heal_command())


@app.command("generate")
def generate_cmd(out: Path = typer.Argument(..., help="dsopt 输出目录（或任何本地检查点）"),
                 prompt: str = typer.Option(..., "--prompt", help="提示文本"),
                 max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="最多生成的 token 数"),
                 no_mtp: bool = typer.Option(False, "--no-mtp", help="不用 MTP 投机解码（普通 generate）"),
                 lookup: int = typer.Option(10, "--lookup", help="MTP 解码时也用上下文查找草稿：末尾 n-gram 在前文出现过"
                                            "就把其后最多这么多个 token 当草稿（0 表示只用 MTP 模块）"),
                 branches: str | None = typer.Option(None, "--branches", help="贪心时的草稿树形状：各 MTP 模块在每个上一级"
                                                     "草稿后给出的候选数，逗号分隔（如 4,2；1 为单链；缺省用模型的 "
                                                     "DRAFT_BRANCHES），与查找草稿合成一棵树一次验证"),
                 temperature: float = typer.Option(0.0, "--temperature", help="0 为贪心；>0 为（投机）采样"),
                 chat: bool = typer.Option(False, "--chat", help="按分词器的对话模板包装提示"),
                 as_json: bool = typer.Option(False, "--json", help="只输出一行 JSON（text、tokens_per_s、accepted_per_step…）")):
    """用转换后的检查点生成文本；有 MTP 模块时缺省走无损投机解码。"""
    from . import jobs
    from .errors import DsoptError

    try:
        row = jobs.generate(out, prompt, max_new_tokens, not no_mtp, lookup, branches, temperature, chat)
    except DsoptError as e:
        _fail(str(e))
    text, n, use_mtp = row["text"], row["new_tokens"], row["mtp"]
    if as_json:
        print(json.dumps(row, ensure_ascii=False))
    else:
        print(text)
        console.print(f"[dim]{n} 个 token，{row['tokens_per_s']:.1f} tokens/s，每步接受 {row['accepted_per_step']:.2f}"
                      f"{'（MTP 投机解码）' if use_mtp else ''}[/]")


@app.command("inspect")
def inspect_cmd(source: str = typer.Argument(..., help="来源：本地目录、.gguf 或内置别名"),
                trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="信任远程代码"),
                as_json: bool = typer.Option(False, "--json", help="以 JSON 输出")):
    """打印定位器在每层找到的角色（来自 FX 图的数据流），以及找不到的角色。"""
    from .errors import DsoptError
    from .model.families import family_of
    from .model.locate import locate
    from .model.sources import load

    try:
        model, _, _ = load(source, trust_remote_code=trust_remote_code)
        mm = locate(model)
    except DsoptError as e:
        _fail(str(e))
    notes = family_of(mm.model_type).notes
    if as_json:
        print(json.dumps({"model_type": mm.model_type, "layers_path": mm.layers_path, "rotary_path": mm.rotary_path,
                          "family_notes": notes, "layers": [_layer_row(lm) for lm in mm.layers]},
                         ensure_ascii=False, indent=1))
        return
    table = Table(title=f"{source}（{mm.model_type}）：{mm.layers_path} × {len(mm.layers)}，RoPE 来自 {mm.rotary_path}")
    cols = ["layer", "attention", "q", "k", "v", "o", "rope", "qk_norm", "gate", "up", "down", "act", "norms", "missing"]
    for c in cols:
        table.add_column(c, overflow="fold")
    for lm in mm.layers:
        row = _layer_row(lm)
        table.add_row(*[str(row[c]) for c in cols])
    Console(width=200).print(table)
    if notes:
        console.print(f"[dim]{mm.model_type}：{notes}[/]")
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
    from .errors import DsoptError
    from .evaluation.render import render_markdown
    from .evaluation.report import read_report

    try:
        rep = read_report(out)
    except (FileNotFoundError, DsoptError) as e:
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
              max_kv_ratio: Optional[float] = typer.Option(None, "--max-kv-ratio", help="KV 缓存比例上限（0–1）"),
              sure: bool = typer.Option(False, "--sure", help="困惑度上升按每个领域 95 % 区间的上界判定：上界都不超过 "
                                        "--max-ppl-increase 才通过（只看点估计时，贴着阈值的结果通过与否是运气）")):
    """CI 门禁：任一阈值不满足时以非零状态退出，并逐条说明原因。"""
    from .errors import DsoptError
    from .evaluation.gate import check
    from .evaluation.report import read_report

    try:
        rep = read_report(out)
    except (FileNotFoundError, DsoptError) as e:
        _fail(str(e))
    try:
        failures = check(rep, max_ppl_increase, min_top1, max_kl, max_kv_ratio, sure)
    except DsoptError as e:
        _fail(str(e))
    if failures:
        for f in failures:
            console.print(f"[bold red]未通过：[/]{f}")
        raise typer.Exit(1)
    Console().print("[green]全部阈值通过[/]")


def _crash_file(exc: BaseException) -> Path:
    """Write the full traceback of an unexpected error to a file; the terminal gets one line."""
    import os
    import tempfile
    import time
    import traceback

    folder = Path(os.environ.get("DSOPT_CACHE", Path.home() / ".cache" / "dsopt")) / "crashes"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        folder = Path(tempfile.gettempdir())
    path = folder / f"dsopt-crash-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.txt"
    path.write_text("".join(traceback.format_exception(exc)), encoding="utf-8")
    return path


def main():
    from transformers.utils import logging as hf_logging

    from .files import disk_full

    hf_logging.disable_progress_bar()  # our own rich bars say what is happening
    try:
        app(standalone_mode=True)
    except Exception as e:  # noqa: BLE001  an error of ours, not the user's: one line and where the traceback is
        if disk_full(e):
            console.print(f"[bold red]错误：[/]磁盘已满（{type(e).__name__}）；腾出空间后重试")
            raise SystemExit(2) from None
        path = _crash_file(e)
        console.print(f"[bold red]内部错误[/]（dsopt 的缺陷，不是输入的问题）：{type(e).__name__}: {str(e)[:200]}；"
                      f"完整回溯已写入 {path}，报告问题时请附上")
        raise SystemExit(3) from None


if __name__ == "__main__":
    main()
