"""在**校准侧**留出的领域上挑缺省值（不碰评估文本）：用三个校准领域校准，在另外两个校准领域的文件上评判。

这样选出的缺省值，之后在内置评估文本（来源与校准不相交）上报告，选择与报告用的是不同的文本。
每个候选一行 JSON（JSONL）。用法：
python scripts/tune_heldout.py --out scripts/results/tune-heldout-smollm2.jsonl --variant calib-16k --variant calib-64k
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from patcher import patch_model  # noqa: E402
from patcher.model import sources  # noqa: E402

CAL = ROOT / "patcher" / "data" / "calibration"
FIT, JUDGE = ("narrative", "encyclopedic", "technical"), ("code", "chat")
VARIANTS = {
    "calib-16k": {"mla": {"enabled": True, "kv_keep": 0.6}, "calibration": {"tokens": 16384}},
    "calib-64k": {"mla": {"enabled": True, "kv_keep": 0.6}, "calibration": {"tokens": 65536}},
    "objective-balanced": {"mla": {"enabled": True, "kv_keep": 0.6, "objective": "balanced"}},
    "allocation-uniform": {"mla": {"enabled": True, "kv_keep": 0.6, "allocation": "uniform"}},
    "allocation-log": {"mla": {"enabled": True, "kv_keep": 0.6, "allocation": "log"}},
    "allocation-energy": {"mla": {"enabled": True, "kv_keep": 0.6, "allocation": "energy"}},
    "objective-attention-cov": {"mla": {"enabled": True, "kv_keep": 0.6, "objective": "attention_cov"}},
    "k-weight-2": {"mla": {"enabled": True, "kv_keep": 0.6, "k_weight": 2.0}},
    "k-weight-0.5": {"mla": {"enabled": True, "kv_keep": 0.6, "k_weight": 0.5}},
    "cov-k-weight-2": {"mla": {"enabled": True, "kv_keep": 0.6, "objective": "attention_cov", "k_weight": 2.0}},
    "cov-k-weight-0.5": {"mla": {"enabled": True, "kv_keep": 0.6, "objective": "attention_cov", "k_weight": 0.5}},
    "cov-k-weight-4": {"mla": {"enabled": True, "kv_keep": 0.6, "objective": "attention_cov", "k_weight": 4.0}},
    # decoupled RoPE (the DeepSeek-V3 form): how the key parts that lose their rotation enter the no-position part
    "decoupled-residual-choose": {"mla": {"enabled": True, "kv_keep": 0.6, "rope": "decoupled", "rope_residual": "choose"}},
    "decoupled-residual-fitted": {"mla": {"enabled": True, "kv_keep": 0.6, "rope": "decoupled", "rope_residual": "fitted"}},
    # the rotary split alone (latent at full width, 384 for SmolLM2's K+V): what the residual treatment is worth
    "decoupled-full-latent-choose": {"mla": {"enabled": True, "kv_lora_rank": 384, "rope": "decoupled",
                                             "rope_residual": "choose"}},
    "decoupled-full-latent-fitted": {"mla": {"enabled": True, "kv_lora_rank": 384, "rope": "decoupled",
                                             "rope_residual": "fitted"}},
    # the same 0.6 budget (230 numbers per token) split differently between the shared rotary key and the latent
    "decoupled-rope-48": {"mla": {"enabled": True, "kv_keep": 0.6, "rope": "decoupled", "rope_dim": 48}},
    "decoupled-rope-32": {"mla": {"enabled": True, "kv_keep": 0.6, "rope": "decoupled", "rope_dim": 32}},
    "decoupled-rope-16": {"mla": {"enabled": True, "kv_keep": 0.6, "rope": "decoupled", "rope_dim": 16}},
    # calibration tokens weighted by the attention they receive as keys and values (first: the latent form).
    # Rows measured before session 34 weighted each window's first token (the attention sink) by its attention
    # too; since then it counts as an average token, and those rows carry the suffix "-sink-as-average"
    "token-weighting-uniform": {"mla": {"enabled": True, "kv_keep": 0.6, "token_weighting": "uniform"}},
    "decoupled-token-weighting-uniform": {"mla": {"enabled": True, "kv_keep": 0.6, "rope": "decoupled",
                                                  "token_weighting": "uniform"}},
    "token-weighting-attention": {"mla": {"enabled": True, "kv_keep": 0.6, "token_weighting": "attention"}},
    "decoupled-token-weighting-attention": {"mla": {"enabled": True, "kv_keep": 0.6, "rope": "decoupled",
                                                    "token_weighting": "attention"}},
    "token-weighting-mixed": {"mla": {"enabled": True, "kv_keep": 0.6, "token_weighting": "mixed"}},
    # the results file has two rows of this recipe: before the shared rotary key's PCA also weighed keys by the
    # attention they receive, and after (that row is named "decoupled-token-weighting-mixed-shared-key")
    "decoupled-token-weighting-mixed": {"mla": {"enabled": True, "kv_keep": 0.6, "rope": "decoupled",
                                                "token_weighting": "mixed"}},
    # the latent cannot hold V and the unrotated K in full at 0.6: how to weigh K's error against V's there
    "decoupled-k-weight-1": {"mla": {"enabled": True, "kv_keep": 0.6, "rope": "decoupled", "k_weight": 1.0}},
    "decoupled-k-weight-4": {"mla": {"enabled": True, "kv_keep": 0.6, "rope": "decoupled", "k_weight": 4.0}},
    # MoE split: layer allocation and the shared part, judged on domains the split and routers were not fitted on
    "moe-0.75": {"moe": {"enabled": True, "mode": "split", "active": 0.75}},
    "moe-0.75-allocation-uniform": {"moe": {"enabled": True, "mode": "split", "active": 0.75, "allocation": "uniform"}},
    "moe-0.75-lowrank": {"moe": {"enabled": True, "mode": "split", "active": 0.75, "router": "lowrank"}},
    "moe-0.75-no-refit": {"moe": {"enabled": True, "mode": "split", "active": 0.75, "refit_down": False}},
    # at half the FFN active: allocation, router kind and expert granularity (neurons per expert)
    "moe-0.5": {"moe": {"enabled": True, "mode": "split", "active": 0.5}},
    "moe-0.5-allocation-uniform": {"moe": {"enabled": True, "mode": "split", "active": 0.5, "allocation": "uniform"}},
    "moe-0.5-lowrank": {"moe": {"enabled": True, "mode": "split", "active": 0.5, "router": "lowrank"}},
    "moe-0.5-width-8": {"moe": {"enabled": True, "mode": "split", "active": 0.5, "expert_width": 8}},
    "moe-0.5-no-refit": {"moe": {"enabled": True, "mode": "split", "active": 0.5, "refit_down": False}},
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="scripts/results/tune-heldout-smollm2.jsonl")
    ap.add_argument("--variant", action="append", choices=sorted(VARIANTS), required=True)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        fit, judge = Path(tmp) / "fit", Path(tmp) / "judge"
        for folder, names in ((fit, FIT), (judge, JUDGE)):
            folder.mkdir()
            for n in names:
                (folder / f"{n}.txt").write_text((CAL / f"{n}.txt").read_text(encoding="utf-8"), encoding="utf-8")
        for name in args.variant:
            recipe = json.loads(json.dumps(VARIANTS[name]))
            recipe.setdefault("calibration", {})["data"] = str(fit)
            recipe["eval"] = {"data": str(judge)}
            model, tok, _ = sources.load("smollm2-135m")
            t = time.perf_counter()
            _, rep = patch_model(model, recipe, tok)
            f = rep["fidelity"]
            row = {"variant": name, "recipe": VARIANTS[name], "fit_domains": FIT, "judged_on": JUDGE,
                   "worst_domain": f["worst_domain"], "worst_ppl_increase_pct": f["ppl_increase_pct"],
                   "domains": {d: v["ppl_increase_pct"] for d, v in f["domains"].items()},
                   "seconds": time.perf_counter() - t, "stage_seconds": rep["resources"].get("stage_seconds")}
            with open(args.out, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(row) + "\n")
            print(name, f"worst {f['worst_domain']} {f['ppl_increase_pct']:+.2f} %", row["domains"], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
