"""修复（KL 蒸馏）：改善保真度、只训练转换过的模块、LoRA 合并、top-k 老师缓存、精确续训、格式不变。"""

import json

import pytest
import torch
from conftest import FAST_RECIPE, byte_tokenizer, tiny_model

from patcher import convert
from patcher.jobs import heal_checkpoint
from patcher.training.heal import HealOptions


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    folder = tmp_path_factory.mktemp("heal") / "tiny-llama"
    # a larger init gives peaked outputs, so conversion loses something measurable
    tiny_model("llama", seed=9, rms_norm_eps=1e-6, initializer_range=0.1).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


def converted(source, tmp_path, **extra):
    out = tmp_path / "out"
    recipe = {**FAST_RECIPE, "mla": {"enabled": True, "kv_keep": 0.25, "allocation": "uniform"}, **extra}
    convert(str(source), recipe, out)
    return out


def healed_dtypes(out):
    from safetensors import safe_open

    with safe_open(str(next(out.glob("model*.safetensors"))), "pt") as f:
        return {f.get_slice(k).get_dtype() for k in f.keys()}


FAST = dict(tokens=8192, seq_len=64, batch_size=4, lr=1e-3, save_every=8)  # 32 steps


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_healing_improves_fidelity_and_keeps_the_format(source, tmp_path, precision):
    from transformers import AutoModelForCausalLM

    out = converted(source, tmp_path)
    frozen_before = AutoModelForCausalLM.from_pretrained(out).model.embed_tokens.weight.clone()
    rec = heal_checkpoint(out, HealOptions(**FAST, precision=precision))
    assert rec["precision"] == ("bf16 autocast" if precision == "bf16" else "fp32")
    assert rec["after"]["kl_mean"] < 0.9 * rec["before"]["kl_mean"]
    assert healed_dtypes(out) == {"F32"}  # bf16 only in the forward pass: the checkpoint keeps its precision
    assert rec["steps"] == 32 and rec["trainable_parameters"] > 0
    rep = json.loads((out / "fidelity.json").read_text())
    assert rep["fidelity"] == rec["after"] and rep["fidelity_converted"] == rec["before"]
    assert "修复后" in (out / "fidelity.md").read_text()
    healed = AutoModelForCausalLM.from_pretrained(out)
    assert type(healed.model.layers[0].self_attn).__name__ == "LatentAttention"
    assert torch.equal(healed.model.embed_tokens.weight, frozen_before)  # only converted modules trained


def test_lora_and_topk_cache(source, tmp_path):
    out = converted(source, tmp_path)
    rec = heal_checkpoint(out, HealOptions(**FAST, lora=4, top_k=16))
    assert rec["after"]["kl_mean"] < rec["before"]["kl_mean"]
    assert rec["teacher_logits"] == "top-16 cached"
    assert (out / "heal-train" / "teacher-top16.safetensors").exists()
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(out)  # LoRA merged: plain weights, same keys as before
    assert not any("lora" in k for k in m.state_dict())


def test_healing_resumes_exactly(source, tmp_path, monkeypatch):
    import patcher.training.heal as heal

    a = converted(source, tmp_path / "a")
    b = converted(source, tmp_path / "b")
    opts = HealOptions(**FAST, val_every=4)
    full = heal_checkpoint(a, opts)
    calls = {"n": 0}
    real_step = torch.optim.AdamW.step

    def crash_after_eleven(self, *args, **kw):
        calls["n"] += 1
        if calls["n"] == 12:
            raise RuntimeError("simulated crash")
        return real_step(self, *args, **kw)

    monkeypatch.setattr(torch.optim.AdamW, "step", crash_after_eleven)
    with pytest.raises(RuntimeError, match="simulated"):
        heal_checkpoint(b, opts)
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    assert json.loads((b / heal.STATE_DIR / "progress.json").read_text())["step"] == 8
    resumed = heal_checkpoint(b, opts, resume=True)
    assert resumed["resumed_from_step"] == 8
    assert resumed["after"]["kl_mean"] == pytest.approx(full["after"]["kl_mean"], rel=1e-4)
    # the validation curve carries over the resume: checks before the crash come from the saved state
    ran, back = full["validation"], resumed["validation"]
    assert [s for s, _ in back["kl_curve"]] == [s for s, _ in ran["kl_curve"]] == list(range(0, 33, 4))
    assert [kl for _, kl in back["kl_curve"]] == pytest.approx([kl for _, kl in ran["kl_curve"]], rel=1e-4)
    assert back["best_step"] == ran["best_step"]


def test_healing_a_deepseek_export_keeps_it_stock(source, tmp_path):
    from patcher.formats.deepseek_v3 import load_stock

    extra = {"mla": {"enabled": True, "rope_dim": 8, "kv_keep": 0.5}, "mtp": {"heads": 1, "draft_vocab": 0},
             "output": {"format": "deepseek-v3"}}
    out = tmp_path / "ds"
    convert(str(source), {**FAST_RECIPE, **extra}, out)
    rec = heal_checkpoint(out, HealOptions(**FAST, local_steps=60, local_tokens=2048, local_batch=128, local_lr=3e-3))
    assert rec["after"]["kl_mean"] < rec["before"]["kl_mean"]
    # the stock attentions are reconstructed too, their tiny-scale latents trained in unit-scale coordinates
    attention = [l for l in rec["local"]["layers"] if l["kind"] == "attention"]
    assert len(attention) == 2 and all(l["error_after"] < 0.9 * l["error_before"] for l in attention)
    stock = load_stock(out)
    ids = torch.arange(4, 30)[None]
    with torch.no_grad():
        plain = stock.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
        mtp = stock.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0, use_mtp=True)
    assert torch.equal(plain, mtp)


def test_heal_command_line(source, tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    out = converted(source, tmp_path)
    res = subprocess.run([sys.executable, "-m", "patcher.cli", "heal", str(out), "--tokens", "1024", "--seq-len", "64",
                          "--lr", "1e-3", "--top-k", "8"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "修复完成" in res.stdout
    rep = json.loads((out / "fidelity.json").read_text())
    assert rep["healing"]["steps"] == 4 and rep["healing"]["options"]["top_k"] == 8
    bad = subprocess.run([sys.executable, "-m", "patcher.cli", "heal", str(out), "--scope", "everything"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "scope" in bad.stdout + bad.stderr


def test_healing_keeps_the_best_weights_on_held_out_windows(source, tmp_path):
    out = converted(source, tmp_path)
    # a rate that wrecks the model; no layer-wise stage, so the step-0 weights are the converted ones
    rec = heal_checkpoint(out, HealOptions(**{**FAST, "lr": 3.0, "val_every": 8, "local_steps": 0}))
    val = rec["validation"]
    assert val["tokens"] > 0 and [s for s, _ in val["kl_curve"]] == [0, 8, 16, 24, 32]
    assert val["best_step"] == 0 and val["best_kl"] == min(kl for _, kl in val["kl_curve"])
    # the converted weights come back untouched: the fidelity on the evaluation text is what it was
    assert rec["after"]["kl_mean"] == pytest.approx(rec["before"]["kl_mean"], rel=1e-5)


def test_healing_stops_at_its_time_budget_and_keeps_a_resumable_state(source, tmp_path):
    out = converted(source, tmp_path)
    # far more tokens than the text has (so epochs repeat) and a budget that ends after the first step
    rec = heal_checkpoint(out, HealOptions(**{**FAST, "tokens": 2 ** 20, "max_minutes": 1e-6, "val_every": 1000}))
    assert rec["steps"] == 1 and rec["planned_steps"] == 2 ** 20 // (64 * 4)
    assert rec["tokens"] == 4 * 64 and rec["epochs"] < 1
    assert [s for s, _ in rec["validation"]["kl_curve"]] == [0, 1]  # the step it stopped at is validated
    assert (out / "heal-train").exists()



def test_healing_on_the_teachers_own_text_counts_it_and_resumes_on_the_same_text(source, tmp_path, monkeypatch):
    import patcher.training.selfgen as selfgen

    out = converted(source, tmp_path)
    opts = HealOptions(**{**FAST, "generate_tokens": 16 * 64, "max_minutes": 1e-6, "val_every": 1000})
    rec = heal_checkpoint(out, opts)  # the budget ends after the first step, past the generation
    gen = rec["generated"]
    assert gen["windows"] == 16 and gen["tokens"] == 16 * 64 and gen["temperature"] == 1.0
    assert rec["steps"] == 1 and rec["seconds"] >= gen["seconds"]  # the writing counts in the training time
    assert "老师自己写的文本：16 个窗口" in (out / "fidelity.md").read_text()
    assert (out / "heal-train" / "generated.safetensors").exists()  # kept next to the state for --resume

    def never(*a, **k):
        raise AssertionError("a resumed run must train on the text it wrote before")

    monkeypatch.setattr(selfgen, "generate_windows", never)
    again = heal_checkpoint(out, opts.model_copy(update={"max_minutes": 0.0}), resume=True)
    assert again["generated"] == gen and again["resumed_from_step"] == 1 and again["steps"] == again["planned_steps"]
    assert again["after"]["kl_mean"] < again["before"]["kl_mean"]


def test_layerwise_reconstruction_brings_every_converted_module_closer_before_the_kl_stage(source, tmp_path,
                                                                                          monkeypatch):
    import patcher.training.reconstruct as reconstruct

    out = converted(source, tmp_path, moe={"enabled": True, "mode": "split", "active": 0.5, "allocation": "uniform"})
    opts = HealOptions(**{**FAST, "tokens": 4096, "val_every": 1000, "local_steps": 80, "local_tokens": 4096,
                          "local_batch": 256, "local_lr": 3e-3})
    rec = heal_checkpoint(out, opts)
    local = rec["local"]
    layers = json.loads((out / "config.json").read_text())["num_hidden_layers"]
    assert [l["module"] for l in local["layers"]] == [f"model.layers.{i}.{part}" for i in range(layers)
                                                      for part in ("self_attn", "mlp")]
    assert [l["kind"] for l in local["layers"]] == ["attention", "mlp"] * layers
    assert local["skipped_layers"] == 0 and local["tokens"] == 4096
    assert all(l["error_after"] < 0.9 * l["error_before"] for l in local["layers"])
    assert rec["seconds"] >= local["seconds"]  # the stage counts in the healing time
    assert rec["after"]["kl_mean"] < rec["before"]["kl_mean"]
    assert "逐层重建" in (out / "fidelity.md").read_text() and (out / "heal_local.png").exists()

    def never(*a, **k):
        raise AssertionError("a resumed heal already has the reconstruction in its saved weights")

    monkeypatch.setattr(reconstruct, "fit_layer", never)
    again = heal_checkpoint(out, opts, resume=True)
    assert again["local"] == local


def test_layerwise_reconstruction_stops_at_the_time_budget_and_refuses_lora(source, tmp_path):
    from pydantic import ValidationError

    out = converted(source, tmp_path, moe={"enabled": True, "mode": "split", "active": 0.5, "allocation": "uniform"})
    rec = heal_checkpoint(out, HealOptions(**{**FAST, "local_steps": 40, "max_minutes": 1e-6, "val_every": 1000}))
    layers = json.loads((out / "config.json").read_text())["num_hidden_layers"]
    assert rec["local"]["layers"] == [] and rec["local"]["skipped_layers"] == 2 * layers and rec["steps"] == 1
    mlp_only = heal_checkpoint(out, HealOptions(**{**FAST, "local_steps": 40, "max_minutes": 1e-6, "val_every": 1000,
                                                   "local_attention_lr": 0.0}))
    assert mlp_only["local"]["skipped_layers"] == layers  # the attentions are left to the KL stage
    with pytest.raises(ValidationError, match="lora"):
        HealOptions(local_steps=10, lora=4)
    assert HealOptions(lora=4).local_steps  # the default stays; the stage is off under LoRA, not an error
