"""transformers 版本差异与内部约定，集中在一处（复制进输出目录的 ``runtime/`` 代码除外：它必须自包含）。"""

from __future__ import annotations

import inspect

from torch import nn


def cache_argument(layer: nn.Module) -> str:
    """The keyword a decoder layer takes its cache by: transformers 5 renamed ``past_key_values`` to ``cache``."""
    return "cache" if "cache" in inspect.signature(layer.forward).parameters else "past_key_values"


def drop_quantization_config(config) -> None:
    """A model loaded from .gguf is marked quantized and cannot be saved as it is: clear the mark (the attribute
    must go, not only be None, or save_pretrained still treats the model as quantized)."""
    config.quantization_config = None
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")


class traceable_config:
    """The config as ``torch.export`` of the first decoder layer needs it: one layer (and its layer type), and the
    sdpa attention kernel (other kernels do not trace); restored afterwards."""

    def __init__(self, config):
        self.config = config

    def __enter__(self):
        cfg = self.config
        self.saved = {k: getattr(cfg, k, None) for k in ("num_hidden_layers", "layer_types")}
        self.saved_impl = getattr(cfg, "_attn_implementation", None)
        cfg.num_hidden_layers = 1
        if isinstance(self.saved["layer_types"], list):
            cfg.layer_types = self.saved["layer_types"][:1]
        cfg._attn_implementation = "sdpa"
        return cfg

    def __exit__(self, *exc):
        for k, v in self.saved.items():
            if v is not None:
                setattr(self.config, k, v)
        self.config._attn_implementation = self.saved_impl
        return False
