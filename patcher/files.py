"""原子写出：输出先写进同级的临时目录，全部成功后再改名；崩溃不会留下看似完整的半成品。"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from .errors import OutputError


class atomic_dir:
    """上下文管理器：在目标旁的临时目录里写，成功后改名；失败时删除临时目录、保留原有内容。"""

    def __init__(self, out: Path, overwrite: bool = False):
        self.out = Path(out)
        self.overwrite = overwrite

    def __enter__(self) -> Path:
        check_output(self.out, self.overwrite)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-", dir=self.out.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            if isinstance(exc, OSError) and exc.errno == 28:
                raise OutputError(f"磁盘已满，写 {self.out} 失败；临时文件已删除，原有内容未动") from exc
            return False
        replace_dir(self.tmp, self.out)
        return False


def replace_dir(done: Path, out: Path) -> None:
    """Put the finished folder ``done`` at ``out`` by renames; an existing ``out`` is removed only afterwards."""
    if out.exists():
        trash = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(trash)
        done.rename(out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        done.rename(out)



def check_output(out: Path, overwrite: bool) -> None:
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"输出路径 {out} 已存在且不是目录")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputError(f"输出目录 {out} 已存在且非空；加 --overwrite 覆盖，或换一个目录")
