"""重建内置的 code 与 technical 两个领域（校准与评估各一份）：全部取自本机已安装的、许可宽松的文件原文。

来源与许可见 patcher/data/PROVENANCE.md。其余领域（narrative、encyclopedic、chat）是从公开来源取来的原文，
来源记录在同一文件中。用法：python scripts/data/build_local_domains.py（写入 patcher/data/{calibration,evaluation}/）。
"""

from __future__ import annotations

import pydoc_data.topics
import re
import sys
import sysconfig
from email.parser import Parser
from importlib import metadata
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2] / "patcher" / "data"
STDLIB = Path(sysconfig.get_paths()["stdlib"])
INCLUDE = Path(sysconfig.get_paths()["include"])
SITE = Path(sysconfig.get_paths()["purelib"])
TORCH_INCLUDE = Path(torch.__file__).parent / "include"


def joined(parts, limit: int) -> str:
    out, size = [], 0
    for p in parts:
        if size >= limit:
            break
        out.append(p.strip("\n"))
        size += len(p)
    return "\n\n".join(out) + "\n"


def files(paths) -> list[str]:
    return [Path(p).read_text(encoding="utf-8") for p in paths]


def readme(dist: str) -> str:
    """A package's long description (its README) without HTML lines and badge images."""
    body = Parser().parsestr(metadata.distribution(dist).read_text("METADATA")).get_payload()
    keep = [line for line in body.splitlines()
            if not re.search(r"<[a-zA-Z/!][^>]*>|!\[|^\s*\[!\[", line)]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(keep)).strip()


def main() -> int:
    cal, ev = ROOT / "calibration", ROOT / "evaluation"
    cal.mkdir(exist_ok=True)
    ev.mkdir(exist_ok=True)
    # code: CPython's standard library and headers (PSF-2.0) to calibrate; rich (MIT) and PyTorch's c10 (BSD-3) to judge
    (cal / "code.txt").write_text(joined(files(
        [STDLIB / f for f in ("textwrap.py", "shlex.py", "heapq.py", "graphlib.py")] +
        [INCLUDE / f for f in ("listobject.h", "dictobject.h", "abstract.h")]), 70_000), encoding="utf-8")
    (ev / "code.txt").write_text(joined(files(
        [SITE / "rich" / "table.py"] + [TORCH_INCLUDE / "c10" / "util" / f for f in ("ArrayRef.h", "Bitset.h")]),
        60_000), encoding="utf-8")
    # technical: the Python Language Reference (PSF-2.0, pydoc_data) to calibrate; READMEs of MIT/Apache packages to judge
    topics = pydoc_data.topics.topics
    (cal / "technical.txt").write_text(joined([topics[k] for k in sorted(topics)], 70_000), encoding="utf-8")
    (ev / "technical.txt").write_text(joined([readme(d) for d in ("typer", "accelerate", "huggingface_hub")],
                                             40_000), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
