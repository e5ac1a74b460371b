"""MoE 改造的端到端测试：copy 模式完全等价、split 模式路由与负载、检查点往返。"""

import copy

import pytest
import torch
from conftest import FAST_RECIPE, tiny_model

from patcher import patch_model


def moe_recipe(**moe):
    return {**FAST_RECIPE, "moe": {"enabled": True, **moe}}


@pytest.mark.parametrize("family", ["llama", "qwen3", "phi3", "gemma", "gpt2", "gpt_neox"])
def test_copy_mode_equals_the_dense_model(family, tokenizer):
    model = tiny_model(family, seed=7)
    base = copy.deepcopy(model)
    patched, report = patch_model(model, moe_recipe(mode="copy", experts=4, top_k=2), tokenizer)
    ids = torch.randint(4, 250, (2, 20))
    with torch.no_grad():
        assert (patched(input_ids=ids).logits - base(input_ids=ids).logits).abs().max() <= 1e-4
    p = report["parameters"]["patched_active_per_token"]
    assert p["ffn_total"] / p["ffn_active"] == pytest.approx(2.0, rel=0.02)  # 4 experts, 2 active
    assert report["fidelity"]["top1_agreement"] == 1.0


def test_copy_noise_breaks_symmetry(tokenizer):
    model = tiny_model("llama", seed=7)
    base = copy.deepcopy(model)
    patched, _ = patch_model(model, moe_recipe(mode="copy", experts=4, top_k=2, noise=0.1), tokenizer)
    ids = torch.randint(4, 250, (1, 12))
    with torch.no_grad():
        assert (patched(input_ids=ids).logits - base(input_ids=ids).logits).abs().max() > 1e-3


def test_split_mode_reports_routing_and_balance(tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    from patcher.evaluation.report import write_report
    from patcher.formats.folder import write_checkpoint

    model = tiny_model("llama", seed=8)
    patched, report = patch_model(model, moe_recipe(mode="split", experts=8, active=0.5, balance=True, router_rank=4), tokenizer)
    bal = report["moe"]["balance"]
    assert len(bal) == 2 and all(sum(b["tokens_per_expert"]) > 0 for b in bal)
    assert all(0 < b["entropy"] <= 1 for b in bal)
    active = report["parameters"]["patched_active_per_token"]
    assert 0.4 < active["active_ffn_fraction"] < 0.7
    # FLOPs per token: 2 per weight a token uses, the embedding lookup out, the tied output head in
    dense = report["parameters"]["base_active_per_token"]
    emb = model.get_input_embeddings().weight.numel()
    assert dense["flops_per_token"] == 2 * (dense["total"] - emb + emb * model.config.tie_word_embeddings
                                            ) and dense["ffn_flops_per_token"] == 2 * dense["ffn_total"]
    assert active["ffn_flops_per_token"] == 2 * active["ffn_active"]
    assert dense["flops_per_token"] - active["flops_per_token"] == 2 * (dense["active"] - active["active"])
    assert all(0 <= l["moe_router_recall"] <= 1 for l in report["layers"])
    write_checkpoint(patched, None, tmp_path / "out")
    write_report(tmp_path / "out", report)
    assert (tmp_path / "out" / "moe_balance.png").exists()
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.randint(4, 250, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, patched(input_ids=ids).logits)
    out = again.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=3)
    assert out.shape == (1, 20)


def test_mla_and_moe_together(tokenizer):
    model = tiny_model("qwen2", seed=9)
    patched, report = patch_model(model, {**moe_recipe(mode="split", experts=4, active=0.75, router_rank=4),
                                          "mla": {"enabled": True, "kv_keep": 0.5}}, tokenizer)
    assert report["techniques"] == ["mla", "moe"] and report["kv_cache"]["ratio"] == pytest.approx(0.5, abs=0.02)
    assert type(patched.model.layers[0].mlp).__name__ == "MoEMLP"
    assert type(patched.model.layers[0].self_attn).__name__ == "LatentAttention"
