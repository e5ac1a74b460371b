"""补丁注意力与 transformers Cache API 的契约：generate()（贪心、采样、左填充批量）与只存潜在向量的缓存。"""

import pytest
import torch
from conftest import fast_recipe, tiny_model

from patcher import patch_model


@pytest.fixture(scope="module")
def patched(tokenizer):
    model = tiny_model("llama", seed=1)
    patched, report = patch_model(model, fast_recipe(kv_keep=0.5), tokenizer)
    return patched, report


def _greedy_without_cache(model, ids, n):
    for _ in range(n):
        logits = model(input_ids=ids, use_cache=False).logits
        ids = torch.cat([ids, logits[:, -1:].argmax(-1)], dim=1)
    return ids


def test_cache_holds_only_the_latent(patched):
    model, report = patched
    ids = torch.randint(4, 200, (2, 10))
    out = model.generate(ids, max_new_tokens=5, do_sample=False, return_dict_in_generate=True, pad_token_id=3)
    cache = out.cache if hasattr(out, "cache") else out.past_key_values
    for i, layer in enumerate(cache.layers):
        rank = report["layers"][i]["rank"]
        assert layer.keys.shape == (2, 1, 14, rank)  # 15 tokens seen, the last one is never cached
        assert layer.values.numel() == 0


def test_cached_greedy_matches_recomputation(patched):
    model, _ = patched
    ids = torch.randint(4, 200, (1, 12))
    with torch.no_grad():
        expected = _greedy_without_cache(model, ids, 8)
        got = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=3)
    assert torch.equal(got, expected)


def test_left_padded_batch_matches_single_rows(patched):
    model, _ = patched
    a = torch.randint(4, 200, (1, 12))
    b = torch.randint(4, 200, (1, 7))
    pad = torch.full((1, 5), 3)
    batch = torch.cat([a, torch.cat([pad, b], 1)])
    mask = torch.cat([torch.ones(1, 12), torch.cat([torch.zeros(1, 5), torch.ones(1, 7)], 1)]).long()
    with torch.no_grad():
        both = model.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=3)
        one_a = model.generate(a, max_new_tokens=6, do_sample=False, pad_token_id=3)
        one_b = model.generate(b, max_new_tokens=6, do_sample=False, pad_token_id=3)
    assert torch.equal(both[0, -6:], one_a[0, -6:])
    assert torch.equal(both[1, -6:], one_b[0, -6:])


def test_sampling_runs_and_is_seeded(patched):
    model, _ = patched
    ids = torch.randint(4, 200, (2, 6))
    outs = []
    for _ in range(2):
        torch.manual_seed(7)
        outs.append(model.generate(ids, max_new_tokens=6, do_sample=True, temperature=0.9, top_k=20, pad_token_id=3))
    assert outs[0].shape == (2, 12) and torch.equal(outs[0], outs[1])


def test_incremental_logits_match_full_forward(patched):
    model, _ = patched
    ids = torch.randint(4, 200, (1, 16))
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits
        first = model(input_ids=ids[:, :10], use_cache=True)
        rest = model(input_ids=ids[:, 10:], cache=first.cache if hasattr(first, "cache") else first.past_key_values,
                     use_cache=True).logits
    torch.testing.assert_close(rest, full[:, 10:], atol=1e-4, rtol=1e-4)


def test_absorbed_value_path_matches_materialized_values(patched):
    """The decoding path that never builds V gives the same logits as the prefill path that does."""
    model, _ = patched
    ids = torch.randint(4, 200, (2, 20))
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, :6] = 0  # left padding in row 1
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        first = model(input_ids=ids[:, :17], attention_mask=mask[:, :17], use_cache=True)
        rest = model(input_ids=ids[:, 17:], attention_mask=mask, cache=first.cache, use_cache=True).logits
    torch.testing.assert_close(rest, full[:, 17:], atol=1e-4, rtol=1e-4)
