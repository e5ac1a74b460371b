"""家族矩阵（issue 27 第 4 项）：每个家族的小模型（扰动过偏置与归一化，逐层类型不同之处保留）转换为 MLA（满秩）+
MoE（copy，无噪声）+ MTP 后 logits 与源模型一致；不支持的组合在任何重活之前被预检拒绝，并说出原因。"""

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, ZOO, byte_tokenizer, zoo_model

from patcher import patch_model
from patcher.errors import DsoptError

FAST = {"calibration": {"tokens": 512, "seq_len": 64, "batch_size": 4, "probe_tokens": 128},
        "eval": {"tokens": 128, "seq_len": 64}}
EXACT = {"mla": {"enabled": True, "kv_keep": 1.0}, "moe": {"enabled": True, "mode": "copy", "experts": 2, "top_k": 2}}
# what is refused, and the words the refusal must contain (the role or reason it names)
REFUSED = {
    "qwen3_moe": ("moe", "up, down"),          # its MLPs are already experts
    "mixtral": ("moe", "up, down"),
}
NO_MTP: dict[str, str] = {}


@pytest.mark.parametrize("family", sorted(ZOO))
def test_family_converts_exactly_at_full_rank_or_is_refused_up_front(family):
    src = zoo_model(family, seed=7)
    ids = torch.randint(4, 250, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = src(input_ids=ids).logits
    tok = byte_tokenizer()
    if family in REFUSED:
        section, words = REFUSED[family]
        with pytest.raises(DsoptError, match=words):
            patch_model(copy.deepcopy(src), {**FAST, section: EXACT[section]}, tok)
        return
    recipe = {**FAST, **EXACT, "mtp": {"heads": 0 if family in NO_MTP else 1, "draft_vocab": 0}}
    patched, report = patch_model(copy.deepcopy(src), recipe, tok)
    with torch.no_grad():
        got = patched(input_ids=ids).logits
    assert (got - ref).abs().max() < 1e-4, family
    assert report["preflight"]["family"] == ZOO[family].get("model_type", family) and report["fidelity"]["top1_agreement"] == 1.0
    if family in NO_MTP:
        with pytest.raises(DsoptError, match=NO_MTP[family]):
            patch_model(copy.deepcopy(src), {**FAST, "mtp": {"heads": 1}}, tok)


@pytest.mark.parametrize("family", ["smollm3", "internlm3"])
def test_outputs_of_any_family_load_with_import_patcher_or_remote_code(family, tmp_path):
    """Families outside the eight with notes, and one whose model class is Llama's: both ways of loading work in a
    fresh process."""
    from patcher import convert

    src = tmp_path / "src"
    zoo_model(family).save_pretrained(src)
    byte_tokenizer().save_pretrained(src)
    convert(str(src), {**FAST, "mla": {"enabled": True, "kv_keep": 1.0}}, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["auto_map"]["AutoConfig"].endswith(family)
    for code in ("import patcher\nfrom transformers import AutoModelForCausalLM as A\nA.from_pretrained({!r})",
                 "from transformers import AutoModelForCausalLM as A\nA.from_pretrained({!r}, trust_remote_code=True)"):
        res = subprocess.run([sys.executable, "-c", code.format(str(tmp_path / "out"))], capture_output=True,
                             text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert res.returncode == 0, res.stderr[-2000:]
