"""报告文件：``fidelity.json``（机器读）、``fidelity.md`` 与图（人读）。"""

from __future__ import annotations

import json
from pathlib import Path

from .render import plots, render_markdown

REPORT_JSON = "fidelity.json"
REPORT_MD = "fidelity.md"


def write_report(folder: Path, report: dict) -> None:
    folder = Path(folder)
    (folder / REPORT_JSON).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (folder / REPORT_MD).write_text(render_markdown(report, plots(folder, report)), encoding="utf-8")


def read_report(folder: Path) -> dict:
    path = Path(folder) / REPORT_JSON
    if not path.exists():
        raise FileNotFoundError(f"{folder} 中没有 {REPORT_JSON}：这不是 dsopt 的输出目录？")
    return json.loads(path.read_text(encoding="utf-8"))
