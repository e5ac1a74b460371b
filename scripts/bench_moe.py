"""MoE 基准（SmolLM2-135M）：写出 JSON。

- copy 模式：真实文本上 max|Δlogit|（噪声 0）与总参数/激活参数；
- split 模式（不训练）：激活 FFN 比例（含路由器参数）0.75 / 0.5 / 0.25 下，``--variants`` 中每个
  “划分:分配” 组合的困惑度上升，并排（缺省：共激活聚类 + 敏感度分配、随机划分基线、共激活 + 均匀分配）；
- CPU 上每 token 的时间：split MoE 对稠密模型，批大小 1 与 16，同一次运行中交替测量；既量 64 个 token 的
  整段前向（预填充），也量带 KV 缓存的逐 token 解码（``generate()``，两者都用预打包的 CPU 线性层）。
  ``--timing-only 目录`` 只对一个已转换的 split 检查点量时间（不重新转换）。

校准用《傲慢与偏见》，评估用莎士比亚（../shared/data；没有时用内置文本）。
用法：python scripts/bench_moe.py --out bench-out/moe.json
      python scripts/bench_moe.py --timing-only out/smol-moe50 --out bench-out/moe-timing.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "data"

from patcher import patch_model  # noqa: E402
from patcher.data.text import read_text, token_windows  # noqa: E402
from patcher.model import sources  # noqa: E402
from patcher.runtime.modeling import DsoptPatchedMixin  # noqa: E402
from patcher.runtime.packed_linear import packed_linears  # noqa: E402


def forward_ms_per_token(model, ids: torch.Tensor, repeats: int) -> list[float]:
    out = []
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)  # warm-up
        for _ in range(repeats):
            t = time.perf_counter()
            model(input_ids=ids, use_cache=False)
            out.append(1000 * (time.perf_counter() - t) / ids.numel())
    return out


def decode_ms_per_token(model, ids: torch.Tensor, new_tokens: int) -> float:
    """Greedy ``generate()`` of ``new_tokens`` after the prompts ``ids`` (KV cache, CPU linear layers pre-packed
    for both models alike); ms per generated token, prefill included but small beside the decoding."""
    kwargs = {"attention_mask": torch.ones_like(ids), "max_new_tokens": new_tokens, "min_new_tokens": new_tokens,
              "do_sample": False}
    if isinstance(model, DsoptPatchedMixin):
        kwargs["use_mtp"] = False
    with torch.no_grad(), packed_linears(model):
        t = time.perf_counter()
        model.generate(ids, **kwargs)
        return 1000 * (time.perf_counter() - t) / (new_tokens * ids.shape[0])


def timing(models: dict, ids: torch.Tensor, repeats: int) -> dict:
    """ms per token of every model at batch 1 and 16, interleaved so that all see the same machine noise:
    ``forward`` a full forward of 64-token sequences without cache, ``decode`` 32 new tokens after them."""
    measure = {"forward": lambda m, x: forward_ms_per_token(m, x, 1)[0],  # warms up before it measures
               "decode": lambda m, x: decode_ms_per_token(m, x, 32)}
    res = {}
    for kind, run in measure.items():
        res[kind] = {}
        for batch in (1, 16):
            x = ids[:batch, :64]
            runs = {k: [] for k in models}
            if kind == "decode":
                for m in models.values():  # warm-up; packs the weights once
                    decode_ms_per_token(m, x, 2)
            for _ in range(repeats):
                for k, m in models.items():
                    runs[k].append(run(m, x))
            med = {k: statistics.median(v) for k, v in runs.items()}
            res[kind][str(batch)] = {"ms_per_token": med, "runs": runs,
                                     "ratio_split_vs_dense": {k: med[k] / med["dense"] for k in med if k != "dense"}}
            print(f"{kind} batch {batch}: " + ", ".join(f"{k} {v:.3f} ms/token" for k, v in med.items()), flush=True)
    res["note"] = ("forward: full forward of 64-token sequences, no cache; decode: greedy generate() of 32 tokens "
                   "after 64-token prompts, KV cache, pre-packed CPU linear layers; batch b means b different "
                   "prompts; ms per token, median over repeats")
    return res


def write(out: str, res: dict) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(res, indent=2))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench-out/moe.json")
    ap.add_argument("--calib-data", default=str(SHARED / "pride-and-prejudice.txt") if SHARED.exists() else None)
    ap.add_argument("--eval-data", default=str(SHARED / "tinyshakespeare.txt") if SHARED.exists() else None)
    ap.add_argument("--calib-tokens", type=int, default=8192)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--actives", default="0.75,0.5,0.25")
    ap.add_argument("--variants", default="coactivation:sensitivity,random:sensitivity,coactivation:uniform",
                    help="partition:allocation pairs; the first is the best method")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--timing-only", metavar="DIR", help="only time this converted split checkpoint against the base")
    args = ap.parse_args()
    common = {"calibration": {"data": args.calib_data, "tokens": args.calib_tokens},
              "eval": {"data": args.eval_data, "tokens": args.eval_tokens}}
    res = {"calib_data": args.calib_data or "builtin", "eval_data": args.eval_data or "builtin"}

    base, tok, _ = sources.load("smollm2-135m")
    text = read_text(args.eval_data, "evaluation")
    ids = token_windows(tok, text, 512, 512, None)
    prompts = token_windows(tok, text, 16 * 64, 64, 3)  # 16 different windows: batch rows route differently
    if args.timing_only:
        from transformers import AutoModelForCausalLM

        split = AutoModelForCausalLM.from_pretrained(args.timing_only).eval()
        report = json.loads((Path(args.timing_only) / "fidelity.json").read_text())
        res.update(model=args.timing_only, recipe=report["recipe"].get("moe"),
                   parameters=report["parameters"], time=timing({"dense": base, "split": split}, prompts, args.repeats))
        write(args.out, res)
        print(f"wrote {args.out}")
        return

    model, _, _ = sources.load("smollm2-135m")
    copy_model, rep = patch_model(model, {**common, "moe": {"enabled": True, "mode": "copy", "experts": 8,
                                                            "top_k": 2}}, tok)
    with torch.no_grad():
        diff = float((copy_model(input_ids=ids).logits - base(input_ids=ids).logits).abs().max())
    p = rep["parameters"]["patched_active_per_token"]
    res["copy"] = {"experts": 8, "top_k": 2, "max_abs_logit_diff": diff, "total": p["total"], "active": p["active"],
                   "total_over_active": p["total"] / p["active"], "ppl_increase_pct": rep["fidelity"]["ppl_increase_pct"]}
    print(f"copy: max|Δlogit| {diff:.2e}, total/active {p['total'] / p['active']:.2f}", flush=True)
    del copy_model, model

    res["split"] = {}
    split_models = {}
    variants = [v.split(":") for v in args.variants.split(",")]
    for active in [float(a) for a in args.actives.split(",")]:
        for partition, allocation in variants:
            model, _, _ = sources.load("smollm2-135m")
            t = time.perf_counter()
            patched, rep = patch_model(model, {**common, "moe": {"enabled": True, "mode": "split", "active": active,
                                                                 "partition": partition, "allocation": allocation}},
                                       tok)
            f = rep["fidelity"]
            layers = [l for l in rep["layers"] if not l.get("moe_dense")]
            key = f"{partition}-{allocation}-{active}"
            res["split"][key] = {
                "active_target": active, "partition": partition, "allocation": allocation, "plan": rep["plan"]["moe"],
                "active_ffn_fraction": rep["parameters"]["patched_active_per_token"]["active_ffn_fraction"],
                "active_ffn_fraction_vs_dense": rep["parameters"]["active_ffn_fraction_vs_dense"],
                "routers": rep["plan"]["moe"]["routers"],
                "down_refit_layers": sum(1 for l in layers if l.get("moe_down_refit")),
                "dense_layers": rep["plan"]["moe"]["dense_layers"],
                "ppl_base": f["ppl_base"], "ppl_patched": f["ppl_patched"], "ppl_increase_pct": f["ppl_increase_pct"],
                "kl_mean": f["kl_mean"], "top1_agreement": f["top1_agreement"],
                "router_recall": statistics.mean(l["moe_router_recall"] for l in layers),
                "energy_kept": statistics.mean(l["moe_energy_kept"] for l in layers),
                "energy_kept_oracle": statistics.mean(l["moe_energy_kept_oracle"] for l in layers),
                "balance_max_over_mean": statistics.mean(b["max_over_mean"] for b in rep["moe"]["balance"]),
                "balance_entropy": statistics.mean(b["entropy"] for b in rep["moe"]["balance"]),
                "seconds": time.perf_counter() - t}
            print(f"split {key}: ppl {f['ppl_increase_pct']:+.2f} %  active (vs dense FFN) "
                  f"{res['split'][key]['active_ffn_fraction_vs_dense']:.3f}  dense layers "
                  f"{res['split'][key]['dense_layers']}  routers {res['split'][key]['routers']}  down refit on "
                  f"{res['split'][key]['down_refit_layers']} layers",
                  flush=True)
            if [partition, allocation] == variants[0] and active == 0.5:
                split_models["split-0.5"] = patched
            del model
            write(args.out, res)  # partial results survive an interrupted run

    res["time"] = timing({"dense": base, **split_models}, prompts, args.repeats)
    write(args.out, res)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
