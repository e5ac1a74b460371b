"""MTP：追加模块、训练（可续训）、无损投机解码（贪心逐 token 相同；采样保持基座分布）、检查点往返。"""

import copy

import pytest
import torch
from conftest import FAST_RECIPE, tiny_model
from transformers import DynamicCache

from patcher import patch_model
from patcher.recipe import MTPOptions
from patcher.runtime.mtp import (
    DraftHead,
    DraftTree,
    ModuleDrafts,
    _keep_rows,
    _one_hot,
    accept_or_resample,
    draft_widths,
    lookup_drafts,
    speculative_generate,
)
from patcher.training.draft_heads import base_hidden, mtp_hiddens, train_mtp


def mtp_recipe(**mtp):
    return {**FAST_RECIPE, "mtp": {"heads": 2, "seq_len": 64, **mtp}}


@pytest.fixture(scope="module")
def trained(tokenizer):
    """A tiny llama with two MTP heads trained a little: drafts are accepted sometimes and rejected sometimes."""
    model = tiny_model("llama", seed=11)
    patched, report = patch_model(model, mtp_recipe(train_tokens=4096), tokenizer)
    return patched, report


def test_mtp_report_and_structure(trained):
    patched, report = trained
    m = report["mtp"]
    assert report["techniques"] == ["mtp"] and m["heads"] == 2 and m["source_layer"] == 1
    assert m["norm_path"] == "model.norm" and len(patched.mtp) == 2
    assert m["greedy_identical"] is True
    assert len(m["head_acceptance_teacher_forced"]) == 2 and 0 < m["head_acceptance_teacher_forced"][0] <= 1
    assert m["training"]["steps"] == 16 and m["accepted_per_step"] >= 1.0
    w = m["with_lookup"]  # the same generation with context lookup drafts, also identical to plain greedy
    assert w["accepted_per_step"] >= 1.0 and w["lookup_steps"] + w["mtp_steps"] >= 1
    assert report["fidelity"]["top1_agreement"] == 1.0  # the base itself is untouched


@pytest.mark.parametrize("seed", range(4))
def test_greedy_speculative_output_equals_plain_greedy(trained, seed):
    patched, _ = trained
    ids = torch.randint(4, 250, (1, 5 + 3 * seed), generator=torch.Generator().manual_seed(seed))
    plain = patched.generate(ids, use_mtp=False, do_sample=False, max_new_tokens=40, eos_token_id=None)
    spec = patched.generate(ids, do_sample=False, max_new_tokens=40, eos_token_id=None, mtp_lookup=0)
    assert torch.equal(plain, spec)
    stats = patched.last_mtp_stats
    assert stats["lookup_steps"] == 0 and stats["mtp_steps"] == stats["verify_steps"]
    # rejections happened (so the caches were rolled back) and so did acceptances
    assert stats["verify_steps"] < 40 and stats["accepted_per_step"] < 3


def test_lookup_drafts_follow_the_latest_recurrence_of_the_longest_ngram():
    assert lookup_drafts([1, 2, 3, 9, 2, 3, 7, 5, 2, 3], 2, 3) == ([7, 5, 2], 2)  # latest "2 3", not the first
    assert lookup_drafts([4, 2, 3, 9, 4, 2, 3, 8, 1, 4, 2, 3], 3, 1) == ([8], 3)  # "4 2 3" before "2 3"
    assert lookup_drafts([1, 2, 3, 4, 5, 3], 2, 5) == ([4, 5, 3], 1)  # no bigram recurs: the unigram "3" does
    assert lookup_drafts([1, 2, 3], 2, 4) == ([], 0) and lookup_drafts([5, 5], 2, 0) == ([], 0)
    assert lookup_drafts([5, 5], 2, 3) == ([5], 1)  # the tail itself is never its own match


def test_greedy_with_context_lookup_drafts_equals_plain_greedy(trained):
    """Lookup drafts (some right, some wrong) and MTP drafts in one generation: output still equals plain greedy."""
    patched, _ = trained
    ids = torch.tensor([[7, 8, 9, 10, 11, 7, 8, 9, 10, 11, 7, 8]])
    plain = patched.generate(ids, use_mtp=False, do_sample=False, max_new_tokens=40, eos_token_id=None)
    spec = patched.generate(ids, do_sample=False, max_new_tokens=40, eos_token_id=None, mtp_lookup=5)
    assert torch.equal(plain, spec)
    stats = patched.last_mtp_stats
    assert stats["lookup_steps"] > 0 and stats["mtp_steps"] > 0
    assert stats["lookup_steps"] + stats["mtp_steps"] == stats["verify_steps"] < 40
    assert stats["accepted_per_step_lookup"] >= 1.0 and len(stats["head_acceptance"]) == 2


def test_untrained_heads_are_still_lossless_on_an_mla_model(tokenizer):
    model = tiny_model("qwen3", seed=12)
    patched, _ = patch_model(model, {**mtp_recipe(), "mla": {"enabled": True, "kv_keep": 0.5}}, tokenizer)
    assert type(patched.mtp[0].block.self_attn).__name__ == "LatentAttention"
    ids = torch.randint(4, 250, (1, 9))
    plain = patched.generate(ids, use_mtp=False, do_sample=False, max_new_tokens=24, eos_token_id=None)
    spec, stats = speculative_generate(patched, ids, 24, (), heads=1)
    assert torch.equal(plain, spec) and len(stats["head_acceptance"]) == 1


def test_draft_tree_merges_shared_prefixes_and_walks_the_base_choices():
    tree = DraftTree([[5, 6, 7], [5, 8], [], [9]])
    assert tree.tokens == [5, 6, 7, 8, 9] and tree.parents == [-1, 0, 1, 0, -1] and tree.depths == [1, 2, 3, 2, 1]
    seen = tree.attention_mask(3, torch.float32, "cpu")[0, 0] == 0
    assert seen.shape == (6, 9) and seen[:, :3].all()  # every row sees the cached context
    # row 4 (node 8) sees the root, node 5 and itself; not node 6, 7 or 9
    assert seen[4, 3:].tolist() == [True, True, False, False, True, False]
    assert seen[3, 3:].tolist() == [True, True, True, True, False, False]
    # the base picks 5 at the root, then 8 after it, then 1 after 8: path 5 8, next token 1
    assert tree.walk([5, 8, 0, 0, 1, 0]) == ([0, 3], 1)
    assert tree.walk([4, 0, 0, 0, 0, 0]) == ([], 4)
    assert DraftTree([[1, 2]]).attention_masks(None, 3, torch.float32, "cpu") is None  # one path: plain causal
    # a sliding window of 3: the root (position 3) sees positions 1..3, node 7 (position 6) only 4..6
    near = tree.attention_mask(3, torch.float32, "cpu", window=3)[0, 0] == 0
    assert near[0].tolist() == [False, True, True, True, False, False, False, False, False]
    assert near[3].tolist() == [False] * 4 + [True, True, True, False, False]


def test_keep_rows_keeps_the_prefix_and_the_verified_path():
    cache = DynamicCache()
    keys = torch.arange(8.0).view(1, 1, 8, 1).expand(1, 2, 8, 3).contiguous()
    cache.update(keys, keys + 100, 0)
    _keep_rows(cache, 3, [0, 2, 4])
    assert cache.layers[0].keys[0, 1, :, 0].tolist() == [0, 1, 2, 3, 5, 7]
    assert cache.layers[0].values[0, 0, :, 0].tolist() == [100, 101, 102, 103, 105, 107]
    _keep_rows(cache, 3, [0, 1])  # a prefix of the new rows: a plain crop
    assert cache.get_seq_length() == 5


@pytest.mark.parametrize("family,mla", [("llama", None), ("qwen3", "latent"), ("llama", "decoupled"),
                                        ("mistral", None)])
def test_tree_rows_score_like_their_branch_alone(tokenizer, family, mla):
    """One forward over a draft tree gives each node the logits of its own branch run alone after the context,
    on plain attention, on both latent attentions (whose keys are rotated by position, not cache index) and
    under a sliding window shorter than the context (Mistral)."""
    model = tiny_model(family, seed=14, **({"sliding_window": 6} if family == "mistral" else {}))
    if mla:
        model, _ = patch_model(model, {**FAST_RECIPE, "mla": {"enabled": True, "kv_keep": 0.5, "rope": mla}},
                               tokenizer)
    ctx = torch.randint(4, 250, (1, 11), generator=torch.Generator().manual_seed(3))
    paths = [[17, 18, 19], [17, 30], [40, 41]]
    tree = DraftTree(paths)
    with torch.no_grad():
        cache = DynamicCache()  # full history, as speculative_generate keeps it
        model(input_ids=ctx[:, :-1], cache=cache, use_cache=True)
        m = ctx.shape[1] - 1
        got = model(input_ids=torch.tensor([[int(ctx[0, -1])] + tree.tokens]), cache=cache, use_cache=True,
                    position_ids=torch.tensor([[m] + [m + d for d in tree.depths]]),
                    attention_mask=tree.attention_masks(model.config, m, torch.float32, "cpu")).logits[0]
        for path in paths:
            alone = model(input_ids=torch.cat([ctx, torch.tensor([path])], 1)).logits[0, m:]
            node, rows = -1, [0]
            for t in path:
                node = tree.child[(node, t)]
                rows.append(node + 1)
            torch.testing.assert_close(got[rows], alone, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("heads,context", [(2, 9), (2, 1), (3, 9), (3, 1)])
def test_module_draft_tree_candidates_are_those_of_each_path_alone(tokenizer, trained, heads, context):
    """Every node's children in the modules' tree are the best tokens the modules give when that node's path is
    the text (teacher-forced depths), also on later steps with some rows cached, for a context shorter than the
    depth, and with three modules (whose draft rows attend to draft rows of their own)."""
    patched = trained[0] if heads == 2 else patch_model(tiny_model("llama", seed=13), mtp_recipe(heads=3),
                                                        tokenizer)[0]
    mtp = list(patched.mtp)
    head = patched.get_output_embeddings()
    draft_heads = [DraftHead(head, mod.draft_ids) for mod in mtp]
    text = torch.randint(4, 250, (1, context + 6), generator=torch.Generator().manual_seed(context)).tolist()[0]
    hid, final, caches = [None] + [None] * len(mtp), [0] * (len(mtp) + 1), [DynamicCache() for _ in mtp]
    with torch.no_grad():
        for m in (context, context + 1, context + 4):  # three steps: the verified text grows by 1, then by 3
            tokens = text[: m + 1]
            hid[0] = base_hidden(patched, torch.tensor([tokens[:m]]))[0]
            hid[1:] = [h[:f] if h is not None else hid[0][:0] for h, f in zip(hid[1:], final[1:])]
            drafts = ModuleDrafts(patched, mtp, draft_heads, tokens, m, hid, final, caches, draft_widths((3, 2), heads),
                                  0.0, None)
            assert [drafts.depths.count(d) for d in range(1, heads + 1)] == [3, 6, 6][:heads]
            for u in range(len(drafts.tokens)):
                path, v = [], u
                while v >= 0:
                    path.insert(0, drafts.tokens[v])
                    v = drafts.parents[v]
                assert drafts.matched(path + [-1]) == len(path)  # how deep an output follows the tree
                want = []
                if len(path) < len(mtp):  # depth len(path)+1 at position m−1 reads the path's last token
                    ids = torch.tensor([tokens + path + [5] * len(mtp)])  # padding no row here reads
                    g = mtp_hiddens(patched, ids, base_hidden(patched, ids))[len(path)]
                    want = draft_heads[len(path)].top(mtp[len(path)].norm(g[0, m - 1]), (3, 2, 1)[len(path)])
                assert [drafts.tokens[c] for c, p in enumerate(drafts.parents) if p == u] == want
            best = [0]
            while len(best) < heads:
                best.append(drafts.parents.index(best[-1]))  # each node's first child is its best candidate
            assert drafts.chain == [drafts.tokens[u] for u in best]


@pytest.mark.parametrize("family,mla", [("llama", None), ("qwen3", "latent"), ("mistral", None)])
def test_greedy_draft_trees_equal_plain_greedy(tokenizer, trained, family, mla):
    """Module branches, the modules' chain and lookup continuations verified together as one tree; also on
    MLA and past a sliding window (where rejected drafts must still be cut from the cache)."""
    if family == "llama":
        patched, _ = trained
    else:
        model = tiny_model(family, seed=12, **({"sliding_window": 12} if family == "mistral" else {}))
        recipe = mtp_recipe(train_tokens=2048)
        if mla:
            recipe["mla"] = {"enabled": True, "kv_keep": 0.5}
        patched, _ = patch_model(model, recipe, tokenizer)
    for ids in (torch.tensor([[7, 8, 9, 10, 11, 7, 8, 9, 10, 11, 7, 8]]), torch.randint(4, 250, (1, 9))):
        plain = patched.generate(ids, use_mtp=False, do_sample=False, max_new_tokens=40, eos_token_id=None)
        for lookup, branches in [(0, 3), (0, (3, 2)), (5, (2, 2)), (5, 1)]:
            spec, stats = speculative_generate(patched, ids, 40, (), lookup=lookup, branches=branches)
            assert torch.equal(plain, spec), (lookup, branches)
            assert stats["verify_steps"] < 40


@pytest.mark.parametrize("moe", [{"mode": "split", "active": 0.5}, {"mode": "split", "active": 0.5, "router": "gate"},
                                 {"mode": "copy", "experts": 4, "top_k": 2}])
def test_greedy_speculative_output_equals_plain_greedy_on_moe_models(tokenizer, moe):
    """MoE layers run a different product for 1 token (plain decoding) than for a verified draft tree (gathered
    experts or the masked product over all), and routing is a discrete choice: the output must still be exact."""
    model = tiny_model("llama", seed=5)
    patched, _ = patch_model(model, {**mtp_recipe(train_tokens=2048), "moe": {"enabled": True, **moe}}, tokenizer)
    g = torch.Generator().manual_seed(0)
    for ids in (torch.tensor([[7, 8, 9, 10, 11, 7, 8, 9, 10, 11, 7, 8]]), torch.randint(4, 250, (1, 9), generator=g),
                torch.randint(4, 250, (1, 9), generator=g)):
        plain = patched.generate(ids, use_mtp=False, do_sample=False, max_new_tokens=40, eos_token_id=None)
        for lookup, branches in [(0, (3, 2)), (5, 2)]:
            spec, _ = speculative_generate(patched, ids, 40, (), lookup=lookup, branches=branches)
            assert torch.equal(plain, spec), (lookup, branches)


def test_speculative_sampling_step_keeps_the_target_distribution():
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])
    q = torch.tensor([0.05, 0.1, 0.2, 0.3, 0.35])
    n = 40000
    counts = torch.zeros(5)
    for _ in range(n):
        d = int(torch.multinomial(q, 1, generator=g))
        counts[accept_or_resample(p, q, d, g)[1]] += 1
    assert (counts / n - p).abs().max() < 0.012  # ~4 standard errors at n = 40000
    # a deterministic draft (context lookup): q is one-hot at the draft, the output is still distributed as p
    counts.zero_()
    for i in range(n):
        d = i % 5
        counts[accept_or_resample(p, _one_hot(d, 5, "cpu"), d, g)[1]] += 1
    assert (counts / n - p).abs().max() < 0.012


@pytest.mark.parametrize("drafts", ["mtp", "lookup"])
def test_speculative_sampling_end_to_end_matches_the_base_distribution(trained, drafts, monkeypatch):
    """Distribution of the 2nd sampled token (the first that goes through a draft) vs the exact base marginal.
    ``lookup``: every step drafts one deterministic token (the marginal's mode) as a context match would."""
    patched, _ = trained
    ids = torch.tensor([[10, 20, 30, 40]])
    temp = 0.03  # the tiny random model's logits are flat (std ≈ 0.2): sharpen them so that the test has power
    with torch.no_grad():
        p1 = torch.softmax(patched(input_ids=ids).logits[0, -1] / temp, -1)
        vocab = p1.numel()
        every = torch.cat([ids.repeat(vocab, 1), torch.arange(vocab)[:, None]], 1)
        exact = p1 @ torch.softmax(patched(input_ids=every).logits[:, -1] / temp, -1)  # Σ_x1 p(x1) p(x2 | x1)
    if drafts == "lookup":
        monkeypatch.setattr("patcher.runtime.mtp.lookup_drafts", lambda tokens, n, limit: ([int(exact.argmax())][:limit], 1))
    g = torch.Generator().manual_seed(1)
    n = 1500
    counts = torch.zeros_like(p1)
    for _ in range(n):
        # 3 new tokens: a lookup draft is only made when the step can yield more than one token
        out, stats = speculative_generate(patched, ids, 3, (), temperature=temp, generator=g,
                                          lookup=4 if drafts == "lookup" else 0)
        assert (stats["lookup_steps"] > 0) == (drafts == "lookup")
        counts[out[0, ids.shape[1] + 1]] += 1
    tv = 0.5 * float((counts / n - exact / exact.sum()).abs().sum())
    assert tv < 0.08, tv  # sampling noise at n = 1500 is about 0.03 here


def test_training_resumes_exactly(tokenizer, tmp_path):
    model = tiny_model("llama", seed=13)
    patched, _ = patch_model(model, mtp_recipe(), tokenizer)
    start = copy.deepcopy(patched.mtp.state_dict())
    windows = torch.randint(4, 250, (24, 32), generator=torch.Generator().manual_seed(0))
    opts = MTPOptions(heads=2, seq_len=32, batch_size=4, save_every=2)

    class Stop(Exception):
        pass

    class StopAt:
        def start(self, *a, **k):
            pass

        def update(self, step, loss, acc):
            if step == 5:  # crash after step 5; the last saved state is step 4 (save_every=2)
                raise Stop

    with pytest.raises(Stop):
        train_mtp(patched, windows, opts, tmp_path / "state", progress=StopAt())
    summary = train_mtp(patched, windows, opts, tmp_path / "state", resume=True)
    assert summary["resumed_from_step"] == 4 and summary["steps"] == 6
    resumed = copy.deepcopy(patched.mtp.state_dict())

    patched.mtp.load_state_dict(start)
    train_mtp(patched, windows, opts, None)
    for k, v in patched.mtp.state_dict().items():
        torch.testing.assert_close(v, resumed[k], msg=k)


def test_training_stops_at_its_time_budget_with_a_resumable_state(tokenizer, tmp_path):
    import json

    model = tiny_model("llama", seed=13)
    patched, _ = patch_model(model, mtp_recipe(), tokenizer)
    windows = torch.randint(4, 250, (24, 32), generator=torch.Generator().manual_seed(0))
    opts = MTPOptions(heads=2, seq_len=32, batch_size=4, train_tokens=2 ** 16, max_minutes=1e-6)
    summary = train_mtp(patched, windows, opts, tmp_path / "state")
    assert summary["steps"] == 1 and summary["planned_steps"] == 2 ** 16 // (4 * 32) and summary["tokens"] == 4 * 32
    assert json.loads((tmp_path / "state" / "progress.json").read_text())["step"] == 1
    again = train_mtp(patched, windows, opts.model_copy(update={"max_minutes": 0.0, "train_tokens": 3 * 4 * 32}),
                      tmp_path / "state", resume=True)
    assert again["resumed_from_step"] == 1 and again["steps"] == 3


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_training_in_either_precision_learns_and_keeps_fp32_modules(tokenizer, precision):
    model = tiny_model("llama", seed=13)
    patched, _ = patch_model(model, mtp_recipe(), tokenizer)
    windows = torch.randint(4, 250, (8, 32), generator=torch.Generator().manual_seed(0))
    small = dict(heads=2, seq_len=32, batch_size=4, loss_positions=1.0)

    def loss_now():  # one step at a vanishing rate: the modules' loss on the same 4 windows, in fp32
        return sum(train_mtp(patched, windows, MTPOptions(**small, train_tokens=4 * 32, lr=1e-12, precision="fp32"),
                             None)["final_loss"])

    before = loss_now()
    summary = train_mtp(patched, windows, MTPOptions(**small, train_tokens=64 * 32, lr=3e-3, precision=precision), None)
    assert summary["precision"] == ("bf16 autocast" if precision == "bf16" else "fp32")
    assert {p.dtype for p in patched.mtp.parameters()} == {torch.float32}
    assert loss_now() < 0.8 * before


def test_mtp_checkpoint_round_trip(trained, tmp_path):
    from transformers import AutoModelForCausalLM

    from patcher.formats.folder import write_checkpoint

    patched, _ = trained
    write_checkpoint(patched, None, tmp_path / "out")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    for k, v in patched.mtp.state_dict().items():
        torch.testing.assert_close(again.mtp.state_dict()[k], v)
    ids = torch.randint(4, 250, (1, 12))
    assert torch.equal(again.generate(ids, do_sample=False, max_new_tokens=16, eos_token_id=None),
                       patched.generate(ids, do_sample=False, max_new_tokens=16, eos_token_id=None))


def test_mtp_on_a_family_without_rope_is_lossless_and_learns(tokenizer, tmp_path):
    """GPT-2 (learned absolute positions, no RoPE): the MTP block gets positions through the hidden state only;
    training lowers its loss, and speculative greedy (tree drafts, lookup) equals plain greedy, also reloaded."""
    from transformers import AutoModelForCausalLM

    from patcher.formats.folder import write_checkpoint

    patched, report = patch_model(tiny_model("gpt2", seed=1), mtp_recipe(train_tokens=4096), tokenizer)
    m = report["mtp"]
    assert len(patched.mtp) == 2 and m["training"]["steps"] == 16 and m["greedy_identical"] is True
    assert 0 < m["head_acceptance_teacher_forced"][0] <= 1
    write_checkpoint(patched, None, tmp_path / "out")
    _assert_trees_match_plain_greedy(AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval())


def test_mtp_is_refused_up_front_where_layers_need_rotary_tables_that_were_not_found(tokenizer, monkeypatch):
    """A decoder layer that takes ``position_embeddings`` cannot run as an MTP block without the family's rotary:
    refused, by the preflight's miniature, naming the missing role."""
    import dataclasses

    from converters.mtp import MTPTechnique
    from patcher.errors import DsoptError

    real = MTPTechnique.attach
    monkeypatch.setattr(MTPTechnique, "attach", lambda self, model, mm, *a: real(
        self, model, dataclasses.replace(mm, rotary_path=None), *a))
    with pytest.raises(DsoptError, match="预检.*position_embeddings.*missing role rotary"):
        patch_model(tiny_model("llama", seed=1), mtp_recipe(), tokenizer)


def test_tree_verification_keeps_chunked_attention_exact(tokenizer):
    """Llama 4's chunked layers (chunks of 16 here) see only keys of their own chunk: a draft tree verified across
    a chunk boundary must be masked the same way, or speculative greedy drifts from plain greedy."""
    from conftest import zoo_model

    patched, _ = patch_model(zoo_model("llama4_text", seed=3), mtp_recipe(train_tokens=2048), tokenizer)
    _assert_trees_match_plain_greedy(patched)


def _assert_trees_match_plain_greedy(model) -> None:
    """40 tokens past a repetitive and a random prompt: tree drafts, lookup drafts, both equal plain greedy."""
    for ids in (torch.tensor([[7, 8, 9, 10, 11, 7, 8, 9, 10, 11, 7, 8]]), torch.randint(4, 250, (1, 9))):
        plain = model.generate(ids, use_mtp=False, do_sample=False, max_new_tokens=40, eos_token_id=None)
        for lookup, branches in [(0, (3, 2)), (5, 2)]:
            spec, stats = speculative_generate(model, ids, 40, (), lookup=lookup, branches=branches)
            assert torch.equal(plain, spec), (lookup, branches)
            assert stats["verify_steps"] < 40


def test_training_on_the_bases_own_continuations(tokenizer, tmp_path):
    model = tiny_model("llama", seed=13)
    patched, _ = patch_model(model, mtp_recipe(), tokenizer)
    windows = torch.randint(4, 250, (8, 32), generator=torch.Generator().manual_seed(0))
    opts = MTPOptions(heads=2, seq_len=32, batch_size=4, train_tokens=8 * 32, generate_tokens=12 * 32,
                      generate_temperature=0.0)
    summary = train_mtp(patched, windows, opts, tmp_path / "state")
    assert summary["generated"]["windows"] == 12 and summary["generated"]["temperature"] == 0.0
    assert summary["distinct_tokens"] == (8 + 12) * 32  # the base's continuations joined the book's windows
    assert (tmp_path / "state" / "generated.safetensors").exists()
