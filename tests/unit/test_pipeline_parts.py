"""管线的通用部分：技术声明规划方式、后端声明限制，``run.fit`` 据此调整或拒绝配方；格式规则是数据。"""

import pytest
import torch

from converters import registry
from converters.base import STYLES
from patcher.errors import RecipeError
from patcher.pipeline.run import Limits, fit
from patcher.pipeline.streaming import LIMITS
from patcher.recipe import FORMATS, parse_recipe


def test_every_technique_is_registered_the_same_way_in_conversion_order():
    assert list(registry.TECHNIQUES) == ["mla", "moe", "mtp"]
    for tech in registry.TECHNIQUES.values():
        for method in ("planning", "plan", "check", "captures", "convert", "summary") if tech.structure_key else \
                ("planning", "attach", "check_model"):
            assert callable(getattr(tech, method)), (tech.section, method)
    r = parse_recipe({"mla": {"enabled": True}, "mtp": {"heads": 1}})
    assert [t.section for t in registry.enabled(r)] == ["mla", "mtp"]
    assert [t.section for t in registry.layer_techniques(r)] == ["mla"]


@pytest.mark.parametrize("options, style", [
    ({"mla": {"enabled": True}}, "global_probe"),
    ({"mla": {"enabled": True, "allocation": "energy"}}, "global"),
    ({"mla": {"enabled": True, "allocation": "uniform"}}, "per_layer"),
    ({"mla": {"enabled": True, "kv_lora_rank": 8}}, "per_layer"),
    ({"mla": {"enabled": True, "rope": "decoupled"}}, "global"),
    ({"moe": {"enabled": True}}, "global_probe"),
    ({"moe": {"enabled": True, "mode": "copy"}}, "per_layer"),
    ({"mtp": {"heads": 1}}, "none"),
    ({"mtp": {"heads": 1, "train_tokens": 64}}, "whole_model"),
])
def test_techniques_declare_how_they_plan(options, style):
    recipe = parse_recipe(options)
    (tech,) = registry.enabled(recipe)
    planning = tech.planning(getattr(recipe, tech.section))
    assert planning.style == style and planning.style in STYLES
    if style not in ("none", "per_layer"):
        assert planning.needs  # said to the user when a backend cannot plan this way


def test_a_backend_that_plans_per_layer_takes_the_declared_fallback_for_defaults_only():
    recipe = parse_recipe({"mla": {"enabled": True}, "moe": {"enabled": True}})
    fitted, notes = fit(recipe, LIMITS)
    assert fitted.mla.allocation == fitted.moe.allocation == "uniform"
    assert notes == ["mla.allocation: sensitivity → uniform（流式转换逐层规划，不做全模型敏感度探测）",
                     "moe.allocation: sensitivity → uniform（流式转换逐层规划，不做全模型敏感度探测）"]
    assert recipe.mla.allocation == "sensitivity"  # the caller's recipe is not changed
    assert fit(recipe, Limits()) == (recipe, [])  # a backend that can do everything changes nothing


@pytest.mark.parametrize("options, needle", [
    ({"mla": {"enabled": True, "allocation": "sensitivity"}}, "按 sensitivity 在层间分配秩"),
    ({"mla": {"enabled": True, "allocation": "log"}}, "按 log 在层间分配秩"),
    ({"mla": {"enabled": True, "rope": "decoupled"}}, "解耦 RoPE"),
    ({"mtp": {"heads": 1, "train_tokens": 64}}, "dsopt train-mtp"),
    ({"mla": {"enabled": True}, "output": {"format": "deepseek-v3"}}, "导出 deepseek-v3 格式"),
])
def test_explicit_asks_a_backend_cannot_honour_are_refused_with_what_to_do(options, needle):
    with pytest.raises(RecipeError, match=needle) as err:
        fit(parse_recipe(options), LIMITS)
    assert "--streaming off" in str(err.value)


def test_format_rules_are_data_and_fix_only_what_the_user_left_open():
    assert set(FORMATS) == {"dsopt", "deepseek-v3"} and FORMATS["dsopt"].target.unit_expert_weights
    r = parse_recipe({"mla": {"enabled": True}, "moe": {"enabled": True}, "output": {"format": "deepseek-v3"}})
    assert (r.mla.rope, r.moe.routing, r.moe.allocation, r.moe.router) == ("decoupled", "sigmoid", "uniform", "linear")
    copy = parse_recipe({"mla": {"enabled": True}, "moe": {"enabled": True, "mode": "copy"},
                         "output": {"format": "deepseek-v3"}})
    assert copy.moe.router == "auto"  # the router rule applies to split mode only
    with pytest.raises(RecipeError, match="--moe-allocation uniform"):
        parse_recipe({"mla": {"enabled": True}, "moe": {"enabled": True, "allocation": "sensitivity"},
                      "output": {"format": "deepseek-v3"}})


def test_query_lora_path_and_interleaved_rows_are_exact():
    """q_b(RMSNorm(q_a(x))) equals W_q·x for x = RMSNorm_in(h); interleaving permutes rotary rows of q and k alike,
    so their rotated dot product is unchanged."""
    from patcher.formats.deepseek_v3 import interleave_rows, query_lora

    torch.manual_seed(0)
    h, g, wq = torch.randn(5, 12) * 3, torch.rand(12) + 0.2, torch.randn(8, 12)
    x = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * g
    q_a, q_b = query_lora(wq, g, "test")
    y = x @ q_a.T
    y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-6)
    assert torch.allclose(y @ q_b.T, x @ wq.T, atol=1e-4)
    assert interleave_rows(6).tolist() == [0, 3, 1, 4, 2, 5]


def test_attended_covariance_weights_each_token_by_the_attention_it_receives():
    """``cov_attended`` = Σ_j a_j x_j x_jᵀ / Σ_j a_j, a_j = the source's attention probabilities on key j summed
    over queries, averaged over heads, except the window's first token (the attention sink), which counts as an
    average token (a_0 = 1); the layer's sdpa setting is restored afterwards."""
    from patcher.pipeline.calibrate import capture_layer_inputs, collect
    from tests.conftest import tiny_model

    model = tiny_model("llama", seed=3)
    model.config._attn_implementation = "sdpa"
    ids = torch.randint(4, 200, (2, 24))
    inputs = capture_layer_inputs(model, model.model.layers, ids, 2)
    layer = model.model.layers[0]
    stats = collect(layer, [("self_attn.k_proj", "cov"), ("self_attn.k_proj", "cov_attended", "self_attn")], inputs)
    assert model.config._attn_implementation == "sdpa"

    seen = {}
    layer.self_attn.k_proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0].detach()))
    model.config._attn_implementation = "eager"
    with torch.no_grad():
        out = model(input_ids=ids, output_attentions=True)
    a = out.attentions[0].sum((1, 2)) / out.attentions[0].shape[1]  # (batch, keys)
    assert float(a.sum()) == pytest.approx(ids.numel(), rel=1e-5)  # every query's probabilities sum to one
    assert (a[:, 0] > 3).all()  # the first key, seen by every query, gets far more than the average 1
    a[:, 0] = 1.0
    x = seen["x"].reshape(-1, seen["x"].shape[-1]).double()
    w = a.reshape(-1).double()
    expected = (x * w[:, None]).T @ x / w.sum()
    assert torch.allclose(stats[("self_attn.k_proj", "cov_attended")], expected, rtol=1e-4, atol=1e-6)
    assert torch.allclose(stats[("self_attn.k_proj", "cov")], x.T @ x / x.shape[0], rtol=1e-4, atol=1e-6)
    assert not torch.allclose(stats[("self_attn.k_proj", "cov_attended")], stats[("self_attn.k_proj", "cov")],
                              rtol=1e-2)


def test_attention_without_probabilities_is_a_clear_error_naming_the_way_out():
    from patcher.errors import PlanError
    from patcher.pipeline.calibrate import capture_layer_inputs, collect
    from tests.conftest import tiny_model

    model = tiny_model("llama", seed=3)
    inputs = capture_layer_inputs(model, model.model.layers, torch.randint(4, 200, (1, 16)), 1)
    attn = model.model.layers[0].self_attn
    forward = attn.forward
    attn.forward = lambda *a, **k: (forward(*a, **k)[0], None)  # an attention that never gives its probabilities
    with pytest.raises(PlanError, match="--mla-token-weighting uniform"):
        collect(model.model.layers[0], [("self_attn.k_proj", "cov_attended", "self_attn")], inputs)
