"""dsopt：把现有的稠密 LLM 检查点转换成 DeepSeek 风格的模型（MLA、MoE、MTP），并给出保真度报告。

Python 接口::

    from patcher import patch_model, convert, load_recipe
    model, report = patch_model(model, {"mla": {"enabled": True, "kv_keep": 0.6}}, tokenizer)
"""

__version__ = "0.1.0"

from . import modeling as _modeling  # noqa: E402
from .families import FAMILIES as _FAMILIES  # noqa: E402

for _model_type in _FAMILIES:  # loading a converted checkpoint then needs no remote code
    _modeling.register(_model_type)

from .api import convert, patch_model  # noqa: E402
from .recipe import Recipe, load_recipe  # noqa: E402

__all__ = ["convert", "patch_model", "Recipe", "load_recipe", "__version__"]
