"""修复的训练顺序：token 数多于文本时按轮次重复，每轮重新打乱、每个窗口各出现一次。"""

import torch

from patcher.training.heal import HealOptions, epoch_order


def test_epoch_order_repeats_the_text_in_reshuffled_epochs():
    order = epoch_order(10, HealOptions(tokens=25 * 64, seq_len=64))
    assert len(order) == 25
    for epoch in (order[:10], order[10:20]):
        assert sorted(epoch.tolist()) == list(range(10))
    assert len(set(order[20:].tolist())) == 5
    assert not torch.equal(order[:10], order[10:20])  # a new shuffle each epoch


def test_epoch_order_covers_a_text_longer_than_the_budget_once():
    order = epoch_order(40, HealOptions(tokens=64, seq_len=64))
    assert sorted(order.tolist()) == list(range(40))


def test_layerwise_fit_gives_a_layer_its_weights_back_when_training_made_it_worse():
    from patcher.runtime.modeling import MoEMLP
    from patcher.training.reconstruct import fit_layer

    torch.manual_seed(0)
    spec = {"hidden_size": 8, "num_experts": 8, "top_k": 4, "expert_size": 4, "shared_size": 0, "gated": True,
            "up_bias": False, "down_bias": False, "routing": "sigmoid", "weights": "one", "router": "gate"}
    moe = MoEMLP(spec, None, torch.nn.SiLU())
    for p in moe.parameters():
        torch.nn.init.normal_(p)
    x = torch.randn(512, 8)
    with torch.no_grad():
        moe.experts_down.mul_(1.2)  # the target: the same layer with a larger down projection, within reach
        y = moe(x[None])[0]
        moe.experts_down.div_(1.2)
    start = {n: p.clone() for n, p in moe.named_parameters()}
    before, after = fit_layer(moe, x, y, steps=3, lr=100.0, batch=64, precision="fp32", seed=0)
    assert after == before
    assert all(torch.equal(p, start[n]) for n, p in moe.named_parameters())
    before, after = fit_layer(moe, x, y, steps=50, lr=1e-2, batch=64, precision="fp32", seed=0)
    assert after < before  # a sensible step size still trains


def test_an_attention_run_alone_gives_its_output_in_the_model_also_on_a_short_last_batch():
    from conftest import tiny_model

    from patcher.training.reconstruct import attention_apply, call_arguments, capture_inputs

    model = tiny_model("llama", seed=3)
    attn = model.model.layers[1].self_attn
    windows = torch.randint(3, model.config.vocab_size, (5, 24))
    (x, y), = capture_inputs(model, [attn], windows, 5, "fp32", [True])
    assert x.shape == (5, 24, model.config.hidden_size) and y.shape == x.shape
    kwargs, = call_arguments(model, [attn], windows[:2])  # rotary tables and mask for batches of 2 windows
    with torch.no_grad():
        alone = attention_apply(kwargs, 2)(attn, x.float())  # batches of 2, 2 and 1
    assert alone.shape == y.shape
    assert torch.allclose(alone, y.float(), atol=2e-2 * float(y.float().abs().max()))
    with torch.no_grad():
        shifted = attention_apply(kwargs, 2)(attn, x.float().roll(1, dims=1))
    assert not torch.allclose(shifted, y.float(), atol=2e-2 * float(y.float().abs().max()))  # order matters
