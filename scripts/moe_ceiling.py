"""MoE 切分的上限（SmolLM2-135M，CPU）：写出 JSON。

每个 token 在每层只保留 f 比例的 FFN 神经元，按**精确**的贡献 |act(gate(x))·up(x)|·‖W_down 列‖ 挑选，数值也精确——
这是一个不花任何代价、从不选错的"神谕"路由器，任何真实路由器都达不到。它给出 0.5 激活的切分在不训练时最多能
好到哪里：真实的路由器还要从同一份预算里付自己的参数（dsopt 的 gate 路由器读一半输入维，约占 1/6），并且会选错。
``--threshold`` 另测每层一个阈值、每个 token 个数可变（平均仍为 f）的版本。

用法：python scripts/moe_ceiling.py --out bench-out/moe-ceiling.json --fractions 0.25,0.5,0.67,0.75
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "data"

from patcher.data.text import read_text, token_windows  # noqa: E402
from patcher.evaluation.metrics import compare, evaluate_base  # noqa: E402
from patcher.model import sources  # noqa: E402


def oracle_forward(mlp, share: dict, threshold: bool):
    """A forward for a gated MLP that runs only the neurons the oracle keeps (``share["f"]`` of them)."""
    for part in ("gate_proj", "up_proj", "down_proj", "act_fn"):
        if not hasattr(mlp, part):
            raise SystemExit(f"{type(mlp).__name__} 没有 {part}：这个上限脚本只认 Llama 式门控 MLP")
    column = mlp.down_proj.weight.norm(dim=0)

    def forward(x):
        h = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
        score = h.abs() * column
        if threshold:  # one cut for all tokens of the batch: the kept count varies per token, the mean is f
            flat = score.reshape(-1).float()
            cut = flat.kthvalue(max(1, int((1 - share["f"]) * flat.numel())))[0]
        else:
            cut = score.topk(max(1, int(share["f"] * h.shape[-1])), dim=-1)[0][..., -1:]
        return mlp.down_proj(h * (score >= cut))

    return forward


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench-out/moe-ceiling.json")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--eval-data", default=str(SHARED / "tinyshakespeare.txt") if SHARED.exists() else None)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--fractions", default="0.25,0.5,0.67,0.75")
    ap.add_argument("--threshold", action="store_true", help="也测每层一个阈值（每 token 个数可变）的版本")
    args = ap.parse_args()

    model, tokenizer, _ = sources.load(args.model)
    ids = token_windows(tokenizer, read_text(args.eval_data, "evaluation"), args.eval_tokens, 512, None)
    base = evaluate_base(model, ids)
    share = {"f": 1.0}
    results = {"machine": {"cpus": torch.get_num_threads(), "python": platform.python_version(),
                           "torch": torch.__version__},
               "model": args.model, "eval_data": args.eval_data, "command": " ".join(sys.argv), "oracle": []}
    for threshold in ([False, True] if args.threshold else [False]):
        originals = []
        for layer in model.model.layers:
            originals.append(layer.mlp.forward)
            layer.mlp.forward = oracle_forward(layer.mlp, share, threshold)
        for f in [float(v) for v in args.fractions.split(",")]:
            share["f"] = f
            r = compare(model, base)
            results["oracle"].append({"neuron_fraction": f, "per_token_count": "variable" if threshold else "fixed",
                                      **r})
            print(f"f={f:.2f} {'threshold' if threshold else 'top-k'}: ppl {r['ppl_increase_pct']:+.2f} %  "
                  f"KL {r['kl_mean']:.4f}", flush=True)
        for layer, fwd in zip(model.model.layers, originals):
            layer.mlp.forward = fwd
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"写出 {out}")


if __name__ == "__main__":
    main()
