"""dsopt：把现有的稠密 LLM 检查点转换成 DeepSeek 风格的模型（MLA、MoE、MTP），并给出保真度报告。

Python 接口::

    from patcher import patch_model, convert, load_recipe
    model, report = patch_model(model, {"mla": {"enabled": True, "kv_keep": 0.6}}, tokenizer)

出错时抛出 ``DsoptError`` 的子类（``patcher.errors``），消息写明原因与出路。
"""

from . import legacy as _legacy  # noqa: E402
from .model.compat import register_on_demand as _register_on_demand  # noqa: E402
from .runtime import modeling as _modeling  # noqa: E402
from .version import __version__  # noqa: E402,F401

_legacy.install()  # the module paths before the redesign still import
_register_on_demand(_modeling.register)  # loading a converted checkpoint of any family then needs no remote code

from .errors import (  # noqa: E402
    DataError,
    DsoptError,
    ExportError,
    LocateError,
    OutputError,
    PlanError,
    RecipeError,
    ReportError,
    SourceError,
)
from .recipe import Recipe, load_recipe  # noqa: E402


def __getattr__(name: str):
    """``convert`` and ``patch_model`` load the pipeline on first use: importing ``patcher.errors`` (as every
    technique does) then never pulls in the pipeline that imports the techniques."""
    if name in ("convert", "patch_model"):
        from . import jobs

        return getattr(jobs, name)
    raise AttributeError(f"module 'patcher' has no attribute {name!r}")


__all__ = ["convert", "patch_model", "Recipe", "load_recipe", "__version__", "DsoptError", "RecipeError",
           "PlanError", "LocateError", "SourceError", "OutputError", "DataError", "ExportError", "ReportError"]
