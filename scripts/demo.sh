#!/usr/bin/env bash
# 快速开始：离线把内置的 SmolLM2-135M 转换为 MLA（省 40 % KV 缓存），然后检查报告。
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
out=${1:-out/smollm2-135m-mla}
dsopt convert smollm2-135m --recipe mla-kv40 -o "$out" --overwrite
dsopt check "$out" --max-ppl-increase 25 --min-top1 0.6 --max-kv-ratio 0.6
