"""代码的形状：导入图里没有环；每个模块都在分层契约的某一层里；旧模块路径与错误类仍可导入。"""

from __future__ import annotations

import importlib

import grimp
import pytest
import tomllib
from conftest import ROOT

UNLAYERED = {"patcher", "patcher.legacy", "converters"}  # package roots and the old-path shim stand outside


def _graph():
    return grimp.build_graph("patcher", "converters")


def _layers() -> list[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["importlinter"]
    contract = next(c for c in config["contracts"] if c["type"] == "layers")
    return [m.strip() for layer in contract["layers"] for m in layer.split("|")]


def test_the_import_graph_has_no_cycles():
    graph = _graph()
    cycles = sorted({tuple(sorted((a, b))) for a in graph.modules for b in graph.find_modules_directly_imported_by(a)
                     if graph.find_shortest_chain(importer=b, imported=a)})
    assert cycles == []


def test_every_module_sits_in_a_layer_of_the_contract():
    layers = _layers()
    outside = [m for m in sorted(_graph().modules) if m not in UNLAYERED
               and not any(m == layer or m.startswith(layer + ".") for layer in layers)]
    assert outside == []


def test_a_technique_imports_no_file_format_pipeline_or_cli_code():
    graph = _graph()
    for technique in ("converters.mla", "converters.moe", "converters.mtp"):
        for upper in ("patcher.formats", "patcher.pipeline", "patcher.jobs", "patcher.cli", "patcher.training",
                      "patcher.evaluation"):
            assert not graph.chain_exists(importer=technique, imported=upper, as_packages=True), (technique, upper)


@pytest.mark.parametrize("old, name", [
    ("patcher.checkpoint", "SourceError"), ("patcher.checkpoint", "OutputError"), ("patcher.recipe", "RecipeError"),
    ("patcher.locate", "LocateError"), ("patcher.calibrate", "DataError"), ("patcher.export_deepseek", "ExportError"),
    ("converters.mla", "PlanError"), ("patcher.api", "convert"), ("patcher.api", "patch_model"),
    ("patcher.api", "heal_checkpoint"), ("patcher.fidelity", "read_report"), ("patcher.modeling", "MoEMLP"),
])
def test_names_stay_importable_from_where_they_were(old, name):
    from patcher import errors

    value = getattr(importlib.import_module(old), name)
    if name.endswith("Error"):
        assert value is getattr(errors, name) and issubclass(value, errors.DsoptError)
    else:
        assert callable(value)


def test_importing_a_technique_first_does_not_pull_in_the_pipeline():
    import subprocess
    import sys

    code = "import sys, converters.mla; print(any(m.startswith('patcher.pipeline') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"
