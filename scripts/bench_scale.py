"""大模型流式转换的内存与时间：7B 形状（及 Llama-3-8B 形状）的随机权重 bf16 检查点，``--mla --moe --mtp 1``。

    python scripts/bench_scale.py --shape llama-7b --shape llama-3-8b --work /path/with/40GB

每个形状：先用 scripts/make_synthetic_checkpoint.py 写出检查点（已存在则复用），再在子进程里跑
``dsopt convert``（与用户的命令相同），记录子进程的峰值常驻内存（getrusage RUSAGE_CHILDREN）、墙钟时间、
报告里的逐层时间与各阶段时间/内存。结果写到 scripts/results/scale-<形状>.json。
随机权重的困惑度没有意义（会在 JSON 里注明），这里量的是内存与时间。
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "scripts" / "results"

DEFAULT_FLAGS = ["--mla", "--moe", "--mtp", "1", "--calib-tokens", "1024", "--calib-seq-len", "512",
                 "--eval-tokens", "1024", "--eval-seq-len", "512", "--streaming", "on"]


def run_shape(shape: str, work: Path, flags: list[str], keep_output: bool, layers: int | None = None) -> dict:
    src = work / (f"synthetic-{shape}" + (f"-{layers}l" if layers else ""))
    if not (src / "model.safetensors.index.json").exists():
        shutil.rmtree(src, ignore_errors=True)
        subprocess.run([sys.executable, str(ROOT / "scripts" / "make_synthetic_checkpoint.py"), "--shape", shape,
                        "--dtype", "bfloat16", str(src), *(["--layers", str(layers)] if layers else [])], check=True)
    out = work / f"{src.name}-dsopt"
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(work / f".{out.name}.partial", ignore_errors=True)
    cmd = [sys.executable, "-c", "from patcher.cli import main; main()", "convert", str(src), "-o", str(out), *flags]
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak, not that of the checkpoint maker before it
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t
    if proc.returncode:
        raise SystemExit(f"dsopt convert failed with exit code {proc.returncode}")
    peak_kib = usage.ru_maxrss
    report = json.loads((out / "fidelity.json").read_text())
    r = report["resources"]
    per_layer = r["layer_seconds"]
    out_bytes = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    result = {
        "shape": shape, "layers": layers or "all", "command": "dsopt convert SRC -o OUT " + " ".join(flags),
        "source_weight_bytes": report["streaming"]["source_weight_bytes"], "output_weight_bytes": out_bytes,
        "peak_rss_gib": peak_kib / 2 ** 20, "peak_rss_gib_reported": r["peak_rss_mib"] / 1024,
        "wall_seconds": wall, "conversion_seconds": r["conversion_seconds"],
        "seconds_per_layer": {"mean": statistics.mean(per_layer), "min": min(per_layer), "max": max(per_layer),
                              "all": per_layer},
        "stage_seconds": r["stage_seconds"], "rss_mib_after_stage": r["rss_mib_after_stage"],
        "layer_rss_mib": r["layer_rss_mib"],
        "kv_cache_ratio": report["kv_cache"]["ratio"], "kv_bytes_per_token": report["kv_cache"],
        "parameters": report["parameters"], "plan": report["plan"], "streaming": report["streaming"],
        "fidelity_random_weights": report["fidelity"],
        "note": "random weights: perplexity figures only show the pipeline runs end to end, not quality",
        "machine": {"cpus": os.cpu_count(), "mem_total_gib": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30},
    }
    if not keep_output:
        shutil.rmtree(out, ignore_errors=True)
    return result


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", action="append", choices=["llama-7b", "llama-3-8b"])
    ap.add_argument("--work", type=Path, default=ROOT.parent / "scale-work")
    ap.add_argument("--keep-output", action="store_true")
    ap.add_argument("--layers", type=int, default=None, help="只用前 N 层（层外张量与每层大小不变：测内存峰值更快）")
    ap.add_argument("flags", nargs="*", help="覆盖 dsopt convert 的参数（缺省：" + " ".join(DEFAULT_FLAGS) + "）")
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    for shape in args.shape or ["llama-7b", "llama-3-8b"]:
        res = run_shape(shape, args.work, args.flags or DEFAULT_FLAGS, args.keep_output, args.layers)
        path = RESULTS / (f"scale-{shape}" + (f"-{args.layers}layers" if args.layers else "") + ".json")
        path.write_text(json.dumps(res, indent=2, ensure_ascii=False) + "\n")
        print(f"{shape}: peak RSS {res['peak_rss_gib']:.2f} GiB, {res['seconds_per_layer']['mean']:.1f} s/layer, "
              f"{res['wall_seconds'] / 60:.1f} min → {path}")


if __name__ == "__main__":
    main()
