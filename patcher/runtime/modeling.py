"""dsopt 补丁模型的模块类（自包含文件）。

本文件只依赖 torch 与 transformers：转换时原样复制到输出目录（``modeling_dsopt.py``），
因此未安装 dsopt 的进程也能用 ``trust_remote_code=True`` 加载补丁后的检查点。
导入 dsopt 时同一文件向 transformers 的 Auto 类注册，此时无需远程代码。

补丁模型 = 源模型家族的原始类 + ``config.dsopt`` 中记录的结构改动（例如某层注意力换成
``LatentAttention``）。权重键名与源模型一致，只有被替换的模块换成新键名。
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING, CONFIG_MAPPING_NAMES
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

try:  # the attention kernels of transformers (sdpa, flash, ...) under their config names
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
except ImportError:  # pragma: no cover - older layouts
    ALL_ATTENTION_FUNCTIONS = None

from .mtp import RMSNorm, build_mtp, speculative_generate  # in an output folder, mtp.py sits next to modeling_dsopt.py
from .packed_linear import packed_linears, packed_product  # likewise

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


def eager_attention(module, query, key, value, attention_mask, scaling, softcap=None, **_):
    """Plain attention used when the config names no kernel transformers knows, or when scores are soft-capped
    (Gemma 2: tanh(s / cap) · cap, which the sdpa kernel cannot do)."""
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
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


def rope_positions(kv_len: int, q_len: int, position_ids: torch.Tensor | None, device) -> torch.Tensor:
    """Rotary positions of the ``kv_len`` cached entries, the last ``q_len`` of them new.

    Earlier entries sit at their cache index. New entries follow ``position_ids`` relative to the first new one,
    so a draft tree (siblings share a position, see ``mtp.DraftTree``) rotates right; a plain run of tokens gives
    the cache index again. Only relative positions matter to RoPE, so left padding, which shifts a whole row,
    changes nothing; batches of several rows (only ever plain runs) keep the cache index."""
    pos = torch.arange(kv_len, device=device)
    if position_ids is None or q_len == 1 or position_ids.shape[0] != 1:
        return pos
    new = position_ids[0, -q_len:].to(device)
    return torch.cat([pos[: kv_len - q_len], new - new[0] + (kv_len - q_len)])


def rotary_cos_sin(rotary: nn.Module, like: torch.Tensor, position_ids: torch.Tensor, **extra):
    """(cos, sin) of a family's rotary at ``position_ids`` (batch, len). A complex table (Llama 4's ``freqs_cis``,
    one entry per rotated pair) is given as rotate-half cos/sin: θ_0..θ_{h-1} twice."""
    out = rotary(like, position_ids, **extra)
    if torch.is_tensor(out) and out.is_complex():
        return torch.cat([out.real, out.real], -1), torch.cat([out.imag, out.imag], -1)
    return out


def rope_tables(rotary: nn.Module, positions: torch.Tensor, like: torch.Tensor, columns: list[int] | None = None,
                layer_type: str | None = None):
    """cos/sin of the family's rotary at ``positions`` (1-D), shaped (1, 1, len, rot); ``columns`` picks dims.
    ``layer_type``: families whose rotary differs by layer kind (Gemma 3: local and global bases) take it."""
    extra = {"layer_type": layer_type} if layer_type is not None else {}
    cos, sin = rotary_cos_sin(rotary, like, positions.unsqueeze(0), **extra)
    if columns is not None:
        cols = torch.tensor(columns, device=cos.device)
        cos, sin = cos[..., cols], sin[..., cols]
    return cos[:, None].to(like.dtype), sin[:, None].to(like.dtype)


def attend(module, query, key, value, attention_mask, kwargs):
    """Attention through the kernel the config names (eager when transformers has none by that name), then o_proj."""
    impl = getattr(module.config, "_attn_implementation", None) or "eager"
    attention = eager_attention
    softcap = getattr(module, "softcap", None)
    if softcap:
        kwargs["softcap"] = softcap
    elif impl != "eager" and ALL_ATTENTION_FUNCTIONS is not None and impl in ALL_ATTENTION_FUNCTIONS:
        attention = ALL_ATTENTION_FUNCTIONS[impl]
    kwargs.pop("position_ids", None)
    output, weights = attention(module, query, key, value, attention_mask, dropout=0.0,
                                scaling=module.scaling, sliding_window=module.sliding_window, **kwargs)
    return module.o_proj(output.reshape(output.shape[0], output.shape[1], -1).contiguous()), weights


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
        self.softcap = spec.get("softcap")
        self.layer_type = spec.get("layer_type")
        self.rope_columns = spec.get("rope_columns")  # interleaved tables put in rotate-half order
        # [β, span(, offset)]: 1 + β·log(1 + ⌊(pos + offset) / span⌋), Ministral 3's long-context scale, Llama 4's NoPE one
        self.query_scale = spec.get("query_scale")
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
        self.qk_norm_full = spec.get("qk_norm_full", False)
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
        if self.softcap:
            scores = torch.tanh(scores / self.softcap) * self.softcap
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


    def forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None,
                cache=None, past_key_values=None, layer_past=None, **kwargs):
        # families name the cache differently (cache / past_key_values / GPT-NeoX's layer_past)
        cache = next((c for c in (cache, past_key_values, layer_past) if c is not None), None)
        bsz, q_len, _ = hidden_states.shape
        query = self.q_proj(hidden_states)
        if self.q_norm is not None and self.qk_norm_full:  # over the whole projection, before the head split
            query = self.q_norm(query)
        query = query.view(bsz, q_len, self.num_heads, self.head_dim)
        if self.q_norm is not None and not self.qk_norm_full:
            query = self.q_norm(query)
        query = query.transpose(1, 2)

        latent = self.kv_a_proj(hidden_states).unsqueeze(1)  # (B, 1, T, r): all that is cached
        if cache is not None:
            latent, _ = cache.update(latent, latent.new_empty(bsz, 1, q_len, 0), self.layer_idx, kwargs=kwargs)
        latent = latent[:, 0]
        kv_len = latent.shape[1]
        key = self.k_b_proj(latent)
        if self.k_norm is not None and self.qk_norm_full:
            key = self.k_norm(key)
        key = key.view(bsz, kv_len, self.num_kv_heads, self.head_dim)
        if self.k_norm is not None and not self.qk_norm_full:
            key = self.k_norm(key)
        key = key.transpose(1, 2)

        if self.rotary_dim:
            positions = rope_positions(kv_len, q_len, kwargs.get("position_ids"), query.device)
            cos, sin = rope_tables(self._rotary, positions, query, self.rope_columns, self.layer_type)
            key = apply_rope(key, cos, sin)
            query = apply_rope(query, cos[:, :, kv_len - q_len:], sin[:, :, kv_len - q_len:])
        if self.query_scale:
            beta, span, *offset = self.query_scale
            pos = torch.arange(kv_len - q_len, kv_len, device=query.device, dtype=torch.float32) + sum(offset)
            query = query * (1 + beta * torch.log(1 + torch.floor(pos / span)))[:, None].to(query.dtype)

        if q_len <= self.ABSORB_MAX_QUERY and kv_len > q_len:
            output = self._absorbed_value_attention(query, key, latent, attention_mask)
            return self.o_proj(output.reshape(bsz, q_len, -1)), None
        value = self.v_b_proj(latent).view(bsz, kv_len, self.num_kv_heads, self.v_head_dim).transpose(1, 2)

        return attend(self, query, key, value, attention_mask, kwargs)


class DecoupledLatentAttention(nn.Module):
    """多头潜在注意力，解耦 RoPE（DeepSeek-V2/V3 的布局，参数名与 ``DeepseekV3Attention`` 相同）。

    每个 token 缓存 ``kv_a_layernorm(c)``（秩 r）与一个各头共享的旋转键 ``k_rot``（``qk_rope_head_dim`` 维）。
    每头的键 = [k_nope（由 c 上投影，无位置）; k_rot]，查询 = [q_nope; q_rot]。旋转键使用源模型 RoPE 中
    被保留的那些频率（``rope_pairs``，源 RoPE 的频率下标），由源家族的旋转模块给出 cos/sin，因此与源模型
    的频率、缩放完全一致。缓存中存放旋转前的 [c; k_rot]，位置按缓存内的相对次序计算（RoPE 只依赖相对位置）。
    """

    KV_NORM_EPS = 1e-6  # DeepseekV3Attention builds kv_a_layernorm with this eps, whatever the config says

    def __init__(self, spec: dict, config, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = spec["num_heads"]
        self.qk_nope_head_dim = spec["qk_nope_head_dim"]
        self.qk_rope_head_dim = spec["qk_rope_head_dim"]
        self.v_head_dim = spec["v_head_dim"]
        self.rank = spec["rank"]
        self.scaling = spec["scaling"]
        self.sliding_window = spec.get("sliding_window")
        self.softcap = spec.get("softcap")
        self.layer_type = spec.get("layer_type")
        self.num_key_value_groups = 1  # every head has its own key and value once expanded from the latent
        self.is_causal = True
        pairs, half = spec["rope_pairs"], spec["rope_half"]
        # a plain list, not a buffer: transformers materialises non-persistent buffers uninitialised at load time
        self.rope_columns = [int(p) for p in pairs] + [int(p) + half for p in pairs]
        hidden, heads = spec["hidden_size"], self.num_heads
        self.q_proj = nn.Linear(hidden, heads * (self.qk_nope_head_dim + self.qk_rope_head_dim), bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(hidden, self.rank + self.qk_rope_head_dim, bias=spec["kv_a_bias"])
        self.kv_a_layernorm = RMSNorm(self.rank, self.KV_NORM_EPS)
        self.kv_b_proj = nn.Linear(self.rank, heads * (self.qk_nope_head_dim + self.v_head_dim), bias=False)
        self.o_proj = nn.Linear(heads * self.v_head_dim, spec.get("out_size", hidden), bias=spec["o_bias"])
        self._rotary = None  # the family's rotary embedding (set by the model), not a submodule of ours


    def forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None,
                cache=None, past_key_values=None, layer_past=None, **kwargs):
        cache = next((c for c in (cache, past_key_values, layer_past) if c is not None), None)
        bsz, q_len, _ = hidden_states.shape
        nope, rope, heads = self.qk_nope_head_dim, self.qk_rope_head_dim, self.num_heads
        query = self.q_proj(hidden_states).view(bsz, q_len, heads, nope + rope).transpose(1, 2)
        compressed = self.kv_a_proj_with_mqa(hidden_states)
        latent, k_rot = compressed.split([self.rank, rope], dim=-1)
        entry = torch.cat([self.kv_a_layernorm(latent), k_rot], -1).unsqueeze(1)  # (B, 1, T, r + rope): the cache
        if cache is not None:
            entry, _ = cache.update(entry, entry.new_empty(bsz, 1, q_len, 0), self.layer_idx, kwargs=kwargs)
        latent, k_rot = entry[:, 0].split([self.rank, rope], dim=-1)
        kv_len = latent.shape[1]
        positions = rope_positions(kv_len, q_len, kwargs.get("position_ids"), query.device)
        cos, sin = rope_tables(self._rotary, positions, query, self.rope_columns, self.layer_type)
        k_rot = apply_rope(k_rot[:, None], cos, sin)
        q_pass, q_rot = query.split([nope, rope], dim=-1)
        q_rot = apply_rope(q_rot, cos[:, :, kv_len - q_len:], sin[:, :, kv_len - q_len:])
        kv = self.kv_b_proj(latent).view(bsz, kv_len, heads, nope + self.v_head_dim).transpose(1, 2)
        k_nope, value = kv.split([nope, self.v_head_dim], dim=-1)
        key = torch.cat([k_nope, k_rot.expand(-1, heads, -1, -1)], -1)
        query = torch.cat([q_pass, q_rot], -1)
        return attend(self, query, key, value, attention_mask, kwargs)


def largest_inputs(x: torch.Tensor, scale: torch.Tensor, n: int) -> torch.Tensor:
    """``x`` with only each row's ``n`` entries of largest |x_i|·scale_i kept, the rest zero (input sparsity as in
    TEAL/CATS: a product then needs only those columns of its weight)."""
    keep = (x.abs() * scale).topk(n, dim=-1, sorted=False)[1]
    return torch.zeros_like(x).scatter(-1, keep, x.gather(-1, keep))


class MoEMLP(nn.Module):
    """混合专家 MLP：路由专家 + 可选的共享专家（始终激活）。

    专家权重以 3D 张量存放（``experts_gate/up``: E×m×d，``experts_down``: E×d×m）。路由：
    ``softmax``（top-k 后归一化）或 DeepSeek-V3 的 ``sigmoid``（``e_score_correction_bias`` 只用于
    选择，即无辅助损失的负载均衡；可按组限制）。``weights == "one"`` 时被选中的专家权重为 1——
    切分模式下它们本就是稠密 MLP 的一部分，无需缩放。``router == "gate"`` 时路由器就是专家自己的 gate 行，
    ``gate_input_dims`` 小于隐藏维时只读每个 token 最大的那部分输入维。
    """

    def __init__(self, spec: dict, config, act: nn.Module):
        super().__init__()
        d, e, m = spec["hidden_size"], spec["num_experts"], spec["expert_size"]
        self.num_experts, self.top_k, self.gated = e, spec["top_k"], spec["gated"]
        self.routing, self.weights = spec["routing"], spec["weights"]
        self.routed_scaling = spec.get("routed_scaling", 1.0)  # DeepSeek-V3's routed_scaling_factor
        self.n_group, self.topk_group = spec.get("n_group", 1), spec.get("topk_group", 1)
        self.act = act
        self.router = spec.get("router", "linear")
        self.gate = nn.Linear(d, e, bias=False) if self.router == "linear" else None  # DeepSeek's name
        if self.router == "lowrank":
            # reads a low-rank copy of the MLP's own gate projection: scores = Σ_expert |act(x·A·B)|·c
            r = spec["router_rank"]
            self.router_down = nn.Linear(d, r, bias=False)
            self.router_up = nn.Linear(r, e * m, bias=spec.get("router_bias", False))
        if self.router in ("lowrank", "gate"):
            # "gate": the experts' own gate rows, all computed, are the router (scores Σ_expert |act(x·W_g)|·c)
            self.router_scale = nn.Parameter(torch.zeros(e * m))
        # the gate router may read only each token's largest input dims (ranked by |x_i|·‖W_g[:, i]‖): all gate
        # rows then use that part of their columns, and the gates it gives are also the chosen neurons' gates
        self.gate_input_dims = spec.get("gate_input_dims", d) if self.router == "gate" else d
        if self.gate_input_dims < d:
            self.register_buffer("gate_input_scale", torch.ones(d))
        self.register_buffer("e_score_correction_bias", torch.zeros(e))
        self.experts_up = nn.Parameter(torch.zeros(e, m, d))
        self.experts_gate = nn.Parameter(torch.zeros(e, m, d)) if self.gated else None
        self.experts_down = nn.Parameter(torch.zeros(e, d, m))
        self.experts_up_bias = nn.Parameter(torch.zeros(e, m)) if spec["up_bias"] else None
        self.down_bias = nn.Parameter(torch.zeros(d)) if spec["down_bias"] else None
        s = spec.get("shared_size", 0)
        self.shared_up = nn.Linear(d, s, bias=spec["up_bias"]) if s else None
        self.shared_gate = nn.Linear(d, s, bias=False) if s and self.gated else None
        self.shared_down = nn.Linear(s, d, bias=False) if s else None
        self.last_routing = None  # (tokens, top_k) expert ids of the last forward, for balance statistics
        self._down_copy = None  # (weight key, experts_down as neuron rows), see _down_rows

    def params_per_expert(self) -> int:
        """Parameters of one routed expert that run only when it is chosen (the gate router runs every gate row)."""
        parts = [self.experts_up, self.experts_down, self.experts_up_bias]
        if self.router != "gate":
            parts.append(self.experts_gate)
        return sum(p[0].numel() for p in parts if p is not None)

    def inactive_params(self) -> int:
        """Parameters one token does not use: the unchosen experts, and the gate router's columns on the input
        dims it does not read."""
        e, m, d = self.experts_up.shape
        unread = e * m * (d - self.gate_input_dims)  # gate_input_dims is d unless a gate router reads part
        return self.params_per_expert() * (self.num_experts - self.top_k) + unread

    def all_gates(self, x: torch.Tensor) -> torch.Tensor:
        """Gate pre-activations of every routed neuron (tokens × E·m), from the token's largest input dims only
        when ``gate_input_dims`` is below the hidden size."""
        if self.gate_input_dims < x.shape[1]:
            x = largest_inputs(x, self.gate_input_scale, self.gate_input_dims)
        return packed_product(self, "gate", x, self.experts_gate.reshape(-1, x.shape[1]))

    def packable_products(self) -> dict:
        """The products over all experts (the masked path, and the gate router's gates) as ``name: (parameter,
        weight out × in)``: ``packed_linear`` packs them for decoding like the dense model's linear layers (at 16
        rows 3× faster than ``mm`` here). Not for large experts, which never run as one product."""
        if self.experts_up.shape[1] >= self.LOOP_MIN_EXPERT_SIZE:
            return {}
        e, m, d = self.experts_up.shape
        out = {"up": (self.experts_up, lambda: self.experts_up.detach().reshape(e * m, d)),
               "down": (self.experts_down, lambda: self._down_rows().detach().T.contiguous())}
        if self.gated:
            out["gate"] = (self.experts_gate, lambda: self.experts_gate.detach().reshape(e * m, d))
        return out

    def router_logits(self, x: torch.Tensor, gates: torch.Tensor | None = None) -> torch.Tensor:
        """Expert scores; the gate router reads ``gates`` (``all_gates(x)``, computed here when not given)."""
        if self.gate is not None:
            return self.gate(x).float()
        if self.router == "gate":
            h = self.act(self.all_gates(x) if gates is None else gates).abs() * self.router_scale
        else:
            h = self.act(self.router_up(self.router_down(x))).abs() * self.router_scale
        return h.float().view(x.shape[0], self.num_experts, -1).sum(-1)

    def route(self, x: torch.Tensor, gates: torch.Tensor | None = None):
        logits = self.router_logits(x, gates)
        if self.gate is None:  # scores of the low-rank reader are already magnitudes: rank them as they are
            scores = logits
            choice = scores + self.e_score_correction_bias
        elif self.routing == "softmax":
            scores = logits.softmax(-1)
            choice = scores
        else:
            scores = logits.sigmoid()
            choice = scores + self.e_score_correction_bias
        if self.n_group > 1:  # group-limited routing: only experts of the best topk_group groups compete
            grouped = choice.view(-1, self.n_group, self.num_experts // self.n_group)
            best = grouped.topk(min(2, grouped.shape[-1]), dim=-1)[0].sum(-1)
            keep = torch.zeros_like(best).scatter_(1, best.topk(self.topk_group, dim=-1)[1], 1.0)
            choice = choice.masked_fill(~keep.bool().repeat_interleave(self.num_experts // self.n_group, 1),
                                        float("-inf"))
        idx = choice.topk(self.top_k, dim=-1, sorted=False)[1]  # order is not used; unsorted is 4× faster
        if self.weights == "one" and scores.requires_grad:
            # exactly 1 in value, but d w / d s = 1/s: training (healing) moves the router through the chosen
            # experts' scores (a straight-through weight); a constant 1 would leave the router without gradient
            s = scores.gather(1, idx)
            w = (1 + (s - s.detach()) / s.detach().clamp_min(1e-20)).to(x.dtype)
        elif self.weights == "one":
            w = torch.ones_like(idx, dtype=x.dtype)
        else:
            w = scores.gather(1, idx)
            w = (w / w.sum(-1, keepdim=True).clamp_min(1e-20) * self.routed_scaling).to(x.dtype)
        return idx, w

    # temperature of the straight-through mask, relative to each token's threshold score (0.1 and 0.5 measured alike)
    STRAIGHT_THROUGH_T = 0.5

    def _learns_choice(self) -> bool:
        """Training a split MoE whose scores are magnitudes and whose weights are 1 (gate or low-rank router)."""
        return (self.gate is None and torch.is_grad_enabled() and self.router_scale.requires_grad
                and self.weights == "one" and self.n_group == 1 and self.top_k < self.num_experts)

    def _straight_through(self, x: torch.Tensor, gates: torch.Tensor | None):
        """``route`` for ``_learns_choice``: every expert, weighted exactly 1 if among the top-k and 0 if not, with
        the gradient of a sigmoid of its score around the token's threshold. The router then also learns which
        unchosen experts would have helped (top-k alone gives them no gradient). SmolLM2 layer 15, layer-wise
        stage, 400 steps: held-out error 0.108 → 0.102 (session 19 probe). Costs nothing extra where training
        runs the masked product over all experts anyway."""
        choice = self.router_logits(x, gates) + self.e_score_correction_bias
        top = choice.topk(self.top_k + 1, dim=-1)
        tau = 0.5 * (top[0][:, -2:-1] + top[0][:, -1:])  # between the k-th and the (k+1)-th score
        hard = torch.zeros_like(choice).scatter_(1, top[1][:, :-1], 1.0)
        soft = torch.sigmoid((choice - tau) / (self.STRAIGHT_THROUGH_T * tau.abs().clamp_min(1e-20)))
        idx = torch.arange(self.num_experts, device=x.device).expand(x.shape[0], -1)
        return idx, (hard + (soft - soft.detach())).to(x.dtype)  # exactly 0 or 1 in value

    # How a forward runs the chosen experts, by what measured fastest on CPU (SmolLM2 MLP sizes, one layer):
    # large experts (copy upcycling) run one by one on their own tokens, straight from their weights; small ones
    # run as one product over the experts some token chose (gathered once), or, when most are chosen or there are
    # many tokens (prefill), over all experts with the unchosen weighted 0. Gathering per token instead cost
    # 2–8× more from 4 tokens up (gate router, 16 tokens: 4.8 ms against 0.6 masked).
    GATHER_MAX_TOKENS = 32
    GATHER_MAX_USED = 0.5  # fraction of the experts chosen by some token, above which the masked product wins
    LOOP_MIN_EXPERT_SIZE = 64

    def _expert(self, x, e):
        h = x @ self.experts_up[e].T
        if self.experts_up_bias is not None:
            h = h + self.experts_up_bias[e]
        h = self.act(x @ self.experts_gate[e].T) * h if self.gated else self.act(h)
        return h @ self.experts_down[e].T

    def _used(self, idx: torch.Tensor) -> torch.Tensor:
        """The experts some token chose, ascending (flags instead of ``unique()``, which sorts all t·k ids)."""
        hit = torch.zeros(self.num_experts, dtype=torch.bool, device=idx.device)
        return hit.index_fill_(0, idx.reshape(-1), True).nonzero().squeeze(1)

    def _gathered(self, x, idx, w, used, gates=None):
        """Few tokens (decoding): the experts in ``used`` (chosen by some token) gathered once, as one product."""
        e, m, d = self.experts_up.shape
        rows = (used[:, None] * m + torch.arange(m, device=used.device)).reshape(-1)  # their neurons
        h = x @ self.experts_up.view(e * m, d).index_select(0, rows).T
        if self.experts_up_bias is not None:
            h = h + self.experts_up_bias.view(-1)[rows]
        if self.gated:  # the gates: taken from the router's when it computed them all
            g = x @ self.experts_gate.view(e * m, d).index_select(0, rows).T if gates is None else gates[:, rows]
            h = self.act(g) * h
        else:
            h = self.act(h)
        weight = torch.zeros(x.shape[0], e, dtype=x.dtype, device=x.device).scatter_(1, idx, w)[:, used]
        h = (h.view(x.shape[0], -1, m) * weight[..., None]).view(x.shape[0], -1)
        return h @ self._down_rows().index_select(0, rows)

    def _down_rows(self) -> torch.Tensor:
        """``experts_down`` with one row of d values per neuron, (E·m) × d: a view for single-neuron experts;
        otherwise a transposed copy, kept while the weights are unchanged and no gradient is taken (made on
        every call, the copy cost more than the product itself when decoding 16 rows)."""
        e, d, m = self.experts_down.shape
        if m == 1:
            return self.experts_down.view(e, d)
        if torch.is_grad_enabled():
            return self.experts_down.transpose(1, 2).reshape(e * m, d)
        key = (id(self.experts_down), self.experts_down.data_ptr(), self.experts_down._version)  # same, unchanged
        if self._down_copy is None or self._down_copy[0] != key:
            self._down_copy = (key, self.experts_down.detach().transpose(1, 2).contiguous().view(e * m, d))
        return self._down_copy[1]

    def _masked_dense(self, x, idx, w, gates=None):
        """Many tokens (prefill, evaluation): all experts as one dense product, unchosen ones weighted 0.

        Same result as running only the chosen experts; on CPU one large product beats a loop over many
        small experts. Decoding, where sparsity saves time, takes the gathered path.
        """
        e, m, d = self.experts_up.shape
        h = packed_product(self, "up", x, self.experts_up.reshape(e * m, d))
        if self.experts_up_bias is not None:
            h = h + self.experts_up_bias.reshape(-1)
        if self.gated:
            h = self.act(self.all_gates(x) if gates is None else gates) * h
        else:
            h = self.act(h)
        weight = torch.zeros(x.shape[0], e, dtype=x.dtype, device=x.device).scatter_(1, idx, w)
        h = (h.view(-1, e, m) * weight[..., None]).reshape(-1, e * m)
        return packed_product(self, "down", h, self._down_rows().T)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        gates = self.all_gates(x) if self.router == "gate" else None  # routing needs them all: compute once
        idx, w = self._straight_through(x, gates) if self._learns_choice() else self.route(x, gates)
        self.last_routing = idx.detach()
        large = self.experts_up.shape[1] >= self.LOOP_MIN_EXPERT_SIZE
        used = self._used(idx) if large or x.shape[0] <= self.GATHER_MAX_TOKENS else None  # not for prefill
        if large:  # large experts (copy upcycling): one by one
            out = torch.zeros_like(x)
            for e in used.tolist():
                rows, slot = (idx == e).nonzero(as_tuple=True)
                out.index_add_(0, rows, self._expert(x[rows], e) * w[rows, slot, None])
        elif used is not None and used.numel() <= self.GATHER_MAX_USED * self.num_experts:
            out = self._gathered(x, idx, w, used, gates)
        else:
            out = self._masked_dense(x, idx, w, gates)
        if self.shared_up is not None:
            h = self.shared_up(x)
            h = self.act(self.shared_gate(x)) * h if self.gated else self.act(h)
            out = out + self.shared_down(h)
        if self.down_bias is not None:
            out = out + self.down_bias
        return out.view(shape)


class DsoptPatchedMixin:
    """在源家族模型类构造完成后，按 ``config.dsopt`` 换入 dsopt 模块。

    带 MTP 模块时，``generate()`` 在批大小 1 且参数受支持时走投机解码（贪心输出与普通贪心逐 token 相同，
    采样保持基座分布）；``use_mtp=False`` 或其他情况交给 transformers 的普通 ``generate()``。
    上下文末尾的 n-gram 在前文出现过时，其后的至多 ``mtp_lookup`` 个 token 也作草稿（缺省 ``LOOKUP_TOKENS``，
    0 表示只用 MTP 模块；见 ``mtp.lookup_drafts``）；贪心时各模块在上一级的每个草稿之后给出 ``mtp_branches``
    个候选（每个模块一个数，如 (4, 2)；整数只设第一个模块；缺省 ``DRAFT_BRANCHES``，1 即单链），所有草稿合成
    一棵树由基座一次验证（见 ``mtp.ModuleDrafts``、``mtp.DraftTree``）。
    最近一次投机解码的统计在 ``self.last_mtp_stats``（有无查找草稿的步分开计）。
    """

    # SmolLM2, 12 prompts (scripts/results/mtp-smollm2-lookup-sweep.json): 36.8 tok/s with up to 10 lookup tokens,
    # 34.4 with 5, 36.3 with 20, 18.5 with the MTP modules alone; more tokens per step on book and chat prompts alike
    LOOKUP_TOKENS = 10
    # draft tree: 4 candidates for t+1, 2 after each for t+2. Same prompts, modules trained with dialogues
    # (scripts/results/mtp-smollm2-chat-tree-sweep.json): with lookup 3.63 / 3.78 / 3.87 / 3.98 tokens per step for
    # widths 1 / 2 / 4 / (4, 2) at the same speed (84.0 / 82.9 / 83.7 / 82.9 tok/s, 2.14-2.17x plain greedy); the
    # modules alone 1.54 / 1.71 / 1.83 / 1.91 per step, 1.08-1.15x. On this CPU the 12 extra rows cost about as
    # much as they save; where a verification forward is memory-bound (larger models, GPUs) they are nearly free.
    DRAFT_BRANCHES = (4, 2)

    MTP_KWARGS = {"input_ids", "attention_mask", "max_new_tokens", "do_sample", "temperature", "eos_token_id",
                  "pad_token_id", "generator", "mtp_heads", "mtp_lookup", "mtp_branches"}

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        apply_structure(self, config)
        self.last_mtp_stats = None

    def generate(self, inputs=None, use_mtp: bool | None = None, packed_cpu: bool = True, **kwargs):
        """``packed_cpu``：在 CPU 上用预打包的 oneDNN 权重解码（见 ``packed_linear``），普通与投机解码都用。"""
        with packed_linears(self, enabled=packed_cpu):
            return self._generate(inputs, use_mtp, **kwargs)

    def _generate(self, inputs, use_mtp, **kwargs):
        ids = inputs if inputs is not None else kwargs.get("input_ids")
        mask = kwargs.get("attention_mask")
        usable = (getattr(self, "mtp", None) is not None and ids is not None and ids.shape[0] == 1
                  and set(kwargs) <= self.MTP_KWARGS and (mask is None or bool(mask.all())))
        if use_mtp and not usable:
            raise ValueError("use_mtp=True 需要 MTP 模块、批大小 1、无填充，且只用 max_new_tokens/do_sample/temperature")
        if use_mtp is False or not usable:
            for key in ("mtp_heads", "mtp_lookup", "mtp_branches", "generator"):
                kwargs.pop(key, None)
            return super().generate(inputs, **kwargs)
        gc = self.generation_config
        sample = kwargs.get("do_sample", gc.do_sample)
        eos = kwargs.get("eos_token_id", gc.eos_token_id)
        eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        lookup, branches = kwargs.get("mtp_lookup"), kwargs.get("mtp_branches")
        out, self.last_mtp_stats = speculative_generate(
            self, ids, kwargs.get("max_new_tokens") or gc.max_new_tokens or 20, eos,
            temperature=(kwargs.get("temperature", gc.temperature) or 1.0) if sample else 0.0,
            heads=kwargs.get("mtp_heads"), generator=kwargs.get("generator"),
            lookup=self.LOOKUP_TOKENS if lookup is None else lookup,
            branches=self.DRAFT_BRANCHES if branches is None else branches)
        return out


def apply_structure(model: nn.Module, config) -> None:
    """Swap modules as ``config.dsopt`` records; used at load time and, with the same data, at conversion."""
    plan = getattr(config, "dsopt", None) or {}
    rotary = model.get_submodule(plan["rotary_path"]) if plan.get("rotary_path") else None
    for idx, spec in sorted((plan.get("attention") or {}).items(), key=lambda kv: int(kv[0])):
        path = f"{plan['layers_path']}.{idx}.{spec['path']}"
        old = model.get_submodule(path)
        if isinstance(old, (LatentAttention, DecoupledLatentAttention)):
            continue
        if spec.get("kind") == "decoupled":
            new = DecoupledLatentAttention(spec, config, getattr(old, "layer_idx", int(idx)))
        else:
            norms = {role: (old.get_submodule(spec[role]) if spec.get(role) else None) for role in ("q_norm", "k_norm")}
            new = LatentAttention(spec, config, getattr(old, "layer_idx", int(idx)), **norms)
        ref = next(iter(old.parameters()), None)
        if ref is not None:
            new.to(device=ref.device, dtype=ref.dtype)
        new._rotary = rotary
        model.set_submodule(path, new)
    for idx, spec in sorted((plan.get("mlp") or {}).items(), key=lambda kv: int(kv[0])):
        path = f"{plan['layers_path']}.{idx}.{spec['path']}"
        old = model.get_submodule(path)
        if isinstance(old, MoEMLP):
            continue
        new = MoEMLP(spec, config, old.get_submodule(spec["act"]))
        ref = next(iter(old.parameters()), None)
        if ref is not None:
            new.to(device=ref.device, dtype=ref.dtype)
        model.set_submodule(path, new)
    if plan.get("mtp") and getattr(model, "mtp", None) is None:
        model.mtp = build_mtp(model, config)


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


def family_of(class_name: str, table: dict) -> str | None:
    """The model type whose class in ``table`` is ``class_name``. Several may share one (transformers 5.24 maps
    exaone, internlm3 and iquestcoder to ``LlamaForCausalLM`` too, gpt-sw3 to ``GPT2LMHeadModel``): then the one
    named like the class (llama for ``LlamaForCausalLM``), so that a config and its model resolve to one family."""
    types = [t for t, c in table.items() if c == class_name]
    stem = class_name.lower()
    for suffix in ("config", "forcausallm", "lmheadmodel"):
        stem = stem.removesuffix(suffix)
    return next((t for t in types if "".join(ch for ch in t if ch.isalnum()) == stem), types[0] if types else None)


CONFIG_NAME, MODEL_NAME = "DsoptConfig_", "DsoptForCausalLM_"  # + model type: the names config.json's auto_map uses


def __getattr__(name: str):
    # config.json's auto_map names the classes; build them on first access (PEP 562). Outputs name them by model
    # type (DsoptForCausalLM_internlm3); older outputs by class (DsoptLlamaConfig), still understood.
    for prefix, pick in ((CONFIG_NAME, 0), (MODEL_NAME, 1)):
        if name.startswith(prefix) and name[len(prefix):] in CONFIG_MAPPING_NAMES:
            return family_classes(name[len(prefix):])[pick]
    if name.startswith("Dsopt"):
        for table, pick in ((CONFIG_MAPPING_NAMES, 0), (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, 1)):
            model_type = family_of(name[len("Dsopt"):], table)
            if model_type is not None:
                return family_classes(model_type)[pick]
    raise AttributeError(name)
