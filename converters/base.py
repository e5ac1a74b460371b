"""技术插件的协议：管线按这里的约定驱动每种技术，不按名字认识它们。

一种技术（``Technique``）提供：

- ``section``：它在配方（Recipe）中读取的小节名；``structure_key``：它在 ``config.dsopt`` 中记录结构的键
  （attention / mlp；不替换层的技术为 None）；
- ``planning(opts) -> Planning``：它怎样规划（见 ``STYLES``）。后端只支持部分方式时（流式转换只能逐层规划），
  管线按 ``Planning.fallback`` 换成逐层的选项（用户明确给出的选项不换，而是报错，错误里用 ``Planning.needs``）；
- ``check(layer_map, opts)``：缺少角色或选项不可能时报错（写明层与角色），在任何重活之前；
- ``captures(layer_map, opts)``：校准时需要的统计，(模块, "cov" / "inputs" / "sequences")；
- ``analyse(job, layer, layer_map, stats, opts, probe)``：全局规划的逐层分析（在未转换的模型上）；
  ``global_probe`` 方式时管线提供敏感度探测 ``probe(i, 路径, 模块) -> KL``；
- ``plan(model_map, opts, analyses)``：逐层计划（逐层规划时 ``analyses`` 全是 None）；
- ``convert(job, layer, layer_map, stats, plan_i, opts)``：就地替换第 i 层的模块，返回 (结构记录, 报告信息)；
  结构记录为 None 表示按计划保持该层不变；
- ``summary(model_map, opts, plans, specs)``：写进报告的计划摘要；
- 可选 ``verify(model, model_map, eval_ids, infos)``：转换后在评估文本上的额外测量；
- 可选 ``attach(model, model_map, opts, job, token_ids)``：所有层转换之后在模型上追加模块（MTP）。
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from torch import nn

from patcher.recipe import Target  # what the output format lets a technique assume

# none: no per-layer work; per_layer: each layer's plan from that layer alone; global: every layer analysed first;
# global_probe: also the whole model's sensitivity to each layer; whole_model: needs the whole converted model
# in memory afterwards (training at conversion time)
STYLES = ("none", "per_layer", "global", "global_probe", "whole_model")


@dataclass(frozen=True)
class Planning:
    """How a technique plans with its options: ``style`` (one of ``STYLES``); ``needs``: what in the options asks
    for it, said to the user when a backend cannot; ``fallback``: option values that make it plan per layer."""
    style: str
    needs: str = ""
    fallback: dict = field(default_factory=dict)


@dataclass(frozen=True)
class JobContext:
    """What a technique may use besides its layer and its options."""
    config: object  # the model's transformers config
    rotary: nn.Module | None  # the model's rotary embedding, if it has one
    seed: int  # the calibration seed: a technique's random draws derive from it
    target: Target = Target()


class Technique(Protocol):
    section: str
    structure_key: str | None

    def planning(self, opts) -> Planning: ...

    def check(self, lm, opts) -> None: ...

    def captures(self, lm, opts) -> list[tuple[str, str]]: ...

    def analyse(self, job: JobContext, layer: nn.Module, lm, stats: dict, opts, probe=None): ...

    def plan(self, mm, opts, analyses: list) -> list: ...

    def convert(self, job: JobContext, layer: nn.Module, lm, stats: dict, plan, opts) -> tuple[dict | None, dict]: ...

    def summary(self, mm, opts, plans: list, specs: dict) -> dict: ...
