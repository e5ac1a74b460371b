"""转换器：每种技术一个模块，统一的小接口加一个注册表。

转换器只懂自己的技术，不碰文件、命令行或其他转换器。引擎（``patcher.api``）负责顺序、
内存、读写与报告。一个转换器提供：

- ``section``：它在配方（Recipe）中读取的小节名；
- ``enabled(recipe)``：配方是否启用它；
- ``inputs(layer_map)``：校准时需要其输入协方差的模块（相对解码层路径）；
- ``plan(model_map, recipe, spectra)``：全局预算下的逐层计划（例如每层的秩）；
- ``analyse(layer, layer_map, stats)``：规划轮中每层的谱；
- ``convert(model, layer, layer_map, stats, plan)``：就地替换第 i 层的模块，返回该层的结构记录与误差。
"""

from __future__ import annotations

REGISTRY: dict[str, object] = {}


def register(converter):
    REGISTRY[converter.section] = converter
    return converter


def enabled_converters(recipe) -> list:
    return [c for c in REGISTRY.values() if c.enabled(recipe)]


from . import mla  # noqa: E402,F401  (registers itself)
