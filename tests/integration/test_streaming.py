"""流式转换：与内存中的管线结果一致；被杀掉后 --resume 得到同样的字节；坏输入给出清楚的错误。"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import FAST_RECIPE, ROOT

sys.path.insert(0, str(ROOT / "scripts"))
from make_synthetic_checkpoint import write_synthetic  # noqa: E402

SHAPE = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=96, vocab_size=300, max_position_embeddings=512, rope_theta=10000.0, rms_norm_eps=1e-5)
RECIPE = {**FAST_RECIPE, "mla": {"enabled": True, "kv_keep": 0.5}, "moe": {"enabled": True, "router_rank": 8},
          "mtp": {"heads": 1}}
CLI_FLAGS = ["--mla", "--kv-keep", "0.5", "--moe", "--moe-router-rank", "8", "--mtp", "1", "--calib-tokens", "1024",
             "--calib-seq-len", "128", "--eval-tokens", "512", "--eval-seq-len", "128", "--streaming", "on"]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return write_synthetic(tmp_path_factory.mktemp("syn") / "llama-tiny", SHAPE, torch.float32, log=lambda *a: None)


@pytest.fixture(scope="module")
def source_bf16(tmp_path_factory):
    return write_synthetic(tmp_path_factory.mktemp("syn16") / "llama-tiny-bf16", SHAPE, torch.bfloat16,
                           log=lambda *a: None)


def _load(folder):
    from transformers import AutoModelForCausalLM

    from patcher.runtime import modeling

    modeling.register("llama")
    return AutoModelForCausalLM.from_pretrained(folder).eval()


# the CLI in a subprocess; ``kill_after=i`` SIGKILLs it right after layer i's state is committed (a real kill at a
# known point: nothing gets to clean up)
KILLING = """
import os, sys
from patcher.pipeline import streaming
commit, after = streaming.Run.commit, int(sys.argv.pop(1))
def commit_then_die(run, i, *a, **kw):
    commit(run, i, *a, **kw)
    if i == after:
        os.kill(os.getpid(), 9)
streaming.Run.commit = commit_then_die
from patcher.cli import main
main()
"""


def _dsopt(*args, kill_after: int | None = None):
    script = "from patcher.cli import main; main()" if kill_after is None else KILLING
    cmd = [sys.executable, "-c", script, *([str(kill_after)] if kill_after is not None else []), *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)


def _digests(folder: Path) -> dict:
    names = [p for p in sorted(folder.iterdir()) if p.suffix == ".safetensors" or p.name in
             ("model.safetensors.index.json", "config.json")]
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in names}


def test_streaming_matches_in_memory_pipeline(source, tmp_path):
    """Same recipe, same source: the streamed checkpoint holds exactly the weights the in-memory pipeline writes,
    and its report the same fidelity and KV cache figures."""
    from patcher.jobs import convert

    uniform = {**RECIPE, "mla": {**RECIPE["mla"], "allocation": "uniform"},
               "moe": {**RECIPE["moe"], "allocation": "uniform"}}
    streamed = convert(str(source), {**uniform, "output": {"streaming": "on"}}, tmp_path / "s")
    in_memory = convert(str(source), {**uniform, "output": {"streaming": "off"}}, tmp_path / "m")
    a, b = _load(tmp_path / "s").state_dict(), _load(tmp_path / "m").state_dict()
    assert set(a) == set(b) and any(k.startswith("mtp.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert streamed["fidelity"] == in_memory["fidelity"]
    assert streamed["kv_cache"]["ratio"] == in_memory["kv_cache"]["ratio"] == 0.5
    assert streamed["parameters"]["patched"] == in_memory["parameters"]["patched"]
    assert streamed["parameters"]["base"] == in_memory["parameters"]["base"]
    assert [b["tokens_per_expert"] for b in streamed["moe"]["balance"]] == \
        [b["tokens_per_expert"] for b in in_memory["moe"]["balance"]]
    assert not (tmp_path / ".s.partial").exists()


def test_streaming_bf16_checkpoint_loads_generates_and_reports(source_bf16, tmp_path):
    from patcher.jobs import convert

    report = convert(str(source_bf16), {**RECIPE, "output": {"streaming": "on"}}, tmp_path / "out")
    model = _load(tmp_path / "out")
    assert next(model.parameters()).dtype == torch.bfloat16
    ids = torch.tensor([[5, 6, 7, 8]])
    assert model.generate(ids, max_new_tokens=4, do_sample=False, use_mtp=False).shape == (1, 8)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == SHAPE["num_hidden_layers"] + 2  # layers, outer, MTP
    s = report["streaming"]
    assert s["checkpoint_dtype"] == "bfloat16" and s["compute_dtype"] == "float32"
    assert any("uniform" in n for n in s["notes"])  # the default sensitivity allocation needs all layers
    r = report["resources"]
    assert len(r["layer_seconds"]) == SHAPE["num_hidden_layers"] and r["peak_rss_mib"] > 0
    assert {"read", "calibrate", "convert", "propagate", "write", "verify"} <= set(r["stage_seconds"])
    assert report["kv_cache"]["ratio"] == 0.5 and report["fidelity"]["tokens"] > 0
    assert "流式" in report["mtp"]["note"]


def test_killed_conversion_resumes_to_the_same_bytes(source, tmp_path):
    whole = _dsopt("convert", source, "-o", tmp_path / "whole", *CLI_FLAGS)
    assert whole.returncode == 0, whole.stderr[-2000:]

    out = tmp_path / "resumed"
    killed = _dsopt("convert", source, "-o", out, *CLI_FLAGS, kill_after=1)
    assert killed.returncode == -9  # SIGKILL: nothing was cleaned up
    partial = tmp_path / ".resumed.partial"
    assert not out.exists() and partial.is_dir()
    assert json.loads((partial / "stream-state" / "progress.json").read_text())["done"] == 1

    again = _dsopt("convert", source, "-o", out, *CLI_FLAGS)  # without --resume: refuses, keeps the partial work
    assert again.returncode == 2 and "--resume" in again.stderr and partial.is_dir()

    resumed = _dsopt("convert", source, "-o", out, *CLI_FLAGS, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert not partial.exists()
    assert _digests(out) == _digests(tmp_path / "whole")
    assert json.loads((out / "fidelity.json").read_text())["streaming"]["resumed_from_layer"] == 2
    assert json.loads((out / "fidelity.json").read_text())["fidelity"] == \
        json.loads((tmp_path / "whole" / "fidelity.json").read_text())["fidelity"]


def test_resume_refuses_a_different_recipe(source, tmp_path):
    out = tmp_path / "o"
    killed = _dsopt("convert", source, "-o", out, *CLI_FLAGS, kill_after=0)
    assert killed.returncode == -9
    other = _dsopt("convert", source, "-o", out, *CLI_FLAGS, "--kv-keep", "0.25", "--resume")
    assert other.returncode == 2 and "不同" in other.stderr


def test_streaming_refuses_what_needs_all_layers(source, tmp_path):
    from patcher.jobs import convert
    from patcher.recipe import RecipeError

    for extra, word in (({"mla": {"enabled": True, "allocation": "sensitivity"}}, "sensitivity"),
                        ({"mla": {"enabled": True}, "output": {"format": "deepseek-v3"}}, "DeepSeek-V3"),
                        ({"mtp": {"heads": 1, "train_tokens": 1024}}, "train-mtp")):
        recipe = {**FAST_RECIPE, **extra, "output": {**extra.get("output", {}), "streaming": "on"}}
        with pytest.raises(RecipeError, match=word):
            convert(str(source), recipe, tmp_path / "x")
    assert not list(tmp_path.iterdir())


def test_bad_weights_are_named_and_nothing_looks_whole(source, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from patcher.errors import SourceError
    from patcher.jobs import convert

    bad = tmp_path / "bad"
    shutil.copytree(source, bad)
    index = json.loads((bad / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.2.mlp.up_proj.weight"
    shard = bad / index[name]
    tensors = load_file(str(shard))
    tensors[name][0, 0] = float("nan")
    save_file(tensors, str(shard), metadata={"format": "pt"})
    with pytest.raises(SourceError, match=name):
        convert(str(bad), {**RECIPE, "output": {"streaming": "on"}}, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # the layers before it stay in .out.partial for --resume

    cut = tmp_path / "cut"
    shutil.copytree(source, cut)
    victim = cut / index["model.layers.1.self_attn.q_proj.weight"]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    with pytest.raises(SourceError, match="截断"):
        convert(str(cut), {**RECIPE, "output": {"streaming": "on"}}, tmp_path / "out2")
    assert not (tmp_path / "out2").exists()


def test_tied_embeddings_qwen2_biases_stream_like_in_memory(tmp_path, tokenizer):
    """A family with q/k/v biases and a head tied to the embedding: the head is read from the embedding's tensor."""
    from conftest import tiny_model

    tiny_model("qwen2", tie_word_embeddings=True).save_pretrained(tmp_path / "src")
    tokenizer.save_pretrained(tmp_path / "src")
    _assert_streams_like_in_memory(tmp_path, "qwen2", {"mtp": {"heads": 1}})


def _assert_streams_like_in_memory(tmp_path, family: str, extra: dict) -> None:
    """Convert ``tmp_path/src`` (MLA 0.5, uniform) streamed and in memory: equal weights and equal fidelity."""
    from transformers import AutoModelForCausalLM

    from patcher.jobs import convert
    from patcher.runtime import modeling

    recipe = {**FAST_RECIPE, "mla": {"enabled": True, "kv_keep": 0.5, "allocation": "uniform"}, **extra}
    streamed = convert(str(tmp_path / "src"), {**recipe, "output": {"streaming": "on"}}, tmp_path / "s")
    in_memory = convert(str(tmp_path / "src"), {**recipe, "output": {"streaming": "off"}}, tmp_path / "m")
    modeling.register(family)
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "s").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "m").state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert streamed["fidelity"] == in_memory["fidelity"]


def test_names_transformers_renames_on_load_stream_like_in_memory(tmp_path, tokenizer):
    """GPT-NeoX stores its head as ``embed_out`` and transformers renames it to ``lm_head`` on load: streaming
    reads it under the model's name (it used to refuse the checkpoint)."""
    from conftest import zoo_model
    from safetensors import safe_open

    zoo_model("gpt_neox").save_pretrained(tmp_path / "src")
    tokenizer.save_pretrained(tmp_path / "src")
    with safe_open(tmp_path / "src" / "model.safetensors", "pt") as f:
        assert "embed_out.weight" in f.keys()  # the stored name really differs
    _assert_streams_like_in_memory(tmp_path, "gpt_neox", {})


@pytest.mark.parametrize("family, stored", [("qwen3_moe", "model.layers.0.mlp.experts.3.up_proj.weight"),
                                             ("mixtral", "model.layers.0.block_sparse_moe.experts.3.w3.weight")])
def test_experts_transformers_stacks_on_load_stream_like_in_memory(tmp_path, tokenizer, family, stored):
    """Qwen3-MoE and Mixtral store one tensor per expert and transformers stacks them (gate and up concatenated;
    Mixtral's names renamed first) on load: streaming reads and stacks them layer by layer (it used to refuse)."""
    from conftest import zoo_model
    from safetensors import safe_open

    zoo_model(family).save_pretrained(tmp_path / "src")
    tokenizer.save_pretrained(tmp_path / "src")
    with safe_open(tmp_path / "src" / "model.safetensors", "pt") as f:
        assert stored in f.keys()  # really stored per expert
    _assert_streams_like_in_memory(tmp_path, family, {})
