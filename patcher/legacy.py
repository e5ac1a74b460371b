"""旧模块路径（重构之前的 ``patcher.api``、``patcher.checkpoint`` 等）仍可导入：每个旧名字指向现在放着
同样东西的模块，按顺序查找属性。只是为了向后兼容；新代码请用新路径（见 docs/architecture.md）。"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types

MOVED: dict[str, tuple[str, ...]] = {
    "patcher.api": ("patcher.jobs", "patcher.pipeline.run", "patcher.evaluation.metrics", "patcher.training.draft_heads"),
    "patcher.checkpoint": ("patcher.model.sources", "patcher.formats.folder", "patcher.files", "patcher.errors"),
    "patcher.calibrate": ("patcher.pipeline.calibrate", "patcher.data.text", "patcher.errors"),
    "patcher.fidelity": ("patcher.evaluation.metrics", "patcher.evaluation.report", "patcher.evaluation.render",
                         "patcher.evaluation.gate"),
    "patcher.locate": ("patcher.model.locate", "patcher.errors"),
    "patcher.families": ("patcher.model.families",),
    "patcher.modeling": ("patcher.runtime.modeling",),
    "patcher.mtp": ("patcher.runtime.mtp",),
    "patcher.packed_linear": ("patcher.runtime.packed_linear",),
    "patcher.shards": ("patcher.formats.shards", "patcher.errors"),
    "patcher.export_deepseek": ("patcher.formats.deepseek_v3", "patcher.errors"),
    "patcher.streaming": ("patcher.pipeline.streaming",),
    "patcher.heal": ("patcher.training.heal",),
    "patcher.reconstruct": ("patcher.training.reconstruct",),
    "patcher.selfgen": ("patcher.training.selfgen",),
    "patcher.mtp_train": ("patcher.training.draft_heads",),
    "converters.weights": ("patcher.model.weights",),
}


class _Moved(types.ModuleType):
    def __init__(self, name: str, targets: tuple[str, ...]):
        super().__init__(name, f"已移动：见 {', '.join(targets)}")
        self._targets = targets

    def __getattr__(self, attr: str):
        for target in self._targets:
            module = importlib.import_module(target)
            if hasattr(module, attr):
                return getattr(module, attr)
        raise AttributeError(f"module {self.__name__!r} has no attribute {attr!r}")


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        return importlib.util.spec_from_loader(name, self) if name in MOVED else None

    def create_module(self, spec):
        return _Moved(spec.name, MOVED[spec.name])

    def exec_module(self, module):
        pass


def install() -> None:
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.append(_Finder())
