import pytest
import torch
from conftest import FAMILY_CONFIGS, tiny_model

from patcher.model.locate import LocateError, locate

EXPECT = {  # family: (fused qkv, rotary dim, qk-norm, gated mlp, conv1d)
    "llama": (False, 16, False, True, False),
    "mistral": (False, 16, False, True, False),
    "qwen2": (False, 16, False, True, False),
    "qwen3": (False, 16, True, True, False),
    "phi3": (True, 16, False, True, False),
    "gemma": (False, 16, False, True, False),
    "gpt2": (True, 0, False, False, True),
    "gpt_neox": (True, 4, False, False, False),
}


@pytest.mark.parametrize("family", list(FAMILY_CONFIGS))
def test_roles_found_from_data_flow(family):
    fused, rot, qk_norm, gated, conv = EXPECT[family]
    model = tiny_model(family)
    mm = locate(model)
    assert len(mm.layers) == 2
    lm = mm.layers[1]
    assert lm.missing == []
    assert lm.num_heads == 4 and lm.head_dim == 16
    assert lm.num_kv_heads == (4 if family in ("gpt2", "gpt_neox") else 2)
    assert (lm.q.module == lm.k.module == lm.v.module) == fused
    assert lm.rotary_dim == rot
    assert (lm.q_norm is not None and lm.k_norm is not None) == qk_norm
    assert (lm.gate is not None) == gated
    assert lm.q.conv1d == conv and lm.o.conv1d == conv
    assert lm.attn_norm and lm.mlp_norm and lm.attn_norm != lm.mlp_norm
    # the rows of q, k and v never overlap and stay inside the projection's output
    rows = lm.q.flat_rows + lm.k.flat_rows + lm.v.flat_rows
    if fused:
        assert len(set(rows)) == len(rows)
    layer = model.get_submodule(lm.prefix)
    w = layer.get_submodule(lm.k.module).weight
    assert max(lm.k.flat_rows) < (w.shape[1] if conv else w.shape[0])


def test_rows_reproduce_the_keys_of_a_fused_interleaved_projection():
    """GPT-NeoX interleaves q/k/v per head: the rows the locator found must give exactly the module's keys."""
    model = tiny_model("gpt_neox")
    lm = locate(model).layers[0]
    attn = model.gpt_neox.layers[0].attention
    x = torch.randn(3, 64)
    qkv = attn.query_key_value(x).view(3, 4, 3 * 16)
    expected_k = qkv[..., 16:32].reshape(3, -1)
    got = attn.query_key_value(x)[:, lm.k.flat_rows]
    torch.testing.assert_close(got, expected_k)


def test_layer_that_differs_is_named():
    model = tiny_model("llama")
    model.model.layers[1].self_attn.k_proj = torch.nn.Linear(64, 16, bias=False)
    with pytest.raises(LocateError, match="第 1 层.*k_proj"):
        locate(model)


def test_missing_module_is_named():
    model = tiny_model("llama")
    del model.model.layers[1].mlp.up_proj
    model.model.layers[1].mlp.forward = lambda x: x  # keep layer 0 traceable; layer 1 lacks the module
    with pytest.raises(LocateError, match="layer 1: module 'mlp.up_proj'"):
        locate(model)


def test_require_names_layer_and_role():
    lm = locate(tiny_model("llama")).layers[0]
    lm.k = None
    with pytest.raises(LocateError, match="missing role.*k"):
        lm.require("q", "k")
