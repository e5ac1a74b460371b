#!/usr/bin/env bash
# 运行全部测试（单元、契约、集成，含真实 SmolLM2 模型的测试）。
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec python3 -m pytest -q tests "$@"
