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
    with tempfile.TemporaryDirectory() as tmp:  # the file-based paths: DeepSeek-V3 export and streaming
        from transformers import AutoModelForCausalLM

        from patcher import convert

        src.save_pretrained(f"{tmp}/src")
        tok.save_pretrained(f"{tmp}/src")
        for tech, recipe in (("deepseek_v3_0.6", {"mla": {"enabled": True, "kv_keep": 0.6},
                                                  "output": {"format": "deepseek-v3"}}),
                             ("streaming_full_rank", {"mla": {"enabled": True, "kv_keep": 1.0},
                                                      "output": {"streaming": "on"}})):
            try:
                rep = convert(f"{tmp}/src", {**FAST, **recipe}, f"{tmp}/{tech}")
                again = AutoModelForCausalLM.from_pretrained(f"{tmp}/{tech}").eval()
                with torch.no_grad():
                    got = again(input_ids=ids).logits
                row[tech] = {"ok": True, "max_abs_logit_diff": float((got - ref).abs().max()),
                             "ppl_increase_pct": rep["fidelity"]["ppl_increase_pct"]}
            except Exception as e:  # noqa: BLE001
                row[tech] = {"ok": False, "error": short(e)}
    row["logit_scale"] = float(ref.abs().max())
    return row


COLUMNS = [("mla_full_rank", "MLA 满秩 max Δlogit"), ("mla_0.6", "MLA 0.6 困惑度"),
           ("moe_split", "MoE 切分 0.5"), ("moe_split_full", "MoE 满激活 max Δlogit"), ("mtp", "MTP"),
           ("deepseek_v3_0.6", "DeepSeek-V3 导出 0.6"), ("streaming_full_rank", "流式 满秩 max Δlogit")]


def cell(key: str, r: dict | None) -> str:
    if not r:
        return "—"
    if not r.get("ok"):
        return "✗ " + r["error"].split(":", 1)[0] if "预检" not in r["error"] else "✗ 预检拒绝"
    if "full" in key or key == "mtp":
        return f"✓ {r['max_abs_logit_diff']:.0e}" if r["max_abs_logit_diff"] else "✓ 0"
    return f"✓ {r['ppl_increase_pct']:+.1f} %"


def markdown(table: dict) -> str:
    lines = ["| 家族 | " + " | ".join(t for _, t in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for fam, row in table.items():
        lines.append(f"| {fam} | " + " | ".join(cell(k, row.get(k)) for k, _ in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="scripts/results/families-tiny.json")
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--markdown", help="把支持表写成 Markdown（docs/families.md 引用它）")
    args = ap.parse_args()
    tok = byte_tokenizer()
    torch.manual_seed(0)
    out = Path(args.out)
    table = json.loads(out.read_text()) if args.only and out.exists() else {}  # --only: update those rows
    for t in FAMILIES:
        if args.only and t not in args.only:
            continue
        table[t] = check(t, tok)
        r = table[t]
        print(t, {k: (round(v["max_abs_logit_diff"], 6) if v.get("ok") else v.get("error", "")[:90])
                  if isinstance(v, dict) else v for k, v in r.items()}, flush=True)
    table = {t: table[t] for t in FAMILIES if t in table}
    out.write_text(json.dumps(table, indent=1))
    if args.markdown:  # between the markers of an existing page, else the table alone
        page = Path(args.markdown)
        text = page.read_text(encoding="utf-8") if page.exists() else ""
        start, end = "<!-- family-table -->\n", "<!-- /family-table -->"
        if start in text and end in text:
            text = text[:text.index(start) + len(start)] + markdown(table) + text[text.index(end):]
        else:
            text = markdown(table)
        page.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
