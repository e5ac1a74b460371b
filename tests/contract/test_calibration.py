"""校准的契约：.txt / .jsonl 输入、--seed 决定结果、逐层流式（第 i 层的统计来自已转换的前 i 层）。"""

import json

import pytest
import torch
from conftest import fast_recipe, tiny_model

from patcher import patch_model
from patcher.data.text import read_text, token_windows
from patcher.errors import DataError
from patcher.model.sources import resolve


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "kv_a_proj" in k}


def test_same_seed_same_weights_other_seed_other_weights(tokenizer):
    runs = {}
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        recipe = fast_recipe(kv_keep=0.5)
        recipe["calibration"] = {**recipe["calibration"], "seed": seed}
        patched, _ = patch_model(tiny_model("llama", seed=4), recipe, tokenizer)
        runs[name] = _weights(patched)
    assert all(torch.equal(runs["a"][k], runs["b"][k]) for k in runs["a"])
    assert not all(torch.equal(runs["a"][k], runs["c"][k]) for k in runs["a"])


def test_jsonl_and_txt_sources(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps({"text": f"line {i}"}) for i in range(3)) + "\n")
    assert read_text(str(p), "calibration") == "line 0\n\nline 1\n\nline 2"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"nope": 1}\n')
    with pytest.raises(DataError, match="第 1 行"):
        read_text(str(bad), "calibration")
    with pytest.raises(DataError, match="找不到"):
        read_text(str(tmp_path / "missing.txt"), "calibration")
    assert len(read_text(None, "calibration")) > 50_000  # the built-in default works offline


def test_windows_are_seeded_and_sized(tokenizer):
    text = read_text(None, "calibration")
    a = token_windows(tokenizer, text, 1024, 128, seed=0)
    b = token_windows(tokenizer, text, 1024, 128, seed=0)
    c = token_windows(tokenizer, text, 1024, 128, seed=1)
    assert a.shape == (8, 128) and torch.equal(a, b) and not torch.equal(a, c)


def test_streaming_feeds_converted_outputs_forward(tokenizer, monkeypatch):
    """Layer 1's statistics in the convert pass come from the already converted layer 0."""
    import patcher.pipeline.memory as memory

    seen = []
    real = memory.stream

    def spy(model, layers, ids, bs, needs, on_layer, progress=None):
        def wrapped(i, layer, stats):
            seen.append((i, type(layers[0].self_attn).__name__))
            on_layer(i, layer, stats)
        return real(model, layers, ids, bs, needs, wrapped, progress)

    monkeypatch.setattr(memory, "stream", spy)
    patch_model(tiny_model("llama"), fast_recipe(kv_keep=0.5), tokenizer)
    # the real run's two passes are the last four calls (the preflight's miniature runs come first)
    # plan pass: layer 0 untouched when layer 1 is analysed; convert pass: layer 0 already latent
    assert (1, "LlamaAttention") in seen[-4:-2] and (1, "LatentAttention") in seen[-2:]


def test_gguf_path_is_a_source(tmp_path):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    src = resolve(str(f))
    assert src.kind == "gguf" and src.gguf_file == "m.gguf"


def test_builtin_domains_are_five_disjoint_kinds_with_provenance():
    from patcher.data.text import builtin_domains, digest

    calib, evals = builtin_domains("calibration"), builtin_domains("evaluation")
    kinds = {"narrative", "encyclopedic", "technical", "code", "chat"}
    assert {d.name for d in calib} == {d.name for d in evals} == kinds
    assert not {digest(d.text) for d in calib} & {digest(d.text) for d in evals}
    for a, b in zip(calib, evals):  # disjoint by source: not even a shared paragraph
        paras = {p for p in a.text.split("\n\n") if len(p) > 200}
        assert not paras & {p for p in b.text.split("\n\n") if len(p) > 200}, a.name
    from importlib import resources

    provenance = resources.files("patcher.data").joinpath("PROVENANCE.md").read_text(encoding="utf-8")
    assert all(f"`calibration/{k}.txt`" in provenance and f"`evaluation/{k}.txt`" in provenance for k in kinds)


def test_calibration_mixes_domains_equally(tokenizer, tmp_path):
    from patcher.data.text import mixed_windows, read_domains

    (tmp_path / "long.txt").write_text("a long text about apples. " * 400)
    (tmp_path / "short.txt").write_text("brief words. " * 30)  # 390 bytes: three windows of 128
    domains = read_domains(str(tmp_path), "calibration")
    assert [d.name for d in domains] == ["long", "short"]
    w = mixed_windows(tokenizer, domains, 10 * 128, 128, seed=0)
    assert w.shape == (10, 128)

    def alphabet(text):
        return set(tokenizer(text, add_special_tokens=False)["input_ids"])

    from_short = sum(set(row.tolist()) <= alphabet("brief words. ") for row in w)
    from_long = sum(set(row.tolist()) <= alphabet("a long text about apples. ") for row in w)
    assert (from_short, from_long) == (3, 7)  # short gives what it has, long the rest


def test_report_per_domain_with_the_worst_as_headline(tokenizer, tmp_path):
    for name, text in (("plain", "the cat sat on the mat. " * 300), ("odd", "zq xj vk wp qq zz. " * 300)):
        (tmp_path / f"{name}.txt").write_text(text)
    recipe = fast_recipe(kv_keep=0.5)
    recipe["eval"] = {**recipe["eval"], "data": f"{tmp_path / 'plain.txt'},{tmp_path / 'odd.txt'}"}
    _, report = patch_model(tiny_model("llama", seed=4), recipe, tokenizer)
    f = report["fidelity"]
    assert set(f["domains"]) == {"plain", "odd"} and f["headline"] == "worst_domain"
    worst = max(f["domains"].values(), key=lambda d: d["ppl_increase_pct"])
    assert f["ppl_increase_pct"] == worst["ppl_increase_pct"] == f["domains"][f["worst_domain"]]["ppl_increase_pct"]
    assert f["kl_mean"] == max(d["kl_mean"] for d in f["domains"].values())
    assert f["top1_agreement"] == min(d["top1_agreement"] for d in f["domains"].values())
    assert f["pooled"]["tokens"] == sum(d["tokens"] for d in f["domains"].values())
    assert [d["name"] for d in report["eval"]["domains"]] == ["plain", "odd"]
    for d in (*f["domains"].values(), f["pooled"]):  # each figure carries its sampling interval
        low, high = d["ppl_increase_ci95_pct"]
        assert low <= d["ppl_increase_pct"] <= high and d["ppl_increase_se_pct"] >= 0
    from patcher.evaluation.render import render_markdown

    assert "上升的 95 % 区间" in render_markdown(report)
