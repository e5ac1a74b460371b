"""转换（或修复）后的输出在不同上下文长度下的逐领域保真度：同样的内置评估文本、同样多的 token，只改窗口长度。

转换报告缺省用 512 token 的窗口；修复缺省用 256 token 的序列训练。服务时的上下文往往更长，这个脚本量的是
窗口加长后（例如 2048）最差领域还剩多少。打分与报告相同（``patcher.evaluation.metrics.compare``）。

用法：
python scripts/eval_context.py --seq-len 512 --seq-len 2048 --out scripts/results/context-smollm2.json OUT1 OUT2 ...
python scripts/eval_context.py --seq-len 512 --tokens 8192 --split 4 --out OUT.json OUT1 ...   # 全部评估文本 + 4 份样本
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from transformers import AutoModelForCausalLM  # noqa: E402

import patcher  # noqa: E402,F401  (registers the dsopt model classes)
from patcher.data.text import eval_windows, read_domains  # noqa: E402
from patcher.evaluation.metrics import BaseEval, compare, evaluate_base  # noqa: E402
from patcher.model import sources  # noqa: E402


def figures(f: dict) -> dict:
    return {"worst_domain": f["worst_domain"], "worst_ppl_increase_pct": round(f["ppl_increase_pct"], 3),
            "domains": {d: {"ppl_increase_pct": round(v["ppl_increase_pct"], 3),
                            "ppl_increase_ci95_pct": [round(x, 3) for x in v["ppl_increase_ci95_pct"] or []],
                            "kl_mean": round(v["kl_mean"], 4),
                            "top1_agreement": round(v["top1_agreement"], 4)} for d, v in f["domains"].items()}}


def interleaved(ref: BaseEval, k: int, n: int) -> BaseEval:
    """每个领域的第 k、k+n、k+2n…… 个窗口：同一文本的 n 份互不重叠的样本（全集的窗口数是报告缺省的 n 倍时，
    k = 0 就是报告缺省用的那一份）。"""
    idx, spans, at = [], [], 0
    for name, count in ref.spans:
        pick = list(range(at + k, at + count, n))
        idx += pick
        spans.append((name, len(pick)))
        at += count
    return BaseEval(ref.windows[idx], [ref.logprobs[i] for i in idx], [ref.nll[i] for i in idx],
                    [ref.top1[i] for i in idx], spans)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("outputs", nargs="+", help="dsopt 输出目录")
    ap.add_argument("--source", default="smollm2-135m", help="源模型（老师）")
    ap.add_argument("--seq-len", type=int, action="append", required=True, help="窗口长度，可重复")
    ap.add_argument("--tokens", type=int, default=8192, help="每个领域的评估 token 数（各窗口长度相同）")
    ap.add_argument("--split", type=int, default=0,
                    help="另把每个领域的窗口交错分成 N 份、各算一遍（看评估文本少时数字的抽样波动）")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    base, tok, _ = sources.load(args.source)
    base.eval()
    students = {o: AutoModelForCausalLM.from_pretrained(o, dtype=torch.float32).eval() for o in args.outputs}
    domains = read_domains(None, "evaluation")
    result = {"source": args.source, "eval": "builtin evaluation set (five domains)", "tokens_per_domain": args.tokens,
              "command": "python scripts/eval_context.py " + " ".join(f"--seq-len {s}" for s in args.seq_len)
              + f" --tokens {args.tokens}" + (f" --split {args.split}" if args.split else "")
              + " --out OUT.json " + " ".join(args.outputs), "by_seq_len": {}}
    for seq_len in args.seq_len:
        t = time.perf_counter()
        windows, spans = eval_windows(tok, domains, args.tokens, seq_len)
        ref = evaluate_base(base, windows, spans=spans)
        row = {"windows": {d: n for d, n in spans}, "outputs": {}}
        for o, m in students.items():
            row["outputs"][o] = figures(compare(m, ref))
            print(seq_len, o, row["outputs"][o]["worst_domain"], row["outputs"][o]["worst_ppl_increase_pct"], flush=True)
            if args.split:
                row.setdefault("split", {})[o] = [figures(compare(m, interleaved(ref, k, args.split)))
                                                  for k in range(args.split)]
        row["seconds"] = round(time.perf_counter() - t, 1)
        result["by_seq_len"][str(seq_len)] = row
    Path(args.out).write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
