"""转换器：每种技术一个模块，统一的小接口加一个注册表。

转换器只懂自己的技术，不碰文件、命令行或其他转换器。引擎（``patcher.api``）负责顺序、
内存、读写与报告。一个转换器提供：

- ``section``：它在配方（Recipe）中读取的小节名；
- ``structure_key``：它在 ``config.dsopt`` 中记录结构的键（attention / mlp）；
- ``enabled(recipe)``：配方是否启用它；``check(layer_map, recipe)``：缺少角色时报错（写明层与角色）；
- ``captures(layer_map, recipe)``：校准时需要的统计，(模块, "cov" 或 "inputs")；
- ``needs_analysis(recipe)`` / ``analyse(ctx, layer, layer_map, stats, recipe, probe)``：规划轮（在未转换的模型上）
  逐层分析；``needs_probe(recipe)`` 为真时引擎提供敏感度探测 ``probe(i, 路径, 模块) -> KL``；
- ``plan(model_map, recipe, analyses)``：全局预算下的逐层计划；
- ``convert(ctx, layer, layer_map, stats, plan_i, recipe)``：就地替换第 i 层的模块，返回 (结构记录, 报告信息)；
  结构记录为 None 表示按计划保持该层不变；
- ``summary(model_map, recipe, plans, specs)``：写进报告的计划摘要（``specs``：各层的结构记录，计划留到转换时才定的
  选择从这里读）；可选 ``verify(...)``：转换后在评估文本上的额外测量。
"""

from __future__ import annotations

REGISTRY: dict[str, object] = {}


class PlanError(ValueError):
    """配方中的秩或预算不可能实现时抛出。"""


def register(converter):
    REGISTRY[converter.section] = converter
    return converter


def enabled_converters(recipe) -> list:
    return [c for c in REGISTRY.values() if c.enabled(recipe)]


from . import mla, moe  # noqa: E402,F401  (each registers itself; order = order of conversion)
