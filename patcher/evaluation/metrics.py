"""保真度指标：困惑度、KL、top-1 一致率，KV 缓存字节，参数与 FLOPs。

基座的评估在转换之前完成并保存每个 token 的 log 概率（float16），转换之后在同样的窗口上
比较，所以不需要同时在内存中放两份模型。KV 字节数从真实 ``generate()`` 之后的缓存对象量出，
不按公式推算。
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..model.locate import ModelMap
from ..runtime.modeling import MoEMLP


@dataclass
class BaseEval:
    windows: torch.Tensor
    logprobs: list[torch.Tensor] = field(default_factory=list)  # per window, (T-1, V) float16
    nll: list[torch.Tensor] = field(default_factory=list)
    top1: list[torch.Tensor] = field(default_factory=list)  # from float32, before the float16 rounding
    spans: list | None = None  # [(domain, windows)] in window order; None: one pooled text


def model_logits(model: nn.Module):
    """The usual source of logits: the whole model on one window (streaming conversion passes its own)."""
    return lambda _i, window: model(input_ids=window[None], use_cache=False).logits[0]


def _logprobs(logits, i: int, window: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(logits(i, window)[:-1].float(), dim=-1)


def evaluate_base(model: nn.Module | None, windows: torch.Tensor, logits=None, spans: list | None = None) -> BaseEval:
    """Per-token log-probs of the base on ``windows``; ``logits(i, window)`` replaces the model when given."""
    logits = logits or model_logits(model)
    ev = BaseEval(windows, spans=spans)
    for i, w in enumerate(windows):
        lp = _logprobs(logits, i, w)
        ev.nll.append(-lp.gather(1, w[1:, None])[:, 0])
        ev.top1.append(lp.argmax(-1))
        ev.logprobs.append(lp.half())
    return ev


BLOCK = 128  # tokens per block for the sampling error: per-token log-ratios barely correlate beyond this


def block_sums(per_token: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """逐 token 的差值按 ``BLOCK`` 个 token 分块：(每块之和, 每块 token 数)，供 ``increase_interval`` 使用。"""
    blocks = per_token.double().split(BLOCK)
    return torch.stack([b.sum() for b in blocks]), torch.tensor([b.numel() for b in blocks])


def increase_interval(sums: torch.Tensor, counts: torch.Tensor, z: float = 1.96) -> tuple[float, list[float]] | None:
    """困惑度上升（%）的抽样误差：输入是逐块的 log p_基座 − log p_转换后 之和与每块 token 数。

    误差按块均值（比率估计）算：几千个评估 token 时，两个数字差多少才有意义由它决定。返回
    (标准误 %, [下限 %, 上限 %])（约 95 % 区间）；不足两块时返回 None。"""
    sums, counts = sums.double(), counts.double()
    n, m = float(counts.sum()), len(sums)
    mean = float(sums.sum()) / n
    if m < 2:
        return None
    se = math.sqrt(m / (m - 1) * float(((sums - counts * mean) ** 2).sum())) / n
    return 100.0 * se, [100.0 * (math.exp(mean - z * se) - 1.0), 100.0 * (math.exp(mean + z * se) - 1.0)]


def _figures(rows: list) -> dict:
    n = sum(r[4] for r in rows)
    nll_b, nll_p, kl, agree = (sum(r[k] for r in rows) for k in range(4))
    ppl_b, ppl_p = math.exp(nll_b / n), math.exp(nll_p / n)
    se, ci = increase_interval(torch.cat([r[5] for r in rows]), torch.cat([r[6] for r in rows])) or (None, None)
    return {"tokens": n, "ppl_base": ppl_b, "ppl_patched": ppl_p,
            "ppl_increase_pct": 100.0 * (ppl_p / ppl_b - 1.0), "ppl_increase_se_pct": se,
            "ppl_increase_ci95_pct": ci, "kl_mean": kl / n, "top1_agreement": agree / n}


def compare(model: nn.Module | None, base: BaseEval, logits=None) -> dict:
    """Perplexity of base and patched, mean KL(base‖patched) per token, top-1 agreement.

    With domains (``base.spans``) the top-level figures are the worst domain's (the highest perplexity increase and
    KL, the lowest top-1, each over the domains), ``domains`` has each domain and ``pooled`` all windows together."""
    logits = logits or model_logits(model)
    rows = []
    for i, (w, lp_b16, nb, top1) in enumerate(zip(base.windows, base.logprobs, base.nll, base.top1)):
        lp_p = _logprobs(logits, i, w)
        lp_b = lp_b16.float()
        nll_p = -lp_p.gather(1, w[1:, None])[:, 0]
        rows.append((float(nb.sum()), float(nll_p.sum()),
                     float((lp_b.exp() * (lp_b - lp_p)).sum()), int((top1 == lp_p.argmax(-1)).sum()), w.numel() - 1,
                     *block_sums(nll_p - nb)))
    pooled = _figures(rows)
    if not base.spans:
        return pooled
    domains, at = {}, 0
    for name, n in base.spans:
        domains[name] = _figures(rows[at:at + n])
        at += n
    worst = max(domains, key=lambda d: domains[d]["ppl_increase_pct"])
    return {**domains[worst], "kl_mean": max(d["kl_mean"] for d in domains.values()),
            "top1_agreement": min(d["top1_agreement"] for d in domains.values()),
            "headline": "worst_domain", "worst_domain": worst, "domains": domains, "pooled": pooled}


def cache_bytes_per_token(model: nn.Module, prompt_ids: torch.Tensor, new_tokens: int = 8) -> dict:
    """Run a real greedy generate() and measure what its cache object holds, per token and layer summed."""
    with torch.no_grad():
        out = model.generate(prompt_ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             return_dict_in_generate=True, use_cache=True, pad_token_id=0)
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    total, length = 0, 0
    for layer in cache.layers:
        if not isinstance(layer.keys, torch.Tensor):  # a layer the model never wrote to
            continue
        for t in (layer.keys, layer.values):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
        length = max(length, layer.keys.shape[-2])
    tokens = prompt_ids.shape[0] * length
    return {"kv_bytes_per_token": total / tokens, "cached_tokens": tokens, "cache_bytes": total}


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def active_parameters(model: nn.Module, mm: ModelMap) -> dict:
    """Parameters one token uses (MoE layers count their router, shared part and top-k experts only)."""
    total = parameter_count(model)
    inactive, ffn_total, ffn_active = 0, 0, 0
    for lm in mm.layers:
        layer = model.get_submodule(lm.prefix)
        mlp = layer.get_submodule(lm.mlp) if lm.mlp else None
        if mlp is None:
            continue
        n = sum(p.numel() for p in mlp.parameters())
        if isinstance(mlp, MoEMLP):
            unused = mlp.inactive_params()
            inactive += unused
            ffn_total += n
            ffn_active += n - unused
        else:
            ffn_total += n
            ffn_active += n
    # forward FLOPs per token on the weights: 2 per multiply-add of every weight a token uses; the embedding is a
    # lookup, the output head a product (counted again when it shares the embedding's weight); attention over the
    # context, which grows with its length, is not included
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and head.weight.data_ptr() == emb.weight.data_ptr()
    products = total - inactive - emb.weight.numel() + (head.weight.numel() if tied else 0)
    return {"total": total, "active": total - inactive, "ffn_total": ffn_total, "ffn_active": ffn_active,
            "active_ffn_fraction": ffn_active / max(ffn_total, 1),
            "flops_per_token": 2 * products, "ffn_flops_per_token": 2 * ffn_active}
