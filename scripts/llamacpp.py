"""在真实推理引擎 llama.cpp 中运行 dsopt 的导出：构建（``llamacpp.sh``）、转换成 GGUF、困惑度、贪心续写、速度。

集成测试与 ``bench_engine.py`` 共用。困惑度按 llama.cpp 自己的算法（``llama-perplexity``）：全文切成 n_ctx 的块，
块首换成 BOS（词表要求时），只给每块后一半的 token 打分；``hf_perplexity`` 在 transformers 中用同样的 token、
同样的打分重算，两者可以逐位比较。
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "llamacpp.sh"


class EngineError(RuntimeError):
    pass


def _sh(*args: str, timeout: float = 3600) -> str:
    res = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout)
    if res.returncode:
        raise EngineError(f"llamacpp.sh {' '.join(args)} 失败：{res.stderr[-2000:]}")
    return res.stdout.strip()


def build(timeout: float = 3600) -> Path:
    """Build llama.cpp once (cached); returns the folder of its tools."""
    _sh("build", timeout=timeout)
    return Path(_sh("bin"))


def convert(hf_dir: Path, gguf: Path, outtype: str = "f32") -> Path:
    _sh("convert", str(hf_dir), str(gguf), outtype, timeout=1800)
    return gguf


def _run(tool: str, *args: str, timeout: float = 1800) -> subprocess.CompletedProcess:
    exe = Path(_sh("bin")) / tool
    res = subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, "LLAMA_ARG_LOG_COLORS": "off"})
    if res.returncode:
        raise EngineError(f"{tool} 失败（退出码 {res.returncode}）：{res.stderr[-3000:]}")
    return res


def kv_bytes_per_token(log: str) -> float:
    """KV-cache bytes per token as llama.cpp itself allocates them (its ``llama_kv_cache: size = …`` line)."""
    m = re.search(r"llama_kv_cache: size = +([\d.]+) MiB \( *(\d+) cells", log)
    if not m:
        raise EngineError("llama.cpp 的日志里没有 KV 缓存大小")
    return float(m.group(1)) * 1024 * 1024 / int(m.group(2))


def perplexity(gguf: Path, text_file: Path, n_ctx: int = 512, chunks: int = 4, threads: int = 2) -> dict:
    """llama-perplexity on ``text_file``: its final estimate, the tokens it read and its KV bytes per token."""
    res = _run("llama-perplexity", "-m", str(gguf), "-f", str(text_file), "-c", str(n_ctx), "-b", str(n_ctx),
               "--chunks", str(chunks), "-t", str(threads), "-ngl", "0", "--no-escape", "-lv", "4")  # -lv 4: the KV-cache line
    log = res.stdout + res.stderr
    m = re.search(r"Final estimate: PPL = ([\d.]+)", log)
    if not m:
        raise EngineError(f"llama-perplexity 没有给出结果：{log[-1500:]}")
    return {"ppl": float(m.group(1)), "kv_bytes_per_token": kv_bytes_per_token(log), "n_ctx": n_ctx, "chunks": chunks}


def complete(gguf: Path, prompt: str, n: int = 32, threads: int = 2) -> str:
    """Greedy continuation of ``prompt`` (``n`` tokens, EOS ignored): the generated text only."""
    res = _run("llama-completion", "-m", str(gguf), "-p", prompt, "-n", str(n), "--temp", "0", "--top-k", "1",
               "--ignore-eos", "-t", str(threads), "-ngl", "0", "-ctk", "f32", "-ctv", "f32",
               "-no-cnv", "--no-display-prompt", "--no-warmup", "--no-escape")
    return res.stdout


def tokenize(gguf: Path, text: str) -> list[int]:
    """llama.cpp's own token ids for ``text`` (BOS included when its vocabulary adds one); escapes are not
    processed, as in ``perplexity``."""
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".txt", encoding="utf-8", delete=False) as f:
        f.write(text)
    try:
        res = _run("llama-tokenize", "-m", str(gguf), "-f", f.name, "--ids", "--log-disable", "--no-escape")
    finally:
        os.unlink(f.name)
    return json.loads(res.stdout.strip().splitlines()[-1])


def bench(gguf: Path, depths: list[int], threads: int = 2, n_gen: int = 32, n_prompt: int = 256, reps: int = 2) -> list:
    """llama-bench rows (JSON): prompt processing (pp) and decoding (tg) speed at each context depth."""
    res = _run("llama-bench", "-m", str(gguf), "-t", str(threads), "-p", str(n_prompt), "-n", str(n_gen),
               "-d", ",".join(map(str, depths)), "-r", str(reps), "-o", "json", "-ngl", "0", timeout=3600)
    return json.loads(res.stdout)


def llama_tokens(tokenizer, text: str, add_bos: bool) -> torch.Tensor:
    """The token ids llama.cpp scores: the text's tokens, with BOS in front when the vocabulary asks for it."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor(([tokenizer.bos_token_id] if add_bos else []) + ids)


def hf_perplexity(model, ids: torch.Tensor, n_ctx: int = 512, chunks: int = 4, bos: int | None = None) -> float:
    """llama-perplexity's number computed with a transformers model: the same chunks, BOS and scored half."""
    first, nll, count = n_ctx // 2, 0.0, 0
    with torch.no_grad():
        for c in range(chunks):
            chunk = ids[c * n_ctx:(c + 1) * n_ctx].clone()
            if len(chunk) < n_ctx:
                raise ValueError(f"文本只有 {len(ids)} 个 token，不够 {chunks} 块 × {n_ctx}")
            if bos is not None:
                chunk[0] = bos
            logp = torch.log_softmax(model(input_ids=chunk[None]).logits[0].double(), -1)
            tgt = chunk[first + 1:]
            nll -= float(logp[first:n_ctx - 1].gather(1, tgt[:, None]).sum())
            count += len(tgt)
    return math.exp(nll / count)


def perplexity_both(gguf: Path, hf_dir: Path, text_file: Path, model, n_ctx: int = 512, chunks: int = 4,
                    threads: int = 2) -> dict:
    """llama-perplexity on ``gguf`` and the same number from ``model`` (the checkpoint in ``hf_dir``, loaded by the
    caller) in transformers, on llama.cpp's own tokens of ``text_file``."""
    from transformers import AutoTokenizer

    got = perplexity(gguf, text_file, n_ctx, chunks, threads)
    tok = AutoTokenizer.from_pretrained(hf_dir)
    add_bos = gguf_add_bos(gguf)
    text = text_file.read_text(encoding="utf-8")
    ids = llama_tokens(tok, text, add_bos)
    same_tokens = tokenize(gguf, text[:2000]) == llama_tokens(tok, text[:2000], add_bos).tolist()
    ref = hf_perplexity(model, ids, n_ctx, chunks, tok.bos_token_id if add_bos else None)
    return {**got, "ppl_transformers_same_scoring": ref, "same_tokens": same_tokens}


def gguf_add_bos(gguf: Path) -> bool:
    """Whether llama.cpp adds BOS for this GGUF, asked of llama.cpp itself (the GGUF key may be absent, and then
    its default depends on the vocabulary type): a one-token text comes back as two tokens."""
    return len(tokenize(gguf, "a")) == 2
