"""MLA 基准（SmolLM2-135M）：写出 JSON。

- 困惑度上升、KL、top-1：plain/whitened × uniform/global（kv_keep 0.6）并排，加上 kv_keep 0.5；
- 每 token KV 字节：从真实 generate() 之后的缓存对象量出；
- 解码速度：同一次运行中交替测基座与补丁模型，上下文 256 与 2048；2048 时缓存的内存；
- 转换耗时与峰值常驻内存：在子进程中跑一次 `dsopt convert`（单独进程才量得准）。

校准用一本书，评估用另一本（缺省为 ../shared/data 的《傲慢与偏见》与莎士比亚；没有该目录时用内置文本）。

用法：python scripts/bench_mla.py --out bench-out/mla.json [--quick]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "data"

from patcher import patch_model  # noqa: E402
from patcher.data.text import read_text, token_windows  # noqa: E402
from patcher.model import sources  # noqa: E402


def decode_rate(model, prompt: torch.Tensor, new_tokens: int) -> tuple[float, int]:
    """Decode tokens/s (prefill excluded: time(N+1 tokens) − time(1 token)) and cache bytes at the end."""
    with torch.no_grad():
        t = time.perf_counter()
        model.generate(prompt, max_new_tokens=1, min_new_tokens=1, do_sample=False, pad_token_id=0)
        t1 = time.perf_counter() - t
        t = time.perf_counter()
        out = model.generate(prompt, max_new_tokens=new_tokens + 1, min_new_tokens=new_tokens + 1, do_sample=False,
                             pad_token_id=0, return_dict_in_generate=True)
        tn = time.perf_counter() - t
    cache = out.cache
    nbytes = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    return new_tokens / max(tn - t1, 1e-9), nbytes


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench-out/mla.json")
    ap.add_argument("--calib-data", default=str(SHARED / "pride-and-prejudice.txt") if SHARED.exists() else None)
    ap.add_argument("--eval-data", default=str(SHARED / "tinyshakespeare.txt") if SHARED.exists() else None)
    ap.add_argument("--calib-tokens", type=int, default=16384)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="只跑最佳方法与 0.5，少量 token（冒烟）")
    args = ap.parse_args()
    torch.manual_seed(0)

    common = {"calibration": {"data": args.calib_data, "tokens": args.calib_tokens},
              "eval": {"data": args.eval_data, "tokens": args.eval_tokens}}
    variants = [  # the SVD-LLM-style baselines (objective kv), then dsopt's defaults (objective attention)
        ("plain-uniform-0.6", {"kv_keep": 0.6, "init": "plain", "allocation": "uniform", "objective": "kv"}),
        ("whitened-uniform-0.6", {"kv_keep": 0.6, "init": "whitened", "allocation": "uniform", "objective": "kv"}),
        ("plain-allocated-0.6", {"kv_keep": 0.6, "init": "plain", "allocation": "sensitivity", "objective": "kv"}),
        ("whitened-allocated-0.6", {"kv_keep": 0.6, "init": "whitened", "allocation": "sensitivity",
                                    "objective": "kv"}),
        ("attention-uniform-0.6", {"kv_keep": 0.6, "allocation": "uniform"}),
        ("attention-uniform-0.5", {"kv_keep": 0.5, "allocation": "uniform"}),
        ("best-0.6", {"kv_keep": 0.6}),
        ("best-0.5", {"kv_keep": 0.5}),
    ]
    if args.quick:
        variants = variants[-2:]
    results = {"machine": {"cpus": torch.get_num_threads(), "python": platform.python_version(),
                           "torch": torch.__version__},
               "calib_data": args.calib_data or "builtin", "eval_data": args.eval_data or "builtin",
               "variants": {}}
    models = {}
    for name, mla in variants:
        model, tok, _ = sources.load("smollm2-135m")
        t = time.perf_counter()
        patched, rep = patch_model(model, {**common, "mla": {"enabled": True, **mla}}, tok)
        f, kv = rep["fidelity"], rep["kv_cache"]
        results["variants"][name] = {
            "mla": rep["recipe"]["mla"], "ppl_base": f["ppl_base"], "ppl_patched": f["ppl_patched"],
            "ppl_increase_pct": f["ppl_increase_pct"], "kl_mean": f["kl_mean"], "top1_agreement": f["top1_agreement"],
            "kv_bytes_per_token_base": kv["base"]["kv_bytes_per_token"],
            "kv_bytes_per_token_patched": kv["patched"]["kv_bytes_per_token"], "kv_ratio": kv["ratio"],
            "ranks": [l["rank"] for l in rep["layers"]], "seconds": time.perf_counter() - t}
        print(f"{name}: ppl {f['ppl_increase_pct']:+.2f} %  KL {f['kl_mean']:.4f}  top1 {f['top1_agreement']:.3f}  "
              f"kv {kv['ratio']:.3f}", flush=True)
        if name.startswith("best-0.6"):
            models["patched"] = patched
        del model
    base, tok, _ = sources.load("smollm2-135m")
    models["base"] = base

    text = read_text(args.eval_data, "evaluation")
    decode = {}
    for ctx in (256, 2048):
        prompt = token_windows(tok, text, ctx, ctx, None)[:1]
        rates = {k: [] for k in models}
        nbytes = {}
        for _ in range(args.repeats):  # interleaved so both see the same machine noise
            for k, m in models.items():
                r, nbytes[k] = decode_rate(m, prompt, args.decode_tokens)
                rates[k].append(r)
        med = {k: statistics.median(v) for k, v in rates.items()}
        decode[str(ctx)] = {"tokens_per_s": med, "all_runs": rates, "speed_ratio_patched_vs_base":
                            med["patched"] / med["base"], "cache_bytes": nbytes,
                            "cache_ratio": nbytes["patched"] / nbytes["base"]}
        print(f"ctx {ctx}: base {med['base']:.1f} tok/s, patched {med['patched']:.1f} tok/s, cache "
              f"{nbytes['base'] / 2**20:.1f} → {nbytes['patched'] / 2**20:.1f} MiB", flush=True)
    results["decode"] = decode
    results["decode"]["note"] = "greedy, batch 1, prefill excluded; cache bytes from the cache object after generate()"

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "conv"
        cmd = [sys.executable, "-m", "patcher.cli", "convert", "smollm2-135m", "--recipe", "mla-kv40", "-o", str(out),
               "--calib-tokens", str(args.calib_tokens)]
        if args.calib_data:
            cmd += ["--calib-data", args.calib_data]
        if args.eval_data:
            cmd += ["--eval-data", args.eval_data]
        t = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True)
        wall = time.perf_counter() - t
        r = json.loads((out / "fidelity.json").read_text())["resources"]
    results["conversion"] = {"command": " ".join(cmd[1:]), "process_wall_seconds": wall, **r}
    print(f"convert: {wall:.1f} s wall (pipeline {r['conversion_seconds']:.1f} s), peak RSS {r['peak_rss_mib']:.0f} MiB")

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
