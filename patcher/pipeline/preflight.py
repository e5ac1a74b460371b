"""预检：在读权重、校准之前，用同一家族的缩微模型证明转换后的结构在满秩时重现源模型。

缩微模型由源的 config 得来：层数截到前几层（每层类型不同的列表一起截），宽度缩到 64，其余（RoPE 的种类与
比例、softcap、QK-norm、滑窗、逐层的注意力类型……）原样保留；权重随机，偏置与归一化权重被扰动，
这样它们也必须被精确搬运。然后在它上面按用户的配方跑一遍同一条管线，但秩取满（``kv_keep`` 1、MoE 全激活），
比较 logits。有差异或异常就立刻停下，说明家族、层与技术；几秒钟，而不是几十分钟后的一个回溯。
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import torch

from ..errors import DsoptError, ExportError, PlanError
from ..formats import deepseek_v3
from ..model.compat import per_layer_keys

LAYERS = 6  # enough for per-layer patterns seen in practice (local/global, NoPE every 4th layer)
TOLERANCE = 1e-4  # max |Δlogit| at full rank (logits of the miniature are of order 1)
WIDTH = {"hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 96, "moe_intermediate_size": 32,
         "intermediate_size_mlp": 96, "shared_expert_intermediate_size": 32}
SMALL_RECIPE = {"calibration": {"data": None, "tokens": 256, "seq_len": 32, "batch_size": 4, "probe_tokens": 64},
                "eval": {"data": None, "tokens": 64, "seq_len": 32}}  # the built-in text: never the user's files


class _Bytes:
    """Tokenizer stand-in for the miniature: one id per byte, inside the source's vocabulary."""

    def __init__(self, vocab: int):
        self.vocab = vocab

    def __call__(self, text, return_tensors=None, add_special_tokens=False):
        data = text.encode("utf-8")[:8192]
        return {"input_ids": torch.tensor([[4 + b % (self.vocab - 4) for b in data]])}


def miniature_config(config):
    """The source's config at miniature width and depth; per-layer lists are cut with the layers."""
    cfg = copy.deepcopy(config)
    n = cfg.num_hidden_layers
    keep = min(n, LAYERS)
    for key in per_layer_keys(cfg):
        setattr(cfg, key, getattr(cfg, key)[:keep])
    cfg.num_hidden_layers = keep
    heads = cfg.num_attention_heads
    for key, value in WIDTH.items():
        if getattr(cfg, key, None) is not None:
            setattr(cfg, key, value)
    kv = getattr(cfg, "num_key_value_heads", None)
    if kv is not None:
        cfg.num_key_value_heads = 4 if kv == heads else 2  # keep MHA as MHA, GQA as GQA
    for key in ("num_kv_heads",):
        if getattr(cfg, key, None) is not None:
            cfg.num_kv_heads = 4 if getattr(config, key) == heads else 2
    if getattr(cfg, "head_dim", None) is not None and not isinstance(getattr(type(cfg), "head_dim", None), property):
        cfg.head_dim = 16  # a stored head_dim; a derived one (Falcon: hidden / heads) follows the width
    if isinstance(getattr(cfg, "sliding_window", None), int):
        cfg.sliding_window = min(cfg.sliding_window, 16)  # shorter than the windows: the mask is exercised
    for key in ("rope_parameters", "rope_scaling"):  # long-context terms then act within the miniature's windows
        params = getattr(cfg, key, None)
        if isinstance(params, dict) and params.get("original_max_position_embeddings"):
            setattr(cfg, key, {**params, "original_max_position_embeddings": 8})
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    cfg.torch_dtype = torch.float32
    return cfg


def miniature(config, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(miniature_config(config), dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name.rsplit(".", 2)[-2]:
                p.add_(torch.randn_like(p) * 0.3)
    return model


def full_rank(recipe) -> list[tuple[str, object, bool]]:
    """(technique, its options at full rank, must the result be exact) — what the preflight runs."""
    mla = recipe.mla.model_copy(update={"kv_keep": 1.0, "kv_lora_rank": None, "allocation": "uniform"})
    runs = [("mla", mla, mla.rope == "latent")]  # decoupled RoPE shares one rotated key: never exact
    # MoE: copy mode without noise is the dense MLP exactly (it checks the roles and the MoE module); split at the
    # user's settings is run for crashes (its unchosen experts are its approximation)
    runs += [("moe", recipe.moe.model_copy(update={"mode": "copy", "noise": 0.0, "experts": 2, "top_k": 2}), True)]
    if recipe.moe.mode == "split":
        runs += [("moe", recipe.moe.model_copy(update={"allocation": "uniform"}), False)]
    runs += [("mtp", recipe.mtp.model_copy(update={"train_tokens": 0, "draft_vocab": 0}), True)]
    return [(section, opts, exact) for section, opts, exact in runs if section in recipe.techniques()]


def first_difference(a, b, ids) -> tuple[int | None, float]:
    """(first layer whose output differs beyond the tolerance, max |Δlogit|)."""
    with torch.no_grad():
        ra = a(input_ids=ids, output_hidden_states=True)
        rb = b(input_ids=ids, output_hidden_states=True)
    diff = float((ra.logits - rb.logits).abs().max())
    for i, (ha, hb) in enumerate(zip(ra.hidden_states[1:], rb.hidden_states[1:])):
        if float((ha - hb).abs().max()) > TOLERANCE * max(1.0, float(ha.abs().max())):
            return i, diff
    return None, diff


def preflight(config, recipe, run) -> dict:
    """See ``check``; the caller's random state is left as it was."""
    with torch.random.fork_rng(devices=[]):
        return check(config, recipe, run)


def check(config, recipe, run) -> dict:
    """Run ``run(model, recipe, tokenizer)`` (the pipeline) on the miniature at full rank, per technique; raise a
    ``PlanError`` naming family, technique and layer when the result differs from the source or fails."""
    from ..recipe import Recipe

    family = getattr(config, "model_type", "?")
    try:
        source = miniature(config)
    except Exception as e:  # noqa: BLE001  our shrinking, not the user's model: say so and go on
        return {"skipped": f"无法构建 {family} 的缩微模型：{type(e).__name__}: {str(e)[:160]}"}
    ids = torch.randint(4, min(config.vocab_size, 260), (2, 24), generator=torch.Generator().manual_seed(0))
    tok = _Bytes(min(config.vocab_size, 260))
    result = {"family": family, "layers": source.config.num_hidden_layers, "techniques": {}}
    small = {k: getattr(recipe, k).model_copy(update=v) for k, v in SMALL_RECIPE.items()}
    for section, opts, exact in full_rank(recipe):
        only = Recipe(**small, **{section: opts})
        model = copy.deepcopy(source)
        try:
            patched, _ = run(model, only, tok)
        except DsoptError as e:
            if not exact:  # a budget that the miniature's widths cannot meet says nothing of the real model
                result["techniques"][f"{section} (crash check)"] = {"skipped": str(e)[:200]}
                continue
            raise type(e)(f"预检（{family} 缩微模型，{section}）：{e}") from None  # same error class, earlier
        except Exception as e:  # noqa: BLE001  a crash here would have been a crash after minutes of work
            raise PlanError(f"预检失败：{family} 的 {section} 转换在缩微模型上出错（{type(e).__name__}: {str(e)[:200]}）；"
                            f"这个家族目前不能用 {section} 转换") from None
        layer, diff = first_difference(source, patched, ids)
        result["techniques"][f"{section}{'' if exact else ' (crash check)'}"] = {"max_abs_logit_diff": diff}
        if exact and (diff > TOLERANCE or layer is not None):
            raise PlanError(f"预检失败：{family} 的 {section} 转换在满秩时不能重现源模型（缩微模型第 {layer} 层起输出不同，"
                            f"max |Δlogit| = {diff:.2g}）：转换结果会是错的，所以在读权重之前就停下。"
                            f"这个家族的这一结构目前不受支持")
    if recipe.output.format == "deepseek-v3":
        result["deepseek_v3_export"] = export_check(source, recipe, small, run, tok, ids, family)
    return result


def export_check(source, recipe, small: dict, run, tok, ids, family: str) -> dict:
    """The whole recipe on the miniature, written as DeepSeek-V3 and loaded with stock transformers: what the
    format cannot express (LayerNorm, sliding windows, extra norms, scaled RoPE…) stops the run here, before
    the real conversion, instead of after it. Ranks are the miniature's (the user's budget is checked later)."""
    from ..recipe import Recipe

    techs = {k: getattr(recipe, k) for k in recipe.techniques()}
    if "mla" in techs:
        techs["mla"] = techs["mla"].model_copy(update={"kv_lora_rank": 32, "rope_dim": None, "allocation": "uniform"})
    if "moe" in techs:
        # the user's expert count, cut from the miniature's 96 neurons, gives widths no model has: the format's
        # default width (its expert_width) exercises the same layout
        techs["moe"] = techs["moe"].model_copy(update={"allocation": "uniform", "experts": None, "top_k": None})
    if "mtp" in techs:
        techs["mtp"] = techs["mtp"].model_copy(update={"train_tokens": 0, "draft_vocab": 0})
    only = Recipe(**small, **techs, output=recipe.output.model_copy(update={"format": "deepseek-v3"}))
    try:
        patched, _ = run(copy.deepcopy(source), only, tok)
        with tempfile.TemporaryDirectory(prefix="dsopt-preflight-") as tmp:
            deepseek_v3.write_deepseek_v3(patched, patched.dsopt_model_map, None, Path(tmp))
            found = deepseek_v3.verify_export(Path(tmp), patched, ids[:1])
    except ExportError as e:
        raise ExportError(f"预检（{family} 缩微模型，DeepSeek-V3 导出）：{e}；在读权重之前就停下"
                          f"（--format dsopt 可以转换这个模型）") from None
    except DsoptError as e:  # the miniature's widths, not the format: the real run checks the user's budget
        return {"skipped": str(e)[:200]}
    except Exception as e:  # noqa: BLE001
        raise PlanError(f"预检失败：{family} 导出为 DeepSeek-V3 时在缩微模型上出错（{type(e).__name__}: {str(e)[:200]}）"
                        ) from None
    return {"max_abs_logit_diff_vs_dsopt": found["max_abs_logit_diff_vs_dsopt"]}
