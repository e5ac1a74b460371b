"""导出为原生 DeepSeek-V3 格式：标准 transformers 以 ``DeepseekV3ForCausalLM`` 加载，不需要任何自定义代码。

输入是 dsopt 的补丁模型（注意力为解耦 RoPE 的 ``DecoupledLatentAttention``，MLP 为稠密或 ``MoEMLP``，
可带 MTP 模块）。这里只做布局与配置的映射，不再做任何近似；能否映射在写出前逐项检查，不能时说明原因：

- 注意力：DeepSeek 的规范布局，推理引擎（llama.cpp、vLLM、SGLang）按它读取：查询走 q_a_proj / q_a_layernorm /
  q_b_proj（``q_lora_rank`` = 隐藏维，精确，见 ``query_lora``）；查询与共享旋转键的旋转维按交错的频率对存放，
  ``rope_interleave: true``（精确的行置换）；``num_key_value_heads = num_attention_heads``（键、值由潜在向量为
  每头展开）；旋转频率必须是源频率的等比子集，写成 ``rope_theta``（必要时加 ``linear`` 缩放）。
- MLP：前 ``first_k_dense_replace`` 层稠密，其后每层必须是形状相同的 MoE（sigmoid 路由、线性 gate）。
- MTP：写在 ``model.layers.{N+k}``（DeepSeek-V3 的检查点布局）：enorm / hnorm / eh_proj（DeepSeek 的拼接
  顺序是 [嵌入; 隐藏状态]）/ 一个完整解码块 / shared_head.norm。MTP 块在 transformers 中总是 MoE：
  主模型没有 MoE 时，把稠密 MLP 精确地拆成 2 个路由专家（top-2，各得权重 1）加共享专家。
- ``rms_norm_eps`` 写成 1e-6：潜在向量的 RMSNorm 工作在线性区（见 ``converters.rope_split.latent_scale``），
  它的 eps 必须是各推理引擎都一致的值；transformers 固定用 1e-6，vLLM/SGLang 读配置，两者由此一致。
  转换一开始（基座测完之后）就把模型所有 RMSNorm 的 eps 换成 1e-6（``adopt_eps``），所以报告的保真度
  已包含这一改动，导出的模型与 dsopt 的前向逐 logit 相同。
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..errors import ExportError
from ..evaluation.metrics import cache_bytes_per_token
from ..model.locate import final_norm_path
from ..model.weights import rope_angles, weight_of
from ..runtime.modeling import DecoupledLatentAttention, MoEMLP

EXPORT_EPS = 1e-6



def adopt_eps(model: nn.Module) -> float | None:
    """Give every RMSNorm of ``model`` the export's eps, so the converted model is measured as it will be exported.

    Returns the source's eps (None when it already was EXPORT_EPS)."""
    old = getattr(model.config, "rms_norm_eps", None)
    if old == EXPORT_EPS:
        return None
    model.config.rms_norm_eps = EXPORT_EPS
    for mod in model.modules():
        if "RMSNorm" in type(mod).__name__:
            for attr in ("variance_epsilon", "eps"):
                if isinstance(getattr(mod, attr, None), float):
                    setattr(mod, attr, EXPORT_EPS)
    return old


def _plain_rms_weight(norm: nn.Module, where: str) -> torch.Tensor:
    """The weight of a norm that behaves as x/rms(x)·w (checked numerically, so Gemma's 1+w or LayerNorm fail)."""
    w = getattr(norm, "weight", None)
    if w is None:
        raise ExportError(f"{where} 没有 weight，不是 RMSNorm")
    x = torch.randn(3, w.shape[0], dtype=w.dtype, device=w.device)
    with torch.no_grad():
        got = norm(x)
        ref = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + EXPORT_EPS) * w.float()
    if not torch.allclose(got.float(), ref, rtol=1e-3, atol=1e-4):
        raise ExportError(f"{where}（{type(norm).__name__}）不是普通 RMSNorm（x/rms(x)·w），DeepSeek-V3 无法表达")
    return w.detach()


def rope_parameters(rotary: nn.Module, rot: int, pairs: list[int]) -> dict:
    """DeepSeek rotary settings that reproduce the kept source frequencies exactly (or an ExportError)."""
    theta, scale = rope_angles(rotary, rot)
    if not torch.allclose(scale, torch.ones_like(scale), atol=1e-6):
        raise ExportError("源 RoPE 对 cos/sin 有缩放（attention_scaling ≠ 1，例如 YaRN），DeepSeek-V3 的 default/linear "
                          "旋转无法表达")
    kept = theta[pairs]
    n = len(pairs)
    ratio = float(kept[1] / kept[0]) if n > 1 else 0.5
    want = kept[0] * ratio ** torch.arange(n, dtype=torch.float64)
    if not torch.allclose(kept, want, rtol=1e-4):
        raise ExportError(f"保留的源频率 {pairs} 不成等比数列（源 RoPE 可能带 llama3 式缩放），"
                          f"一个 rope_theta 无法表达")
    base = ratio ** -n  # DeepSeek: inv_freq_j = base^(-2j/(2n)) / factor
    factor = 1.0 / float(kept[0])
    if abs(factor - 1.0) < 1e-6:
        return {"rope_type": "default", "rope_theta": base}
    return {"rope_type": "linear", "rope_theta": base, "factor": factor}


def _split_dense(gate, up, down):
    """A dense SwiGLU MLP as 2 routed experts (top-2, weight 1 each) plus shared experts of the same size: exact."""
    inter = gate.shape[0]
    shared = next((s for s in range(1, 9) if inter % (2 + s) == 0), None)
    if shared is None:
        raise ExportError(f"MTP 块的稠密 MLP 中间维 {inter} 无法均分成 2 个路由专家加共享专家")
    m = inter // (2 + shared)
    return {"experts": 2, "top_k": 2, "size": m, "n_shared": shared, "scaling": 2.0,
            "gate": gate[:2 * m].view(2, m, -1), "up": up[:2 * m].view(2, m, -1),
            "down": down[:, :2 * m].T.reshape(2, m, -1).transpose(1, 2),
            "router": torch.zeros(2, gate.shape[1]), "bias": torch.zeros(2),
            "shared": (gate[2 * m:], up[2 * m:], down[:, 2 * m:])}


def _moe_parts(mlp: MoEMLP, where: str) -> dict:
    if mlp.gate is None or mlp.routing != "sigmoid" or not mlp.gated or mlp.weights != "prob":
        raise ExportError(f"{where} 的 MoE 不是 DeepSeek-V3 的形式（需要 sigmoid 路由、线性 gate、归一化权重、门控专家）")
    if mlp.experts_up_bias is not None or mlp.down_bias is not None:
        raise ExportError(f"{where} 的专家带偏置，DeepSeek-V3 的专家没有偏置")
    m, d = mlp.experts_up.shape[1], mlp.experts_up.shape[2]
    s = mlp.shared_up.weight.shape[0] if mlp.shared_up is not None else 0
    if s % m:
        raise ExportError(f"{where} 的共享专家宽度 {s} 不是专家宽度 {m} 的整数倍")
    ref = mlp.experts_up
    shared = ((mlp.shared_gate.weight.detach(), mlp.shared_up.weight.detach(), mlp.shared_down.weight.detach()) if s
              else (ref.new_zeros(0, d), ref.new_zeros(0, d), ref.new_zeros(d, 0)))
    return {"experts": mlp.num_experts, "top_k": mlp.top_k, "size": m, "n_shared": s // m,
            "scaling": float(mlp.routed_scaling), "n_group": mlp.n_group, "topk_group": mlp.topk_group,
            "gate": mlp.experts_gate.detach(), "up": mlp.experts_up.detach(), "down": mlp.experts_down.detach(),
            "router": mlp.gate.weight.detach(), "bias": mlp.e_score_correction_bias.detach(), "shared": shared}


def _dense_parts(layer: nn.Module, lm, where: str):
    if lm.gate is None:
        raise ExportError(f"{where} 的 MLP 没有 gate 投影（不是 SwiGLU 类），DeepSeek-V3 的 MLP 无法表达")
    (wg, bg), (wu, bu), (wd, bd) = weight_of(layer, lm.gate), weight_of(layer, lm.up), weight_of(layer, lm.down, rows=False)
    if any(b is not None for b in (bg, bu, bd)):
        raise ExportError(f"{where} 的 MLP 带偏置，DeepSeek-V3 的 MLP 没有偏置")
    return wg, wu, wd


def _attention(attn: nn.Module, where: str) -> DecoupledLatentAttention:
    if not isinstance(attn, DecoupledLatentAttention):
        raise ExportError(f"{where} 不是解耦 RoPE 的 MLA（{type(attn).__name__}）；请用 --mla --mla-rope decoupled 转换")
    if attn.sliding_window:
        raise ExportError(f"{where} 是滑动窗口注意力（sliding_window={attn.sliding_window}），DeepSeek-V3 没有滑动窗口："
                          f"长于窗口的上下文会算得不同")
    return attn


def _all_mapped(layer: nn.Module, lm, where: str) -> None:
    """Every parameter of ``layer`` sits in a module the layout maps (attention, its two norms, the MLP): one
    outside them (GLM-4's post-norms, say) is computation DeepSeek-V3 would silently skip."""
    mapped = [m for m in (lm.attention, lm.attn_norm, lm.mlp_norm, lm.mlp) if m]
    left = [n for n, _ in layer.named_parameters() if not any(n == m or n.startswith(m + ".") for m in mapped)]
    if left:
        raise ExportError(f"{where}有 DeepSeek-V3 的层里没有的参数：{', '.join(left[:4])}，导出会丢掉它们的计算")


def interleave_rows(rope: int) -> torch.Tensor:
    """Rotary dims in rotate-half order (x_0…x_{n-1}, y_0…y_{n-1}) put in DeepSeek's interleaved pair order
    (x_0, y_0, x_1, y_1, …): exact, since query and key are permuted alike (``rope_interleave: true``)."""
    n = rope // 2
    return torch.stack([torch.arange(n), torch.arange(n) + n], 1).reshape(-1)


def query_lora(wq: torch.Tensor, norm: torch.Tensor, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The query as q_b(RMSNorm(q_a(x))) with q_lora_rank = hidden, exact: x = RMSNorm_in(h) = h/rms(h)·g, so
    q_a = diag(1/g) gives h/rms(h), whose rms is 1 — the q_a norm is then the identity (weight 1) and
    q_b = W_q·diag(g). Engines that only load DeepSeek's q-LoRA path (llama.cpp) read it as is."""
    g = norm.detach().double()
    if bool((g.abs() < 1e-6 * g.abs().max()).any()):
        raise ExportError(f"{where} 的输入归一化权重含零，q_a/q_b 查询路径无法精确表达")
    q_a = torch.diag(1.0 / g).to(wq.dtype)
    q_b = (wq.double() * g[None]).to(wq.dtype)
    return q_a, q_b


class _Layout:
    """Collects the DeepSeek-V3 tensors of the main model and of the MTP layers, and the shapes they imply."""

    def __init__(self):
        self.main: dict[str, torch.Tensor] = {}
        self.mtp: dict[str, torch.Tensor] = {}
        self.moe_shape: dict | None = None
        self.attn_shape: dict | None = None
        self.bias = False

    def attention(self, out: dict, p: str, a: DecoupledLatentAttention, norm: torch.Tensor, where: str) -> None:
        """One layer's attention in DeepSeek's canonical layout: the query through q_a/q_b (``query_lora``) and the
        rotary rows of the query and of the shared key in interleaved pair order (``interleave_rows``)."""
        shape = {"num_heads": a.num_heads, "kv_lora_rank": a.rank, "qk_nope_head_dim": a.qk_nope_head_dim,
                 "qk_rope_head_dim": a.qk_rope_head_dim, "v_head_dim": a.v_head_dim,
                 "rope_columns": list(a.rope_columns), "hidden": a.q_proj.weight.shape[1]}
        if self.attn_shape is None:
            self.attn_shape = shape
        elif shape != self.attn_shape:
            raise ExportError(f"{where} 的注意力形状与第 0 层不同（DeepSeek-V3 只有一个 kv_lora_rank 与一组旋转频率）")
        nope, rope, rank = a.qk_nope_head_dim, a.qk_rope_head_dim, a.rank
        head = nope + rope
        q_rows = torch.cat([torch.cat([torch.arange(h * head, h * head + nope), h * head + nope + interleave_rows(rope)])
                            for h in range(a.num_heads)])
        q_a, q_b = query_lora(a.q_proj.weight.detach()[q_rows], norm, where)
        out[p + "self_attn.q_a_proj.weight"] = q_a
        out[p + "self_attn.q_a_layernorm.weight"] = torch.ones(q_a.shape[0], dtype=q_a.dtype)
        out[p + "self_attn.q_b_proj.weight"] = q_b
        kv_rows = torch.cat([torch.arange(rank), rank + interleave_rows(rope)])
        out[p + "self_attn.kv_a_proj_with_mqa.weight"] = a.kv_a_proj_with_mqa.weight.detach()[kv_rows]
        out[p + "self_attn.kv_a_layernorm.weight"] = a.kv_a_layernorm.weight
        out[p + "self_attn.kv_b_proj.weight"] = a.kv_b_proj.weight
        out[p + "self_attn.o_proj.weight"] = a.o_proj.weight
        for name, lin, rows in (("kv_a_proj_with_mqa", a.kv_a_proj_with_mqa, kv_rows), ("o_proj", a.o_proj, None)):
            if lin.bias is not None:
                self.bias = True
                out[p + f"self_attn.{name}.bias"] = lin.bias.detach() if rows is None else lin.bias.detach()[rows]

    def moe(self, out: dict, p: str, parts: dict, where: str, fused: bool) -> None:
        shape = {k: parts[k] for k in ("experts", "top_k", "size", "n_shared", "scaling")}
        shape.update(n_group=parts.get("n_group", 1), topk_group=parts.get("topk_group", 1))
        if self.moe_shape is None:
            self.moe_shape = shape
        elif {k: v for k, v in shape.items() if k not in ("n_group", "topk_group")} != \
                {k: v for k, v in self.moe_shape.items() if k not in ("n_group", "topk_group")}:
            raise ExportError(f"{where} 的 MoE 形状 {shape} 与其他层 {self.moe_shape} 不同（DeepSeek-V3 每层相同）")
        out[p + "mlp.gate.weight"] = parts["router"].float()
        out[p + "mlp.gate.e_score_correction_bias"] = parts["bias"].float()
        if fused:  # the in-memory layout of transformers' DeepseekV3Experts
            out[p + "mlp.experts.gate_up_proj"] = torch.cat([parts["gate"], parts["up"]], 1)
            out[p + "mlp.experts.down_proj"] = parts["down"]
        else:  # the checkpoint layout transformers converts from when loading
            for e in range(parts["experts"]):
                out[p + f"mlp.experts.{e}.gate_proj.weight"] = parts["gate"][e]
                out[p + f"mlp.experts.{e}.up_proj.weight"] = parts["up"][e]
                out[p + f"mlp.experts.{e}.down_proj.weight"] = parts["down"][e]
        sg, su, sd = parts["shared"]
        out[p + "mlp.shared_experts.gate_proj.weight"] = sg
        out[p + "mlp.shared_experts.up_proj.weight"] = su
        out[p + "mlp.shared_experts.down_proj.weight"] = sd


def deepseek_v3_layout(model: nn.Module, mm) -> tuple[dict, dict, dict]:
    """(config kwargs, main-model state dict in transformers' in-memory layout, MTP tensors in checkpoint layout).

    ``mm`` is the source's ModelMap: the roles' paths inside a layer are the same in the patched model."""
    plan = model.config.dsopt
    layers = model.get_submodule(plan["layers_path"])
    lay = _Layout()
    dense_prefix, seen_moe = 0, False
    inter = None
    for i, (layer, lm) in enumerate(zip(layers, mm.layers)):
        where = f"第 {i} 层"
        p = f"model.layers.{i}."
        norm = _plain_rms_weight(layer.get_submodule(lm.attn_norm), where + "输入归一化")
        lay.attention(lay.main, p, _attention(layer.get_submodule(lm.attention), where + "注意力"), norm, where)
        lay.main[p + "input_layernorm.weight"] = norm
        if lm.mlp is None or lm.mlp_norm is None:
            raise ExportError(f"{where} 的 MLP 没有定位到（缺少角色 {', '.join(lm.missing) or 'mlp'}）：源模型的 MLP 已是专家"
                              f"（Mixtral、Qwen3-MoE 一类）或不是普通的 MLP，DeepSeek-V3 导出只能写稠密 MLP 或 dsopt 切出的 MoE")
        lay.main[p + "post_attention_layernorm.weight"] = _plain_rms_weight(layer.get_submodule(lm.mlp_norm),
                                                                            where + "MLP 前归一化")
        mlp = layer.get_submodule(lm.mlp)
        if isinstance(mlp, MoEMLP):
            seen_moe = True
            lay.moe(lay.main, p, _moe_parts(mlp, where), where, fused=True)
        else:
            if seen_moe:
                raise ExportError(f"{where} 是稠密 MLP，但它前面已有 MoE 层：DeepSeek-V3 只允许前 first_k_dense_replace 层稠密"
                                  f"（用 --moe-allocation uniform --moe-first-dense K）")
            dense_prefix += 1
            wg, wu, wd = _dense_parts(layer, lm, where)
            inter = wg.shape[0]
            lay.main[p + "mlp.gate_proj.weight"], lay.main[p + "mlp.up_proj.weight"] = wg, wu
            lay.main[p + "mlp.down_proj.weight"] = wd
        _all_mapped(layer, lm, where)
    n_layers = len(layers)
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    lay.main["model.embed_tokens.weight"] = embed.weight
    # untied even when the source ties: vLLM and SGLang never tie DeepSeek's lm_head (SGLang would leave it unset)
    lay.main["lm_head.weight"] = head.weight.detach().clone()
    lay.main["model.norm.weight"] = _plain_rms_weight(model.get_submodule(_final_norm(model)), "末层归一化")

    heads = len(getattr(model, "mtp", None) or [])
    for k in range(heads):
        mod, p = model.mtp[k], f"model.layers.{n_layers + k}."
        where = f"MTP 模块 {k}"
        d = mod.eh_proj.weight.shape[0]
        w = mod.eh_proj.weight.detach()
        lay.mtp[p + "eh_proj.weight"] = torch.cat([w[:, d:], w[:, :d]], 1)  # ours [h; e], DeepSeek [e; h]
        lay.mtp[p + "enorm.weight"] = mod.enorm.weight
        lay.mtp[p + "hnorm.weight"] = mod.hnorm.weight
        lay.mtp[p + "shared_head.norm.weight"] = _plain_rms_weight(mod.norm, where + "末层归一化")
        block, lm = mod.block, mm.layers[plan["mtp"]["source_layer"]]
        norm = _plain_rms_weight(block.get_submodule(lm.attn_norm), where)
        lay.attention(lay.mtp, p, _attention(block.get_submodule(lm.attention), where), norm, where)
        lay.mtp[p + "input_layernorm.weight"] = norm
        lay.mtp[p + "post_attention_layernorm.weight"] = _plain_rms_weight(block.get_submodule(lm.mlp_norm), where)
        mlp = block.get_submodule(lm.mlp)
        parts = _moe_parts(mlp, where) if isinstance(mlp, MoEMLP) else _split_dense(*_dense_parts(block, lm, where))
        lay.moe(lay.mtp, p, parts, where, fused=False)

    a, moe = lay.attn_shape, lay.moe_shape
    rot_half = len(a["rope_columns"]) // 2
    pairs = a["rope_columns"][:rot_half]
    first = next(iter(mm.layers))
    rotary = model.get_submodule(plan["rotary_path"])
    src = model.config
    cfg = {
        "vocab_size": embed.weight.shape[0], "hidden_size": a["hidden"], "num_hidden_layers": n_layers,
        "intermediate_size": inter or (moe["size"] * (moe["experts"] + moe["n_shared"]) if moe else a["hidden"]),
        "num_attention_heads": a["num_heads"], "num_key_value_heads": a["num_heads"],
        "q_lora_rank": a["hidden"], "kv_lora_rank": a["kv_lora_rank"], "qk_nope_head_dim": a["qk_nope_head_dim"],
        "qk_rope_head_dim": a["qk_rope_head_dim"], "v_head_dim": a["v_head_dim"],
        "rope_parameters": rope_parameters(rotary, first.rotary_dim, pairs), "rope_interleave": True,
        "attention_bias": lay.bias, "rms_norm_eps": EXPORT_EPS,
        "first_k_dense_replace": dense_prefix, "num_nextn_predict_layers": heads,
        "hidden_act": getattr(src, "hidden_act", None) or getattr(src, "hidden_activation", "silu"),
        "max_position_embeddings": getattr(src, "max_position_embeddings", 4096),
        "tie_word_embeddings": False,
        # keys transformers does not define but the engines' DeepSeek loaders read (SGLang: moe_layer_freq
        # without a default; older loaders: a top-level rope_theta)
        "moe_layer_freq": 1, "ep_size": 1,
        "bos_token_id": src.bos_token_id, "eos_token_id": src.eos_token_id,
        "pad_token_id": getattr(src, "pad_token_id", None),
    }
    if moe:
        cfg.update(n_routed_experts=moe["experts"], num_experts_per_tok=moe["top_k"],
                   moe_intermediate_size=moe["size"], n_shared_experts=moe["n_shared"],
                   routed_scaling_factor=moe["scaling"], norm_topk_prob=True,
                   n_group=moe["n_group"], topk_group=moe["topk_group"],
                   # transformers' DeepSeek-V3 always scores with sigmoid and selects by score + bias; engines read
                   # these keys and default otherwise (llama.cpp: softmax gating without them)
                   scoring_func="sigmoid", topk_method="noaux_tc")
    if lay.bias:  # attention_bias also gives q_a_proj and o_proj a bias: layers without one get zeros
        for i in range(n_layers + heads):
            tensors = lay.main if i < n_layers else lay.mtp
            for name, size in (("kv_a_proj_with_mqa", a["kv_lora_rank"] + a["qk_rope_head_dim"]), ("o_proj", a["hidden"]),
                               ("q_a_proj", a["hidden"])):
                tensors.setdefault(f"model.layers.{i}.self_attn.{name}.bias", torch.zeros(size))
    return cfg, lay.main, lay.mtp


def _final_norm(model: nn.Module) -> str:
    rec = (model.config.dsopt or {}).get("mtp")
    return rec["norm_path"] if rec else final_norm_path(model)


def write_deepseek_v3(model: nn.Module, mm, tokenizer, tmp: Path, max_shard_size: str = "200MB") -> dict:
    """Write the stock DeepSeek-V3 checkpoint of ``model`` into ``tmp``; return the config written."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    cfg_kwargs, main, mtp = deepseek_v3_layout(model, mm)
    config = DeepseekV3Config(**cfg_kwargs)
    dtype = next(model.parameters()).dtype
    with torch.device("meta"):
        stock = DeepseekV3ForCausalLM(config)
    state = {k: v.detach().to(dtype if v.is_floating_point() and "mlp.gate." not in k else v.dtype).contiguous()
             for k, v in main.items()}
    missing, unexpected = stock.load_state_dict(state, strict=False, assign=True)  # lm_head is never tied here
    if missing or unexpected:
        raise ExportError(f"DeepSeek-V3 映射不完整：缺少 {missing[:5]}，多出 {unexpected[:5]}")
    stock.generation_config = model.generation_config  # the source's stop tokens and sampling defaults
    stock.save_pretrained(tmp, max_shard_size=max_shard_size, safe_serialization=True)
    # transformers 5 writes only rope_parameters; loaders written for 4.x read a top-level rope_theta (else 10000)
    cfg_path = tmp / "config.json"
    written = json.loads(cfg_path.read_text())
    written["rope_theta"] = written["rope_parameters"]["rope_theta"]
    cfg_path.write_text(json.dumps(written, indent=2, sort_keys=True) + "\n")
    if mtp:
        append_shard(tmp, "model-mtp.safetensors",
                      {k: v.detach().to(dtype if "mlp.gate." not in k else torch.float32).contiguous()
                       for k, v in mtp.items()})
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    return cfg_kwargs


def append_shard(folder: Path, name: str, tensors: dict) -> None:
    """Add a safetensors file and list its tensors in the index.

    A single-file save is turned into a sharded one first: transformers prefers ``model.safetensors`` over the
    index when both exist, and would then never see the added file."""
    save_file(tensors, str(folder / name), metadata={"format": "pt"})
    index_path = folder / "model.safetensors.index.json"
    if index_path.exists():
        index = json.loads(index_path.read_text())
    else:
        from safetensors import safe_open

        main = "model-main.safetensors"
        (folder / "model.safetensors").rename(folder / main)
        with safe_open(str(folder / main), "pt") as f:
            index = {"metadata": {}, "weight_map": {k: main for k in f.keys()}}
    index["weight_map"].update({k: name for k in tensors})
    index.setdefault("metadata", {})["total_size"] = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def load_stock(folder: Path, with_mtp_keys: bool = True):
    """Load an export with stock transformers; make its MTP layers findable by ``generate(use_mtp=True)``.

    transformers 5 finds DeepSeek-V3 MTP weights through ``DeepseekV3ForCausalLM._keys_to_ignore_on_load_unexpected``,
    which names layer 61 only (the 671B model): a model with N layers keeps its MTP at ``model.layers.N``, so the
    pattern for N is added on the loaded instance (one line; a fresh process needs it too, see README).
    """
    from transformers import DeepseekV3ForCausalLM
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()  # the MTP keys are "unexpected" for the main model: expected, not news
    try:
        model = DeepseekV3ForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    finally:
        logging.set_verbosity(level)
    if with_mtp_keys:
        model._keys_to_ignore_on_load_unexpected = set(model._keys_to_ignore_on_load_unexpected or ()) | {
            rf"model\.layers\.{model.config.num_hidden_layers}\..*"}
    return model


class _RouterRecord:
    """dsopt's routing per MoE layer (call order): chosen experts and the scores they were chosen by."""

    def __init__(self, patched: nn.Module):
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.handles = []
        for m in patched.modules():
            if isinstance(m, MoEMLP) and m.gate is not None:
                self.handles.append(m.gate.register_forward_hook(self._logits))
                self.handles.append(m.register_forward_hook(self._choice))

    def _logits(self, gate, args, out):
        self._last = out.detach().float().reshape(-1, out.shape[-1])

    def _choice(self, mlp, args, out):
        self.layers.append((mlp.last_routing.clone(), self._last))

    def remove(self):
        for h in self.handles:
            h.remove()


class _PinnedRouting:
    """Stock transformers' routers made to choose what dsopt chose, with their own weights for those experts.

    Routing is a hard top-k: where two experts' scores nearly tie, the rounding difference between two
    implementations picks a different expert, and that token's output changes by a whole expert (the near-ties
    are real: split experts' scores sit close together). So the mapping is checked with the choice pinned: the
    logits must agree as for a dense model, each router's logits must equal dsopt's, and every expert dsopt chose
    must be among stock's top-k up to that rounding (this checks the selection bias too).
    """

    def __init__(self, stock: nn.Module, record: _RouterRecord):
        self.record, self.calls, self.worst = record, 0, {"router_logit_diff": 0.0, "choice_gap": 0.0}
        self.handles = [m.gate.register_forward_hook(self._pin) for m in stock.modules()
                        if type(m).__name__ == "DeepseekV3MoE"]

    def _pin(self, router, args, out):
        logits, _, own = out
        if self.calls >= len(self.record.layers):  # an MTP layer's MoE: not part of the main forward compared
            return out
        idx, ours = self.record.layers[self.calls]
        self.calls += 1
        scores = logits.float().sigmoid()
        weights = scores.gather(1, idx)
        if router.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        diff = float((logits.float() - ours).abs().max())
        choice = scores + router.e_score_correction_bias
        gap = float((choice.gather(1, own).amin(-1) - choice.gather(1, idx).amin(-1)).max())
        rounding = 2 * float((scores - ours.sigmoid()).abs().max())
        scale = max(float(ours.abs().max()), 1e-30)
        self.worst["router_logit_diff"] = max(self.worst["router_logit_diff"], diff / scale)
        self.worst["choice_gap"] = max(self.worst["choice_gap"], gap - rounding if router.num_group == 1 else 0.0)
        return logits, weights * router.routed_scaling_factor, idx

    def remove(self):
        for h in self.handles:
            h.remove()


def verify_export(folder: Path, patched: nn.Module, ids: torch.Tensor, mtp_tokens: int = 12) -> dict:
    """Load the export with stock transformers and compare it with dsopt's own forward of the same model.

    With MoE layers the comparison pins stock's routing to dsopt's choices (see ``_PinnedRouting``); the
    free-running agreement is reported beside it.
    """
    stock = load_stock(folder)
    record = _RouterRecord(patched)
    try:
        with torch.no_grad():
            ours = patched(input_ids=ids, use_cache=False).logits.float()
    finally:
        record.remove()
    pins = _PinnedRouting(stock, record) if record.layers else None
    try:
        with torch.no_grad():
            theirs = stock(input_ids=ids, use_cache=False).logits.float()
    finally:
        if pins:
            pins.remove()
    per_token = (ours - theirs).abs().amax(-1)
    diff = float(per_token.max())
    result = {"format": "deepseek-v3", "class": type(stock).__name__,
              "max_abs_logit_diff_vs_dsopt": diff, "logit_scale": float(ours.abs().max()),
              "top1_agreement_vs_dsopt": float((ours.argmax(-1) == theirs.argmax(-1)).float().mean()),
              "stock_kv_cache": cache_bytes_per_token(stock, ids[:1, :64]),
              "rope_parameters": stock.config.rope_parameters}
    over = per_token > 1e-3 * max(result["logit_scale"], 1.0)
    result["tokens_over_tolerance"] = float(over.float().mean())
    if pins:
        with torch.no_grad():
            free = stock(input_ids=ids, use_cache=False).logits.float()
        result.update({"routing": "pinned to dsopt's choices", **pins.worst,
                       "free_routing_top1_agreement_vs_dsopt": float((ours.argmax(-1) == free.argmax(-1)).float().mean()),
                       "free_routing_max_abs_logit_diff_vs_dsopt": float((ours - free).abs().max())})
        if pins.worst["router_logit_diff"] > 1e-3 or pins.worst["choice_gap"] > 0:
            raise ExportError("标准 transformers 的路由与 dsopt 的不同（路由 logits 相对差 "
                              f"{pins.worst['router_logit_diff']:.3g}，选择差 {pins.worst['choice_gap']:.3g}），"
                              "路由器或选择偏置的映射有误，未写出")
    if over.any():
        window = getattr(patched.config, "sliding_window", None)
        why = ("源模型配置了滑动窗口（sliding_window），DeepSeek-V3 没有滑动窗口" if window
               else "映射有误")
        raise ExportError(f"标准 transformers 加载导出后的 logits 与 dsopt 自己的前向相差 {diff:.3g}，"
                          f"{result['tokens_over_tolerance']:.1%} 的 token 超出容差（{why}），未写出")
    if stock.config.num_nextn_predict_layers:
        prompt = ids[:1, :32]
        with torch.no_grad():
            plain = stock.generate(prompt, max_new_tokens=mtp_tokens, do_sample=False, pad_token_id=0)
            drafted = stock.generate(prompt, max_new_tokens=mtp_tokens, do_sample=False, pad_token_id=0, use_mtp=True)
        result["mtp_generate_identical_to_greedy"] = bool(torch.equal(plain, drafted))
    return result
