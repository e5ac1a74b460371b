"""原子写出：输出先写进同级的临时目录，全部成功后再改名；崩溃不会留下看似完整的半成品。

临时目录名带写入进程的 pid；下一次写同一输出时，进程已不在的临时目录会被清掉（被 kill -9 的保存留下的）。
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import OutputError


class atomic_dir:
    """上下文管理器：在目标旁的临时目录里写，成功后改名；失败时删除临时目录、保留原有内容。"""

    def __init__(self, out: Path, overwrite: bool = False, keep: tuple = ()):
        self.out = Path(out)
        self.overwrite = overwrite
        self.keep = keep

    def __enter__(self) -> Path:
        check_output(self.out, self.overwrite, self.keep)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        clean_stale(self.out)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-{os.getpid()}-", dir=self.out.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            if disk_full(exc):
                raise OutputError(f"磁盘已满，写 {self.out} 失败；临时文件已删除，原有内容未动") from exc
            return False
        replace_dir(self.tmp, self.out)
        return False


def disk_full(exc: BaseException | None) -> bool:
    """True when ``exc`` (or what caused it) is 'no space left': OSError errno 28, or a library that wraps it in
    its own exception (safetensors' SafetensorError, tokenizers' bare Exception) with the OS message."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno == 28:
            return True
        text = str(exc)
        if "No space left" in text or "os error 28" in text or "StorageFull" in text:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


@contextmanager
def disk_guard(what: str):
    """Turn a full disk, in whatever exception a library wraps it, into an ``OutputError`` that says ``what``."""
    try:
        yield
    except OutputError:
        raise
    except Exception as e:
        if disk_full(e):
            raise OutputError(f"磁盘已满：{what}") from e
        raise


def replace_dir(done: Path, out: Path) -> None:
    """Put the finished folder ``done`` at ``out`` by renames; an existing ``out`` is removed only afterwards."""
    if out.exists():
        trash = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(trash)
        done.rename(out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        done.rename(out)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(out: Path) -> list[Path]:
    """Remove ``.OUT.tmp-PID-*`` / ``.OUT.old-PID`` folders beside ``out`` whose writing process is gone."""
    removed = []
    if not out.parent.is_dir():
        return removed
    for kind in ("tmp", "old"):
        for p in out.parent.glob(f".{out.name}.{kind}-*"):
            pid = p.name[len(f".{out.name}.{kind}-"):].split("-")[0]
            if p.is_dir() and (not pid.isdigit() or not _alive(int(pid))):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_output(out: Path, overwrite: bool, keep: tuple = ()) -> None:
    """Refuse, before any work, an output that cannot or must not be written.

    ``keep`` lists paths (the source) that the output must neither be nor contain: ``--overwrite`` would delete them.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"输出路径 {out} 已存在且不是目录")
    for src in keep:
        src = Path(src)
        if src.exists() and (out.resolve() == src.resolve() or out.resolve() in src.resolve().parents):
            raise OutputError(f"输出目录 {out} 就是来源 {src}（或包含它）：覆盖会删掉来源。请换一个 -o 目录")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputError(f"输出目录 {out} 已存在且非空；加 --overwrite 覆盖，或换一个目录")
    base = _nearest_existing(out.parent)
    if not base.is_dir():
        raise OutputError(f"输出目录 {out} 的上级 {base} 不是目录")
    try:  # the only reliable test of writability (ACLs, read-only mounts, root): make and remove a folder
        probe = tempfile.mkdtemp(prefix=".dsopt-write-test-", dir=base)
        os.rmdir(probe)
    except OSError as e:
        raise OutputError(f"无法在 {base} 中写入（{e.strerror}）：输出 {out} 写不出去。请换一个可写的 -o 目录") from None
