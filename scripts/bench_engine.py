"""在 llama.cpp 中实测（SmolLM2-135M）：基座、MLA 导出、MLA+MoE 导出在同一次运行里并排比较。

每个模型：llama.cpp 自己分配的 KV 缓存字节/token、解码速度（上下文深度 0、2048、8192）、提示处理速度、
llama-perplexity 的困惑度（内置评估文本的各领域拼接，n_ctx 512），以及 transformers 里按同样打分算出的困惑度。
全部 f32 GGUF、同样的线程数。结果写 JSON。

用法：python scripts/bench_engine.py --out scripts/results/engine-smollm2.json [--depths 0,2048,8192] [--quick]
导出目录可以复用：--mla DIR、--moe DIR（已由 dsopt convert --format deepseek-v3 写好的导出）；
--export NAME=DIR 可重复，再并排测别的导出（例如不同专家粒度）。
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import llamacpp  # noqa: E402

from patcher import jobs  # noqa: E402
from patcher.data.text import builtin_text  # noqa: E402
from patcher.model import sources  # noqa: E402

SMALL = {"calibration": {"tokens": 4096}, "eval": {"tokens": 512}}
RECIPES = {
    "mla": {"mla": {"enabled": True, "kv_keep": 0.6, "rope": "decoupled"}, "output": {"format": "deepseek-v3"}},
    "mla_moe": {"mla": {"enabled": True, "kv_keep": 0.6, "rope": "decoupled"},
                "moe": {"enabled": True, "mode": "split", "active": 0.5, "router": "linear", "allocation": "uniform",
                        "experts": 48},
                "output": {"format": "deepseek-v3"}},
}


def eval_text(folder: Path) -> Path:
    """The built-in evaluation domains, one after the other (never the calibration text)."""
    path = folder / "eval.txt"
    path.write_text(builtin_text("evaluation"), encoding="utf-8")
    return path


def base_folder(folder: Path) -> Path:
    model, tok, _ = sources.load("smollm2-135m")
    out = folder / "base-hf"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def measure(name: str, hf_dir: Path, gguf: Path, text: Path, depths: list[int], chunks: int, threads: int,
            stock_loader) -> dict:
    t = time.perf_counter()
    llamacpp.convert(hf_dir, gguf)
    ppl = llamacpp.perplexity_both(gguf, hf_dir, text, stock_loader(hf_dir), 512, chunks, threads)
    rows = llamacpp.bench(gguf, depths, threads)
    speed = {}
    for r in rows:
        kind = "prompt" if r["n_prompt"] and not r["n_gen"] else "decode"
        speed[f"{kind}_tok_s_depth_{r['n_depth']}"] = r["avg_ts"]
    ref = ppl["ppl_transformers_same_scoring"]
    return {"model": name, "gguf_bytes": gguf.stat().st_size, "kv_bytes_per_token": ppl["kv_bytes_per_token"],
            "ppl_llamacpp": ppl["ppl"], "ppl_transformers_same_scoring": ref, "same_tokens": ppl["same_tokens"],
            "ppl_engine_vs_transformers": ppl["ppl"] / ref - 1, **speed, "seconds": time.perf_counter() - t}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="scripts/results/engine-smollm2.json")
    ap.add_argument("--depths", default="0,2048,8192")
    ap.add_argument("--chunks", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--mla", default=None, help="已有的 MLA 导出目录")
    ap.add_argument("--moe", default=None, help="已有的 MLA+MoE 导出目录")
    ap.add_argument("--only", default="base,mla,mla_moe", help="测哪些模型（逗号分隔）")
    ap.add_argument("--export", action="append", default=[], metavar="NAME=DIR",
                    help="再测一个已有的 DeepSeek-V3 导出（可重复；例如不同专家粒度的 MoE）")
    args = ap.parse_args()
    depths = [int(d) for d in args.depths.split(",")]
    llamacpp.build()
    from transformers import AutoModelForCausalLM

    from patcher.formats.deepseek_v3 import load_stock

    def plain(d):
        return AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()

    results = {"device": "CPU", "threads": args.threads, "torch_threads": torch.get_num_threads(),
               "gguf_type": "f32", "kv_cache_type": "f16 (llama.cpp default)", "models": []}
    with tempfile.TemporaryDirectory(prefix="dsopt-engine-") as tmp:
        tmp = Path(tmp)
        text = eval_text(tmp)
        folders = {"base": (base_folder(tmp), plain)}
        for name, given in (("mla", args.mla), ("mla_moe", args.moe)):
            if name not in args.only.split(","):
                continue
            if given:
                folders[name] = (Path(given), load_stock)
                continue
            out = tmp / name
            report = jobs.convert("smollm2-135m", {**RECIPES[name], **SMALL}, out)
            results[f"{name}_report"] = {"worst_domain": report["fidelity"]["worst_domain"],
                                         "ppl_increase_pct": report["fidelity"]["ppl_increase_pct"]}
            folders[name] = (out, load_stock)
        for item in args.export:
            name, _, given = item.partition("=")
            folders[name] = (Path(given), load_stock)
        for name, (folder, loader) in folders.items():
            row = measure(name, folder, tmp / f"{name}.gguf", text, depths, args.chunks, args.threads, loader)
            results["models"].append(row)
            print(json.dumps(row), flush=True)
            (tmp / f"{name}.gguf").unlink()
    base = results["models"][0]
    for row in results["models"][1:]:
        row["kv_ratio_vs_base"] = row["kv_bytes_per_token"] / base["kv_bytes_per_token"]
        row["ppl_increase_vs_base_llamacpp_pct"] = 100 * (row["ppl_llamacpp"] / base["ppl_llamacpp"] - 1)
        for k in [k for k in row if k.endswith("_tok_s_depth_0") or "_tok_s_depth_" in k]:
            if k in base:
                row[f"{k}_vs_base"] = row[k] / base[k]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
