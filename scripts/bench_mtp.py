"""MTP 基准（SmolLM2-135M，CPU）：写出 JSON。

1. 追加 MTP 模块，在一本书上训练（基座冻结，自蒸馏），记录训练 token 数与耗时（即训练预算）；
2. 在另一本书的提示与对话提示上，同一次运行中交替测量：普通贪心 ``generate()``、只用 MTP 模块的投机解码
   （各模块按 ``--branches`` 给出候选，合成草稿树一次验证）、
   MTP + 上下文查找草稿（``mtp_lookup``）、transformers 的提示查找解码（``prompt_lookup_num_tokens``）；
   都在模型的结束符处自然停下；四者都用 ``generate()`` 默认的预打包 CPU 权重，另测一遍不打包的普通贪心
   （``packed_cpu=False``）作对照；
3. 记录：输出是否与普通贪心逐 token 相同、每个验证步平均产出的 token 数、逐头接受率、tokens/s 与加速比。

用法：python scripts/bench_mtp.py --out bench-out/mtp.json [--train-tokens 262144] [--save-model out/smol-mtp]
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
from patcher.files import atomic_dir  # noqa: E402
from patcher.formats.folder import write_checkpoint  # noqa: E402
from patcher.model import sources  # noqa: E402
from patcher.runtime.mtp import parse_widths  # noqa: E402
from patcher.runtime.packed_linear import packed_linears  # noqa: E402

CHAT = ["What is the capital of France, and why is it famous?",
        "Write a short poem about the sea.",
        "Explain in two sentences how a rainbow forms.",
        "Give me three tips for learning a new language."]


class PrintProgress:
    """Training progress as plain lines (the benchmark runs unattended, logs to a file)."""

    def __init__(self):
        self.t0 = time.perf_counter()

    def start(self, name, total, completed=0):
        self.total = total
        print(f"{name}: {total} ({time.perf_counter() - self.t0:.0f}s)", flush=True)

    def step(self, layer, what):
        pass

    def advance(self):
        pass

    def update(self, step, loss, accuracy):
        if step % 10 == 0 or step == self.total:
            print(f"step {step}/{self.total} loss {loss:.3f} acc {[round(a, 3) for a in accuracy]} "
                  f"{time.perf_counter() - self.t0:.0f}s", flush=True)


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def median_ms(fn, repeats: int = 15) -> float:
    fn()
    return 1000 * statistics.median(timed(fn)[1] for _ in range(repeats))


@torch.no_grad()
def step_cost(model, ids, heads: int, branches) -> dict:
    """What one plain decode step and one speculative step cost, part by part (median of repeats, after a prompt
    of ``ids`` is cached): the base forward on 1 and on 1 + the draft tree's tokens (``branches``' widths), the
    output head on as many rows, one MTP module on one position with its draft head. The speculative step is
    estimated as their sum (modules on more rows cost a little more); ``break_even_accepted_per_step`` is the
    number of tokens a speculative step must yield to match plain decoding."""
    from transformers import DynamicCache

    from patcher.runtime.mtp import DraftHead, draft_widths, tree_nodes

    base, head, embed = model.base_model, model.get_output_embeddings(), model.get_input_embeddings()
    cache = DynamicCache(config=model.config)
    h = base(input_ids=ids, cache=cache, use_cache=True).last_hidden_state[0]

    def forward(n):
        def run():
            base(input_ids=ids[:, -n:], cache=cache, use_cache=True)
            cache.crop(-n)
        return run

    mod = model.mtp[0]
    mcache = DynamicCache()
    pos = torch.arange(ids.shape[1])
    mod(model, h[None], embed(ids[0])[None], pos, mcache)
    draft = DraftHead(head, mod.draft_ids)

    def module_step():
        out = mod(model, h[-1:][None], embed(ids[0, -1:])[None], pos[-1:] + 1, mcache)[0]
        draft.pick(mod.norm(out[-1]), 0.0, None)
        mcache.crop(-1)

    widths = draft_widths(branches, heads)
    n = 1 + tree_nodes(widths)
    out = {"base_forward_1": median_ms(forward(1)), f"base_forward_{n}": median_ms(forward(n)),
           "head_1": median_ms(lambda: head(h[-1:])), f"head_{n}": median_ms(lambda: head(h[-n:])),
           "mtp_module_with_draft_head": median_ms(module_step), "heads": heads, "widths": list(widths)}
    plain = out["base_forward_1"] + out["head_1"]
    spec = out[f"base_forward_{n}"] + out[f"head_{n}"] + heads * out["mtp_module_with_draft_head"]
    out.update(plain_step=plain, speculative_step=spec, break_even_accepted_per_step=spec / plain)
    return out


def bench_prompts(tok, eval_data: str | None, book_prompts: int, seed: int = 7,
                  questions: list[str] = CHAT) -> list[tuple[str, torch.Tensor]]:
    """64-token windows of the evaluation book (picked by ``seed``), then the chat ``questions`` wrapped in the chat
    template."""
    book = token_windows(tok, read_text(eval_data, "evaluation"), 64 * 50, 64, seed)[:book_prompts]
    prompts = [("book", w[None]) for w in book]
    for q in questions:
        ids = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
        prompts.append(("chat", ids))
    return prompts


def _per_kind(rows, key, per=None) -> dict:
    """Mean over all / book / chat prompts of a ``mtp_lookup_stats`` figure (or of its ratio to ``per``)."""
    def value(r):
        s = r["mtp_lookup_stats"]
        return s[key] / s[per] if per else s[key]
    return {kind: statistics.mean(value(r) for r in rows if kind == "all" or r["kind"] == kind)
            for kind in ("all", "book", "chat")}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench-out/mtp.json")
    ap.add_argument("--train-data", default=str(SHARED / "pride-and-prejudice.txt") if SHARED.exists() else None)
    ap.add_argument("--eval-data", default=str(SHARED / "tinyshakespeare.txt") if SHARED.exists() else None)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--train-tokens", type=int, default=262144)
    ap.add_argument("--draft-vocab", type=int, default=8192)
    ap.add_argument("--max-minutes", type=float, default=0.0, help="训练时间上限（分钟，含自生成文本的时间；0 不限）")
    ap.add_argument("--generate-tokens", type=int, default=0, help="基座自己续写、加入训练的 token 数")
    ap.add_argument("--generate-temperature", type=float, default=0.0, help="基座续写的采样温度（0 为贪心）")
    ap.add_argument("--generate-chat", type=float, default=0.0,
                    help="自生成文本中对话（基座自己写用户请求再作答）所占的比例")
    ap.add_argument("--book-prompts", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--decode-heads", type=int, default=0, help="解码时只用前几个 MTP 模块起草（0 表示全部）")
    ap.add_argument("--lookup", type=int, default=10,
                    help="另测 MTP + 上下文查找草稿（每步最多这么多个查找 token；0 表示不测）")
    ap.add_argument("--branches", type=parse_widths, default=None,
                    help="草稿树形状：各 MTP 模块在每个上一级草稿后给出的候选数，如 4,2（mtp_branches；缺省用模型的 "
                         "DRAFT_BRANCHES；1 为单链）")
    ap.add_argument("--lookup-branches", type=parse_widths, default=None,
                    help="MTP + 查找草稿时的草稿树形状（缺省用模型的 DRAFT_BRANCHES）")
    ap.add_argument("--save-model", default=None, help="也把训练好的检查点写到这里（供 dsopt generate 使用）")
    ap.add_argument("--load-model", default=None, help="不训练，加载 --save-model 写出的检查点只做测量")
    ap.add_argument("--train-result", default=None, help="与 --load-model 同用：训练那次运行的 JSON（取训练预算）")
    args = ap.parse_args()

    if args.load_model:
        patched, tok, _ = sources.load(args.load_model)
        mtp_report = json.loads(Path(args.train_result).read_text())["report_mtp"] if args.train_result else None
    else:
        model, tok, _ = sources.load("smollm2-135m")
        recipe = {"mtp": {"heads": args.heads, "train_tokens": args.train_tokens, "data": args.train_data,
                          "draft_vocab": args.draft_vocab, "max_minutes": args.max_minutes,
                          "generate_tokens": args.generate_tokens, "generate_temperature": args.generate_temperature,
                          "generate_chat": args.generate_chat},
                  "calibration": {"data": args.train_data, "tokens": 4096},
                  "eval": {"data": args.eval_data, "tokens": 4096}}
        patched, rep = patch_model(model, recipe, tok, progress=PrintProgress())
        mtp_report = rep["mtp"]
        print(f"trained: {mtp_report['training']['tokens']} tokens in {mtp_report['training']['seconds']:.0f} s; "
              f"teacher-forced acceptance {mtp_report['head_acceptance_teacher_forced']}", flush=True)
        if args.save_model:
            with atomic_dir(Path(args.save_model), overwrite=True) as tmp:
                write_checkpoint(patched, tok, tmp)
    res = {"command": " ".join(sys.argv), "train_data": args.train_data or "builtin", "eval_data": args.eval_data or "builtin",
           "model": args.load_model or "trained in this run", "report_mtp": mtp_report,
           "new_tokens": args.new_tokens, "lookup": args.lookup,
           "branches": patched.DRAFT_BRANCHES if args.branches is None else args.branches,
           "lookup_branches": patched.DRAFT_BRANCHES if args.lookup_branches is None else args.lookup_branches,
           "prompts": []}

    prompts = bench_prompts(tok, args.eval_data, args.book_prompts)

    n = args.new_tokens
    # every method stops at the model's end-of-turn token by itself (min_new_tokens would change greedy output)
    common = {"do_sample": False, "max_new_tokens": n, "pad_token_id": tok.eos_token_id}
    with torch.no_grad():
        patched.generate(prompts[0][1], use_mtp=False, **common)  # warm-up
        for kind, ids in prompts:
            plain, t_plain = timed(lambda: patched.generate(ids, use_mtp=False, **common))
            unpacked, t_unpacked = timed(lambda: patched.generate(ids, use_mtp=False, packed_cpu=False, **common))
            spec, t_spec = timed(lambda: patched.generate(ids, do_sample=False, max_new_tokens=n,
                                                          mtp_heads=args.decode_heads or None, mtp_lookup=0,
                                                          mtp_branches=args.branches))
            stats = patched.last_mtp_stats
            if args.lookup:
                hybrid, t_hybrid = timed(lambda: patched.generate(ids, do_sample=False, max_new_tokens=n,
                                                                  mtp_heads=args.decode_heads or None,
                                                                  mtp_lookup=args.lookup,
                                                                  mtp_branches=args.lookup_branches))
                hstats = patched.last_mtp_stats
            lookup, t_lookup = timed(lambda: patched.generate(ids, use_mtp=False, prompt_lookup_num_tokens=10,
                                                               **common))
            row = {"kind": kind, "prompt_tokens": ids.shape[1], "new_tokens": plain.shape[1] - ids.shape[1],
                   "identical_mtp": bool(torch.equal(plain, spec)),
                   "identical_prompt_lookup": bool(torch.equal(plain, lookup)),
                   "identical_unpacked": bool(torch.equal(plain, unpacked)),
                   "seconds_plain": t_plain, "seconds_plain_unpacked": t_unpacked, "seconds_mtp": t_spec,
                   "seconds_prompt_lookup": t_lookup,
                   "accepted_per_step": stats["accepted_per_step"], "head_acceptance": stats["head_acceptance"]}
            if args.lookup:
                row.update({"identical_mtp_lookup": bool(torch.equal(plain, hybrid)), "seconds_mtp_lookup": t_hybrid,
                            "mtp_lookup_stats": {k: v for k, v in hstats.items() if k != "seconds"}})
            res["prompts"].append(row)
            m = row["new_tokens"]
            print(f"{kind:4s} identical={row['identical_mtp']} accepted/step {row['accepted_per_step']:.2f} "
                  f"plain {m / t_plain:.1f} tok/s (unpacked {m / t_unpacked:.1f}), mtp {m / t_spec:.1f}, "
                  f"lookup {m / t_lookup:.1f}" + (f", mtp+lookup {m / t_hybrid:.1f} "
                                                   f"({hstats['accepted_per_step']:.2f}/step)" if args.lookup else ""),
                  flush=True)

    rows = res["prompts"]
    methods = ("plain", "plain_unpacked", "mtp", "prompt_lookup") + (("mtp_lookup",) if args.lookup else ())
    tot = {k: sum(r[f"seconds_{k}"] for r in rows) for k in methods}
    res["summary"] = {
        "prompts": len(rows),
        "greedy_identical_fraction": sum(r["identical_mtp"] for r in rows) / len(rows),
        "prompt_lookup_identical_fraction": sum(r["identical_prompt_lookup"] for r in rows) / len(rows),
        "unpacked_identical_fraction": sum(r["identical_unpacked"] for r in rows) / len(rows),
        "accepted_per_step_mean": statistics.mean(r["accepted_per_step"] for r in rows),
        "accepted_per_step_book": statistics.mean(r["accepted_per_step"] for r in rows if r["kind"] == "book"),
        "accepted_per_step_chat": statistics.mean(r["accepted_per_step"] for r in rows if r["kind"] == "chat"),
        "tokens_per_s": {k: sum(r["new_tokens"] for r in rows) / v for k, v in tot.items()},
        "speedup_mtp_vs_plain": tot["plain"] / tot["mtp"],
        "speedup_mtp_vs_prompt_lookup": tot["prompt_lookup"] / tot["mtp"],
        "speedup_prompt_lookup_vs_plain": tot["plain"] / tot["prompt_lookup"],
        "speedup_mtp_vs_plain_unpacked": tot["plain_unpacked"] / tot["mtp"],
        "speedup_packed_vs_unpacked_plain": tot["plain_unpacked"] / tot["plain"],
        **({"mtp_lookup_identical_fraction": sum(r["identical_mtp_lookup"] for r in rows) / len(rows),
            "accepted_per_step_mtp_lookup": _per_kind(rows, "accepted_per_step"),
            "lookup_step_fraction": _per_kind(rows, "lookup_steps", "verify_steps"),
            "speedup_mtp_lookup_vs_plain": tot["plain"] / tot["mtp_lookup"],
            "speedup_mtp_lookup_vs_prompt_lookup": tot["prompt_lookup"] / tot["mtp_lookup"]} if args.lookup else {}),
        "training_budget": ({"tokens": mtp_report["training"]["tokens"], "seconds": mtp_report["training"]["seconds"],
                             "generated": mtp_report["training"].get("generated"),
                             "cores": torch.get_num_threads()} if mtp_report else None),
    }
    heads = args.decode_heads or len(patched.mtp)
    with packed_linears(patched):  # what generate() runs on
        res["step_cost_ms"] = step_cost(patched, prompts[0][1], heads, res["branches"])
    res["step_cost_ms_unpacked"] = step_cost(patched, prompts[0][1], heads, res["branches"])
    print(json.dumps(res["summary"], indent=1), json.dumps(res["step_cost_ms"], indent=1),
          json.dumps(res["step_cost_ms_unpacked"], indent=1), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
