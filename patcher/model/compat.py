"""transformers 版本差异与内部约定，集中在一处（复制进输出目录的 ``runtime/`` 代码除外：它必须自包含）。"""

from __future__ import annotations

import inspect

from torch import nn


def cache_argument(layer: nn.Module) -> str:
    """The keyword a decoder layer takes its cache by: transformers 5 renamed ``past_key_values`` to ``cache``;
    Falcon's layers still call it ``layer_past``."""
    params = inspect.signature(layer.forward).parameters
    return next((k for k in ("cache", "past_key_values", "layer_past") if k in params), "past_key_values")


def drop_quantization_config(config) -> None:
    """A model loaded from .gguf is marked quantized and cannot be saved as it is: clear the mark (the attribute
    must go, not only be None, or save_pretrained still treats the model as quantized)."""
    config.quantization_config = None
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")


def per_layer_keys(config) -> list[str]:
    """Config entries that are one value per layer (``layer_types``, ``no_rope_layers``, …), sorted by name."""
    n = config.num_hidden_layers
    return sorted(k for k, v in config.to_dict().items() if isinstance(v, list) and len(v) == n
                  and k != "architectures")


class no_softcap:
    """Modules that copied ``attn_logit_softcapping`` from the config at build time (Gemma 2's attention) without it
    for the duration (see ``traceable_config``)."""

    def __init__(self, module: nn.Module):
        self.mods = [m for m in module.modules() if getattr(m, "attn_logit_softcapping", None) is not None]

    def __enter__(self):
        self.saved = [m.attn_logit_softcapping for m in self.mods]
        for m in self.mods:
            m.attn_logit_softcapping = None

    def __exit__(self, *exc):
        for m, v in zip(self.mods, self.saved):
            m.attn_logit_softcapping = v
        return False


class traceable_config:
    """The config as ``torch.export`` of one decoder layer needs it: one layer (per-layer lists such as
    ``layer_types`` or ``no_rope_layers`` cut to that layer's entry), the sdpa attention kernel (other kernels do not
    trace) and no score soft-capping; restored afterwards."""

    def __init__(self, config, index: int = 0):
        self.config, self.index = config, index

    def __enter__(self):
        cfg = self.config
        per_layer = per_layer_keys(cfg)
        # soft-capped scores (Gemma 2) happen inside the kernel, after q·k: the data flow is the same without them,
        # and sdpa, the one kernel that traces, refuses them
        self.saved = {k: getattr(cfg, k, None) for k in ("num_hidden_layers", "attn_logit_softcapping", *per_layer)}
        self.saved_impl = getattr(cfg, "_attn_implementation", None)
        cfg.num_hidden_layers = 1
        for k in per_layer:
            setattr(cfg, k, self.saved[k][self.index:self.index + 1])
        cfg._attn_implementation = "sdpa"
        if self.saved["attn_logit_softcapping"] is not None:
            cfg.attn_logit_softcapping = None
        return cfg

    def __exit__(self, *exc):
        for k, v in self.saved.items():
            if v is not None:
                setattr(self.config, k, v)
        self.config._attn_implementation = self.saved_impl
        return False


class _OnDemand(dict):
    """``CONFIG_MAPPING``'s table of registered types, registering ``dsopt_<family>`` the first time transformers
    looks it up: every family loads after ``import patcher`` without remote code, and none is built before."""

    def __init__(self, table: dict, register):
        super().__init__(table)
        self.register, self.busy = register, set()

    def _ensure(self, key) -> None:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

        if not (isinstance(key, str) and key.startswith("dsopt_")) or dict.__contains__(self, key) or key in self.busy:
            return
        base = key[len("dsopt_"):]
        if base in CONFIG_MAPPING_NAMES:
            self.busy.add(key)
            try:
                self.register(base)
            except (KeyError, ValueError, ImportError):  # no causal-LM class for that type: stays unknown
                pass
            finally:
                self.busy.discard(key)

    def __contains__(self, key) -> bool:
        self._ensure(key)
        return dict.__contains__(self, key)

    def __getitem__(self, key):
        self._ensure(key)
        return dict.__getitem__(self, key)


def register_on_demand(register) -> None:
    """Install ``_OnDemand`` (once) with ``register(model_type)`` as the way to register a family."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if not isinstance(CONFIG_MAPPING._extra_content, _OnDemand):
        CONFIG_MAPPING._extra_content = _OnDemand(CONFIG_MAPPING._extra_content, register)
