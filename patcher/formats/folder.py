"""dsopt 输出目录：权重、自包含的模型代码（加载时不需要安装 dsopt）与模型卡。"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from torch import nn

from ..files import atomic_dir, check_output, replace_dir  # noqa: F401  (re-exported: the folder's writers)
from ..runtime import modeling

MODELING_FILE = "modeling_dsopt.py"


def write_checkpoint(model: nn.Module, tokenizer, tmp: Path, max_shard_size: str = "200MB") -> None:
    """Weights (sharded safetensors + index), config with auto_map, the self-contained modeling file, tokenizer."""
    model.save_pretrained(tmp, max_shard_size=max_shard_size, safe_serialization=True)
    add_dsopt_code(tmp, model.config.model_type)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)


def add_dsopt_code(folder: Path, model_type: str) -> None:
    """config.json's auto_map and the self-contained modeling files: the folder loads without dsopt installed.

    The auto_map names carry the family's model type (``DsoptForCausalLM_internlm3``), not its class names: several
    model types share one class (InternLM3 and EXAONE use ``LlamaForCausalLM``), a name would be ambiguous."""
    cfg_path = Path(folder) / "config.json"
    cfg = json.loads(cfg_path.read_text())
    stem, base = MODELING_FILE[:-3], model_type.removeprefix(modeling.DSOPT_PREFIX)
    cfg["auto_map"] = {"AutoConfig": f"{stem}.{modeling.CONFIG_NAME}{base}",
                       "AutoModelForCausalLM": f"{stem}.{modeling.MODEL_NAME}{base}"}
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
