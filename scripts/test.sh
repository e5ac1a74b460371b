#!/usr/bin/env bash
# 运行全部检查与测试：代码风格（ruff）、分层契约（import-linter）、全部测试（单元、契约、集成，含真实
# SmolLM2 模型的测试）及 patcher/ 与 converters/ 的行覆盖率（低于下限时失败）。
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
COVERAGE_FLOOR=${COVERAGE_FLOOR:-94.9}  # 覆盖率下限（%）：重构前 94.65 %（4513/4768 行），重构后 95.0 %（4785/5037），issue 27 后 95.14 %（5241/5509），issue 28 开始后 95.32 %（5355/5618）；只许升高
echo "== llama.cpp（真实推理引擎，缓存中没有时构建一次）"
bash scripts/llamacpp.sh build
echo "== ruff（代码风格）"
python3 -m ruff check .
echo "== import-linter（分层契约）"
lint-imports --no-cache
echo "== pytest（含覆盖率）"
exec python3 -m pytest -q -p no:cacheprovider --cov=patcher --cov=converters --cov-report=term:skip-covered \
  --cov-fail-under="$COVERAGE_FLOOR" tests "$@"
