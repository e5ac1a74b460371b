"""为 DeepSeek-V3 导出的修复实测拼一个较大的训练文本文件夹（每个文件一个领域），写到给定目录。

内置校准文本只有约 11 万 token，30 分钟的修复会把它训练三轮以上（学生开始记文本）。这里在它之外加入：
../shared/data 的两本公有领域书（《傲慢与偏见》全书与莎士比亚），Python《语言参考》全文（pydoc_data.topics，PSF
License 2.0），以及 CPython 标准库的若干模块源码（PSF License 2.0）。全部与内置评估文本按来源不相交（评估的代码取自
rich 与 PyTorch，技术文档取自 typer、accelerate、huggingface_hub 的 README；见 patcher/data/PROVENANCE.md）。
对话与百科只有内置校准那一份。

用法：python scripts/data/build_heal_data.py OUT_DIR，然后 dsopt heal EXPORT --data OUT_DIR ...
"""

from __future__ import annotations

import pydoc_data.topics
import shutil
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared" / "data"
STDLIB = Path(sysconfig.get_paths()["stdlib"])
MODULES = ["argparse.py", "json/*.py", "email/*.py", "http/*.py", "logging/*.py", "asyncio/*.py",
           "collections/*.py", "unittest/*.py", "csv.py", "dataclasses.py", "pathlib.py", "subprocess.py"]
CODE_LIMIT = 900_000  # characters


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__)
        return 2
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    for name in ("chat", "encyclopedic"):
        shutil.copy(ROOT / "patcher" / "data" / "calibration" / f"{name}.txt", out / f"{name}.txt")
    for src, name in (("pride-and-prejudice.txt", "narrative.txt"), ("tinyshakespeare.txt", "drama.txt")):
        if not (SHARED / src).exists():
            print(f"缺少 {SHARED / src}（两本书在 ../shared/data）", file=sys.stderr)
            return 1
        shutil.copy(SHARED / src, out / name)
    topics = pydoc_data.topics.topics
    (out / "technical.txt").write_text("\n\n".join(topics[k] for k in sorted(topics)))
    files = [f for pat in MODULES for f in sorted(STDLIB.glob(pat))]
    (out / "code.txt").write_text("\n\n".join(f.read_text() for f in files)[:CODE_LIMIT])
    for f in sorted(out.glob("*.txt")):
        print(f"{f.name}: {f.stat().st_size} 字节")
    return 0


if __name__ == "__main__":
    sys.exit(main())
