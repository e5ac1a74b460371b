"""聊天模板下的保真度检查（SmolLM2-135M）：五领域评估的窗口从任意文本 token 开始，看不到真实对话的样子——
提示从位置 0 的模板特殊 token 开始。这里把对话文本按分词器的聊天模板渲染，每段对话从位置 0 起（最多 512 token），
比较源模型与各个转换后的文件夹：困惑度上升、KL、top-1（与转换报告同一套指标），以及几个固定问题上贪心回答与源模型一致的 token 数。

每个文件夹一行 JSON，追加到 --out。用法：
python scripts/chat_template_check.py OUT_DIR [OUT_DIR ...] --label NAME [--label NAME ...]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import patcher  # noqa: E402,F401  (registers the converted classes)
from patcher.evaluation.metrics import compare, evaluate_base  # noqa: E402
from patcher.model import sources  # noqa: E402

QUESTIONS = ["What is the capital of France?", "What is the capital of Germany?",
             "Name three primary colors.", "How many legs does a spider have?",
             "Write a Python function that returns the square of a number.",
             "Who wrote Romeo and Juliet?", "What is the boiling point of water in Celsius?",
             "Translate 'good morning' into Spanish."]


def conversations(path: Path, n: int) -> list[list[dict]]:
    """Blank-line separated blocks of "User: …" / "Assistant: …" turns, each block one conversation."""
    out = []
    for block in re.split(r"\n\s*\n", path.read_text(encoding="utf-8")):
        turns = re.split(r"^(User|Assistant): ", block, flags=re.M)[1:]
        msgs = [{"role": "user" if r == "User" else "assistant", "content": c.strip()}
                for r, c in zip(turns[::2], turns[1::2])]
        if len(msgs) >= 2 and msgs[0]["role"] == "user":
            out.append(msgs)
    return out[:n]


def answer(model, tok, question: str) -> torch.Tensor:
    chat = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                   return_tensors="pt", return_dict=True)
    with torch.no_grad():
        return model.generate(**chat, max_new_tokens=24, do_sample=False)[0, chat["input_ids"].shape[1]:]


def main() -> int:
    from transformers import AutoModelForCausalLM

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dirs", nargs="+")
    ap.add_argument("--label", action="append", default=[])
    ap.add_argument("--text", default=str(ROOT / "patcher" / "data" / "evaluation" / "chat.txt"))
    ap.add_argument("--conversations", type=int, default=40)
    ap.add_argument("--out", default="scripts/results/chat-template-smollm2.jsonl")
    args = ap.parse_args()
    labels = args.label + [Path(d).name for d in args.dirs[len(args.label):]]
    base, tok, _ = sources.load("smollm2-135m")
    seqs = [tok.apply_chat_template(c, return_tensors="pt", return_dict=True)["input_ids"][0][:512]
            for c in conversations(Path(args.text), args.conversations)]
    base_eval = evaluate_base(base, seqs)  # windows of different lengths: one conversation each
    base_ans = {q: answer(base, tok, q) for q in QUESTIONS}
    for label, d in zip(labels, args.dirs):
        model = AutoModelForCausalLM.from_pretrained(d).eval()
        f = compare(model, base_eval)
        agree, answers = [], {}
        for q in QUESTIONS:
            o, b = answer(model, tok, q), base_ans[q]
            n = 0
            while n < min(len(o), len(b)) and o[n] == b[n]:
                n += 1
            agree.append(n)
            answers[q] = tok.decode(o, skip_special_tokens=True)
        row = {"label": label, "dir": d, "text": args.text, "conversations": len(seqs), "tokens": f["tokens"],
               "ppl_increase_pct": f["ppl_increase_pct"], "ppl_increase_ci95_pct": f["ppl_increase_ci95_pct"],
               "kl_mean": f["kl_mean"], "top1": f["top1_agreement"],
               "greedy_agree_mean": sum(agree) / len(agree), "greedy_agree": agree,
               "paris": "Paris" in answers[QUESTIONS[0]], "answers": answers}
        with open(args.out, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        print(label, f"ppl {row['ppl_increase_pct']:+.2f} %  KL {row['kl_mean']:.4f}  top-1 {row['top1']:.3f}  "
              f"greedy {row['greedy_agree_mean']:.2f}  Paris {row['paris']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
