"""导出原生 DeepSeek-V3：解耦 RoPE 的数学、布局映射、标准 transformers 在不导入 dsopt 的进程中加载与生成。"""

import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import FAST_RECIPE, ROOT, byte_tokenizer, tiny_model

from patcher import patch_model
from patcher.recipe import RecipeError, parse_recipe


def ds_recipe(moe=None, mtp=0, **mla):
    return {**FAST_RECIPE, "mla": {"enabled": True, "rope_dim": 8, "kv_keep": 0.75, **mla},
            "moe": {"enabled": moe is not None, **(moe or {})}, "mtp": {"heads": mtp, "draft_vocab": 0},
            "output": {"format": "deepseek-v3"}}


def test_decoupled_mqa_at_full_rank_reproduces_the_source(tokenizer):
    # one KV head: the shared rotary key is that head's key, so nothing is lost at full rank and full rope_dim
    model = tiny_model("llama", seed=3, num_key_value_heads=1)
    base = copy.deepcopy(model)
    recipe = {**FAST_RECIPE, "mla": {"enabled": True, "rope": "decoupled", "rope_dim": 16, "kv_lora_rank": 16}}
    patched, report = patch_model(model, recipe, tokenizer)
    ids = torch.randint(4, 250, (2, 24))
    with torch.no_grad():
        assert (patched(input_ids=ids).logits - base(input_ids=ids).logits).abs().max() < 1e-4
        g_base = base.generate(ids[:1, :10], max_new_tokens=6, do_sample=False, pad_token_id=3)
        g_patched = patched.generate(ids[:1, :10], max_new_tokens=6, do_sample=False, pad_token_id=3)
    assert torch.equal(g_base, g_patched)  # through the cache of [latent; rotary key]
    assert report["plan"]["mla"]["rope_pairs"] == list(range(8))


def test_a_budget_above_the_hidden_size_gives_the_exact_latent(tokenizer):
    # full multi-head attention (Llama-2-7B's layout): at 0.9 the budget minus the rotary key (107) exceeds the
    # hidden size (64), where [K_nope; V] already fits exactly; it used to be refused as an impossible rank
    model = tiny_model("llama", seed=3, num_key_value_heads=4)
    recipe = {**FAST_RECIPE, "mla": {"enabled": True, "rope": "decoupled", "rope_dim": 8, "kv_keep": 0.9}}
    _, report = patch_model(model, recipe, tokenizer)
    assert report["plan"]["mla"]["kv_lora_rank"] == 64
    assert report["kv_cache"]["ratio"] == pytest.approx((64 + 8) / 128)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A 3-layer Llama with MLA + split MoE (first layer dense) + one MTP module, written as DeepSeek-V3."""
    from patcher.formats.deepseek_v3 import write_deepseek_v3

    tok = byte_tokenizer()
    model = tiny_model("llama", seed=5, rms_norm_eps=1e-6, num_hidden_layers=3)
    recipe = ds_recipe(moe={"mode": "split", "active": 0.6, "experts": 8, "first_dense": 1}, mtp=1)
    patched, report = patch_model(model, recipe, tok)
    out = tmp_path_factory.mktemp("ds") / "tiny-deepseek"
    out.mkdir()
    write_deepseek_v3(patched, patched.dsopt_model_map, tok, out)
    return patched, report, out


def test_export_config_and_files(exported):
    _, report, out = exported
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["DeepseekV3ForCausalLM"] and cfg["model_type"] == "deepseek_v3"
    assert cfg["first_k_dense_replace"] == 1 and cfg["num_nextn_predict_layers"] == 1
    # DeepSeek's canonical layout, as engines read it: interleaved rotary pairs, the q-LoRA query path
    assert cfg["rope_interleave"] is True and cfg["q_lora_rank"] == cfg["hidden_size"]
    # what transformers does implicitly, spelled out for engines that default otherwise (llama.cpp: softmax)
    assert cfg["scoring_func"] == "sigmoid" and cfg["topk_method"] == "noaux_tc"
    # vLLM/SGLang read a top-level rope_theta and never tie DeepSeek's lm_head
    assert cfg["rope_theta"] == cfg["rope_parameters"]["rope_theta"] and cfg["tie_word_embeddings"] is False
    assert cfg["num_key_value_heads"] == cfg["num_attention_heads"]
    assert cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"] == 48  # 0.75 of K+V = 2 heads · 16 · 2
    assert not list(out.glob("*.py"))  # no custom code
    weights = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.layers.3.eh_proj.weight" in weights and "model.layers.3.shared_head.norm.weight" in weights
    assert "model.layers.0.self_attn.q_b_proj.weight" in weights and "model.layers.0.self_attn.q_proj.weight" not in weights


def test_stock_model_equals_dsopt_forward(exported):
    from patcher.formats.deepseek_v3 import load_stock

    patched, _, out = exported
    stock = load_stock(out)
    ids = torch.randint(4, 250, (2, 30))
    with torch.no_grad():
        ours = patched(input_ids=ids).logits
        theirs = stock(input_ids=ids).logits
        assert (ours - theirs).abs().max() < 1e-4
        # the stock cache holds the latent and the shared rotary key: (kv_lora_rank + qk_rope_head_dim) per layer
        out_gen = stock.generate(ids[:1], max_new_tokens=4, do_sample=False, pad_token_id=0,
                                 return_dict_in_generate=True)
    layer = out_gen.cache.layers[0]
    assert layer.keys.shape[-1] + layer.values.shape[-1] == 48


def test_fresh_process_without_dsopt_loads_and_generates_with_mtp(exported, tmp_path):
    patched, _, out = exported
    ids = torch.arange(4, 40)[None]
    with torch.no_grad():
        torch.save(patched(input_ids=ids).logits[0], tmp_path / "expected.pt")
    script = textwrap.dedent(f"""
        import sys
        sys.modules["patcher"] = None      # dsopt cannot be imported in this process
        sys.modules["converters"] = None
        sys.path = [p for p in sys.path if p not in ("", {str(ROOT)!r})]
        import torch
        from transformers import DeepseekV3ForCausalLM
        m = DeepseekV3ForCausalLM.from_pretrained({str(out)!r}).eval()
        ids = torch.arange(4, 40)[None]
        with torch.no_grad():
            got = m(input_ids=ids).logits[0]
        exp = torch.load({str(tmp_path / 'expected.pt')!r}, weights_only=True)
        assert torch.allclose(got, exp, atol=1e-4), (got - exp).abs().max()
        # transformers looks for DeepSeek-V3 MTP weights at layer 61 only; this model keeps them at layer N
        m._keys_to_ignore_on_load_unexpected.add(rf"model\\.layers\\.{{m.config.num_hidden_layers}}\\..*")
        plain = m.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
        mtp = m.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0, use_mtp=True)
        assert torch.equal(plain, mtp)
        print("OK", type(m).__name__, mtp.shape[1])
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    res = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "OK DeepseekV3ForCausalLM 44" in res.stdout


def test_convert_writes_a_checked_export_with_biases(tmp_path):
    # Qwen2: q/k/v biases. K's goes into the shared rotary key (or cancels in softmax), V's into o_proj's bias,
    # q's is folded into W_q by least squares (no exact home) and its kept share is reported
    from patcher import convert

    src = tmp_path / "tiny-qwen2"
    tiny_model("qwen2", seed=2, rms_norm_eps=1e-6).save_pretrained(src)
    byte_tokenizer().save_pretrained(src)
    report = convert(str(src), ds_recipe(moe={"mode": "copy", "experts": 4, "top_k": 2}, mtp=1), tmp_path / "out")
    ex = report["export"]
    assert ex["class"] == "DeepseekV3ForCausalLM" and ex["max_abs_logit_diff_vs_dsopt"] < 1e-4
    assert ex["mtp_generate_identical_to_greedy"] is True
    assert ex["stock_kv_cache"]["kv_bytes_per_token"] == 2 * 48 * 4  # 2 layers · (rank + rope) · fp32
    assert "q_bias_share_kept" in report["layers"][0]
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["attention_bias"] is True and cfg["first_k_dense_replace"] == 0
    md = (tmp_path / "out" / "fidelity.md").read_text()
    assert "解耦 RoPE" in md and "calibrated" in md and "rope_frequencies.png" in md  # the report names the method
    assert (tmp_path / "out" / "rope_frequencies.png").exists()


def test_recipe_rules_for_the_deepseek_format():
    with pytest.raises(RecipeError, match="--mla"):
        parse_recipe({"output": {"format": "deepseek-v3"}})
    with pytest.raises(RecipeError, match="--mla-rope decoupled"):
        parse_recipe({"mla": {"enabled": True, "rope": "latent"}, "output": {"format": "deepseek-v3"}})
    with pytest.raises(RecipeError, match="--moe-router linear"):
        parse_recipe({"mla": {"enabled": True}, "moe": {"enabled": True, "router": "lowrank"},
                      "output": {"format": "deepseek-v3"}})
    r = parse_recipe({"mla": {"enabled": True}, "moe": {"enabled": True}, "output": {"format": "deepseek-v3"}})
    assert (r.mla.rope, r.moe.router, r.moe.allocation, r.moe.routing) == ("decoupled", "linear", "uniform", "sigmoid")
    with pytest.raises(RecipeError, match="偶数"):
        parse_recipe({"mla": {"enabled": True, "rope_dim": 7}})


def test_layouts_decoupled_rope_cannot_express_are_refused(tokenizer):
    from patcher.errors import PlanError

    with pytest.raises(PlanError, match="q_norm|RMSNorm"):  # Qwen3's per-head q/k norms are not linear
        patch_model(tiny_model("qwen3"), ds_recipe(), tokenizer)
    with pytest.raises(PlanError, match="旋转维数"):
        patch_model(tiny_model("llama"), ds_recipe(rope_dim=32), tokenizer)


@pytest.mark.parametrize("family, why", [("glm4", "post_self_attn_layernorm"), ("ministral", "滑动窗口"),
                                         ("phi", "RMSNorm"), ("mixtral", "MLP 没有定位到")])
def test_what_the_format_cannot_express_is_refused_before_the_model_is_read(family, why, monkeypatch, tmp_path):
    """GLM-4's post-norms, sliding windows and LayerNorm: refused by the preflight's miniature export, before the
    checkpoint's weights are loaded (they were caught only after the whole conversion)."""
    from conftest import zoo_model

    from patcher import jobs
    from patcher.errors import ExportError
    from patcher.model import sources

    def no_weights(*a, **k):
        raise AssertionError("the weights were read before the refusal")
    zoo_model(family).save_pretrained(tmp_path / "src")
    monkeypatch.setattr(sources, "load", no_weights)
    with pytest.raises(ExportError, match=f"预检.*{why}"):
        jobs.convert(str(tmp_path / "src"), parse_recipe(ds_recipe(rope_dim=None)), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_decoupled_model_in_dsopt_format_round_trips(tmp_path):
    from transformers import AutoModelForCausalLM

    from patcher import convert

    src = tmp_path / "tiny-llama"
    tiny_model("llama", seed=4).save_pretrained(src)
    byte_tokenizer().save_pretrained(src)
    recipe = {**FAST_RECIPE, "mla": {"enabled": True, "rope": "decoupled", "rope_dim": 8, "rope_method": "low"}}
    report = convert(str(src), recipe, tmp_path / "out")
    assert report["plan"]["mla"]["rope_pairs"] == [4, 5, 6, 7]
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(m.model.layers[0].self_attn).__name__ == "DecoupledLatentAttention"
    ids = torch.randint(4, 250, (1, 16))
    with torch.no_grad():
        a = m(input_ids=ids).logits
        m.save_pretrained(tmp_path / "again")
        b = AutoModelForCausalLM.from_pretrained(tmp_path / "again")(input_ids=ids).logits
    assert torch.equal(a, b)


def test_routing_mapping_is_checked_with_the_choice_pinned(exported, tmp_path):
    # hard top-k routing turns rounding into a different expert at near-ties, so the export is compared with
    # stock's choice pinned to dsopt's; a wrong router or selection bias must still be refused
    import shutil

    from safetensors.torch import load_file, save_file

    from patcher.errors import ExportError
    from patcher.formats.deepseek_v3 import verify_export

    patched, _, out = exported
    ids = torch.randint(4, 250, (1, 40))
    found = verify_export(out, patched, ids)
    assert found["routing"] == "pinned to dsopt's choices" and found["tokens_over_tolerance"] == 0
    assert found["router_logit_diff"] < 1e-4 and found["choice_gap"] <= 0
    for key, change in (("model.layers.1.mlp.gate.e_score_correction_bias", lambda t: t + torch.arange(len(t))),
                        ("model.layers.2.mlp.gate.weight", lambda t: t.flip(0))):
        bad = tmp_path / key
        shutil.copytree(out, bad)
        for f in bad.glob("*.safetensors"):
            tensors = load_file(f)
            if key in tensors:
                tensors[key] = change(tensors[key]).contiguous()
                save_file(tensors, f, metadata={"format": "pt"})
        with pytest.raises(ExportError, match="路由"):
            verify_export(bad, patched, ids)
