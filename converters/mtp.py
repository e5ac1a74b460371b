"""MTP：在模型末尾追加 DeepSeek-V3 式的多 token 预测模块。

不替换任何层，所以不参与逐层校准；管线在其他技术转换完所有层之后调用 ``attach``。第 k 个模块的
transformer 块复制自一个解码层（缺省最后一层，``--mtp-init-layer``），末层归一化复制自基座的末层归一化，
投影 ``eh_proj`` 初始化为 [I, I]（隐藏状态与嵌入相加），训练从这里开始（把它放大到该层输入残差流的尺度，
实测在 SmolLM2 上训练更慢）。
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from patcher.errors import LocateError, PlanError
from patcher.model.locate import ModelMap, final_norm_path
from patcher.runtime.modeling import apply_structure
from patcher.runtime.mtp import choose_draft_vocab

from .base import Planning


class MTPTechnique:
    """MTP 技术（配方小节 ``mtp``）：不替换层，在所有层转换之后追加模块。"""
    section = "mtp"
    structure_key = None

    def planning(self, o) -> Planning:
        if o.train_tokens:  # training needs the whole converted model in memory
            return Planning("whole_model", "在转换时训练 MTP（之后用 dsopt train-mtp）")
        return Planning("none")

    def check_model(self, mm: ModelMap, o) -> int:
        """The decoder layer the modules' blocks are copied from; checked before any layer is converted."""
        n = len(mm.layers)
        src = o.init_layer if o.init_layer >= 0 else n + o.init_layer
        if not 0 <= src < n:
            raise PlanError(f"--mtp-init-layer {o.init_layer} 超出范围：模型只有 {n} 层")
        return src

    def record(self, mm: ModelMap, o, vocab: int, norm_path: str) -> dict:
        """What ``config.dsopt`` records of the modules."""
        draft_vocab = o.draft_vocab if 0 < o.draft_vocab < vocab else 0
        return {"heads": o.heads, "source_layer": self.check_model(mm, o), "norm_path": norm_path,
                "draft_vocab": draft_vocab}

    def attach(self, model: nn.Module, mm: ModelMap, o, job, token_ids: torch.Tensor) -> dict:
        """Record the modules in ``config.dsopt`` and build them on ``model`` (a dsopt class instance).

        ``token_ids`` (calibration text) decide the draft vocabulary: its most frequent tokens."""
        rec = self.record(mm, o, model.config.vocab_size, final_norm_path(model))
        layer = model.get_submodule(mm.layers_path)[rec["source_layer"]]
        if mm.rotary_path is None and "position_embeddings" in inspect.signature(layer.forward).parameters:
            # GPT-2 carries positions in its hidden states; a layer that asks for rotary tables needs the module
            raise LocateError(f"MTP 模块复制的解码层（第 {rec['source_layer']} 层）需要旋转位置编码（position_embeddings），"
                              f"但定位器没有找到旋转位置编码模块（missing role rotary），无法给 MTP 块位置")
        model.config.dsopt = {**model.config.dsopt, "mtp": rec}
        apply_structure(model, model.config)
        init_eh_proj(model.mtp, model.config.hidden_size)
        choose_draft_vocab(model, token_ids)
        return rec


def init_eh_proj(modules: nn.ModuleList, hidden_size: int) -> None:
    """``eh_proj`` = [I, I]: a module starts from the sum of the hidden state and the next token's embedding."""
    with torch.no_grad():
        for mod in modules:
            eye = torch.eye(hidden_size, dtype=mod.eh_proj.weight.dtype)
            mod.eh_proj.weight.copy_(torch.cat([eye, eye], 1))
