"""MTP：在模型末尾追加 DeepSeek-V3 式的多 token 预测模块。

不替换任何层，所以不参与逐层校准；引擎在其他转换之后调用 ``attach``。第 k 个模块的 transformer 块
复制自一个解码层（缺省最后一层，``--mtp-init-layer``），末层归一化复制自基座的末层归一化，投影
``eh_proj`` 初始化为 [I, I]（隐藏状态与嵌入相加），训练从这里开始（把它放大到该层输入残差流的尺度，
实测在 SmolLM2 上训练更慢）。
"""

from __future__ import annotations

import torch
from torch import nn

from patcher.locate import LocateError, ModelMap
from patcher.modeling import apply_structure
from patcher.mtp import choose_draft_vocab

from . import PlanError


def final_norm_path(model: nn.Module) -> str:
    """The module whose output the output head reads (found by running a tiny forward, not by name)."""
    head = model.get_output_embeddings()
    seen, handles, head_in = {}, [], []

    def remember(name):
        def hook(_m, _a, out):
            seen.setdefault(id(out), (name, out))  # keeps `out` alive, so ids stay unique; returns None
        return hook

    for name, mod in model.named_modules():
        if name and mod is not head and not any(True for _ in mod.children()):
            handles.append(mod.register_forward_hook(remember(name)))
    handles.append(head.register_forward_pre_hook(lambda m, a: head_in.append(a[0])))
    try:
        with torch.no_grad():
            model(input_ids=torch.zeros(1, 2, dtype=torch.long, device=head.weight.device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    x = head_in[0]
    hit = seen.get(id(x)) or seen.get(id(x._base)) if x._base is not None else seen.get(id(x))
    if hit is None:
        raise LocateError("找不到输出头之前的末层归一化（missing role final_norm），无法追加 MTP")
    return hit[0]


def attach(model: nn.Module, mm: ModelMap, opts, token_ids: torch.Tensor) -> dict:
    """Record the MTP modules in ``config.dsopt`` and build them on ``model`` (a dsopt class instance).

    ``token_ids`` (calibration text) decide the draft vocabulary: its most frequent tokens."""
    if mm.rotary_path is None:
        raise LocateError("MTP 模块需要 RoPE 家族（找不到旋转位置编码模块，missing role rotary）")
    n = len(mm.layers)
    src = opts.init_layer if opts.init_layer >= 0 else n + opts.init_layer
    if not 0 <= src < n:
        raise PlanError(f"--mtp-init-layer {opts.init_layer} 超出范围：模型只有 {n} 层")
    vocab = model.config.vocab_size
    draft_vocab = opts.draft_vocab if 0 < opts.draft_vocab < vocab else 0
    rec = {"heads": opts.heads, "source_layer": src, "norm_path": final_norm_path(model), "draft_vocab": draft_vocab}
    model.config.dsopt = {**model.config.dsopt, "mtp": rec}
    apply_structure(model, model.config)
    d = model.config.hidden_size
    with torch.no_grad():
        for mod in model.mtp:
            eye = torch.eye(d, dtype=mod.eh_proj.weight.dtype)
            mod.eh_proj.weight.copy_(torch.cat([eye, eye], 1))
    choose_draft_vocab(model, token_ids)
    return rec
