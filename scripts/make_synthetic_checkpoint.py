"""写一个指定形状、随机权重的 Llama 检查点（分片 safetensors + 配置 + 分词器），用来测大模型转换的内存与时间。

    python scripts/make_synthetic_checkpoint.py --shape llama-7b --dtype bfloat16 OUT
    python scripts/make_synthetic_checkpoint.py --shape llama-3-8b --dtype bfloat16 OUT

一次只生成一层的张量并立刻写成一个分片，所以内存约为一层，与模型大小无关。权重按 HF 的初始化
（正态，标准差 0.02；归一化权重为 1），随机种子固定，同样的参数得到同样的字节。分词器是在内置
校准文本上训练的字节级 BPE（离线可用），词表不超过模型词表。
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {
    "llama-7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                     intermediate_size=11008, vocab_size=32000, max_position_embeddings=4096, rope_theta=10000.0,
                     rms_norm_eps=1e-5),
    "llama-3-8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       intermediate_size=14336, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                       rms_norm_eps=1e-5),
}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
TOKENIZER_VOCAB = 8000


def layer_tensors(shape: dict, i: int, g: torch.Generator, dtype) -> dict[str, torch.Tensor]:
    d, inter = shape["hidden_size"], shape["intermediate_size"]
    hd = d // shape["num_attention_heads"]
    kv = shape["num_key_value_heads"] * hd
    p = f"model.layers.{i}."
    sizes = {"self_attn.q_proj": (d, d), "self_attn.k_proj": (kv, d), "self_attn.v_proj": (kv, d),
             "self_attn.o_proj": (d, d), "mlp.gate_proj": (inter, d), "mlp.up_proj": (inter, d),
             "mlp.down_proj": (d, inter)}
    out = {f"{p}{name}.weight": (torch.randn(size, generator=g) * 0.02).to(dtype) for name, size in sizes.items()}
    out[f"{p}input_layernorm.weight"] = torch.ones(d, dtype=dtype)
    out[f"{p}post_attention_layernorm.weight"] = torch.ones(d, dtype=dtype)
    return out


def make_tokenizer(vocab: int):
    """Byte-level BPE trained on the built-in calibration text: offline, deterministic, ids < ``vocab``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from patcher.data.text import builtin_text

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=min(vocab, TOKENIZER_VOCAB), special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([builtin_text("calibration")], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def write_synthetic(out: Path, shape: dict, dtype=torch.bfloat16, seed: int = 0, log=print) -> Path:
    """Write the checkpoint shard by shard (one per decoder layer, one for the rest); returns ``out``."""
    from transformers import LlamaConfig

    from patcher.formats.shards import shard_name, write_index, write_shard

    out = Path(out)
    out.mkdir(parents=True, exist_ok=False)
    n, d, vocab = shape["num_hidden_layers"], shape["hidden_size"], shape["vocab_size"]
    total = n + 1
    g = torch.Generator().manual_seed(seed)
    t = time.perf_counter()
    outer = {"model.embed_tokens.weight": (torch.randn(vocab, d, generator=g) * 0.02).to(dtype),
             "model.norm.weight": torch.ones(d, dtype=dtype),
             "lm_head.weight": (torch.randn(vocab, d, generator=g) * 0.02).to(dtype)}
    write_shard(out, shard_name(n, total), outer)
    del outer
    for i in range(n):
        write_shard(out, shard_name(i, total), layer_tensors(shape, i, g, dtype))
        log(f"layer {i + 1}/{n} written ({time.perf_counter() - t:.0f} s)")
    write_index(out)
    config = LlamaConfig(**shape, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    config.dtype = dtype
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(out)
    make_tokenizer(vocab).save_pretrained(out)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama-7b")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    ap.add_argument("--layers", type=int, default=None, help="覆盖层数（缺省为该形状的层数）")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    shape = dict(SHAPES[args.shape])
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    write_synthetic(args.out, shape, DTYPES[args.dtype], args.seed)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
