"""分片权重：惰性读取源检查点的张量（用到哪一层读哪一层），逐分片写出输出。

读取只经 safetensors：每次打开一个分片、读出需要的张量、立即关闭，所以常驻内存只有正在处理的那部分，
不会把整个检查点映射进来。写出时每个分片先写成临时文件再改名，索引（``model.safetensors.index.json``）
最后从磁盘上实际存在的分片头部生成，中断后续做也得到同样的索引。
"""

from __future__ import annotations

import errno
import json
import os
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .checkpoint import OutputError, SourceError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class LazyWeights:
    """源目录中 safetensors 权重的名字 → 分片文件表；``read`` 只读出要的张量。"""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        index = self.folder / INDEX
        if index.exists():
            try:
                self.weight_map = dict(json.loads(index.read_text())["weight_map"])
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise SourceError(f"{index} 无法解析（损坏？）：{e}") from None
        elif (self.folder / SINGLE).exists():
            self.weight_map = {name: SINGLE for name in self._keys(self.folder / SINGLE)}
        else:
            raise SourceError(f"{self.folder} 没有 safetensors 权重（{SINGLE} 或 {INDEX}）：流式转换只读 safetensors；"
                              "其他格式请先用 transformers 另存为 safetensors，或关掉流式（--streaming off）")
        missing = sorted({f for f in self.weight_map.values() if not (self.folder / f).exists()})
        if missing:
            raise SourceError(f"索引列出的分片不存在：{', '.join(missing[:3])}（下载不完整？）")

    @staticmethod
    def _keys(path: Path) -> list[str]:
        try:
            with safe_open(str(path), framework="pt") as f:
                return list(f.keys())
        except Exception as e:  # safetensors raises its own error types for bad headers and short files
            raise SourceError(f"无法读取 {path}（损坏或被截断？）：{type(e).__name__}: {str(e)[:200]}") from None

    def nbytes(self) -> int:
        return sum((self.folder / f).stat().st_size for f in set(self.weight_map.values()))

    def names(self) -> list[str]:
        return list(self.weight_map)

    def read(self, names, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The named tensors (floating ones cast to ``dtype`` when given); NaN/Inf and unreadable data are errors."""
        by_file = defaultdict(list)
        for n in names:
            if n not in self.weight_map:
                raise SourceError(f"检查点中没有张量 {n}")
            by_file[self.weight_map[n]].append(n)
        out = {}
        for fname, group in by_file.items():
            path = self.folder / fname
            try:
                with safe_open(str(path), framework="pt") as f:
                    for n in group:
                        out[n] = f.get_tensor(n)
            except Exception as e:
                raise SourceError(f"无法读取 {path} 中的张量（损坏或被截断？）：{type(e).__name__}: {str(e)[:200]}") from None
        for n, t in out.items():
            if t.is_floating_point():
                if dtype is not None:
                    out[n] = t = t.to(dtype)  # check after the cast: bf16 elementwise ops are slow on CPU
                if not torch.isfinite(t).all():
                    raise SourceError(f"权重 {n} 含 NaN 或 Inf：拒绝转换")
        return out

    def dtype(self) -> torch.dtype:
        """The dtype the checkpoint stores its floating weights in (read from one tensor's header)."""
        name = next(iter(self.weight_map))
        with safe_open(str(self.folder / self.weight_map[name]), framework="pt") as f:
            for n in f.keys():
                t = f.get_slice(n).get_dtype()
                if t in ("BF16", "F16", "F32", "F64"):
                    return {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32,
                            "F64": torch.float64}[t]
        return torch.float32


def shard_name(k: int, total: int) -> str:
    return f"model-{k + 1:05d}-of-{total:05d}.safetensors"


def write_shard(folder: Path, name: str, tensors: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> None:
    """One shard, written to a temporary name and renamed (floating tensors cast to ``dtype``)."""
    data = {k: (t.to(dtype) if dtype is not None and t.is_floating_point() else t).detach().contiguous()
            for k, t in tensors.items()}
    tmp = Path(folder) / f".{name}.tmp"
    try:
        save_file(data, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, Path(folder) / name)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno == errno.ENOSPC:
            raise OutputError(f"磁盘已满，写分片 {name} 失败；已完成的层保留在 {folder}，腾出空间后加 --resume 续做") from e
        raise


def write_index(folder: Path) -> dict[str, str]:
    """``model.safetensors.index.json`` from the shards on disk (their headers only); returns the weight map."""
    folder = Path(folder)
    weight_map, total = {}, 0
    for path in sorted(folder.glob("model-*-of-*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for n in f.keys():
                sl = f.get_slice(n)
                size = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I64": 8, "I32": 4, "BOOL": 1, "U8": 1, "I8": 1}
                numel = 1
                for d in sl.get_shape():
                    numel *= d
                total += numel * size[sl.get_dtype()]
                weight_map[n] = path.name
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return weight_map
