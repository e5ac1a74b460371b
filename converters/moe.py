"""MoE 升级改造：把稠密 MLP 变成混合专家。

- ``copy``（稀疏升级，sparse upcycling）：E 个专家都是 MLP 的副本（可加小噪声），top-k 路由、选中专家的
  权重归一化；噪声为 0 时输出与稠密模型完全相同，可以从这里继续训练。
- ``split``（DeepSeekMoE 风格的细粒度切分）：中间层神经元中贡献能量最大的一部分成为共享专家（始终激活），
  其余按校准数据上的共激活聚类成大小相同的路由专家（``random`` 划分作基线）。选中的专家权重为 1
  （它们本来就是稠密 MLP 的一部分），因此未训练时的误差只来自没被选中的专家。
  路由器不经训练、直接从校准数据初始化：``lowrank`` 读取 MLP 自己 gate 投影的白化低秩近似，按每个专家
  神经元的 |act(g̃)|·‖W_down 列‖ 求和打分；``linear`` 用最小二乘把层输入线性映射到每个专家的输出能量
  （DeepSeek-V3 格式的线性路由器）。
"""

from __future__ import annotations

import math

import torch
from torch import nn

from patcher.locate import LayerMap, LocateError, ModelMap
from patcher.modeling import MoEMLP

from . import register
from .mla import PlanError, low_rank
from .weights import weight_of


def balanced_kmeans(features: torch.Tensor, clusters: int, size: int, seed: int, iters: int = 12) -> list[list[int]]:
    """Cosine k-means of the columns of ``features`` into ``clusters`` groups of exactly ``size`` members."""
    n = features.shape[1]
    f = features / features.norm(dim=0, keepdim=True).clamp_min(1e-12)
    g = torch.Generator().manual_seed(seed)
    centroids = f[:, torch.randperm(n, generator=g)[:clusters]]
    for _ in range(iters):
        sim = f.T @ centroids  # (n, clusters)
        order = sim.max(1).values.argsort(descending=True)
        room = [size] * clusters
        assign = [-1] * n
        prefs = sim.argsort(1, descending=True)
        for j in order.tolist():  # most confident neurons choose first; full clusters are skipped
            for c in prefs[j].tolist():
                if room[c]:
                    assign[j] = c
                    room[c] -= 1
                    break
        groups = [[] for _ in range(clusters)]
        for j, c in enumerate(assign):
            groups[c].append(j)
        centroids = torch.stack([f[:, grp].mean(1) for grp in groups], 1)
        centroids = centroids / centroids.norm(dim=0, keepdim=True).clamp_min(1e-12)
    return groups


class MoEConverter:
    section = "moe"
    structure_key = "mlp"

    def enabled(self, recipe) -> bool:
        return recipe.moe.enabled

    def check(self, lm: LayerMap) -> None:
        lm.require("up", "down")
        if lm.mlp is None or lm.act_module is None:
            raise LocateError(f"第 {lm.index} 层（{lm.prefix}）的 MLP 没有可复用的激活模块，无法改造为 MoE"
                              f"（layer {lm.index}: missing role act_module）")

    def captures(self, lm: LayerMap, recipe) -> list[tuple[str, str]]:
        if recipe.moe.mode == "copy":
            return []
        return [(lm.up.module, "inputs"), (lm.down.module, "inputs")]

    def needs_analysis(self, recipe) -> bool:
        return False

    def plan(self, mm: ModelMap, recipe, analyses, probe=None) -> list[dict]:
        o = recipe.moe
        out = []
        for lm in mm.layers:
            inter = len(lm.up.flat_rows)
            if o.mode == "copy":
                e, k = o.experts or 8, o.top_k or 2
                if k > e:
                    raise PlanError(f"--moe-top-k {k} 大于专家数 {e}")
                out.append({"experts": e, "top_k": k, "expert_size": inter, "shared_size": 0})
                continue
            sigma = o.shared if o.shared is not None else o.active / 2
            shared = int(round(sigma * inter))
            # default: experts of two neurons — the finest grain measured best, and the low-rank router
            # scores neurons anyway, so granularity costs no router capacity
            e = o.experts or max(1, (inter - shared) // 2)
            size = (inter - shared) // e
            if size < 1:
                raise PlanError(f"中间维 {inter} 去掉共享部分 {shared} 后不够分给 {e} 个专家")
            shared = inter - size * e
            k = o.top_k or int(round((o.active * inter - shared) / size))
            if not 1 <= k <= e:
                raise PlanError(f"--moe-active {o.active} 与共享比例 {sigma:.3f} 不相容：推出的 top-k={k}"
                                f"（须在 1 与 {e} 之间）")
            out.append({"experts": e, "top_k": k, "expert_size": size, "shared_size": shared})
        return out

    def summary(self, mm: ModelMap, recipe, plans: list[dict]) -> dict:
        o, p = recipe.moe, plans[0]
        inter = p["shared_size"] + (p["expert_size"] * p["experts"] if o.mode == "split" else p["expert_size"])
        frac = (p["shared_size"] + p["top_k"] * p["expert_size"]) / inter if o.mode == "split" else None
        return {"mode": o.mode, "routing": o.routing, "router": o.router if o.mode == "split" else "linear",
                "partition": o.partition if o.mode == "split" else None, **p,
                "active_ffn_fraction_nominal": frac}

    def convert(self, ctx, layer: nn.Module, lm: LayerMap, stats: dict, sizing: dict, recipe):
        o = recipe.moe
        mlp = layer.get_submodule(lm.mlp)
        wu, bu = weight_of(layer, lm.up)
        wg, bg = weight_of(layer, lm.gate) if lm.gate is not None else (None, None)
        wd, bd = weight_of(layer, lm.down, rows=False)
        if bg is not None:
            raise PlanError(f"第 {lm.index} 层的 gate 投影带偏置，暂不支持")
        spec = {"path": lm.mlp, "act": lm.act_module, "hidden_size": wu.shape[1], "num_experts": sizing["experts"],
                "top_k": sizing["top_k"], "expert_size": sizing["expert_size"],
                "shared_size": sizing["shared_size"], "gated": wg is not None, "up_bias": bu is not None,
                "down_bias": bd is not None, "routing": o.routing, "n_group": o.n_group, "topk_group": o.topk_group}
        seed = recipe.calibration.seed * 1000 + lm.index
        if o.mode == "copy":
            spec.update(router="linear", weights="prob")
            new = MoEMLP(spec, ctx.config, mlp.get_submodule(lm.act_module))
            _fill_copy(new, wu, bu, wg, wd, bd, o.noise, seed)
            info = {}
        else:
            spec.update(router=o.router, weights="one",
                        router_rank=min(o.router_rank, wu.shape[1], sizing["experts"] * sizing["expert_size"]),
                        router_bias=(wg is None and bu is not None))
            new = MoEMLP(spec, ctx.config, mlp.get_submodule(lm.act_module))
            x = stats[(lm.up.module, "inputs")]
            h = stats[(lm.down.module, "inputs")]
            info = _fill_split(new, wu, bu, wg, wd, bd, x, h, sizing, o, seed)
        new.to(device=wu.device, dtype=wu.dtype)
        layer.set_submodule(lm.mlp, new)
        return spec, {f"moe_{k}": v for k, v in info.items()}

    def verify(self, model: nn.Module, mm: ModelMap, eval_ids: torch.Tensor, infos) -> dict:
        """Tokens per expert on held-out text, per layer: max/mean and normalised entropy."""
        loads = {}
        hooks = []
        for lm in mm.layers:
            mod = model.get_submodule(lm.prefix).get_submodule(lm.mlp)
            if isinstance(mod, MoEMLP):
                loads[lm.index] = torch.zeros(mod.num_experts)

                def hook(m, _inp, _out, i=lm.index):
                    loads[i] += torch.bincount(m.last_routing.reshape(-1), minlength=m.num_experts).float()
                hooks.append(mod.register_forward_hook(hook))
        try:
            with torch.no_grad():
                for w in eval_ids:
                    model(input_ids=w[None], use_cache=False)
        finally:
            for h in hooks:
                h.remove()
        balance = []
        for i, c in loads.items():
            p = c / c.sum().clamp_min(1)
            ent = float(-(p[p > 0] * p[p > 0].log()).sum() / math.log(len(p))) if len(p) > 1 else 1.0
            balance.append({"layer": i, "tokens_per_expert": c.tolist(), "max_over_mean": float(c.max() / c.mean()),
                            "entropy": ent})
        return {"balance": balance, "balance_text": "eval windows (held-out)"}


def _noisy(w: torch.Tensor, noise: float, g: torch.Generator) -> torch.Tensor:
    if noise == 0:
        return w
    return w + noise * w.std() * torch.randn(w.shape, generator=g, dtype=w.dtype)


def _fill_copy(new: MoEMLP, wu, bu, wg, wd, bd, noise: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for e in range(new.num_experts):
            new.experts_up[e].copy_(_noisy(wu, noise, g))
            if wg is not None:
                new.experts_gate[e].copy_(_noisy(wg, noise, g))
            new.experts_down[e].copy_(_noisy(wd, noise, g))
            if bu is not None:
                new.experts_up_bias[e].copy_(bu)
        if bd is not None:
            new.down_bias.copy_(bd)
        new.gate.weight.copy_(torch.randn(new.gate.weight.shape, generator=g) * 0.02)


def _fill_split(new: MoEMLP, wu, bu, wg, wd, bd, x, h, sizing, o, seed) -> dict:
    e, m, s = sizing["experts"], sizing["expert_size"], sizing["shared_size"]
    col = wd.float().norm(dim=0)                      # ‖W_down[:, j]‖: how much neuron j can move the output
    importance = (h.float() ** 2).mean(0) * col ** 2  # its mean output energy on the calibration text
    shared = importance.argsort(descending=True)[:s]
    mask = torch.ones(len(col), dtype=torch.bool)
    mask[shared] = False
    rest = mask.nonzero()[:, 0]
    if o.partition == "random":
        perm = rest[torch.randperm(len(rest), generator=torch.Generator().manual_seed(seed))]
        groups = [perm[i * m:(i + 1) * m] for i in range(e)]
    else:  # neurons that fire together go together: columns of |h|·‖w_down‖, cosine k-means with equal sizes
        feats = h[:, rest].abs() * col[rest]
        groups = [rest[torch.tensor(grp)] for grp in balanced_kmeans(feats, e, m, seed)]
    order = torch.cat(groups)
    with torch.no_grad():
        new.experts_up.copy_(wu[order].view(e, m, -1))
        if wg is not None:
            new.experts_gate.copy_(wg[order].view(e, m, -1))
        new.experts_down.copy_(wd[:, order].T.reshape(e, m, -1).transpose(1, 2))
        if bu is not None:
            new.experts_up_bias.copy_(bu[order].view(e, m))
        if s:
            new.shared_up.weight.copy_(wu[shared])
            if bu is not None:
                new.shared_up.bias.copy_(bu[shared])
            if wg is not None:
                new.shared_gate.weight.copy_(wg[shared])
            new.shared_down.weight.copy_(wd[:, shared])
        if bd is not None:
            new.down_bias.copy_(bd)
        # each expert's true output energy on the calibration tokens: what the router should rank by
        target = torch.stack([(h[:, grp].float() @ wd[:, grp].float().T).norm(dim=1) for grp in groups], 1)
        cov = (x.double().T @ x.double()) / x.shape[0]
        if o.router == "linear":
            ridge = 1e-3 * cov.diagonal().mean()
            r = torch.linalg.solve(cov + ridge * torch.eye(cov.shape[0], dtype=cov.dtype),
                                   x.double().T @ target.double() / x.shape[0])
            new.gate.weight.copy_(r.T)
        else:
            reader = (wg if wg is not None else wu)[order].double()  # the pre-activation that decides firing
            up, down = low_rank(reader, cov, new.router_down.weight.shape[0])
            new.router_down.weight.copy_(down)
            new.router_up.weight.copy_(up)
            if new.router_up.bias is not None:
                new.router_up.bias.copy_(bu[order])
            up_mag = (x.float() @ wu[order].float().T).abs().mean(0) if wg is not None else torch.ones(len(order))
            new.router_scale.copy_(col[order] * up_mag)
        chosen = _choose(new, x)
        hit = torch.zeros_like(target, dtype=torch.bool).scatter_(1, chosen, True)
        oracle = target.topk(new.top_k, dim=1)[1]
        kept = float((target * hit).sum() / target.sum().clamp_min(1e-12))
        best = float(target.gather(1, oracle).sum() / target.sum().clamp_min(1e-12))
        if o.balance and new.routing == "sigmoid":
            _balance(new, x)
    return {"router_recall": float(hit.gather(1, oracle).float().mean()), "energy_kept": kept,
            "energy_kept_oracle": best}


def _choose(new: MoEMLP, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return new.route(x.to(new.experts_up.dtype))[0]


def _balance(new: MoEMLP, x: torch.Tensor, steps: int = 60) -> None:
    """Aux-loss-free balance (DeepSeek-V3): nudge each expert's selection bias towards equal load."""
    with torch.no_grad():
        spread = new.router_logits(x).std().clamp_min(1e-6)
        for _ in range(steps):
            load = torch.bincount(_choose(new, x).reshape(-1), minlength=new.num_experts).float()
            new.e_score_correction_bias -= 0.02 * spread * torch.sign(load - load.mean())


register(MoEConverter())
