"""MTP 解码设置扫描（SmolLM2 + 已训练的 MTP 模块，CPU）：写出 JSON。

在 ``bench_mtp.py`` 的同一组提示（另一本书的窗口与对话提示）上，逐提示交替运行每种设置：
每步最多查找多少个 token（``mtp_lookup``，0 即只用 MTP 模块）、匹配的最长 n-gram、草稿树形状（``mtp_branches``：
各模块在上一级每个草稿后给出的候选数，如 4/2；1 即单链）。记录每步产出的 token 数（全部 / 书 / 对话，以及
``bench_mtp.py`` 用的逐提示平均）、查找步的比例、tokens/s 与对同一次运行里普通贪心的加速比，
并检查每种设置的输出都与普通贪心逐 token 相同。``generate()`` 的缺省值（``LOOKUP_TOKENS``、
``DRAFT_BRANCHES``）由它选出。

用法：python scripts/sweep_mtp_decoding.py --model out/smol-mtp --out bench-out/mtp-decoding-sweep.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from bench_mtp import CHAT, SHARED, bench_prompts

from patcher.model import sources
from patcher.runtime.mtp import parse_widths, speculative_generate
from patcher.runtime.packed_linear import packed_linears


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="带 MTP 模块的检查点（bench_mtp.py --save-model 写出的）")
    ap.add_argument("--out", default="bench-out/mtp-decoding-sweep.json")
    ap.add_argument("--eval-data", default=str(SHARED / "tinyshakespeare.txt") if SHARED.exists() else None)
    ap.add_argument("--settings", default="0:2:1,0:2:2,0:2:3/2,0:2:4/2,10:2:2,10:2:3/2,10:2:4/2",
                    help="逗号分隔的 查找token数:最长n-gram:各模块候选数（用 / 分隔，如 4/2）")
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--book-seed", type=int, default=7, help="选书中窗口的种子（bench_mtp.py 用 7）")
    ap.add_argument("--questions", default=None, help="用这些对话提示（| 分隔）代替 bench_mtp.py 的那 4 个")
    args = ap.parse_args()

    model, tok, _ = sources.load(args.model)
    settings = [(int(s.split(":")[0]), int(s.split(":")[1]), parse_widths(s.split(":")[2]))
                for s in args.settings.split(",")]
    prompts = bench_prompts(tok, args.eval_data, 8, args.book_seed,
                            args.questions.split("|") if args.questions else CHAT)
    eos = model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    sums = {s: {kind: {"steps": 0, "tokens": 0, "seconds": 0.0, "lookup_steps": 0} for kind in ("book", "chat")}
            for s in settings}
    identical = {s: 0 for s in settings}
    per_prompt = {s: [] for s in settings}  # tokens per step of each prompt (bench_mtp.py's mean)
    plain_tokens, plain_seconds = 0, 0.0
    with torch.no_grad(), packed_linears(model):  # what generate() decodes with
        model.generate(prompts[0][1], use_mtp=False, do_sample=False, max_new_tokens=8)  # warm-up
        for kind, ids in prompts:
            t = time.perf_counter()
            plain = model.generate(ids, use_mtp=False, do_sample=False, max_new_tokens=args.new_tokens,
                                   pad_token_id=tok.eos_token_id)
            plain_seconds += time.perf_counter() - t
            plain_tokens += plain.shape[1] - ids.shape[1]
            for setting in settings:
                lookup, ngram, branches = setting
                t = time.perf_counter()
                out, st = speculative_generate(model, ids, args.new_tokens, eos, lookup=lookup, lookup_ngram=ngram,
                                               branches=branches)
                sec = time.perf_counter() - t
                identical[setting] += bool(torch.equal(out, plain))
                acc = sums[setting][kind]
                acc["steps"] += st["verify_steps"]
                acc["tokens"] += st["new_tokens"]
                acc["seconds"] += sec
                acc["lookup_steps"] += st["lookup_steps"]
                per_prompt[setting].append(st["accepted_per_step"])
            print(kind, flush=True)
    rows = []
    for (lookup, ngram, branches), by_kind in sums.items():
        every = {k: sum(v[k] for v in by_kind.values()) for k in ("steps", "tokens", "seconds", "lookup_steps")}
        rows.append({"lookup_tokens": lookup, "max_ngram": ngram, "branches": branches,
                     "identical": f"{identical[(lookup, ngram, branches)]}/{len(prompts)}",
                     "tokens_per_step": {"all": every["tokens"] / every["steps"],
                                         **{k: v["tokens"] / v["steps"] for k, v in by_kind.items()}},
                     "tokens_per_step_mean_of_prompts": sum(per_prompt[(lookup, ngram, branches)]) / len(prompts),
                     "lookup_step_fraction": every["lookup_steps"] / every["steps"],
                     "tokens_per_s": every["tokens"] / every["seconds"],
                     "speedup_vs_plain": (every["tokens"] / every["seconds"]) / (plain_tokens / plain_seconds)})
        print(json.dumps(rows[-1]), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"command": " ".join(sys.argv), "model": args.model,
                                          "eval_data": args.eval_data or "builtin",
                                          "new_tokens": args.new_tokens, "prompts": len(prompts),
                                          "plain_tokens_per_s": plain_tokens / plain_seconds,
                                          "settings": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
