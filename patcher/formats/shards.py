"""分片权重：惰性读取源检查点的张量（用到哪一层读哪一层），逐分片写出输出，内存有界。

safetensors 格式很简单：8 字节小端的头部长度、JSON 头部（每个张量的 dtype、形状、数据区内的字节区间）、
原始数据。这里直接按这个格式读写，而不经 safetensors 库的 mmap：映射进来的页面也算常驻内存，一个 1 GiB 的
嵌入读一次就要 2 GiB（映射页 + 副本），写一次又要一份完整的字节副本。这里读时按块 ``readinto`` 并逐块转换
dtype、逐块检查 NaN/Inf，写时逐个张量直接写出，复制层外张量时逐块拷贝字节：峰值只比张量本身多一块（64 MiB）。
写出的文件是标准 safetensors（测试里用 safetensors 库读回）。每个分片先写临时名再改名；索引最后从磁盘上
实际存在的分片头部生成，中断后续做也得到同样的索引。
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import torch

from ..errors import OutputError, SourceError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
CHUNK = 64 * 2 ** 20  # bytes per read/copy block
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
CODES = {v: k for k, v in DTYPES.items()}


def read_header(path: Path) -> tuple[dict, int]:
    """(tensor entries, byte offset of the data area); a short or malformed file is a ``SourceError``."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or 8 + n > size:
                raise ValueError(f"头部长度 {n} 超出文件大小 {size}")
            header = json.loads(f.read(n))
    except (OSError, ValueError) as e:
        raise SourceError(f"无法读取 {path}（损坏或被截断？）：{e}") from None
    header.pop("__metadata__", None)
    end = max((e["data_offsets"][1] for e in header.values()), default=0)
    if 8 + n + end > size:
        raise SourceError(f"{path} 被截断：数据区应有 {end} 字节，文件只有 {size - 8 - n} 字节")
    return header, 8 + n


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
            self.weight_map = {name: SINGLE for name in read_header(self.folder / SINGLE)[0]}
        else:
            raise SourceError(f"{self.folder} 没有 safetensors 权重（{SINGLE} 或 {INDEX}）：流式转换只读 safetensors；"
                              "其他格式请先用 transformers 另存为 safetensors，或关掉流式（--streaming off）")
        missing = sorted({f for f in self.weight_map.values() if not (self.folder / f).exists()})
        if missing:
            raise SourceError(f"索引列出的分片不存在：{', '.join(missing[:3])}（下载不完整？）")
        self._headers: dict[str, tuple[dict, int]] = {}
        self.stored: dict[str, str] = {}  # model name -> the name in the files, where they differ
        self.merged: dict[str, tuple[list[list[str]], int, int | None]] = {}  # see ``merge``
        self.parts: dict[str, str] = {}  # stored name of a merged tensor's part -> its file

    def rename(self, renames: dict[str, str]) -> None:
        """Read each stored tensor under its model name (``{stored: model}``): names transformers renames on load."""
        for old, new in renames.items():
            self.weight_map[new] = self.weight_map.pop(old)
            self.stored[new] = old

    def merge(self, merges: dict[str, tuple[list[list[str]], int, int | None]]) -> None:
        """Read each model tensor that transformers builds from several stored ones on load (Qwen3-MoE's experts):
        ``{model name: (groups, stack_dim, cat_dim)}``; each group's tensors (experts in order) are stacked along
        ``stack_dim``, then the groups concatenated along ``cat_dim`` (``None``: one group)."""
        for name, spec in merges.items():
            for part in (p for group in spec[0] for p in group):
                self.parts[part] = self.weight_map.pop(part)
            self.weight_map[name] = self.parts[spec[0][0][0]]
            self.stored[name] = spec[0][0][0]  # its first part stands for it in the headers (dtype, presence)
            self.merged[name] = spec

    def _entry(self, name: str) -> tuple[Path, dict, int]:
        fname = self.weight_map.get(name) or self.parts.get(name)
        if fname is None:
            raise SourceError(f"检查点中没有张量 {name}")
        if fname not in self._headers:
            self._headers[fname] = read_header(self.folder / fname)
        header, start = self._headers[fname]
        stored = self.stored.get(name, name)
        if stored not in header:
            raise SourceError(f"{fname} 中没有索引所说的张量 {stored}（索引与分片不符）")
        return self.folder / fname, header[stored], start

    def nbytes(self) -> int:
        return sum((self.folder / f).stat().st_size for f in set(self.weight_map.values()) | set(self.parts.values()))

    def names(self) -> list[str]:
        return list(self.weight_map)

    def shape(self, name: str) -> list[int]:
        if name in self.merged:
            groups, stack, cat = self.merged[name]
            parts = [(self.shape(g[0]), len(g)) for g in groups]
            shapes = [part[:stack] + [n] + part[stack:] for part, n in parts]
            if cat is not None:
                shapes[0][cat] = sum(sh[cat] for sh in shapes)
            return shapes[0]
        return list(self._entry(name)[1]["shape"])

    def read(self, names, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The named tensors (floating ones cast to ``dtype`` when given), read block by block; NaN/Inf is an error."""
        return {n: self.read_one(n, dtype) for n in names}

    def read_one(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        if name in self.merged:
            groups, stack, cat = self.merged[name]
            stacked = [torch.stack([self.read_one(p, dtype) for p in g], stack) for g in groups]
            return stacked[0] if cat is None else torch.cat(stacked, cat)
        path, entry, start = self._entry(name)
        return read_tensor(path, name, entry, start, dtype)

    def copy_to(self, names: list[str], dest: Path) -> None:
        """Write the named tensors, as stored, into one safetensors file, copying their bytes block by block."""
        entries = [(n, *self._entry(n)) for n in names]
        header, offset = {}, 0
        for n, _, entry, _ in entries:
            size = entry["data_offsets"][1] - entry["data_offsets"][0]
            header[n] = {"dtype": entry["dtype"], "shape": entry["shape"], "data_offsets": [offset, offset + size]}
            offset += size

        def body(f):
            for n, path, entry, start in entries:
                b, e = entry["data_offsets"]
                with open(path, "rb") as src:
                    src.seek(start + b)
                    left = e - b
                    while left:
                        chunk = src.read(min(CHUNK, left))
                        if not chunk:
                            raise SourceError(f"{path} 被截断：读不完张量 {n}")
                        f.write(chunk)
                        left -= len(chunk)

        _write_file(dest, header, body)

    def dtype(self) -> torch.dtype:
        """The dtype the checkpoint stores its floating weights in (from the headers)."""
        for name in self.weight_map:
            t = DTYPES[self._entry(name)[1]["dtype"]]
            if t.is_floating_point:
                return t
        return torch.float32


def read_tensor(path: Path, name: str, entry: dict, start: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """One tensor, read and cast block by block (floating tensors to ``dtype``); NaN/Inf is a ``SourceError``."""
    src = DTYPES[entry["dtype"]]
    floating = src.is_floating_point
    out = torch.empty(entry["shape"], dtype=dtype if (dtype is not None and floating) else src)
    flat = out.view(-1)
    item = torch.empty(0, dtype=src).element_size()
    per = max(1, CHUNK // item)
    buf = bytearray(per * item)
    with open(path, "rb") as f:
        f.seek(start + entry["data_offsets"][0])
        done = 0
        while done < flat.numel():
            k = min(per, flat.numel() - done)
            if f.readinto(memoryview(buf)[: k * item]) != k * item:
                raise SourceError(f"{path} 被截断：读不完张量 {name}")
            part = torch.frombuffer(buf, dtype=src, count=k).to(out.dtype)
            if floating and not torch.isfinite(part).all():
                raise SourceError(f"权重 {name} 含 NaN 或 Inf：拒绝转换")
            flat[done:done + k] = part
            done += k
    return out


def read_shard(path: Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of one safetensors file (read as ``LazyWeights.read`` does)."""
    header, start = read_header(Path(path))
    return {n: read_tensor(Path(path), n, e, start, dtype) for n, e in header.items()}


def _write_file(dest: Path, header: dict, body) -> None:
    """A safetensors file: header (padded to 8 bytes, as the library does) then ``body(f)``; temp name, then rename."""
    raw = json.dumps({"__metadata__": {"format": "pt"}, **header}, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = dest.with_name(f".{dest.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(len(raw).to_bytes(8, "little"))
            f.write(raw)
            body(f)
        os.replace(tmp, dest)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno == errno.ENOSPC:
            raise OutputError(f"磁盘已满，写分片 {dest.name} 失败；已完成的层保留在 {dest.parent}，腾出空间后加 --resume 续做") from e
        raise


def shard_name(k: int, total: int) -> str:
    return f"model-{k + 1:05d}-of-{total:05d}.safetensors"


def write_shard(folder: Path, name: str, tensors: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> None:
    """One shard (floating tensors cast to ``dtype``), each tensor written straight from its memory: no byte copy of
    the whole shard."""
    header, offset, items = {}, 0, []
    for k in sorted(tensors):
        t = tensors[k].detach()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        t = t.contiguous().cpu()
        size = t.numel() * t.element_size()
        header[k] = {"dtype": CODES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
        items.append(t)

    def body(f):
        for t in items:
            if t.numel():
                f.write(memoryview(t.view(-1).view(torch.uint8).numpy()))

    _write_file(Path(folder) / name, header, body)


def write_index(folder: Path) -> dict[str, str]:
    """``model.safetensors.index.json`` from the shards on disk (their headers only); returns the weight map."""
    folder = Path(folder)
    weight_map, total = {}, 0
    for path in sorted(folder.glob("model-*-of-*.safetensors")):
        header, _ = read_header(path)
        for n, entry in header.items():
            total += entry["data_offsets"][1] - entry["data_offsets"][0]
            weight_map[n] = path.name
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return weight_map
