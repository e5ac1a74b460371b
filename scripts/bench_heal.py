"""修复基准（SmolLM2-135M，CPU）：写出 JSON。

三种转换——(a) MLA 保留 60 % KV，(b) MoE 切分 50 % 激活，(c) 两者——各做一次转换，再用 ``dsopt heal``
（老师 = 源模型，KL 蒸馏，只训练转换改动过的模块）训练给定的 token 数。训练用一本书（《傲慢与偏见》），评估用
另一本（莎士比亚）。记录每种情况修复前后的困惑度上升、KL、top-1 与预算（token、步数、秒）。

用法：python scripts/bench_heal.py --out bench-out/heal.json --cases mla,moe,both --tokens 65536
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
from patcher.jobs import heal_checkpoint  # noqa: E402
from patcher.training.heal import HealOptions  # noqa: E402

CASES = {
    "mla": {"mla": {"enabled": True, "kv_keep": 0.6}},
    "moe": {"moe": {"enabled": True, "mode": "split", "active": 0.5}},
    "both": {"mla": {"enabled": True, "kv_keep": 0.6}, "moe": {"enabled": True, "mode": "split", "active": 0.5}},
}


def reuse(folder: Path, recipe: dict, out: Path) -> dict:
    """A copy of an already converted checkpoint of this case (its report's recipe must agree), and its report."""
    import shutil

    from patcher.evaluation.report import read_report

    rep = read_report(folder)
    for part, want in recipe.items():
        got = rep["recipe"].get(part, {})
        if part in ("mla", "moe", "calibration", "eval") and any(got.get(k) != v for k, v in want.items()):
            raise SystemExit(f"{folder} 的配方与这种情况不一致（{part}: {got} ≠ {want}）")
    shutil.copytree(folder, out)
    return rep


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench-out/heal.json")
    ap.add_argument("--cases", default="mla,moe,both")
    ap.add_argument("--data", default=str(SHARED / "pride-and-prejudice.txt") if SHARED.exists() else None)
    ap.add_argument("--eval-data", default=str(SHARED / "tinyshakespeare.txt") if SHARED.exists() else None)
    ap.add_argument("--calib-tokens", type=int, default=16384)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--tokens", type=int, default=65536, help="每种情况的修复 token 数")
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--max-minutes", type=float, default=0.0, help="每种情况的训练时间上限（分钟，0 不限）")
    ap.add_argument("--moe-allocation", default="sensitivity", help="MoE 切分的逐层分配（sensitivity 或 uniform）")
    ap.add_argument("--precision", default="auto", help="训练前向精度：auto、bf16 或 fp32")
    ap.add_argument("--val-every", type=int, default=25, help="每隔多少步在留出窗口上量一次 KL（保留最好的权重）")
    ap.add_argument("--generate-tokens", type=int, default=0, help="老师自己续写、加入训练的 token 数（计入时间预算）")
    ap.add_argument("--generate-temperature", type=float, default=1.0, help="老师续写的采样温度")
    field = HealOptions.model_fields
    ap.add_argument("--local-steps", type=int, default=field["local_steps"].default,
                    help="KL 之前逐层重建 MoE MLP 的步数（每层，0 不做）")
    ap.add_argument("--local-tokens", type=int, default=field["local_tokens"].default, help="逐层重建用的 token 数")
    ap.add_argument("--local-lr", type=float, default=field["local_lr"].default, help="逐层重建的学习率")
    ap.add_argument("--converted", default=None,
                    help="修复这个已转换目录的副本，不再转换（只有一种情况时可用；配方须与该情况一致）")
    args = ap.parse_args()
    torch.manual_seed(0)
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    results = {"machine": {"cpus": torch.get_num_threads(), "python": platform.python_version(),
                           "torch": torch.__version__},
               "model": "smollm2-135m", "train_data": args.data or "builtin", "eval_data": args.eval_data or "builtin",
               "command": " ".join(sys.argv), "cases": {}}
    opts = HealOptions(data=args.data, tokens=args.tokens, lr=args.lr, seq_len=args.seq_len,
                       batch_size=args.batch, top_k=args.top_k, val_every=args.val_every,
                       max_minutes=args.max_minutes, precision=args.precision,
                       generate_tokens=args.generate_tokens, generate_temperature=args.generate_temperature,
                       local_steps=args.local_steps, local_tokens=args.local_tokens, local_lr=args.local_lr)
    if args.converted and "," in args.cases:
        raise SystemExit("--converted 只能配一种情况（--cases mla|moe|both）")
    for name in args.cases.split(","):
        case = {k: ({**v, "allocation": args.moe_allocation} if k == "moe" else v) for k, v in CASES[name].items()}
        recipe = {**case, "calibration": {"data": args.data, "tokens": args.calib_tokens},
                  "eval": {"data": args.eval_data, "tokens": args.eval_tokens}}
        with tempfile.TemporaryDirectory() as tmp:
            if args.converted:  # the conversion ran before: its report has the time it took
                rep = reuse(Path(args.converted), recipe, Path(tmp) / "out")
                convert_s = rep.get("resources", {}).get("conversion_seconds")
            else:
                t = time.perf_counter()
                rep = convert("smollm2-135m", recipe, Path(tmp) / "out")
                convert_s = time.perf_counter() - t
            rec = heal_checkpoint(Path(tmp) / "out", opts)
        b, a = rec["before"], rec["after"]
        results["cases"][name] = {
            "recipe": {k: v for k, v in recipe.items() if k in ("mla", "moe")},
            "kv_ratio": rep["kv_cache"]["ratio"],
            "ffn_active_fraction": rep["parameters"]["patched_active_per_token"].get("active_ffn_fraction"),
            "ppl_base": a["ppl_base"], "converted": b, "healed": a,
            "budget": {"tokens": rec["tokens"], "steps": rec["steps"], "planned_steps": rec["planned_steps"],
                       "epochs": rec["epochs"], "seconds": rec["seconds"], "max_minutes": args.max_minutes,
                       "trainable_parameters": rec["trainable_parameters"], "teacher_logits": rec["teacher_logits"],
                       "precision": rec["precision"], "generated": rec["generated"], "local": rec["local"]},
            "loss_curve": rec["loss_curve"], "validation": rec["validation"], "lr": args.lr,
            "convert_seconds": convert_s}
        print(f"{name}: ppl {b['ppl_increase_pct']:+.2f} % → {a['ppl_increase_pct']:+.2f} %  KL {b['kl_mean']:.4f} → "
              f"{a['kl_mean']:.4f}  ({rec['tokens']} tokens, {rec['seconds']:.0f} s)", flush=True)
        out_path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"写出 {out_path}")


if __name__ == "__main__":
    main()
