"""打包契约：从仓库构建的轮子（非可编辑安装）在干净的虚拟环境里可用——包、包数据与全部预设配方都随轮子安装。"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("patcher", "converters")
# 复制仓库时略去的构建产物与缓存（与 .gitignore 一致；build/ 里的旧文件会被 setuptools 打进轮子）
IGNORED = shutil.ignore_patterns(".git", "__pycache__", "*.egg-info", "build", "dist", "out", "bench-out",
                                 ".pytest_cache", ".ruff_cache", ".import_linter_cache", ".install-stamp")


def _run(cmd, **kw):
    res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600, **kw)
    assert res.returncode == 0, f"{cmd}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env.update(PYTHONNOUSERSITE="1", HF_HUB_OFFLINE="1", PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    return env


def _repo_files(pattern: str, *dirs: str) -> set[str]:
    return {p.relative_to(ROOT).as_posix() for d in dirs for p in (ROOT / d).rglob(pattern)
            if "__pycache__" not in p.parts}


def _preset_files() -> dict[str, Path]:
    return {p.stem: p for p in sorted((ROOT / "recipes").glob("*.yaml"))}


def test_wheel_installs_and_loads_every_preset(tmp_path):
    env = _clean_env()
    # 在副本上构建：不在仓库里留下 build/ 与 *.egg-info，也不会把 build/lib 中已移走模块的旧副本打进轮子
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=IGNORED)
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", wheels, src],
         env=env, cwd=tmp_path)
    (wheel,) = wheels.glob("dsopt-*.whl")

    # 轮子的内容：仓库中各包的每个 .py（缺 __init__.py 的子包会被 find 漏掉）、包数据与全部预设，且没有多余的 .py
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {n for n in names if n.endswith(".py")} == _repo_files("*.py", *PACKAGES, "recipes")
    assert _repo_files("*.yaml", "recipes") <= names and _preset_files()
    assert _repo_files("*.txt", "patcher/data") | _repo_files("*.md", "patcher/data") <= names

    # 不用 --system-site-packages（系统的 __editable__ 查找器会从仓库补上轮子缺的模块），改用只列路径的 .pth 接在最后
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], env=env)
    py = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", py, "install", "--quiet", "--no-deps", "--no-index", wheel],
         env=env, cwd=tmp_path)
    (venv_site,) = (Path(p) for p in json.loads(_run(
        [py, "-c", "import json, site; print(json.dumps(site.getsitepackages()))"], env=env, cwd=tmp_path).stdout))
    (venv_site / "_dsopt_test_system_site.pth").write_text("\n".join(site.getsitepackages()) + "\n")

    script = textwrap.dedent("""
        import json, sys
        import converters, patcher, recipes
        from patcher.recipe import load_recipe, preset_names
        names = list(preset_names())
        print(json.dumps({
            "files": [m.__file__ for m in (patcher, converters, recipes)],
            "editable_finders": [repr(f) for f in sys.meta_path if "editable" in repr(f).lower()],
            "names": names,
            "loaded": {n: load_recipe(n).name for n in names},
        }))
    """)
    got = json.loads(_run([py, "-c", script], env=env, cwd=tmp_path).stdout.strip().splitlines()[-1])

    for f in got["files"]:
        assert Path(f).resolve().is_relative_to(venv_site.resolve()), f
        assert not Path(f).resolve().is_relative_to(ROOT), f
    assert got["editable_finders"] == []
    presets = _preset_files()
    assert got["names"] == sorted(presets)
    # 如今每个预设文件的 name: 都等于文件名（不含 .yaml）
    assert all(yaml.safe_load(p.read_text(encoding="utf-8"))["name"] == stem for stem, p in presets.items())
    assert got["loaded"] == {stem: stem for stem in presets}

    # 控制台脚本指向安装的轮子
    res = _run([venv / "bin" / "dsopt", "--help"], env=env, cwd=tmp_path)
    assert "convert" in res.stdout
