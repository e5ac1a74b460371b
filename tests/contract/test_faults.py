"""坏输入与故障的契约（issue 27 第 6 项）：每一种都得到一行清楚的错误（退出码 2），不丢任何东西，且尽早发现。"""

import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT, saved_tiny_llama
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from patcher.cli import app

runner = CliRunner()
SMALL = ["--calib-tokens", "1024", "--calib-seq-len", "128", "--eval-tokens", "256", "--eval-seq-len", "128"]


def flat(res) -> str:
    return res.output.replace("\n", "")  # rich wraps long lines


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return saved_tiny_llama(tmp_path_factory.mktemp("faults") / "tiny", seed=3)


def copy(folder, tmp_path, name="src"):
    dest = tmp_path / name
    shutil.copytree(folder, dest)
    return dest


def refused(args, needle):
    res = runner.invoke(app, args)
    assert res.exit_code == 2 and needle in flat(res), res.output
    assert "Traceback" not in res.output
    return res


@pytest.mark.parametrize("streaming", ["off", "on"])
def test_missing_or_unexpected_tensors_are_refused_by_both_backends(folder, tmp_path, streaming):
    src = copy(folder, tmp_path)
    weights = load_file(src / "model.safetensors")
    name = "model.layers.1.mlp.up_proj.weight"
    kept = {k: v for k, v in weights.items() if k != name}
    save_file(kept, src / "model.safetensors", metadata={"format": "pt"})
    refused(["convert", str(src), "--mla", "--streaming", streaming, "-o", str(tmp_path / "o1"), *SMALL], name)
    save_file({**weights, "model.layers.0.extra.weight": weights[name].clone()}, src / "model.safetensors",
              metadata={"format": "pt"})
    refused(["convert", str(src), "--mla", "--streaming", streaming, "-o", str(tmp_path / "o2"), *SMALL], "多出")
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_streaming_checks_shapes_against_the_file_headers(folder, tmp_path):
    src = copy(folder, tmp_path)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 80}))
    refused(["convert", str(src), "--mla", "--streaming", "on", "-o", str(tmp_path / "o"), *SMALL], "形状")
    assert not list(tmp_path.glob(".o.partial*")) and not (tmp_path / "o").exists()


def test_disk_full_from_any_library_is_a_clear_error_and_leaves_nothing(folder, tmp_path, monkeypatch):
    import transformers.modeling_utils as mu

    def full(*a, **k):  # what safetensors raises when the disk fills: its own error type, the OS message inside
        raise Exception("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                        "message: \"No space left on device\" })")

    monkeypatch.setattr(mu, "safe_save_file", full)
    refused(["convert", str(folder), "--mla", "-o", str(tmp_path / "out"), *SMALL], "磁盘已满")
    assert list(tmp_path.iterdir()) == []  # no output, no temporary folder


def test_unwritable_output_is_refused_before_loading_anything(folder, monkeypatch):
    from patcher.model import sources

    monkeypatch.setattr(sources, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    refused(["convert", str(folder), "--mla", "-o", "/proc/dsopt-out", *SMALL], "无法在 /proc 中写入")


def test_invalid_config_json_in_every_command(folder, tmp_path):
    src = copy(folder, tmp_path)
    (src / "config.json").write_text("{ not json")
    for args in (["convert", str(src), "--mla", "-o", str(tmp_path / "o"), *SMALL], ["inspect", str(src)],
                 ["generate", str(src), "--prompt", "hi"],
                 ["convert", str(src), "--mla", "--streaming", "on", "-o", str(tmp_path / "o"), *SMALL]):
        refused(args, "config.json 无法解析")


def test_bad_shard_size_fails_before_the_conversion(folder, tmp_path):
    refused(["convert", str(folder), "--mla", "--max-shard-size", "abc", "-o", str(tmp_path / "o"), *SMALL],
            "--max-shard-size")


def test_output_equal_to_source_is_refused_even_with_overwrite(folder, tmp_path):
    src = copy(folder, tmp_path)
    before = sorted(p.name for p in src.iterdir())
    for out in (src, tmp_path):  # the source itself, or a folder holding it
        refused(["convert", str(src), "--mla", "--overwrite", "-o", str(out), *SMALL], "就是来源")
    assert sorted(p.name for p in src.iterdir()) == before


def test_non_text_calibration_and_missing_files_are_refused_up_front(folder, tmp_path, monkeypatch):
    from patcher.model import sources

    monkeypatch.setattr(sources, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    garbage = tmp_path / "weights.txt"
    garbage.write_bytes(bytes(range(256)) * 64)
    refused(["convert", str(folder), "--mla", "--calib-data", str(garbage), "-o", str(tmp_path / "o"), *SMALL],
            "不像文本")
    refused(["convert", str(folder), "--mla", "--eval-data", str(tmp_path / "none.txt"), "-o", str(tmp_path / "o"),
             *SMALL], "找不到评估数据")


def test_check_without_thresholds_is_refused(folder, tmp_path):
    out = tmp_path / "o"
    res = runner.invoke(app, ["convert", str(folder), "--mla", "--kv-keep", "0.5", "-o", str(out), *SMALL])
    assert res.exit_code == 0, res.output
    refused(["check", str(out)], "没有给任何阈值")


def test_windows_longer_than_the_context_are_clamped_with_a_note(folder, tmp_path):
    out = tmp_path / "o"  # the tiny model's context is 256 tokens
    res = runner.invoke(app, ["convert", str(folder), "--mla", "-o", str(out), "--calib-tokens", "1024",
                              "--calib-seq-len", "1024", "--eval-tokens", "256", "--eval-seq-len", "128"])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "fidelity.json").read_text())
    assert any("calibration.seq_len: 1024 → 256" in n for n in report["notes"])
    assert report["calibration"]["seq_len"] == 256 and "配方调整" in (out / "fidelity.md").read_text()


def test_stale_temporary_folders_of_killed_saves_are_cleaned(folder, tmp_path):
    stale = tmp_path / ".o.tmp-999999999-abc"  # no such process
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    mine = tmp_path / f".o.tmp-{os.getpid()}-live"  # a save in progress in a live process is left alone
    mine.mkdir()
    res = runner.invoke(app, ["convert", str(folder), "--mla", "-o", str(tmp_path / "o"), *SMALL])
    assert res.exit_code == 0, res.output
    assert not stale.exists() and mine.exists()


def test_relative_source_is_recorded_absolute_and_a_lost_teacher_is_named(folder, tmp_path, monkeypatch):
    shutil.copytree(folder, tmp_path / "src")
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(app, ["convert", "src", "--mla", "-o", "out", *SMALL])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "out" / "fidelity.json").read_text())
    assert report["source"] == str((tmp_path / "src").resolve())
    (tmp_path / "out" / "fidelity.json").write_text(json.dumps({**report, "source": "./moved-away"}))
    refused(["heal", "out", "--tokens", "256"], "--teacher")


def test_an_internal_error_prints_one_line_and_writes_the_traceback(tmp_path):
    code = ("import sys, patcher.jobs as j\n"
            "def boom(*a, **k): raise ZeroDivisionError('inside')\n"
            "j.convert = boom\n"
            "from patcher.cli import main\n"
            "sys.argv = ['dsopt', 'convert', 'x', '--mla']\n"
            "main()\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "DSOPT_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT),
                              "COLUMNS": "400"})
    assert res.returncode == 3 and "内部错误" in res.stderr and "Traceback" not in res.stderr, res.stderr
    crash = list((tmp_path / "cache" / "crashes").glob("dsopt-crash-*.txt"))
    assert len(crash) == 1 and "ZeroDivisionError: inside" in crash[0].read_text()
