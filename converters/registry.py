"""已注册的技术，按转换顺序：先替换注意力（MLA），再替换 MLP（MoE），最后在末尾追加模块（MTP）。"""

from __future__ import annotations

from .base import Technique
from .mla import MLAConverter
from .moe import MoEConverter
from .mtp import MTPTechnique

TECHNIQUES: dict[str, Technique] = {t.section: t for t in (MLAConverter(), MoEConverter(), MTPTechnique())}


def enabled(recipe) -> list[Technique]:
    """The techniques the recipe turns on, in conversion order."""
    return [t for t in TECHNIQUES.values() if getattr(recipe, t.section).enabled]


def layer_techniques(recipe) -> list[Technique]:
    """The enabled techniques that replace modules inside the decoder layers."""
    return [t for t in enabled(recipe) if t.structure_key is not None]
