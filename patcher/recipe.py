"""配方（Recipe）：一个 pydantic 模式同时驱动 ``patch_model`` 与 CLI 的每个参数。

每个字段的 ``flag`` 元数据就是它的命令行参数名；``patcher.cli`` 从这里生成参数，
所以新增一个选项只改这一处。YAML 预设在 ``recipes`` 包中（随 wheel 安装的包数据），可按名字加载
（``--recipe mla-kv40``）。未知键、类型错误和不可能的数值都会给出清楚的错误。
各输出格式能表达什么（``FORMATS``）是数据：格式要求哪些技术、固定哪些选项。
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import RecipeError

PRESETS = resources.files("recipes")  # the presets, as installed package data


def _flag(name: str, help: str, **kw) -> Any:
    return Field(json_schema_extra={"flag": name}, description=help, **kw)


# forward precision of the training loops (MTP training, healing): see patcher/training/loop.py
Precision = Literal["auto", "bf16", "fp32"]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class MLAOptions(Section):
    enabled: bool = _flag("--mla", "把注意力转换为 MLA（潜在 KV 缓存）", default=False)
    kv_keep: float = _flag("--kv-keep", "保留的 KV 缓存比例（全局预算，0–1）", default=0.6, gt=0.0, le=1.0)
    kv_lora_rank: int | None = _flag("--kv-lora-rank", "所有层统一的潜在秩（给出时忽略 --kv-keep）",
                                     default=None, ge=1)
    init: Literal["whitened", "plain"] = _flag("--mla-init", "初始化：whitened（按校准协方差白化的 SVD）或 plain",
                                               default="whitened")
    objective: Literal["kv", "balanced", "attention", "attention_cov"] = _flag(
        "--mla-objective", "SVD 目标：kv（K、V 输出误差）、balanced（K、V 相对误差各半）、attention（按查询能量与 W_o 加权）、"
        "attention_cov（按完整的查询协方差，RoPE 旋转对相对位置取平均，与 W_o 加权；缺省，在校准侧留出领域上选定）",
        default="attention_cov")
    k_weight: float = _flag("--mla-k-weight", "SVD 目标中 K 误差相对 V 误差的权重（两者先各自归一；缺省 2，在校准侧留出领域上选定）",
                            default=2.0, gt=0.0)
    token_weighting: Literal["uniform", "attention", "mixed"] = _flag(
        "--mla-token-weighting", "SVD 输入侧的校准 token 权重：uniform（每个 token 同等）、attention（按源模型中该 token "
        "作为键、值所受的注意力加权：注意力集中的位置，其 K、V 误差更要紧；窗口第一个 token 即注意力汇按平均 token 计）"
        "或 mixed（两者的协方差各半；在校准侧留出领域上更好）。缺省 uniform：改用 mixed 时 MLA+MoE 导出与 llama.cpp 的"
        "一致性测试没有通过（路由近乎平局，见 docs/mla.md）", default="uniform")
    allocation: Literal["sensitivity", "uniform", "energy", "log"] = _flag(
        "--rank-allocation", "秩分配：sensitivity（白化谱 × 实测每层敏感度）、uniform（每层同秩）、"
        "energy（按白化谱能量）、log（按白化谱残差的对数）", default="sensitivity")
    min_rank: int = _flag("--min-rank", "每层最小秩", default=8, ge=1)
    rope: Literal["latent", "decoupled"] = _flag(
        "--mla-rope", "位置编码：latent（RoPE 施加在上投影之后，只缓存潜在向量）或 decoupled（DeepSeek-V3："
        "每头的 no-position 部分来自潜在向量，另有各头共享的旋转键；--format deepseek-v3 时必须）", default="latent")
    rope_dim: int | None = _flag("--rope-dim", "decoupled：共享旋转键的维数（qk_rope_head_dim，偶数；缺省约为每 token 缓存预算的"
                                 " 1/5、取 16 的倍数，不超过源旋转维数；给了 --kv-lora-rank 时为 64 与源旋转维数中的较小者）",
                                 default=None, ge=2)
    rope_method: Literal["calibrated", "high", "low"] = _flag(
        "--rope-method", "decoupled：保留位置的频率，calibrated（按校准文本上注意力分数的实测误差挑选）、"
        "high（最高频）或 low（最低频）", default="calibrated")
    rope_residual: Literal["fitted", "choose"] = _flag(
        "--rope-residual", "decoupled：失去旋转的键分量如何进入无位置部分：fitted（查询乘以在校准文本上拟合的逐头、"
        "逐频率复数因子；缺省）或 choose（原样放进去或丢弃，取代价小者）", default="fitted")

    @field_validator("rope_dim")
    @classmethod
    def _even(cls, v: int | None) -> int | None:
        if v is not None and v % 2:
            raise ValueError(f"--rope-dim 须为偶数（每个频率占两维），收到 {v}")
        return v


class MoEOptions(Section):
    enabled: bool = _flag("--moe", "把 MLP 转换为混合专家（MoE）", default=False)
    mode: Literal["split", "copy"] = _flag(
        "--moe-mode", "split（把 MLP 的神经元切成细粒度专家 + 共享专家）或 copy（每个专家是 MLP 的完整副本）",
        default="split")
    experts: int | None = _flag("--moe-experts", "路由专家数（缺省：split 每个专家 2 个神经元，copy 8）", default=None, ge=1)
    expert_width: int = _flag("--moe-expert-width", "split 缺省专家数时每个专家的神经元数（缺省 2；gate 路由器为 1；"
                              "--format deepseek-v3 时为 8，引擎的分组矩阵乘法需要）", default=0, ge=0)
    top_k: int | None = _flag("--moe-top-k", "每个 token 激活的路由专家数（缺省：copy 2，split 由 --moe-active 推出）",
                              default=None, ge=1)
    active: float = _flag("--moe-active", "split：每个 token 使用的 FFN 参数比例（全模型平均，含路由器）",
                          default=0.5, gt=0.0, le=1.0)
    allocation: Literal["sensitivity", "uniform"] = _flag(
        "--moe-allocation", "split：激活比例的层间分配，sensitivity（按实测每层敏感度，敏感层可保持稠密）或 uniform",
        default="sensitivity")
    shared: float | None = _flag("--moe-shared", "split：共享专家占中间维的比例（缺省为该层激活比例的一半）",
                                 default=None, ge=0.0, lt=1.0)
    partition: Literal["coactivation", "random"] = _flag(
        "--moe-partition", "split：神经元划分，coactivation（共激活聚类）或 random（基线）", default="coactivation")
    router: Literal["auto", "gate", "lowrank", "linear"] = _flag(
        "--moe-router", "split 的路由器：gate（精确算出全部 gate 投影来选专家，预算宽时最准）、lowrank（读 gate "
        "投影的低秩近似，便宜）、auto（每层按校准数据上的输出误差在两者中取优）或 linear（最小二乘线性，DeepSeek 格式）",
        default="auto")
    router_rank: int = _flag("--moe-router-rank", "lowrank 路由器的秩（缺省 128，且不超过隐藏维的 1/4）", default=128, ge=1)
    gate_input: float | None = _flag(
        "--moe-gate-input", "gate 路由器读取的输入维比例：每个 token 只用幅值最大的这部分输入维算全部 gate 投影"
        "（省下的参数让更多神经元激活；1 为精确 gate；缺省每层在 0.25/0.5/0.75/1 中随预算分配一起选）",
        default=None, gt=0.0, le=1.0)
    routing: Literal["sigmoid", "softmax"] = _flag(
        "--moe-routing", "打分：sigmoid（DeepSeek-V3，带只用于选择的偏置）或 softmax", default="sigmoid")
    n_group: int = _flag("--moe-groups", "sigmoid 路由的专家组数（组限制路由）", default=1, ge=1)
    topk_group: int = _flag("--moe-topk-groups", "每个 token 可选的组数", default=1, ge=1)
    balance: bool = _flag("--moe-balance", "在校准数据上调节 e_score_correction_bias 使负载均衡（无辅助损失）",
                          default=False)
    first_dense: int = _flag("--moe-first-dense", "前多少层保持稠密 MLP（DeepSeek-V3 的 first_k_dense_replace；"
                             "uniform 分配时生效）", default=0, ge=0)
    refit_down: bool = _flag("--moe-refit-down/--no-moe-refit-down", "split：按校准数据上真实的路由结果，用最小二乘重拟合 down 投影，"
                             "让被选中的神经元补回落选神经元的部分输出（不训练；只在留出的校准行上误差更小的层保留）。缺省开；"
                             "0.5 激活时关掉在没见过的领域上更好，但缺省不变的原因见 docs/moe.md", default=True)
    noise: float = _flag("--moe-noise", "copy：专家权重的相对噪声（0 时与稠密模型完全一致）", default=0.0, ge=0.0)


class MTPOptions(Section):
    heads: int = _flag("--mtp", "追加的 MTP（多 token 预测）模块数（0 表示不加）", default=0, ge=0, le=8)
    init_layer: int = _flag("--mtp-init-layer", "MTP 的 transformer 块从第几个解码层复制初始化（负数从末尾数）",
                            default=-1)
    draft_vocab: int = _flag("--mtp-draft-vocab", "草稿只在最常见的这么多 token 中选（输出头变小、草稿更快；"
                             "验证仍用完整输出头，输出不变）；0 表示完整词表", default=8192, ge=0)
    train_tokens: int = _flag("--mtp-train-tokens", "转换时接着训练 MTP 的 token 数（0 表示不训练；"
                              "之后可用 dsopt train-mtp）", default=0, ge=0)
    data: str | None = _flag("--mtp-data", "MTP 训练文本（.txt/.jsonl）；缺省用校准文本", default=None)
    generate_tokens: int = _flag("--mtp-generate-tokens", "基座从训练文本的随机片段出发自己续写这么多 token，加入 MTP "
                                 "训练数据（0 表示不生成）；生成时间计入 --mtp-max-minutes", default=0, ge=0)
    generate_temperature: float = _flag("--mtp-generate-temperature", "基座续写时的采样温度（0 为贪心）",
                                        default=1.0, ge=0.0)
    generate_chat: float = _flag("--mtp-generate-chat", "自生成文本中对话所占的比例：基座按分词器的对话模板自己写用户的"
                                 "请求（温度 1）再作答（Magpie），学对话中要猜的回答；需要对话模板", default=0.0,
                                 ge=0.0, le=1.0)
    target: Literal["distill", "text"] = _flag(
        "--mtp-target", "训练目标：distill（基座自己的预测分布，自蒸馏）或 text（文本中的真实 token）",
        default="distill")
    lr: float = _flag("--mtp-lr", "MTP 训练学习率", default=1e-3, gt=0.0)
    seq_len: int = _flag("--mtp-seq-len", "MTP 训练序列长度", default=256, ge=16)
    batch_size: int = _flag("--mtp-batch", "MTP 训练批大小", default=4, ge=1)
    loss_positions: float = _flag("--mtp-loss-positions", "每个序列中计算损失的位置比例（输出头很大，抽样省时间）",
                                  default=0.25, gt=0.0, le=1.0)
    save_every: int = _flag("--mtp-save-every", "每隔多少步保存可续训的训练状态", default=50, ge=1)
    max_minutes: float = _flag("--mtp-max-minutes", "训练时间上限（分钟，0 表示不限）；到时停在当前步并保存可续训状态",
                               default=0.0, ge=0.0)
    precision: Precision = _flag(
        "--mtp-precision", "训练前向精度：auto（硬件支持 bf16 时用 bf16 autocast）、bf16 或 fp32；权重总是 fp32",
        default="auto")

    @property
    def enabled(self) -> bool:
        return self.heads > 0


class CalibrationOptions(Section):
    data: str | None = _flag("--calib-data", "校准文本：文件（.txt/.md/.jsonl）、文件夹（每个文件一个领域）或逗号分隔的多个；"
                             "缺省用内置的多领域文本，各领域等量混合", default=None)
    tokens: int = _flag("--calib-tokens", "校准 token 数", default=16384, ge=64)
    seq_len: int = _flag("--calib-seq-len", "校准序列长度", default=512, ge=16)
    batch_size: int = _flag("--calib-batch", "校准批大小", default=4, ge=1)
    seed: int = _flag("--seed", "随机种子（决定校准片段的选取）", default=0)
    probe_tokens: int = _flag("--probe-tokens", "sensitivity 分配探测每层敏感度所用的校准 token 数",
                              default=1024, ge=16)


class EvalOptions(Section):
    enabled: bool = _flag("--eval/--no-eval", "是否计算保真度指标", default=True)
    data: str | None = _flag("--eval-data", "评估文本（不得与校准文本相同）：文件、文件夹（每个文件一个领域）或逗号分隔的多个；"
                             "缺省用内置的多领域文本；报告以最差的领域为准", default=None)
    tokens: int = _flag("--eval-tokens", "每个评估领域的 token 数", default=2048, ge=32)
    seq_len: int = _flag("--eval-seq-len", "评估窗口长度", default=512, ge=16)


class OutputOptions(Section):
    format: Literal["dsopt", "deepseek-v3"] = _flag(
        "--format", "输出格式：dsopt（源家族的类 + dsopt 模块）或 deepseek-v3（原生 DeepseekV3ForCausalLM，"
        "无需任何自定义代码）", default="dsopt")
    overwrite: bool = _flag("--overwrite", "允许覆盖已存在的非空输出目录", default=False)
    max_shard_size: str = _flag("--max-shard-size", "safetensors 分片大小", default="200MB")
    trust_remote_code: bool = _flag("--trust-remote-code", "信任源检查点的远程代码（默认不信任）", default=False)
    streaming: Literal["auto", "on", "off"] = _flag(
        "--streaming", "流式转换：逐层读入权重、转换、写出分片，内存约为一层加激活，中断后可 --resume；"
        "auto（源权重超过 2 GiB 时开启）、on 或 off", default="auto")

    @field_validator("max_shard_size")
    @classmethod
    def _size(cls, v: str) -> str:
        # the forms transformers' save_pretrained understands; checked here so a typo fails before the conversion
        if not re.fullmatch(r"[1-9]\d*(KB|MB|GB|KIB|MIB|GIB)", str(v).upper()):
            raise ValueError(f"--max-shard-size 应是正数加单位，如 200MB、5GB、1GiB，收到 {v!r}")
        return str(v)


@dataclass(frozen=True)
class Target:
    """What an output format lets a technique assume."""
    unit_expert_weights: bool = True  # a chosen expert may be weighted exactly 1 (not so in DeepSeek-V3's router)
    expert_size_multiple: int = 1  # routed experts' width must be a multiple of this
    shared_whole_experts: bool = False  # the shared part must be a whole number of experts


@dataclass(frozen=True)
class FormatRules:
    """What an output format can express: the techniques it needs and the options its layout fixes.

    ``fixes``: (section, option, value, when) — the option takes ``value`` while the section's options equal
    ``when``; a user's explicit other value is an error."""
    layout: str
    requires: tuple[str, ...] = ()
    why: str = ""
    fixes: tuple[tuple[str, str, Any, dict], ...] = ()
    target: Target = Target()


FORMATS: dict[str, FormatRules] = {
    "dsopt": FormatRules("源家族的类加 dsopt 模块"),
    "deepseek-v3": FormatRules(
        "DeepSeek-V3", requires=("mla",), why="DeepSeek-V3 的注意力只有 MLA 一种",
        # decoupled RoPE always uses one rank for all layers; DeepSeek's router is sigmoid-scored and linear
        fixes=(("mla", "rope", "decoupled", {}),
               ("moe", "routing", "sigmoid", {"enabled": True}),
               ("moe", "allocation", "uniform", {"enabled": True}),
               ("moe", "router", "linear", {"enabled": True, "mode": "split"}),
               ("moe", "expert_width", 8, {"enabled": True, "mode": "split"})),
        # n_shared_experts × moe_intermediate_size; transformers' grouped_mm needs 16-byte expert rows (8 in bf16)
        target=Target(unit_expert_weights=False, expert_size_multiple=8, shared_whole_experts=True)),
}


class Recipe(Section):
    """一次转换的完整描述；保存为输出目录中的 ``recipe.yaml``。"""
    name: str = "custom"
    mla: MLAOptions = MLAOptions()
    moe: MoEOptions = MoEOptions()
    mtp: MTPOptions = MTPOptions()
    calibration: CalibrationOptions = CalibrationOptions()
    eval: EvalOptions = EvalOptions()
    output: OutputOptions = OutputOptions()

    @model_validator(mode="after")
    def _format_rules(self):
        """The output format fixes what its layout can express; an explicit conflicting choice is an error."""
        rules = FORMATS[self.output.format]
        for section in rules.requires:
            if not getattr(self, section).enabled:
                raise ValueError(f"--format {self.output.format} 需要 {_flag_of(section, 'enabled')}：{rules.why}")
        for section, name, value, when in rules.fixes:
            opts = getattr(self, section)
            if not all(getattr(opts, k) == v for k, v in when.items()):
                continue
            if getattr(opts, name) != value:
                if name in opts.model_fields_set:
                    raise ValueError(f"--format {self.output.format} 要求 {_flag_of(section, name)} {value}"
                                     f"（{rules.layout} 的布局只能表达这一种），收到 {getattr(opts, name)}")
                setattr(opts, name, value)
        return self

    def techniques(self) -> list[str]:
        return [s for s in ("mla", "moe", "mtp") if getattr(self, s).enabled]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, allow_unicode=True)



def _explain(err: ValidationError, where: str) -> RecipeError:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        kind = {"extra_forbidden": "未知的键"}.get(e["type"], e["msg"])
        lines.append(f"  {loc}: {kind}")
    return RecipeError(f"配方无效（{where}）：\n" + "\n".join(lines))


def parse_recipe(data: dict, where: str = "recipe") -> Recipe:
    try:
        return Recipe.model_validate(data or {})
    except ValidationError as e:
        raise _explain(e, where) from None


def preset_names() -> list[str]:
    """The names of the packaged presets (``recipes/*.yaml``)."""
    return sorted(p.name[:-5] for p in PRESETS.iterdir() if p.name.endswith(".yaml"))


def load_recipe(name_or_path: str | Path | None) -> Recipe:
    """按路径或预设名加载配方；None 给出默认配方。"""
    if name_or_path is None:
        return Recipe()
    path = Path(name_or_path)
    if path.exists():
        where, read = str(path), lambda: path.read_text(encoding="utf-8")
    elif f"{name_or_path}" in preset_names():
        preset = PRESETS.joinpath(f"{name_or_path}.yaml")
        where, read = f"预设 {name_or_path}", lambda: preset.read_text(encoding="utf-8")
    else:
        raise RecipeError(f"找不到配方 {name_or_path!r}：既不是文件也不是预设（可用预设：{', '.join(preset_names())}）")
    try:
        data = yaml.safe_load(read())
    except yaml.YAMLError as e:
        raise RecipeError(f"配方 {where} 不是有效的 YAML：{e}") from None
    if data is not None and not isinstance(data, dict):
        raise RecipeError(f"配方 {where} 的顶层必须是映射")
    return parse_recipe(data, where)


def _flag_of(section: str, name: str) -> str:
    """The CLI flag of an option, as the user types it (the ``--x/--no-x`` pair's first half)."""
    return Recipe.model_fields[section].annotation.model_fields[name].json_schema_extra["flag"].split("/")[0]


def flag_fields() -> list[tuple[str, str, Any]]:
    """(section, field, FieldInfo) for every option that has a CLI flag, in schema order."""
    out = []
    for section, info in Recipe.model_fields.items():
        sub = info.annotation
        if isinstance(sub, type) and issubclass(sub, Section):
            for name, f in sub.model_fields.items():
                if (f.json_schema_extra or {}).get("flag"):
                    out.append((section, name, f))
    return out


def with_overrides(recipe: Recipe, overrides: dict[tuple[str, str], Any]) -> Recipe:
    """Apply CLI values (only those the user gave) on top of a recipe, validating them."""
    data = recipe.model_dump(exclude_unset=True)  # defaults stay defaults: rules such as --format's may still set them
    for (section, name), value in overrides.items():
        data.setdefault(section, {})[name] = value
    return parse_recipe(data, "命令行参数")
