"""dsopt 补丁模型的模块类（自包含文件）。

本文件只依赖 torch 与 transformers：转换时原样复制到输出目录（``modeling_dsopt.py``），
因此未安装 dsopt 的进程也能用 ``trust_remote_code=True`` 加载补丁后的检查点。
导入 dsopt 时同一文件向 transformers 的 Auto 类注册，此时无需远程代码。

补丁模型 = 源模型家族的原始类 + ``config.dsopt`` 中记录的结构改动（例如某层注意力换成
``LatentAttention``）。权重键名与源模型一致，只有被替换的模块换成新键名。
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING, CONFIG_MAPPING_NAMES
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

try:  # the attention kernels of transformers (sdpa, flash, ...) under their config names
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
except ImportError:  # pragma: no cover - older layouts
    ALL_ATTENTION_FUNCTIONS = None

DSOPT_PREFIX = "dsopt_"


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """对每个头的前 ``cos.shape[-1]`` 维施加 RoPE（rotate-half 布局；部分旋转时其余维不变）。"""
    rot = cos.shape[-1]
    if rot == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    return torch.cat((x_rot * cos + rotate_half(x_rot) * sin, x_pass), dim=-1)


def eager_attention(module, query, key, value, attention_mask, scaling, **_):
    """Plain attention used when the config names no kernel transformers knows."""
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask
    else:
        q_len, k_len = query.shape[2], key.shape[2]
        causal = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril(k_len - q_len)
        scores = scores.masked_fill(~causal, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores.float(), dim=-1).to(query.dtype)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


class LatentAttention(nn.Module):
    """多头潜在注意力（MLA，潜在模式）。

    每个 token 只缓存 ``c = x · W_down``（秩 r）；K、V 由 c 上投影得到，RoPE 在上投影之后施加，
    因此低秩分解是唯一的近似。缓存中 key 槽存放形如 ``(B, 1, T, r)`` 的潜在向量，value 槽为空张量。
    位置只按缓存内的相对次序计算：RoPE 只依赖相对位置，左填充（每行位置整体平移）结果不变。
    """

    def __init__(self, spec: dict, config, layer_idx: int, q_norm: nn.Module | None = None,
                 k_norm: nn.Module | None = None):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = spec["num_heads"]
        self.num_kv_heads = spec["num_kv_heads"]
        self.head_dim = spec["head_dim"]
        self.v_head_dim = spec.get("v_head_dim", self.head_dim)
        self.rank = spec["rank"]
        self.scaling = spec["scaling"]
        self.rotary_dim = spec.get("rotary_dim", 0)
        self.sliding_window = spec.get("sliding_window")
        self.num_key_value_groups = self.num_heads // self.num_kv_heads
        self.is_causal = True
        hidden = spec["hidden_size"]
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=spec["q_bias"])
        self.kv_a_proj = nn.Linear(hidden, self.rank, bias=False)
        self.k_b_proj = nn.Linear(self.rank, self.num_kv_heads * self.head_dim, bias=spec["k_bias"])
        self.v_b_proj = nn.Linear(self.rank, self.num_kv_heads * self.v_head_dim, bias=spec["v_bias"])
        self.o_proj = nn.Linear(self.num_heads * self.v_head_dim, spec.get("out_size", hidden), bias=spec["o_bias"])
        self.q_norm = q_norm
        self.k_norm = k_norm
        self._rotary = None  # set by the model: the family's rotary embedding, not a submodule of ours

    # Decoding steps (a few new tokens over a long cache) never build V: softmax(QKᵀ)·(C·W_uvᵀ + b) equals
    # (softmax(QKᵀ)·C)·W_uvᵀ + b, which costs heads·S·r instead of S·r·kv_heads·head_dim.
    ABSORB_MAX_QUERY = 16

    def _absorbed_value_attention(self, query, key, latent, attention_mask):
        bsz, _, q_len, _ = query.shape
        groups, per = self.num_kv_heads, self.num_key_value_groups
        kv_len = latent.shape[1]
        q = query.reshape(bsz, groups, per * q_len, self.head_dim)  # query heads g*per..g*per+per-1 share kv head g
        scores = torch.matmul(q, key.transpose(2, 3)).float() * self.scaling
        scores = scores.view(bsz, groups, per, q_len, kv_len)
        if attention_mask is not None:
            mask = attention_mask[:, :, None, :, -kv_len:]
            if mask.dtype == torch.bool:
                scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
            else:
                scores = scores + mask.float()
        elif q_len > 1:
            causal = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril(kv_len - q_len)
            scores = scores.masked_fill(~causal, torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores, dim=-1).to(latent.dtype).reshape(bsz, groups, per * q_len, kv_len)
        mixed = torch.matmul(probs, latent[:, None])  # (B, G, per·q, r)
        w = self.v_b_proj.weight.view(groups, self.v_head_dim, self.rank)
        out = torch.einsum("bgnr,gdr->bgnd", mixed, w)
        if self.v_b_proj.bias is not None:
            out = out + self.v_b_proj.bias.view(groups, 1, self.v_head_dim)
        out = out.reshape(bsz, groups * per, q_len, self.v_head_dim)
        return out.transpose(1, 2).contiguous()

    def _rope_tables(self, length: int, like: torch.Tensor):
        positions = torch.arange(length, device=like.device).unsqueeze(0)
        cos, sin = self._rotary(like, positions)
        return cos[:, None].to(like.dtype), sin[:, None].to(like.dtype)  # (1, 1, length, rot)

    def forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None,
                cache=None, past_key_values=None, layer_past=None, **kwargs):
        # families name the cache differently (cache / past_key_values / GPT-NeoX's layer_past)
        cache = next((c for c in (cache, past_key_values, layer_past) if c is not None), None)
        bsz, q_len, _ = hidden_states.shape
        query = self.q_proj(hidden_states).view(bsz, q_len, self.num_heads, self.head_dim)
        if self.q_norm is not None:
            query = self.q_norm(query)
        query = query.transpose(1, 2)

        latent = self.kv_a_proj(hidden_states).unsqueeze(1)  # (B, 1, T, r): all that is cached
        if cache is not None:
            latent, _ = cache.update(latent, latent.new_empty(bsz, 1, q_len, 0), self.layer_idx, kwargs=kwargs)
        latent = latent[:, 0]
        kv_len = latent.shape[1]
        key = self.k_b_proj(latent).view(bsz, kv_len, self.num_kv_heads, self.head_dim)
        if self.k_norm is not None:
            key = self.k_norm(key)
        key = key.transpose(1, 2)

        if self.rotary_dim:
            cos, sin = self._rope_tables(kv_len, query)
            key = apply_rope(key, cos, sin)
            query = apply_rope(query, cos[:, :, kv_len - q_len:], sin[:, :, kv_len - q_len:])

        if q_len <= self.ABSORB_MAX_QUERY and kv_len > q_len:
            output = self._absorbed_value_attention(query, key, latent, attention_mask)
            return self.o_proj(output.reshape(bsz, q_len, -1)), None
        value = self.v_b_proj(latent).view(bsz, kv_len, self.num_kv_heads, self.v_head_dim).transpose(1, 2)

        impl = getattr(self.config, "_attn_implementation", None) or "eager"
        attention = eager_attention
        if impl != "eager" and ALL_ATTENTION_FUNCTIONS is not None and impl in ALL_ATTENTION_FUNCTIONS:
            attention = ALL_ATTENTION_FUNCTIONS[impl]
        kwargs.pop("position_ids", None)
        output, weights = attention(self, query, key, value, attention_mask, dropout=0.0,
                                    scaling=self.scaling, sliding_window=self.sliding_window, **kwargs)
        output = output.reshape(bsz, q_len, -1).contiguous()
        return self.o_proj(output), weights


class DsoptPatchedMixin:
    """在源家族模型类构造完成后，按 ``config.dsopt`` 换入 dsopt 模块。"""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        apply_structure(self, config)


def apply_structure(model: nn.Module, config) -> None:
    """Swap modules as ``config.dsopt`` records; used at load time and, with the same data, at conversion."""
    plan = getattr(config, "dsopt", None) or {}
    rotary = model.get_submodule(plan["rotary_path"]) if plan.get("rotary_path") else None
    for idx, spec in sorted((plan.get("attention") or {}).items(), key=lambda kv: int(kv[0])):
        path = f"{plan['layers_path']}.{idx}.{spec['path']}"
        old = model.get_submodule(path)
        if isinstance(old, LatentAttention):
            continue
        norms = {role: (old.get_submodule(spec[role]) if spec.get(role) else None) for role in ("q_norm", "k_norm")}
        new = LatentAttention(spec, config, getattr(old, "layer_idx", int(idx)), **norms)
        ref = next(iter(old.parameters()), None)
        if ref is not None:
            new.to(device=ref.device, dtype=ref.dtype)
        new._rotary = rotary
        model.set_submodule(path, new)


def family_classes(base_model_type: str):
    """为一个源家族生成 (配置类, 模型类)：原始类的子类，``model_type`` 为 ``dsopt_<家族>``。"""
    if base_model_type in _CLASSES:
        return _CLASSES[base_model_type]
    base_config = CONFIG_MAPPING[base_model_type]
    base_model = MODEL_FOR_CAUSAL_LM_MAPPING[base_config]
    config_cls = type(f"Dsopt{base_config.__name__}", (base_config,),
                      {"model_type": DSOPT_PREFIX + base_model_type, "__module__": __name__})
    model_cls = type(f"Dsopt{base_model.__name__}", (DsoptPatchedMixin, base_model),
                     {"config_class": config_cls, "__module__": __name__})
    _CLASSES[base_model_type] = (config_cls, model_cls)
    return config_cls, model_cls


def register(base_model_type: str):
    """向 AutoConfig / AutoModelForCausalLM 注册某家族的 dsopt 类（可重复调用）。"""
    config_cls, model_cls = family_classes(base_model_type)
    try:
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
        AutoModelForCausalLM.register(config_cls, model_cls, exist_ok=True)
    except TypeError:  # pragma: no cover - transformers without exist_ok
        pass
    return config_cls, model_cls


_CLASSES: dict = {}


def __getattr__(name: str):
    # config.json's auto_map names classes such as DsoptLlamaConfig; build them on first access (PEP 562).
    if name.startswith("Dsopt"):
        base_name = name[len("Dsopt"):]
        for table, pick in ((CONFIG_MAPPING_NAMES, 0), (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, 1)):
            for model_type, class_name in table.items():
                if class_name == base_name:
                    return family_classes(model_type)[pick]
    raise AttributeError(name)
