import pytest
import torch
from conftest import tiny_model

from converters.moe import MoEConverter, balanced_kmeans
from patcher.errors import PlanError
from patcher.model.locate import locate
from patcher.recipe import parse_recipe
from patcher.runtime.modeling import MoEMLP


def test_balanced_kmeans_gives_equal_groups_and_finds_structure():
    torch.manual_seed(0)
    base = torch.randn(200, 4).abs()
    feats = torch.cat([base[:, [i]] + 0.01 * torch.rand(200, 6) for i in range(4)], 1)  # 4 blocks of 6 columns
    groups = balanced_kmeans(feats, 4, 6, seed=0)
    assert sorted(len(g) for g in groups) == [6] * 4
    assert sorted(sum(groups, [])) == list(range(24))
    assert sorted(sorted(g) for g in groups) == [list(range(i * 6, i * 6 + 6)) for i in range(4)]


def _spec(**kw):
    spec = {"hidden_size": 8, "num_experts": 8, "top_k": 2, "expert_size": 4, "shared_size": 0, "gated": True,
            "up_bias": False, "down_bias": False, "routing": "sigmoid", "weights": "prob", "router": "linear"}
    spec.update(kw)
    return spec


def test_selection_bias_changes_choice_not_weights():
    moe = MoEMLP(_spec(), None, torch.nn.SiLU())
    torch.nn.init.normal_(moe.gate.weight)
    x = torch.randn(16, 8)
    idx, w = moe.route(x)
    moe.e_score_correction_bias[5] = 100.0
    idx2, w2 = moe.route(x)
    assert (idx2 == 5).any(1).all() and not (idx == 5).any(1).all()
    assert torch.allclose(w2.sum(-1), torch.ones(16))


@pytest.mark.parametrize("router", ["lowrank", "gate", "linear"])
def test_unit_weights_are_exactly_one_yet_train_the_router(router):
    """Split experts are parts of the dense MLP (weight 1), but healing must still reach the router."""
    torch.manual_seed(0)
    moe = MoEMLP(_spec(weights="one", router=router, router_rank=4, routing="sigmoid"), None, torch.nn.SiLU())
    for prm in moe.parameters():
        torch.nn.init.normal_(prm)
    x = torch.randn(40, 8)  # more rows than GATHER_MAX_TOKENS: the masked dense path
    with torch.no_grad():
        plain = moe(x)
    out = moe(x)
    assert torch.equal(out.detach(), plain)  # the weight is 1, not merely close to it
    out.pow(2).sum().backward()
    reader = {"lowrank": "router_down.weight", "gate": "router_scale", "linear": "gate.weight"}[router]
    reader = moe.get_parameter(reader)
    assert reader.grad is not None and reader.grad.abs().sum() > 0


@pytest.mark.parametrize("router", ["lowrank", "gate"])
def test_training_reaches_the_scores_of_experts_the_token_did_not_choose(router):
    """Top-k alone gives an unchosen expert no gradient; the straight-through mask tells the router which would
    have helped, while the output stays exactly that of the chosen experts."""
    torch.manual_seed(0)
    moe = MoEMLP(_spec(weights="one", router=router, router_rank=4), None, torch.nn.SiLU())
    for prm in moe.parameters():
        torch.nn.init.normal_(prm)
    x = torch.randn(1, 8)  # one token: 6 of the 8 experts unchosen
    with torch.no_grad():
        plain = moe(x)
        chosen = moe.route(x)[0][0]
    out = moe(x)
    assert torch.equal(out.detach(), plain)
    out.pow(2).sum().backward()
    per_expert = moe.router_scale.grad.view(8, 4).abs().sum(-1)
    unchosen = torch.ones(8, dtype=torch.bool).index_fill_(0, chosen, False)
    assert (per_expert[unchosen] > 0).all()


def test_group_limited_routing_stays_in_the_chosen_groups():
    moe = MoEMLP(_spec(n_group=4, topk_group=1), None, torch.nn.SiLU())
    torch.nn.init.normal_(moe.gate.weight)
    idx, _ = moe.route(torch.randn(32, 8))
    assert ((idx // 2)[:, 0] == (idx // 2)[:, 1]).all()  # both experts from the same group of two


def test_softmax_weights_are_normalised():
    moe = MoEMLP(_spec(routing="softmax"), None, torch.nn.SiLU())
    torch.nn.init.normal_(moe.gate.weight)
    _, w = moe.route(torch.randn(10, 8))
    assert torch.allclose(w.sum(-1), torch.ones(10))


@pytest.mark.parametrize("moe, needle", [
    ({"mode": "copy", "experts": 2, "top_k": 3}, "大于专家数"),
    ({"mode": "split", "experts": 512}, "不够分给"),
    ({"mode": "split", "experts": 8, "active": 0.1, "shared": 0.5}, "不相容"),
    # a router that alone spends the budget is named as such (it was a "negative shared ratio")
    ({"mode": "split", "router": "lowrank", "active": 0.3, "router_rank": 64}, "路由器本身就占.*--moe-router-rank"),
])
def test_impossible_expert_plans_are_refused(moe, needle):
    recipe = parse_recipe({"moe": {"enabled": True, **moe}})
    with pytest.raises(PlanError, match=needle):
        MoEConverter().plan(locate(tiny_model("llama")), recipe.moe, None)


def test_gathered_and_looped_expert_paths_agree():
    torch.manual_seed(0)
    moe = MoEMLP(_spec(up_bias=True), None, torch.nn.SiLU())
    for p in moe.parameters():
        torch.nn.init.normal_(p)
    x = torch.randn(40, 8)
    masked = moe(x)  # 40 tokens of small experts: the masked dense product
    gathered = torch.cat([moe(x[:20]), moe(x[20:])])  # 20 tokens each: the gathered path
    torch.testing.assert_close(masked, gathered, atol=1e-4, rtol=1e-4)
    moe.LOOP_MIN_EXPERT_SIZE = 1  # force the per-expert loop
    torch.testing.assert_close(moe(x), gathered, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("router, size, top_k", [("gate", 1, 4), ("lowrank", 2, 1), ("lowrank", 4, 2)])
def test_every_expert_path_gives_the_masked_dense_result(router, size, top_k):
    """Decoding picks the gathered product when few experts are chosen and the masked one otherwise; both must
    equal the dense product over all experts with the unchosen weighted 0, gates reused from the router or not."""
    torch.manual_seed(0)
    moe = MoEMLP(_spec(num_experts=32 // size, expert_size=size, top_k=top_k, router=router, router_rank=4,
                       weights="one", up_bias=True), None, torch.nn.SiLU())
    for p in moe.parameters():
        torch.nn.init.normal_(p)
    with torch.no_grad():
        for tokens in (1, 3, 40):
            x = torch.randn(tokens, 8)
            gates = moe.all_gates(x) if router == "gate" else None
            idx, w = moe.route(x, gates)
            want = moe._masked_dense(x, idx, w, gates)
            used = idx.unique()
            torch.testing.assert_close(moe._gathered(x, idx, w, used, gates), want, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(moe._gathered(x, idx, w, used), want, atol=1e-5, rtol=1e-5)
            for moe.GATHER_MAX_USED in (0.0, 1.0):  # the whole forward, through each path (no shared part here)
                torch.testing.assert_close(moe(x), want, atol=1e-5, rtol=1e-5)


def test_kept_down_copy_follows_weight_updates():
    """Multi-neuron experts keep a transposed copy of their down weights for inference; an in-place update (an
    optimiser step while healing) must not leave generation on the old weights."""
    torch.manual_seed(0)
    moe = MoEMLP(_spec(expert_size=4, weights="one"), None, torch.nn.SiLU())
    for p in moe.parameters():
        torch.nn.init.normal_(p)
    x = torch.randn(2, 8)
    with torch.no_grad():
        before = moe(x)
        moe.experts_down.mul_(2)
        after = moe(x)
    torch.testing.assert_close(after, 2 * before)
    moe(x).sum().backward()  # with a gradient the copy is not used: the down weights receive it
    assert moe.experts_down.grad is not None and moe.experts_down.grad.abs().sum() > 0


def test_sensitivity_allocation_spends_the_budget_where_the_model_is_sensitive():
    from converters.moe import Analysis

    mm = locate(tiny_model("llama"))  # 2 layers
    recipe = parse_recipe({"moe": {"enabled": True, "active": 0.6, "router_rank": 2, "router": "lowrank"}})
    conv = MoEConverter()
    uniform = conv.plan(mm, parse_recipe({"moe": {**recipe.moe.model_dump(), "allocation": "uniform"}}).moe, None)

    def analysis(kl):  # error falls as the fraction grows; the same curve for both layers, only the KL differs
        opts = {("lowrank", f): {"sizing": {"f": f}, "params": 1000 * f + 20, "error": (1 - f) ** 2}
                for f in (0.2, 0.4, 0.6, 0.8)}
        return Analysis(1000, opts, {"lowrank": 0.4}, probe=("lowrank", 0.4), kl=kl)

    plans = conv.plan(mm, recipe.moe, [analysis(1.0), analysis(0.001)])
    assert plans[0] in ({"dense": True}, {"f": 0.8}) and plans[1] in ({"f": 0.2}, {"f": 0.4})
    spent = sum(1000 if p.get("dense") else 1000 * p["f"] + 20 for p in plans)
    assert spent <= 0.6 * 2000  # the budget holds, router parameters included
    assert all("top_k" in p for p in uniform)


def _gate_moe(tokens: int):
    """A gate-routed MoE with every expert chosen, random weights, and the dense MLP it was cut from:
    (moe, x, gate rows, dense activations in expert order, W_down, dense output)."""
    torch.manual_seed(0)
    moe = MoEMLP(_spec(router="gate", weights="one", top_k=8, shared_size=0), None, torch.nn.SiLU())
    for p in moe.parameters():
        torch.nn.init.normal_(p)
    x = torch.randn(tokens, 8)
    g, u = moe.experts_gate.detach().reshape(32, 8), moe.experts_up.detach().reshape(32, 8)
    wd = moe.experts_down.detach().permute(1, 0, 2).reshape(8, 32).clone()
    h = torch.nn.functional.silu(x @ g.T) * (x @ u.T)
    return moe, x, g, h, wd, h @ wd.T


def test_gate_router_reuses_the_experts_gate_rows_and_counts_them_as_always_active():
    moe, x, g, _, _, dense = _gate_moe(40)
    torch.testing.assert_close(moe(x), dense, atol=1e-4, rtol=1e-4)  # all experts chosen: the dense MLP
    torch.testing.assert_close(torch.cat([moe(x[:20]), moe(x[20:])]), dense, atol=1e-4, rtol=1e-4)  # gathered
    assert moe.params_per_expert() == 2 * 4 * 8  # up and down only; every gate row runs to route
    moe.top_k = 2
    idx, _ = moe.route(x)
    scores = (torch.nn.functional.silu(x @ g.T).abs() * moe.router_scale).view(40, 8, 4).sum(-1)
    assert torch.equal(idx.sort(1).values, scores.topk(2, 1).indices.sort(1).values)


def test_gate_router_split_fits_the_budget_and_auto_keeps_both_candidates():
    from converters.moe import GATE_INPUTS, active_params

    mm = locate(tiny_model("llama"))
    lm, d = mm.layers[0], mm.hidden_size
    conv = MoEConverter()
    o = parse_recipe({"moe": {"enabled": True, "active": 0.75, "router": "gate", "gate_input": 1.0}}).moe
    sizing = conv.uniform(lm, d, o, {"router": "gate", "gate_input_dims": d})
    ffn = len(lm.up.flat_rows) * 3 * d
    assert 0.7 * ffn < active_params(lm, d, sizing, o) <= 0.75 * ffn and sizing["shared_size"] == 0
    # reading half the input dims halves what routing costs: the budget left runs more neurons
    half = conv.uniform(lm, d, o, {"router": "gate", "gate_input_dims": d // 2})
    assert 0.7 * ffn < active_params(lm, d, half, o) <= 0.75 * ffn
    assert half["top_k"] > sizing["top_k"] and half["gate_input_dims"] == d // 2
    # auto: the gate reader on each candidate share of the input dims, and the low-rank one
    auto = conv.plan(mm, parse_recipe({"moe": {"enabled": True, "active": 0.75, "allocation": "uniform"}}).moe, None)
    assert [(c["router"], c.get("gate_input_dims")) for c in auto[0]["candidates"]] == \
        [("gate", round(f * d)) for f in GATE_INPUTS] + [("lowrank", None)]
    exact = {"gate_input": 1.0, "allocation": "uniform"}
    low = conv.plan(mm, parse_recipe({"moe": {"enabled": True, "active": 0.3, "router_rank": 4, **exact}}).moe, None)
    assert low[0]["router"] == "lowrank"  # the gate rows alone are 1/3 of the FFN: only the low-rank router fits
    with pytest.raises(PlanError, match="--moe-router lowrank"):
        conv.plan(mm, parse_recipe({"moe": {"enabled": True, "active": 0.3, "router": "gate", **exact}}).moe, None)
    both = conv.plan(mm, parse_recipe({"moe": {"enabled": True, "active": 0.3, "router_rank": 4, "gate_input": 0.5,
                                               "allocation": "uniform"}}).moe, None)
    assert [c["router"] for c in both[0]["candidates"]] == ["gate", "lowrank"]  # half the dims: the gate fits


def test_gate_router_on_part_of_the_input_reads_each_tokens_largest_dims():
    """With ``gate_input_dims`` below the hidden size, routing and the chosen neurons' gates both come from the
    token's largest inputs (by |x_i|·scale_i); up and down still read the whole input."""
    moe, x, g, _, _, _ = _gate_moe(40)
    u = moe.experts_up.detach().reshape(32, 8)
    wd = moe.experts_down.detach().permute(1, 0, 2).reshape(8, 32)
    spec = _spec(router="gate", weights="one", top_k=3, shared_size=0, gate_input_dims=3)
    sparse = MoEMLP(spec, None, torch.nn.SiLU())
    sparse.load_state_dict(moe.state_dict(), strict=False)
    sparse.gate_input_scale.copy_(torch.rand(8) + 0.5)
    keep = (x.abs() * sparse.gate_input_scale).topk(3, 1).indices
    xs = torch.zeros_like(x).scatter(1, keep, x.gather(1, keep))
    assert int((xs != 0).sum(1).max()) == 3
    gates = xs @ g.T
    torch.testing.assert_close(sparse.all_gates(x), gates)
    idx, _ = sparse.route(x)
    scores = (torch.nn.functional.silu(gates).abs() * sparse.router_scale).view(40, 8, 4).sum(-1)
    assert torch.equal(idx.sort(1).values, scores.topk(3, 1).indices.sort(1).values)
    mask = torch.zeros(40, 8).scatter(1, idx, 1.0).repeat_interleave(4, 1)
    want = (torch.nn.functional.silu(gates) * (x @ u.T) * mask) @ wd.T
    torch.testing.assert_close(sparse(x), want, atol=1e-4, rtol=1e-4)  # masked (many tokens)
    torch.testing.assert_close(torch.cat([sparse(x[i:i + 1]) for i in range(3)]), want[:3], atol=1e-4, rtol=1e-4)
    assert "gate_input_scale" in sparse.state_dict()  # saved with the checkpoint


def test_balance_plot_takes_layers_with_different_expert_counts(tmp_path):
    from patcher.evaluation.report import write_report

    balance = [{"layer": 1, "tokens_per_expert": [3.0, 1.0, 0.0], "max_over_mean": 2.25, "entropy": 0.5},
               {"layer": 4, "tokens_per_expert": [2.0, 2.0], "max_over_mean": 1.0, "entropy": 1.0}]
    write_report(tmp_path, {"moe": {"balance": balance}})
    assert (tmp_path / "moe_balance.png").stat().st_size > 0


def test_refit_down_recovers_part_of_the_dropped_output_on_unseen_tokens():
    from converters.moe import refit_down

    moe, x, _, h, wd, dense = _gate_moe(600)
    fit, test = slice(0, 400), slice(400, 600)
    with torch.no_grad():
        refit_down(moe, h[fit], torch.arange(32), torch.arange(0), wd, moe.route(x[fit])[0])
        torch.testing.assert_close(moe(x), dense, atol=1e-3, rtol=1e-3)  # every expert runs: nothing to refit
        moe.top_k = 3
        before = (moe(x[test]) - dense[test]).pow(2).sum()
        refit_down(moe, h[fit], torch.arange(32), torch.arange(0), wd, moe.route(x[fit])[0])
        after = (moe(x[test]) - dense[test]).pow(2).sum()
    assert after < 0.9 * before


def test_expert_widths_the_deepseek_layout_cannot_run_are_refused_up_front():
    from patcher.recipe import FORMATS

    target = FORMATS["deepseek-v3"].target
    mm = locate(tiny_model("llama"))  # 96 neurons; at 0.5 active a quarter (24) is shared
    ok = parse_recipe({"moe": {"enabled": True, "active": 0.5, "router": "linear", "experts": 9}}).moe
    MoEConverter().check_target(mm, ok, target)  # experts of 8 neurons, shared = 3 experts
    bad = parse_recipe({"moe": {"enabled": True, "active": 0.5, "router": "linear", "experts": 12}}).moe
    with pytest.raises(PlanError, match=r"专家宽是 8 的倍数.*可用的 --moe-experts：.*\b9\b"):
        MoEConverter().check_target(mm, bad, target)  # experts of 6 neurons
    MoEConverter().check_target(mm, bad, FORMATS["dsopt"].target)  # the dsopt layout runs any width


def test_the_deepseek_format_defaults_to_experts_of_eight_neurons():
    from patcher.recipe import FORMATS

    recipe = parse_recipe({"mla": {"enabled": True}, "moe": {"enabled": True, "active": 0.75},
                           "output": {"format": "deepseek-v3"}})
    assert recipe.moe.expert_width == 8
    MoEConverter().check_target(locate(tiny_model("llama")), recipe.moe, FORMATS["deepseek-v3"].target)  # it fits


def test_default_lowrank_router_rank_is_capped_by_a_quarter_of_the_hidden_size():
    # a rank-128 router on a 64-wide model would cost more than the experts it routes (Phi, GPT-2, Falcon tiny
    # models were refused at 0.5 active); an explicit --moe-router-rank is kept up to the hidden size
    from converters.moe import router_rank
    from patcher.recipe import MoEOptions

    assert router_rank("lowrank", MoEOptions(), 64) == 16
    assert router_rank("lowrank", MoEOptions(), 576) == 128  # SmolLM2: unchanged
    assert router_rank("lowrank", MoEOptions(router_rank=48), 64) == 48
    assert router_rank("gate", MoEOptions(), 64) == 64
