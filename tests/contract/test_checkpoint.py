"""输出目录的契约：原子写出、可加载（有无 dsopt 都行）、保存-加载-保存逐字节一致、坏输入给出清楚错误。"""

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import ROOT, byte_tokenizer, fast_recipe, tiny_model

from patcher import convert, patch_model
from patcher.errors import OutputError, SourceError
from patcher.formats import folder
from patcher.model import sources


@pytest.fixture(scope="module")
def source_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("src") / "tiny-qwen2"
    model = tiny_model("qwen2", seed=3)
    model.save_pretrained(folder, max_shard_size="40KB")  # sharded source with an index
    byte_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def converted(source_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "converted"
    report = convert(str(source_folder), fast_recipe(kv_keep=0.5), out)
    return out, report


def _hashes(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
            if p.suffix in (".safetensors", ".json") and p.name not in ("fidelity.json",)}


def test_output_folder_contents(converted):
    out, report = converted
    names = {p.name for p in out.iterdir()}
    for needed in ("config.json", "model.safetensors", "modeling_dsopt.py", "recipe.yaml", "fidelity.json",
                   "fidelity.md", "README.md", "tokenizer.json", "fidelity_layers.png"):
        assert needed in names, needed
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "dsopt_qwen2" and cfg["auto_map"]["AutoModelForCausalLM"].startswith("modeling_dsopt.")
    assert not [n for n in names if n.startswith(".")]  # no temporary folder left behind
    assert json.loads((out / "fidelity.json").read_text())["kv_cache"]["ratio"] == pytest.approx(0.5, abs=0.02)


def test_loads_without_remote_code_once_dsopt_is_imported(converted, source_folder):
    from transformers import AutoModelForCausalLM

    out, _ = converted
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(model).__name__ == "DsoptQwen2ForCausalLM"
    ids = torch.randint(4, 200, (1, 20))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert torch.isfinite(logits).all()
    text = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=3)
    assert text.shape == (1, 24)


def test_save_load_save_is_bit_exact(converted, tmp_path):
    from transformers import AutoModelForCausalLM

    out, _ = converted
    model = AutoModelForCausalLM.from_pretrained(out)
    again = tmp_path / "again"
    folder.write_checkpoint(model, None, again)
    first = _hashes(out)
    second = _hashes(again)
    assert {k: v for k, v in first.items() if k.endswith(".safetensors")} == \
           {k: v for k, v in second.items() if k.endswith(".safetensors")}
    assert first["config.json"] == second["config.json"]


def test_loads_with_trust_remote_code_where_dsopt_is_not_installed(converted, tmp_path):
    out, _ = converted
    from transformers import AutoModelForCausalLM

    ids = torch.arange(4, 24)[None]
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(out)(input_ids=ids).logits[0, -1]
    torch.save(expected, tmp_path / "expected.pt")
    script = textwrap.dedent(f"""
        import sys
        sys.modules["patcher"] = None      # dsopt cannot be imported in this process
        sys.modules["converters"] = None
        sys.path = [p for p in sys.path if p not in ("", {str(ROOT)!r})]
        import torch
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True).eval()
        ids = torch.arange(4, 24)[None]
        with torch.no_grad():
            got = m(input_ids=ids).logits[0, -1]
        exp = torch.load({str(tmp_path / 'expected.pt')!r}, weights_only=True)
        assert torch.allclose(got, exp, atol=1e-5), (got - exp).abs().max()
        out = m.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=3)
        print("OK", type(m).__name__, out.shape[1])
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    res = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "OK DsoptQwen2ForCausalLM 23" in res.stdout


def test_existing_output_is_refused_and_kept(converted, source_folder):
    out, _ = converted
    before = _hashes(out)
    with pytest.raises(OutputError, match="--overwrite"):
        convert(str(source_folder), fast_recipe(), out)
    assert _hashes(out) == before


def test_a_crash_leaves_no_half_checkpoint(source_folder, tmp_path, monkeypatch):
    out = tmp_path / "crash"

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(folder, "write_checkpoint", boom)
    with pytest.raises(OutputError, match="磁盘已满"):
        convert(str(source_folder), fast_recipe(), out)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_truncated_weights_are_reported(source_folder, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(source_folder, bad)
    shard = sorted(bad.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(SourceError, match="损坏或被截断"):
        sources.load(str(bad))


def test_nan_weights_are_refused(tmp_path):
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].self_attn.k_proj.weight[0, 0] = float("nan")
    model.save_pretrained(tmp_path / "nan")
    byte_tokenizer().save_pretrained(tmp_path / "nan")
    with pytest.raises(SourceError, match="k_proj.weight.*NaN"):
        sources.load(str(tmp_path / "nan"))


def test_hub_name_offline_says_so(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SourceError, match="离线"):
        sources.load("meta-llama/Llama-2-7b-hf")


def test_eval_text_must_differ_from_calibration(tokenizer, tmp_path):
    from patcher.errors import DataError

    text = tmp_path / "same.txt"
    text.write_text("the same words again and again. " * 400)
    recipe = fast_recipe()
    recipe["calibration"] = {**recipe["calibration"], "data": str(text)}
    recipe["eval"] = {**recipe["eval"], "data": str(text)}
    with pytest.raises(DataError, match="相同"):
        patch_model(tiny_model("llama"), recipe, tokenizer)


@pytest.mark.parametrize("family, config_name, model_name", [("llama", "DsoptLlamaConfig", "DsoptLlamaForCausalLM"),
                                                             ("gpt2", "DsoptGPT2Config", "DsoptGPT2LMHeadModel"),
                                                             ("qwen2", "DsoptQwen2Config", "DsoptQwen2ForCausalLM")])
def test_auto_map_names_resolve_to_one_family(family, config_name, model_name):
    """Remote code builds the classes config.json's auto_map names. transformers maps several model types to one
    class (exaone, internlm3 and iquestcoder to LlamaForCausalLM; gpt-sw3 to GPT2LMHeadModel): the config and the
    model must still resolve to the same family, or loading a converted Llama (SmolLM2) fails."""
    from patcher.runtime import modeling

    config_cls, model_cls = getattr(modeling, config_name), getattr(modeling, model_name)
    assert config_cls.model_type == "dsopt_" + family
    assert model_cls.config_class is config_cls
