"""CLI 契约：convert / inspect / report / check 的退出码与可读的错误。"""

import json

import pytest
from conftest import saved_tiny_llama
from typer.testing import CliRunner

from patcher.cli import app

runner = CliRunner()
SMALL = ["--calib-tokens", "1024", "--calib-seq-len", "128", "--eval-tokens", "512", "--eval-seq-len", "128"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return saved_tiny_llama(tmp_path_factory.mktemp("cli") / "tiny-llama", seed=5)


@pytest.fixture(scope="module")
def converted(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli-out") / "out"
    res = runner.invoke(app, ["convert", str(folder), "--mla", "--kv-keep", "0.5", "-o", str(out), *SMALL])
    assert res.exit_code == 0, res.output
    return out


def test_convert_writes_recipe_from_flags(converted):
    import yaml

    rec = yaml.safe_load((converted / "recipe.yaml").read_text())
    assert rec["mla"]["enabled"] and rec["mla"]["kv_keep"] == 0.5 and rec["calibration"]["tokens"] == 1024


def test_check_passes_and_fails_with_reasons(converted):
    ok = runner.invoke(app, ["check", str(converted), "--max-kv-ratio", "0.55", "--max-ppl-increase", "1000"])
    assert ok.exit_code == 0, ok.output
    bad = runner.invoke(app, ["check", str(converted), "--max-ppl-increase", "-100", "--min-top1", "1.01"])
    assert bad.exit_code == 1
    assert "困惑度上升" in bad.output and "top-1" in bad.output
    # --sure: every domain's 95 % upper bound must be under the limit, so a limit just above the worst point fails
    worst = json.loads((converted / "fidelity.json").read_text())["fidelity"]
    limit = f"{worst['ppl_increase_pct'] + 1e-3:.4f}"
    assert runner.invoke(app, ["check", str(converted), "--max-ppl-increase", limit]).exit_code == 0
    unsure = runner.invoke(app, ["check", str(converted), "--max-ppl-increase", limit, "--sure"])
    assert unsure.exit_code == 1 and "区间上界" in unsure.output


def test_report_prints_the_summary(converted):
    res = runner.invoke(app, ["report", str(converted)])
    assert res.exit_code == 0 and "困惑度" in res.output
    js = runner.invoke(app, ["report", str(converted), "--json"])
    assert json.loads(js.stdout)["techniques"] == ["mla"]


def test_inspect_lists_roles(folder):
    res = runner.invoke(app, ["inspect", str(folder), "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["layers"][0]["k"].startswith("self_attn.k_proj") and data["layers"][1]["missing"] == "—"
    from patcher.model.families import family_of

    assert data["family_notes"] == family_of(data["model_type"]).notes  # the family data reaches the user


def test_existing_output_and_bad_values_exit_cleanly(converted, folder):
    res = runner.invoke(app, ["convert", str(folder), "--mla", "-o", str(converted), *SMALL])
    assert res.exit_code == 2 and "--overwrite" in res.output
    res = runner.invoke(app, ["convert", str(folder), "--mla", "--kv-keep", "1.7", "-o", str(converted) + "x"])
    assert res.exit_code == 2 and "mla.kv_keep" in res.output
    res = runner.invoke(app, ["convert", str(folder), "--mla", "--kv-lora-rank", "4096", "-o", str(converted) + "y",
                              *SMALL])
    assert res.exit_code == 2 and "kv_lora_rank=4096" in res.output
    res = runner.invoke(app, ["convert", str(folder), "-o", str(converted) + "z"])
    assert res.exit_code == 2 and "--mla" in res.output


def test_mtp_convert_train_resume_and_generate(folder, tmp_path):
    out = tmp_path / "mtp"
    res = runner.invoke(app, ["convert", str(folder), "--mtp", "2", "--mtp-seq-len", "64", "-o", str(out), *SMALL])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["train-mtp", str(out), "--tokens", "1024", "--mtp-batch", "4", "--mtp-save-every", "2"])
    assert res.exit_code == 0, res.output
    progress = json.loads((out / "mtp-train" / "progress.json").read_text())
    assert progress == {"step": 4, "steps": 4}
    report = json.loads((out / "fidelity.json").read_text())
    assert report["mtp"]["training"]["steps"] == 4 and report["mtp"]["greedy_identical"] is True
    assert (out / "recipe.yaml").exists() and (out / "mtp.py").exists()  # the rest of the folder survived
    res = runner.invoke(app, ["train-mtp", str(out), "--tokens", "1024", "--resume"])
    assert res.exit_code == 0, res.output  # already complete: resumes at the last step and trains nothing
    assert json.loads((out / "fidelity.json").read_text())["mtp"]["training"]["resumed_from_step"] == 4
    # dialogues need a chat template; this tokenizer has none: a clear error, and the folder is untouched
    before = (out / "fidelity.json").read_text()
    res = runner.invoke(app, ["train-mtp", str(out), "--tokens", "256", "--mtp-generate-tokens", "128",
                              "--mtp-generate-chat", "0.5"])
    assert res.exit_code == 2 and "对话模板" in res.output and (out / "fidelity.json").read_text() == before

    rows = {}
    for flag in (["--lookup", "0", "--branches", "1"], ["--no-mtp"], ["--lookup", "4", "--branches", "3,2"]):
        res = runner.invoke(app, ["generate", str(out), "--prompt", "hello world hello world hello",
                                  "--max-new-tokens", "12", "--json", *flag])
        assert res.exit_code == 0, res.output
        rows[" ".join(flag)] = json.loads(res.stdout.strip().splitlines()[-1])
    mtp, plain, both = rows["--lookup 0 --branches 1"], rows["--no-mtp"], rows["--lookup 4 --branches 3,2"]
    assert mtp["mtp"] is True and plain["mtp"] is False
    assert {"text", "tokens_per_s", "accepted_per_step"} <= set(mtp)
    assert mtp["lookup_steps"] == 0 and both["lookup_steps"] > 0  # "hello world" recurs
    assert mtp["text"] == plain["text"] == both["text"]  # lossless: the same greedy text every way
    for shape in ("4,x", "4,0"):
        bad = runner.invoke(app, ["generate", str(out), "--prompt", "hi", "--branches", shape])
        assert bad.exit_code == 2 and "--branches" in bad.output


def test_train_mtp_refuses_a_folder_without_heads(converted):
    res = runner.invoke(app, ["train-mtp", str(converted), "--tokens", "256"])
    assert res.exit_code == 2 and "MTP" in res.output


def test_a_truncated_or_incomplete_report_is_named_not_a_traceback(converted, tmp_path):
    import shutil

    for name, text, needle in (("cut", None, "不是有效的 JSON"), ("partial", '{"source": "x"}', "缺少 techniques")):
        folder = tmp_path / name
        shutil.copytree(converted, folder)
        whole = (folder / "fidelity.json").read_text(encoding="utf-8")
        (folder / "fidelity.json").write_text(text if text is not None else whole[: len(whole) // 2], encoding="utf-8")
        for cmd in (["report", str(folder)], ["check", str(folder), "--max-kl", "1"]):
            res = runner.invoke(app, cmd)
            flat = res.output.replace("\n", "")  # rich wraps long lines
            assert res.exit_code == 2 and needle in flat and "fidelity.json" in flat, res.output
            assert "Traceback" not in flat

