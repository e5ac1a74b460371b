"""家族支持表：每个家族一个小随机模型（hidden 64、2 层、扰动过的偏置与归一化权重，在代码中由 transformers 配置构建），
逐项检查 MLA（满秩时必须精确重现源模型）、MoE、MTP、保存后在 ``import patcher`` 下重新加载，写出 JSON。

用法：python scripts/family_table.py --out scripts/results/families-tiny.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from conftest import ZOO as FAMILIES  # noqa: E402
from conftest import byte_tokenizer  # noqa: E402
from conftest import zoo_model as tiny  # noqa: E402

from patcher import patch_model  # noqa: E402

FAST = {"calibration": {"tokens": 512, "seq_len": 64, "batch_size": 4, "probe_tokens": 128},
        "eval": {"tokens": 128, "seq_len": 64}}


def short(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


def check(model_type: str, tok) -> dict:
    row = {}
    ids = torch.randint(4, 250, (2, 24))
    try:
        src = tiny(model_type)
    except Exception as e:  # noqa: BLE001
        return {"build": short(e)}
    with torch.no_grad():
        ref = src(input_ids=ids).logits
    for tech, recipe in (("mla_full_rank", {"mla": {"enabled": True, "kv_keep": 1.0}}),
                         ("mla_0.6", {"mla": {"enabled": True, "kv_keep": 0.6}}),
                         ("moe_split", {"moe": {"enabled": True, "mode": "split", "active": 0.5}}),
                         ("moe_split_full", {"moe": {"enabled": True, "mode": "split", "active": 1.0}}),
                         ("mtp", {"mtp": {"heads": 1, "draft_vocab": 0}})):
        model = copy.deepcopy(src)
        try:
            patched, rep = patch_model(model, {**FAST, **recipe}, tok)
            with torch.no_grad():
                got = patched(input_ids=ids).logits
            row[tech] = {"ok": True, "max_abs_logit_diff": float((got - ref).abs().max()),
                         "ppl_increase_pct": rep["fidelity"]["ppl_increase_pct"]}
            if tech == "mla_full_rank":
                with tempfile.TemporaryDirectory() as tmp:
                    from transformers import AutoModelForCausalLM

                    patched.save_pretrained(tmp)
                    again = AutoModelForCausalLM.from_pretrained(tmp).eval()
                    with torch.no_grad():
                        row["reload"] = {"ok": True, "max_abs_logit_diff":
                                         float((again(input_ids=ids).logits - got).abs().max())}
        except Exception as e:  # noqa: BLE001
            row[tech] = {"ok": False, "error": short(e),
                         "where": traceback.extract_tb(e.__traceback__)[-1].filename.split("site-packages/")[-1]}
    row["logit_scale"] = float(ref.abs().max())
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="scripts/results/families-tiny.json")
    ap.add_argument("--only", nargs="*")
    args = ap.parse_args()
    tok = byte_tokenizer()
    torch.manual_seed(0)
    table = {}
    for t in FAMILIES:
        if args.only and t not in args.only:
            continue
        table[t] = check(t, tok)
        r = table[t]
        print(t, {k: (round(v["max_abs_logit_diff"], 6) if v.get("ok") else v.get("error", "")[:90])
                  if isinstance(v, dict) else v for k, v in r.items()}, flush=True)
    Path(args.out).write_text(json.dumps(table, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
