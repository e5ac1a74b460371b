"""报告文件：``fidelity.json``（机器读）、``fidelity.md`` 与图（人读）。"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ReportError
from .render import plots, render_markdown

REPORT_JSON = "fidelity.json"
REPORT_MD = "fidelity.md"


def write_report(folder: Path, report: dict) -> None:
    folder = Path(folder)
    (folder / REPORT_JSON).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (folder / REPORT_MD).write_text(render_markdown(report, plots(folder, report)), encoding="utf-8")


REQUIRED = ("source", "techniques", "recipe", "fidelity", "kv_cache")  # what every command reading a report uses


def read_report(folder: Path) -> dict:
    """The report of an output folder; a missing file is ``FileNotFoundError``, a truncated or incomplete one
    ``ReportError`` (both with a message that says which file and what to do)."""
    path = Path(folder) / REPORT_JSON
    if not path.exists():
        raise FileNotFoundError(f"{folder} 中没有 {REPORT_JSON}：这不是 dsopt 的输出目录？")
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ReportError(f"{path} 不是有效的 JSON（被截断或损坏？{e}）：请重新运行 dsopt convert 生成它") from None
    missing = [k for k in REQUIRED if k not in report] if isinstance(report, dict) else list(REQUIRED)
    if missing:
        raise ReportError(f"{path} 不完整：缺少 {', '.join(missing)}；请重新运行 dsopt convert 生成它")
    return report
