"""DeepSeek-V3 导出基准（SmolLM2-135M）：写出 JSON。

每种 RoPE 频率选择方法（calibrated / high / low）各转换一次并导出为原生 DeepSeek-V3 格式，免训练、
保留 60 % KV 缓存；旁边是 [1/6] 的潜在模式（RoPE 在上投影之后，dsopt 格式）。每个变体记录：

- 困惑度上升、KL、top-1（dsopt 自己的前向，与标准模型逐 logit 比较的最大差也记下）；
- 每 token KV 字节：从 **标准 transformers 模型** 的缓存对象实测（潜在模式从 dsopt 模型的缓存实测）；
- 选中的频率、每层共享旋转键的能量、转换耗时。

用法：python scripts/bench_deepseek_export.py --out bench-out/deepseek-export.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "data"

from patcher import convert  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench-out/deepseek-export.json")
    ap.add_argument("--calib-data", default=str(SHARED / "pride-and-prejudice.txt") if SHARED.exists() else None)
    ap.add_argument("--eval-data", default=str(SHARED / "tinyshakespeare.txt") if SHARED.exists() else None)
    ap.add_argument("--calib-tokens", type=int, default=16384)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--kv-keep", type=float, default=0.6)
    ap.add_argument("--variants", default="latent,calibrated:32,low:32,calibrated:64,high:32",
                    help="逗号分隔：latent（[1/6] 潜在模式）或 RoPE 方法:旋转维数（rope_dim = 64 即全部频率，无需选择）")
    args = ap.parse_args()
    torch.manual_seed(0)
    common = {"calibration": {"data": args.calib_data, "tokens": args.calib_tokens},
              "eval": {"data": args.eval_data, "tokens": args.eval_tokens}}
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    results = {"machine": {"cpus": torch.get_num_threads(), "python": platform.python_version(),
                           "torch": torch.__version__},
               "model": "smollm2-135m", "kv_keep": args.kv_keep,
               "calib_data": args.calib_data or "builtin", "eval_data": args.eval_data or "builtin",
               "command": " ".join(sys.argv), "variants": {}}
    for name in args.variants.split(","):
        if name == "latent":
            recipe = {**common, "mla": {"enabled": True, "kv_keep": args.kv_keep, "allocation": "uniform"}}
        else:
            method, dim = name.split(":")
            recipe = {**common, "mla": {"enabled": True, "kv_keep": args.kv_keep, "rope_dim": int(dim),
                                        "rope_method": method}, "output": {"format": "deepseek-v3"}}
        t = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            rep = convert("smollm2-135m", recipe, Path(tmp) / "out")
        f, ex = rep["fidelity"], rep.get("export") or {}
        row = {"ppl_base": f["ppl_base"], "ppl_patched": f["ppl_patched"], "ppl_increase_pct": f["ppl_increase_pct"],
               "kl_mean": f["kl_mean"], "top1_agreement": f["top1_agreement"],
               "kv_bytes_per_token_base": rep["kv_cache"]["base"]["kv_bytes_per_token"],
               "kv_bytes_per_token": (ex["stock_kv_cache"] if ex else rep["kv_cache"]["patched"])["kv_bytes_per_token"],
               "kv_measured_on": "stock DeepseekV3ForCausalLM cache" if ex else "dsopt model cache",
               "plan": rep["plan"]["mla"], "seconds": time.perf_counter() - t}
        row["kv_ratio"] = row["kv_bytes_per_token"] / row["kv_bytes_per_token_base"]
        if ex:
            row.update(export_max_abs_logit_diff=ex["max_abs_logit_diff_vs_dsopt"],
                       export_top1_agreement=ex["top1_agreement_vs_dsopt"], rope_parameters=ex["rope_parameters"],
                       shared_key_energy=[l["rope_shared_key_energy"] for l in rep["layers"]],
                       k_rel_error=[l["k_rel_error"] for l in rep["layers"]],
                       v_rel_error=[l["v_rel_error"] for l in rep["layers"]])
        results["variants"][name] = row
        print(f"{name}: ppl {f['ppl_increase_pct']:+.2f} %  KL {f['kl_mean']:.4f}  top1 {f['top1_agreement']:.3f}  "
              f"kv {row['kv_ratio']:.3f}  pairs {row['plan'].get('rope_pairs')}", flush=True)
        out_path.write_text(json.dumps(results, indent=2) + "\n")  # after every variant: partial runs keep data
    print(f"写出 {out_path}")


if __name__ == "__main__":
    main()
