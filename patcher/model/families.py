"""家族数据：追踪看不到的信息，每个家族一条，不写成代码分支。

定位器从 FX 图的数据流找出各个角色；这里只记录图里没有的东西：
- ``trace_kwargs``：导出时传给模型 forward 的具体参数；
- ``notes``：报告与 ``dsopt inspect`` 中显示给用户的说明。
新增家族只需加一条数据，并在 tests/unit/test_locate.py 中加一个小配置。
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Family:
    model_type: str
    trace_kwargs: dict = field(default_factory=lambda: {"use_cache": False})
    notes: str = ""
    # how q/k dims pair up under RoPE: "half" (dim i with i + rot/2, rotate_half) or "interleaved" (2i with 2i+1);
    # the FX graph shows slices either way, so this is data
    rope_layout: str = "half"


FAMILIES: dict[str, Family] = {f.model_type: f for f in [
    Family("llama"),
    Family("mistral"),
    Family("qwen2", notes="q/k/v 带偏置：偏置随上投影精确保留"),
    Family("qwen3", notes="QK-norm：在上投影之后对每个头做 RMSNorm"),
    Family("phi3", notes="融合 qkv 与 gate_up：按数据流切出各行"),
    Family("gemma", notes="GeGLU MLP"),
    Family("gpt2", notes="Conv1D 投影、无 RoPE（学习的位置嵌入）"),
    Family("gpt_neox", notes="部分旋转 RoPE、按头交错的融合 qkv"),
    Family("cohere", rope_layout="interleaved", notes="交错布局的 RoPE：转换时把 q/k 的旋转维重排成前后两半（得分不变）"),
    Family("cohere2", rope_layout="interleaved", notes="交错布局的 RoPE"),
    Family("glm", rope_layout="interleaved", notes="部分旋转、交错布局的 RoPE"),
    Family("glm4", rope_layout="interleaved", notes="部分旋转、交错布局的 RoPE"),
    Family("gemma2", notes="注意力得分软截断（softcap）：潜在注意力同样截断；追踪时暂时去掉（sdpa 不支持）"),
    Family("gemma3_text", notes="局部/全局层的 RoPE 基数不同：每层按 layer_types 取自己的旋转表"),
    Family("llama4_text", rope_layout="interleaved",
           notes="复数形式的交错 RoPE（freqs_cis）、NoPE 层的查询温度缩放、分块注意力"),
]}


def family_of(model_type: str) -> Family:
    """未列出的家族仍可尝试定位；定位失败时报错会指出缺少的角色。"""
    return FAMILIES.get(model_type, Family(model_type, notes="未登记的家族：仅按数据流定位"))
