"""逐领域保真度基准（SmolLM2-135M）：每个配置一行 JSON，写进 JSONL（中途被打断也留下已完成的行）。

每个配置：在内置的五领域评估文本上的逐领域困惑度上升、KL、top-1 与最差领域（转换报告本身的数字），
外加“书对书”：同一个转换后的模型在莎士比亚（../shared/data/tinyshakespeare.txt，有该目录时）上的数字。
校准 ``builtin`` 是内置的五领域混合；``books`` 只用《傲慢与偏见》（本 issue 之前的缺省校准）。

用法：python scripts/bench_domains.py --out scripts/results/domains-smollm2.jsonl [--only NAME ...]
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
SHARED = ROOT.parent / "shared" / "data"

from patcher import patch_model  # noqa: E402
from patcher.data.text import read_text, token_windows  # noqa: E402
from patcher.evaluation.metrics import compare, evaluate_base  # noqa: E402
from patcher.model import sources  # noqa: E402

BOOK = str(ROOT / "patcher" / "data" / "calibration" / "narrative.txt")  # Pride and Prejudice
CONFIGS = {
    "mla-0.6": {"mla": {"enabled": True, "kv_keep": 0.6}},
    "mla-0.6-books": {"mla": {"enabled": True, "kv_keep": 0.6}, "calibration": {"data": BOOK}},
    "mla-0.5": {"mla": {"enabled": True, "kv_keep": 0.5}},
    "deepseek-v3-0.6": {"mla": {"enabled": True, "kv_keep": 0.6, "rope": "decoupled"}},
    # the budget the DeepSeek-V3 form needs without training (its latent must hold V and the unrotated K)
    "deepseek-v3-0.7": {"mla": {"enabled": True, "kv_keep": 0.7, "rope": "decoupled"}},
    "deepseek-v3-0.8": {"mla": {"enabled": True, "kv_keep": 0.8, "rope": "decoupled"}},
    "moe-split-0.75": {"moe": {"enabled": True, "mode": "split", "active": 0.75}},
    "moe-split-0.5": {"moe": {"enabled": True, "mode": "split", "active": 0.5}},
    "mla-0.5-books": {"mla": {"enabled": True, "kv_keep": 0.5}, "calibration": {"data": BOOK}},
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="scripts/results/domains-smollm2.jsonl")
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--book-tokens", type=int, default=4096)
    args = ap.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    book = SHARED / "tinyshakespeare.txt"
    for name, recipe in CONFIGS.items():
        if args.only and name not in args.only:
            continue
        model, tok, _ = sources.load("smollm2-135m")
        book_ids = token_windows(tok, read_text(str(book), "evaluation"), args.book_tokens, 512, None) \
            if book.exists() else None
        book_base = evaluate_base(model, book_ids) if book_ids is not None else None
        t = time.perf_counter()
        patched, rep = patch_model(model, recipe, tok)
        seconds = time.perf_counter() - t
        f = rep["fidelity"]
        row = {"config": name, "recipe": {k: v for k, v in rep["recipe"].items() if k in recipe},
               "calibration": rep["calibration"]["data"], "worst_domain": f["worst_domain"],
               "worst": {k: f[k] for k in ("ppl_increase_pct", "kl_mean", "top1_agreement")},
               "domains": {d: {k: v[k] for k in ("ppl_base", "ppl_patched", "ppl_increase_pct", "kl_mean",
                                                  "top1_agreement", "tokens")} for d, v in f["domains"].items()},
               "pooled": f["pooled"], "kv_ratio": (rep.get("kv_cache") or {}).get("ratio"),
               "active_ffn_fraction": rep["parameters"]["active_ffn_fraction_vs_dense"],
               "mla_rel_error_mean": {k: sum(r[k] for r in rep["layers"]) / len(rep["layers"])
                                      for k in ("k_rel_error", "v_rel_error")
                                      if rep["layers"] and all(k in r for r in rep["layers"])},
               "book_to_book": compare(patched, book_base) if book_base is not None else None,
               "book_eval": str(book) if book_base is not None else None, "seconds": seconds,
               "threads": torch.get_num_threads()}
        with out.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
        b = row["book_to_book"]
        print(f"{name}: worst {f['worst_domain']} {f['ppl_increase_pct']:+.2f} %  "
              + "  ".join(f"{d} {v['ppl_increase_pct']:+.2f}" for d, v in f["domains"].items())
              + (f"  | book {b['ppl_increase_pct']:+.2f} %" if b else "") + f"  ({seconds:.0f} s)", flush=True)
        del model, patched
    return 0


if __name__ == "__main__":
    sys.exit(main())
