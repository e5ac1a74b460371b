"""CPU 解码用的预打包线性层（oneDNN）。

为什么需要：解码一步只有 1 到几行输入。这台 2 核 CPU 上，``F.linear`` 走的 MKL 在 2–3 行时每次都要重新打包
整块权重，耗时几乎随行数线性增长（SmolLM2 基座前向：1 行 43 ms，2 行 64 ms，3 行 77 ms），于是投机解码
验证草稿比普通一步贵得多。权重事先按 oneDNN 的布局打包一次后，1–6 行的代价几乎相同（41 / 46 / 47 / 48 /
51 ms），验证草稿才接近“免费”，普通贪心解码也略快。

只在 CPU、float32、不求梯度（``generate()`` 内）时生效。打包好的权重随模型缓存：放在模型之外的弱引用表里，
复制或序列化模型不受影响，约多占一份线性层权重的内存；权重被改动后（``_version`` 或存储变化）自动重新打包。
可用内存不足两份权重时不打包。
不是 ``nn.Linear`` 的乘法（MoE 专家的权重存成 3D 张量）由模块自己用 ``packable_products()`` 列出，块内经
``packed_product`` 走打包的权重。
与 ``modeling.py`` 一样只依赖 torch，随 ``modeling_dsopt.py`` 复制到输出目录。
"""

from __future__ import annotations

import os
import weakref
from contextlib import contextmanager

import torch
from torch import nn

# oneDNN picks its weight layout for an expected row count; with 2 the cost stayed flat from 1 to 5 rows here
# (hints 1, 4 and 8 grew with the rows; measured interleaved on SmolLM2)
ROWS_HINT = 2
# model -> {module name: (weight key, packed weight)}; kept beside the model, not on it, so that copying or
# pickling a model never meets oneDNN's opaque tensors
_STORE: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()
# modules with products of their own (``packable_products``), while inside a packed_linears block -> {product: packed}
_ACTIVE: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def _available_bytes() -> int | None:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not Linux
        return None


def _cpu_float32(w: torch.Tensor | None) -> bool:
    return w is not None and w.device.type == "cpu" and w.dtype == torch.float32


def _packable(m: nn.Module) -> bool:
    return type(m) is nn.Linear and _cpu_float32(getattr(m, "weight", None))


def _packed_forward(module: nn.Linear, packed: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled() or x.dtype != torch.float32:
        return nn.Linear.forward(module, x)  # the class's own forward
    bias = None if module.bias is None else module.bias.detach()
    y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]).contiguous(), packed, bias, "none", [], "")
    return y.view(*x.shape[:-1], y.shape[-1])


def pack(model: nn.Module) -> dict:
    """The packed weight of every CPU float32 ``nn.Linear`` of ``model`` by module name, and of every product a
    module lists in ``packable_products()`` by ``(module name, product)``; reused while the weights are unchanged,
    ``{}`` where oneDNN is missing or memory is short."""
    if not torch.backends.mkldnn.is_available():
        return {}
    candidates = {name: m for name, m in model.named_modules() if _packable(m)}
    products = {(name, k): v for name, m in model.named_modules() if hasattr(m, "packable_products")
                for k, v in m.packable_products().items() if _cpu_float32(v[0])}
    store = _STORE.setdefault(model, {})
    for name in set(store) - set(candidates) - set(products):
        del store[name]
    # a forward already set on the instance is someone else's (accelerate's offload hooks, or an enclosing
    # packed_linears block): leave it
    sources = {name: (m.weight, m.weight.detach) for name, m in candidates.items() if "forward" not in m.__dict__}
    sources.update(products)
    missing = {n: src for n, src in sources.items() if store.get(n, (None,))[0] != _key(src[0])}
    need = sum(src[0].numel() * 4 for src in missing.values())
    free = _available_bytes() if need else None  # every generate() comes here; most find nothing to pack
    if free is not None and 2 * need > free:
        store.clear()
        return {}
    for name, (weight, make) in missing.items():
        store[name] = (_key(weight), torch.ops.mkldnn._reorder_linear_weight(make(), ROWS_HINT))
    return {name: store[name][1] for name in sources}


def packed_product(module: nn.Module, name: str, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` (``x`` 2-D); inside a ``packed_linears`` block, on the packed copy of ``module``'s product
    ``name`` (see ``packable_products``) when no gradient is taken."""
    packed = _ACTIVE.get(module, {}).get(name)
    if packed is None or torch.is_grad_enabled() or x.dtype != torch.float32:
        return x @ weight.T
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, None, "none", [], "")


def _key(weight: torch.Tensor) -> tuple:
    return weight.data_ptr(), weight._version


@contextmanager
def packed_linears(model: nn.Module, enabled: bool = True):
    """Inside the block, the model's CPU float32 linear layers (and the products modules list in
    ``packable_products``) run on pre-packed oneDNN weights when no gradient is taken (identical math, different
    summation order: outputs agree to float rounding)."""
    packed = pack(model) if enabled else {}
    modules = dict(model.named_modules())
    owners = []
    linears = [name for name in packed if isinstance(name, str)]
    for name in linears:
        m, w = modules[name], packed[name]
        m.forward = lambda x, m=m, w=w: _packed_forward(m, w, x)
    for key in packed.keys() - set(linears):  # (module name, product): a module's own products (MoE experts)
        owner = modules[key[0]]
        if owner not in _ACTIVE:
            owners.append(owner)
        _ACTIVE.setdefault(owner, {})[key[1]] = packed[key]
    try:
        yield
    finally:
        for name in linears:
            modules[name].__dict__.pop("forward", None)
        for m in owners:  # an enclosing block's products stay
            _ACTIVE.pop(m, None)
