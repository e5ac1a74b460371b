"""CPU 解码用的预打包线性层：结果与 F.linear 一致、只在不求梯度时启用、权重变了就重新打包、退出后复原。"""

import pytest
import torch
from torch import nn

from patcher.runtime.packed_linear import pack, packed_linears
from tests.conftest import tiny_model

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="oneDNN missing")


def test_packed_forward_matches_linear_for_every_row_count_and_restores_the_module():
    model = tiny_model("qwen2")  # q/k/v carry biases
    ids = torch.randint(4, 250, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        with packed_linears(model):
            assert all("forward" in m.__dict__ for m in model.modules() if type(m) is nn.Linear)
            got = model(input_ids=ids).logits
            one = model.lm_head(model.model.norm.weight)  # a 1-D input keeps its shape
        assert one.shape == (model.config.vocab_size,)
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()
    assert not any("forward" in m.__dict__ for m in model.modules())  # the class forward is back


def test_gradients_bypass_the_packed_weights():
    model = tiny_model()
    ids = torch.randint(4, 250, (1, 6))
    with packed_linears(model):
        loss = model(input_ids=ids).logits.float().square().mean()
    loss.backward()
    assert model.model.layers[0].mlp.down_proj.weight.grad is not None


def test_weights_are_packed_once_and_again_after_a_change():
    model = tiny_model()
    first = pack(model)
    assert len(first) == sum(type(m) is nn.Linear for m in model.modules())
    again = pack(model)
    assert all(again[n] is first[n] for n in first)  # reused
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.mul_(2)
    third = pack(model)
    assert third["model.layers.0.mlp.up_proj"] is not first["model.layers.0.mlp.up_proj"]
    assert third["model.layers.0.mlp.down_proj"] is first["model.layers.0.mlp.down_proj"]
    x = torch.randn(3, model.config.hidden_size)
    with torch.no_grad(), packed_linears(model):
        got = model.model.layers[0].mlp.up_proj(x)
    assert torch.allclose(got, nn.functional.linear(x, model.model.layers[0].mlp.up_proj.weight), atol=1e-5)


def test_a_model_with_packed_weights_still_copies_and_foreign_forwards_are_kept():
    import copy

    model = tiny_model()
    pack(model)
    twin = copy.deepcopy(model)  # the packed weights live beside the model, not in it
    hooked = model.model.layers[0].mlp.up_proj
    hooked.forward = foreign = lambda x: nn.functional.linear(x, hooked.weight)  # as accelerate's hooks do
    with torch.no_grad(), packed_linears(model):
        assert hooked.forward is foreign
        assert "forward" in model.model.layers[0].mlp.down_proj.__dict__
    assert hooked.forward is foreign and "forward" not in model.model.layers[0].mlp.down_proj.__dict__
    assert torch.equal(twin.lm_head.weight, model.lm_head.weight)


def test_nested_blocks_keep_the_outer_packing():
    model = tiny_model()
    down = model.model.layers[0].mlp.down_proj
    with torch.no_grad(), packed_linears(model):
        outer = down.forward
        with packed_linears(model):
            assert down.forward is outer  # the inner block leaves the outer's override alone
        assert down.forward is outer
    first = pack(model)
    with packed_linears(model), packed_linears(model):
        pass
    assert all(pack(model)[n] is first[n] for n in first)  # nothing was dropped and repacked
    assert "forward" not in down.__dict__


@pytest.mark.parametrize("router, size", [("gate", 1), ("lowrank", 2)])
def test_moe_expert_products_run_packed_inside_the_block_only(router, size):
    """MoE experts are 3-D parameters, not linear layers: their products over all experts are packed too,
    with the same results, only without gradients and only inside the block."""
    from patcher.runtime import packed_linear
    from patcher.runtime.modeling import MoEMLP

    torch.manual_seed(0)
    spec = {"hidden_size": 8, "num_experts": 16 // size, "top_k": 3, "expert_size": size, "shared_size": 4,
            "gated": True, "up_bias": True, "down_bias": False, "routing": "sigmoid", "weights": "one",
            "router": router, "router_rank": 4}
    moe = MoEMLP(spec, None, nn.SiLU())
    for p in moe.parameters():
        nn.init.normal_(p)
    model = nn.ModuleDict({"mlp": moe})
    x = torch.randn(40, 8)  # the masked product over all experts
    with torch.no_grad():
        expected = moe(x)
        with packed_linears(model):
            assert set(packed_linear._ACTIVE[moe]) == {"gate", "up", "down"}
            got = moe(x)
    assert moe not in packed_linear._ACTIVE
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    with packed_linears(model):
        moe(x).sum().backward()  # gradients take the parameters, not the packed copies
    assert moe.experts_up.grad is not None and moe.experts_up.grad.abs().sum() > 0
    big = MoEMLP({**spec, "num_experts": 2, "expert_size": 64, "top_k": 1, "router": "linear"}, None, nn.SiLU())
    assert big.packable_products() == {}  # large experts run one by one, never as one product
