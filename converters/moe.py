"""MoE 升级改造：把稠密 MLP 变成混合专家。

- ``copy``（稀疏升级，sparse upcycling）：E 个专家都是 MLP 的副本（可加小噪声），top-k 路由、选中专家的
  权重归一化；噪声为 0 时输出与稠密模型完全相同，可以从这里继续训练。
- ``split``（DeepSeekMoE 风格的细粒度切分）：中间层神经元中贡献能量最大的一部分成为共享专家（始终激活），
  其余按校准数据上的共激活聚类成大小相同的路由专家（``random`` 划分作基线）。选中的专家权重为 1
  （它们本来就是稠密 MLP 的一部分），因此未训练时的误差只来自没被选中的专家。
  路由器不经训练、直接从校准数据初始化：``gate`` 算出全部路由神经元的 gate 投影（始终激活），按
  |act(g)|·‖W_down 列‖ 打分，被选中的专家只再算 up 与 down；它可以只读每个 token 幅值最大的一部分输入维
  （``gate_input_dims``，精确时要花 FFN 参数的 1/3），省下的预算让更多神经元激活，读哪一部分每层随预算选；
  ``lowrank`` 读取 gate 投影的白化低秩近似（便宜，预算紧时更好）；``auto`` 对每层在校准数据上量两者的输出
  误差，取小者；``linear`` 用最小二乘把层输入线性映射到每个专家的输出能量（DeepSeek-V3 格式的线性路由器）。
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import nn

from patcher.errors import LocateError, PlanError
from patcher.model.locate import LayerMap, ModelMap
from patcher.model.weights import weight_of
from patcher.runtime.modeling import MoEMLP, largest_inputs

from .base import Planning
from .lowrank import low_rank


def balanced_kmeans(features: torch.Tensor, clusters: int, size: int, seed: int, iters: int = 12) -> list[list[int]]:
    """Cosine k-means of the columns of ``features`` into ``clusters`` groups of exactly ``size`` members."""
    n = features.shape[1]
    f = features / features.norm(dim=0, keepdim=True).clamp_min(1e-12)
    g = torch.Generator().manual_seed(seed)
    centroids = f[:, torch.randperm(n, generator=g)[:clusters]]
    for _ in range(iters):
        sim = f.T @ centroids  # (n, clusters)
        order = sim.max(1).values.argsort(descending=True)
        room = torch.full((clusters,), size)
        room_left = [size] * clusters
        assign = torch.empty(n, dtype=torch.long)
        # each neuron's few best clusters as Python lists: most neurons find room among them without touching `sim`
        prefs = sim.topk(min(8, clusters), dim=1).indices.tolist()
        for j in order.tolist():  # most confident neurons choose first; full clusters are skipped
            c = next((c for c in prefs[j] if room_left[c]), None)
            if c is None:
                c = int(sim[j].masked_fill(room == 0, float("-inf")).argmax())
            assign[j] = c
            room[c] -= 1
            room_left[c] -= 1
        centroids = torch.zeros(f.shape[0], clusters, dtype=f.dtype).index_add_(1, assign, f) / size
        centroids = centroids / centroids.norm(dim=0, keepdim=True).clamp_min(1e-12)
    groups = [[] for _ in range(clusters)]
    for j, c in enumerate(assign.tolist()):
        groups[c].append(j)
    return groups


# Routed-neuron fractions a split layer may take under sensitivity allocation (besides staying dense).
GRID = tuple(round(0.05 * i, 2) for i in range(2, 20))


@dataclass
class Analysis:
    """规划轮中一层的结果：各路由器、各候选激活比例下（神经元级路由）的相对输出误差，及均匀切分下实测的 KL。"""
    ffn_params: int
    options: dict  # (router, neuron fraction) -> {"sizing", "params" (active, router included), "error"}
    uniform: dict  # router -> its neuron fraction under a uniform split
    probe: tuple | None = None  # the option whose KL was measured
    kl: float | None = None


# Shares of the input dims the gate router may read, tried per layer when --moe-gate-input is not given. What a
# layer can afford moves the best one (SmolLM2, every layer alike: 0.5 at 0.5 active, 0.75 at 0.75 active).
GATE_INPUTS = (0.25, 0.5, 0.75, 1.0)


def router_choices(lm: LayerMap, o, d: int) -> dict[str, dict]:
    """Routers a layer may get, by label: ``auto`` tries the gate reader (gated MLPs only) on each candidate share
    of the input dims, and the low-rank one."""
    kinds = [o.router] if o.router != "auto" else (["gate", "lowrank"] if lm.gate is not None else ["lowrank"])
    out = {}
    for kind in kinds:
        if kind != "gate":
            out[kind] = {"router": kind}
            continue
        for share in [o.gate_input] if o.gate_input is not None else GATE_INPUTS:
            n = max(1, min(d, round(share * d)))
            out["gate" if n == d else f"gate@{n / d:.2f}"] = {"router": "gate", "gate_input_dims": n}
    return out


def choice_of(sizing: dict) -> dict:
    """The router part of a sizing (what ``router_choices`` gives)."""
    return {k: sizing[k] for k in ("router", "gate_input_dims") if k in sizing}


def _router_params(d: int, sizing: dict, o) -> int:
    routed = sizing["experts"] * sizing["expert_size"]
    if sizing["router"] == "linear":
        return d * sizing["experts"]
    if sizing["router"] == "gate":  # per-neuron scale (+ the input dims' scale when it reads only some of them);
        return routed + (d if sizing["gate_input_dims"] < d else 0)  # the gate rows count with the experts
    r = min(router_rank("lowrank", o, d), routed)
    return d * r + routed * r + routed  # down, up, per-neuron scale


def _neuron_params(lm: LayerMap, d: int) -> int:
    return d * (3 if lm.gate is not None else 2)  # gate, up and down rows of one intermediate neuron


def active_params(lm: LayerMap, d: int, sizing: dict, o) -> int:
    """FFN parameters one token uses at ``sizing``, router included."""
    per_neuron = _neuron_params(lm, d)
    chosen = sizing["top_k"] * sizing["expert_size"]
    if sizing["router"] == "gate":  # every routed gate row runs (on the dims read); a chosen neuron adds up and down
        routed = sizing["experts"] * sizing["expert_size"]
        return (sizing["shared_size"] * per_neuron + routed * sizing["gate_input_dims"] + chosen * (per_neuron - d)
                + _router_params(d, sizing, o))
    return (sizing["shared_size"] + chosen) * per_neuron + _router_params(d, sizing, o)


def split_sizing(inter: int, frac: float, o, choice: dict) -> dict:
    """Experts, top-k and shared size for a layer that should run ``frac`` of its neurons per token, with the
    router ``choice`` (from ``router_choices``)."""
    router = choice["router"]
    # exact gate routing picks the best neurons per token already: a fixed shared part would only constrain it
    sigma = o.shared if o.shared is not None else (0.0 if router == "gate" else frac / 2)
    shared = int(round(sigma * inter))
    # default: experts of two neurons — the finest grain measured best, and the low-rank router
    # scores neurons anyway, so granularity costs no router capacity; the exact gate router knows every neuron's
    # activation, so pairing neurons only loses choice: single neurons (SmolLM2 at 0.75: +17.2 % → +8.3 %)
    e = o.experts or max(1, (inter - shared) // (o.expert_width or (1 if router == "gate" else 2)))
    size = (inter - shared) // e
    if size < 1:
        raise PlanError(f"中间维 {inter} 去掉共享部分 {shared} 后不够分给 {e} 个专家")
    shared = inter - size * e
    k = o.top_k or int(round((frac * inter - shared) / size))
    if not 1 <= k <= e:
        raise PlanError(f"--moe-active {o.active} 与共享比例 {sigma:.3f} 不相容：该层应激活 {frac:.3f} 的神经元，"
                        f"推出的 top-k={k}（须在 1 与 {e} 之间）")
    return {"experts": e, "top_k": k, "expert_size": size, "shared_size": shared, **choice}


class MoEConverter:
    """MoE 技术：把每层的 MLP 换成路由专家加共享专家（配方小节 ``moe``，结构记录键 ``mlp``）。"""
    section = "moe"
    structure_key = "mlp"
    SPREAD = 0.2  # how far below the uniform fraction sensitivity allocation may take a layer

    def check(self, lm: LayerMap, o) -> None:
        lm.require("up", "down")
        if lm.mlp is None or lm.act_module is None:
            raise LocateError(f"第 {lm.index} 层（{lm.prefix}）的 MLP 没有可复用的激活模块，无法改造为 MoE"
                              f"（layer {lm.index}: missing role act_module）")

    def captures(self, lm: LayerMap, o) -> list[tuple[str, str]]:
        if o.mode == "copy":
            return []
        return [(lm.up.module, "inputs"), (lm.down.module, "inputs")]

    def planning(self, o) -> Planning:
        if o.mode == "split" and o.allocation == "sensitivity":
            return Planning("global_probe", f"按 {o.allocation} 在层间分配激活比例（要先看完所有层）",
                            {"allocation": "uniform"})
        return Planning("per_layer")

    def uniform(self, lm: LayerMap, d: int, o, choice: dict) -> dict:
        """The split of a layer that, router included, uses ``--moe-active`` of its FFN parameters."""
        inter, per_neuron = len(lm.up.flat_rows), _neuron_params(lm, d)
        router = choice["router"]
        if router == "gate":
            if lm.gate is None:
                raise PlanError(f"--moe-router gate 需要门控 MLP（SwiGLU/GeGLU）：第 {lm.index} 层没有 gate 投影")
            # all gate rows (on the dims read) and a scale per neuron always run; a chosen one adds per_neuron − d
            dims = choice["gate_input_dims"]
            frac = (o.active * per_neuron - dims - 1) / (per_neuron - d)
            if frac * inter < 1:
                raise PlanError(f"--moe-router gate 路由时要算出全部 gate 投影（FFN 参数的 {dims / per_neuron:.2f}），"
                                f"--moe-active {o.active} 不够；请增大它、减小 --moe-gate-input 或用 --moe-router lowrank")
            sizing = split_sizing(inter, frac, o, choice)
            while sizing["top_k"] > 1 and active_params(lm, d, sizing, o) > o.active * inter * per_neuron:
                sizing["top_k"] -= 1  # top-k was rounded: never over the budget
            return sizing
        frac, share = o.active, 0.0
        for _ in range(3):  # the router's size depends (weakly) on the split: settle it by fixed point
            try:
                sizing = split_sizing(inter, frac, o, choice)
            except PlanError as err:
                if not share:
                    raise
                raise PlanError(f"{err}；路由器本身占该层 FFN 参数的 {share:.3f}"
                                f"（减小 --moe-router-rank 或增大 --moe-active）") from None
            share = _router_params(d, sizing, o) / (inter * per_neuron)
            frac = o.active - share
            if frac * inter < 1:  # the router alone spends the budget: say that, not a negative shared ratio
                raise PlanError(f"第 {lm.index} 层：{router} 路由器本身就占该层 FFN 参数的 {share:.3f}，"
                                f"--moe-active {o.active} 的预算已不剩给任何专家（中间维只有 {inter}）；"
                                f"请减小 --moe-router-rank（现为 {o.router_rank}）或增大 --moe-active")
        return sizing

    def uniforms(self, lm: LayerMap, d: int, o) -> dict:
        """Uniform split per router the layer may get, by label (those the budget cannot fit are left out)."""
        out, errors = {}, []
        for label, choice in router_choices(lm, o, d).items():
            try:
                out[label] = self.uniform(lm, d, o, choice)
            except PlanError as err:
                errors.append(err)
        if not out:
            raise errors[-1]
        return out

    def check_target(self, mm: ModelMap, o, target) -> None:
        """What the output format needs of the experts' widths, checked before any work (DeepSeek-V3: the shared
        part is whole experts, and stock transformers runs experts whose width is a multiple of 8)."""
        if o.mode != "split" or (target.expert_size_multiple == 1 and not target.shared_whole_experts):
            return
        d = mm.hidden_size
        for lm in mm.layers[o.first_dense:]:
            for choice in router_choices(lm, o, d).values():
                sizing = self.uniform(lm, d, o, choice)
                if _fits(sizing, target):
                    continue
                good = []
                for e in range(2, min(len(lm.up.flat_rows), 1024) + 1):
                    try:
                        if _fits(self.uniform(lm, d, o.model_copy(update={"experts": e}), choice), target):
                            good.append(e)
                    except PlanError:
                        pass
                hint = f"；这一层可用的 --moe-experts：{', '.join(map(str, good[:12]))}" if good else ""
                raise PlanError(f"第 {lm.index} 层切成 {sizing['experts']} 个专家时每个专家宽 {sizing['expert_size']}、"
                                f"共享部分宽 {sizing['shared_size']}：输出格式要求专家宽是 {target.expert_size_multiple} "
                                f"的倍数" + ("、共享部分是整数个专家" if target.shared_whole_experts else "") + hint)

    def analyse(self, job, layer: nn.Module, lm: LayerMap, stats: dict, o, probe=None) -> Analysis:
        """Planning pass: this layer's output error at each candidate fraction, and the KL the whole model pays
        when only this layer is split uniformly (the layer's sensitivity)."""
        mlp = layer.get_submodule(lm.mlp)
        wu, _ = weight_of(layer, lm.up)
        inter, d = wu.shape[0], wu.shape[1]
        ffn = sum(p.numel() for p in mlp.parameters())
        ls = LayerStats.of(lm, stats)
        options, uniform = {}, {}
        for router, sizing_u in self.uniforms(lm, d, o).items():
            score, wd, h_run = self.scores(layer, lm, ls, sizing_u, o)
            uniform[router] = neuron_fraction(sizing_u, inter)
            fracs = {f: None for f in GRID}
            fracs[uniform[router]] = sizing_u
            for f, sizing in fracs.items():
                try:
                    sizing = sizing or split_sizing(inter, f, o, choice_of(sizing_u))
                except PlanError:
                    continue
                options[(router, f)] = {"sizing": sizing, "params": active_params(lm, d, sizing, o),
                                        "error": ls.masked_error(sizing, score, wd, h_run)}
        out = Analysis(ffn, options, uniform)
        if probe is not None:
            # the KL is measured at the uniform split of the router that fits this layer best
            out.probe = min(((r, f) for r, f in uniform.items()), key=lambda key: options[key]["error"])
            # the probe measures the layer, not the partition: a random one is as telling and much quicker
            module, _, _ = self.build(job, layer, lm, ls, options[out.probe]["sizing"], o, partition="random")
            out.kl = probe(lm.index, lm.mlp, module)
        return out

    def plan(self, mm: ModelMap, o, analyses) -> list[dict]:
        """Per-layer sizing. Sensitivity: each layer's cost = measured KL per unit of output error at the uniform
        split × its error at a candidate split; pick per layer (dense included) to minimise the total cost
        within the parameter budget (Lagrangian search over the price of a parameter)."""
        out = []
        for lm in mm.layers:
            inter, d = len(lm.up.flat_rows), mm.hidden_size
            if o.mode == "copy":
                e, k = o.experts or 8, o.top_k or 2
                if k > e:
                    raise PlanError(f"--moe-top-k {k} 大于专家数 {e}")
                out.append({"experts": e, "top_k": k, "expert_size": inter, "shared_size": 0, "router": "linear"})
            else:  # also validates the recipe before any allocation
                choices = list(self.uniforms(lm, d, o).values())
                # several router kinds: the conversion measures each on the layer's own calibration data
                out.append(choices[0] if len(choices) == 1 else {"router": "auto", "candidates": choices})
        if o.mode == "copy" or o.allocation == "uniform":
            if o.first_dense > len(out):
                raise PlanError(f"--moe-first-dense {o.first_dense} 超过层数 {len(out)}")
            return [{"dense": True} if i < o.first_dense else p for i, p in enumerate(out)]
        costs = []
        for a in analyses:
            weight = max(a.kl, 1e-12) / max(a.options[a.probe]["error"], 1e-12)
            # "KL ∝ output error" holds near the measured point only: a layer may move at most SPREAD below the
            # uniform fraction (error compounds through the later layers far from it), or become dense
            opts = [({"dense": True}, a.ffn_params, 0.0)]
            opts += [(v["sizing"], v["params"], weight * v["error"]) for (r, f), v in a.options.items()
                     if f >= a.uniform[r] - self.SPREAD]
            costs.append(sorted(opts, key=lambda t: t[1]))
        budget = o.active * sum(a.ffn_params for a in analyses)

        def pick(price):
            return [min(opts, key=lambda t: t[2] + price * t[1]) for opts in costs]

        lo, hi = 0.0, 1.0
        while sum(t[1] for t in pick(hi)) > budget and hi < 1e12:
            hi *= 4
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if sum(t[1] for t in pick(mid)) <= budget else (mid, hi)
        chosen = pick(hi)
        # the Lagrangian solution can leave budget unspent (options are discrete): spend it on the upgrades
        # that remove the most cost per parameter
        while True:
            left = budget - sum(t[1] for t in chosen)
            moves = [((c[2] - u[2]) / (u[1] - c[1]), i, u) for i, (c, opts) in enumerate(zip(chosen, costs))
                     for u in opts if c[1] < u[1] <= c[1] + left and u[2] < c[2]]
            if not moves:
                return [t[0] for t in chosen]
            _, i, u = max(moves, key=lambda m: m[0])
            chosen[i] = u

    def summary(self, mm: ModelMap, o, plans: list[dict], specs: dict) -> dict:
        layers, resolved = [], []
        for lm, p in zip(mm.layers, plans):
            if "candidates" in p:  # `auto` under a uniform split: the layer's structure record says what was chosen
                p = next(c for c in p["candidates"] if c["router"] == specs[lm.index]["router"])
            resolved.append(p)
            if p.get("dense"):
                layers.append({"layer": lm.index, "dense": True, "active_ffn_fraction_nominal": 1.0})
                continue
            inter = p["shared_size"] + (p["expert_size"] * p["experts"] if o.mode == "split" else p["expert_size"])
            frac = (p["shared_size"] + p["top_k"] * p["expert_size"]) / inter if o.mode == "split" else None
            layers.append({"layer": lm.index, **p, "active_ffn_fraction_nominal": frac})
        return {"mode": o.mode, "routing": o.routing, "router": o.router if o.mode == "split" else "linear",
                "gate_input": o.gate_input if o.mode == "split" else None,
                "routers": {r: sum(1 for p in resolved if p.get("router") == r) for r in ("gate", "lowrank", "linear")},
                "partition": o.partition if o.mode == "split" else None,
                "allocation": o.allocation if o.mode == "split" else None,
                "dense_layers": [l["layer"] for l in layers if l.get("dense")], "layers": layers}

    def build(self, job, layer: nn.Module, lm: LayerMap, ls: "LayerStats | None", sizing: dict, o,
              partition: str | None = None):
        """The MoE MLP of one layer at ``sizing``: (module, structure record, router statistics)."""
        o = o if partition is None else o.model_copy(update={"partition": partition})
        config = job.config
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
        seed = job.seed * 1000 + lm.index
        if o.mode == "copy":
            spec.update(router="linear", weights="prob")
            new = MoEMLP(spec, config, mlp.get_submodule(lm.act_module))
            _fill_copy(new, wu, bu, wg, wd, bd, o.noise, seed)
            info = {}
        else:
            # DeepSeek-V3 cannot give chosen experts a weight of exactly 1: its weights are sigmoid scores normalised
            # over the top-k and scaled by routed_scaling_factor. With scaling = top_k and router logits squeezed
            # near 0 (σ ≈ ½ ± 10⁻²) every chosen expert gets about 1 ± 10⁻², and the ranking is unchanged.
            deepseek = not job.target.unit_expert_weights
            spec.update(router=sizing["router"], weights="prob" if deepseek else "one",
                        routed_scaling=float(sizing["top_k"]) if deepseek else 1.0,
                        router_rank=min(router_rank("lowrank", o, wu.shape[1]), sizing["experts"] * sizing["expert_size"]),
                        router_bias=(wg is None and bu is not None))
            if sizing["router"] == "gate":
                spec["gate_input_dims"] = sizing["gate_input_dims"]
            new = MoEMLP(spec, config, mlp.get_submodule(lm.act_module))
            info = _fill_split(new, wu, bu, wg, wd, bd, ls, sizing, o, seed)
        new.to(device=wu.device, dtype=wu.dtype)
        return new, spec, info

    def convert(self, job, layer: nn.Module, lm: LayerMap, stats: dict, sizing: dict, o):
        """Replace layer ``lm.index``'s MLP in place (unless the plan keeps it dense)."""
        if sizing.get("dense"):
            return None, {"moe_dense": True}
        ls = LayerStats.of(lm, stats) if o.mode == "split" else None
        if "candidates" in sizing:
            # `--moe-router auto` under a uniform split: the router kind with the smaller output error on this
            # layer's calibration data (the structure record keeps the choice; the summary reads it there)
            sizing = min(sizing["candidates"],
                         key=lambda c: ls.masked_error(c, *self.scores(layer, lm, ls, c, o)))
        new, spec, info = self.build(job, layer, lm, ls, sizing, o)
        layer.set_submodule(lm.mlp, new)
        return spec, {f"moe_{k}": v for k, v in info.items()}

    def scores(self, layer: nn.Module, lm: LayerMap, ls: "LayerStats", choice: dict, o) -> tuple:
        """(neuron scores of a router ``choice`` on the first calibration rows, W_down, the activations the chosen
        neurons then run with when they differ from the dense ones): what ``masked_error`` takes."""
        wu, bu = weight_of(layer, lm.up)
        wd, _ = weight_of(layer, lm.down, rows=False)
        wg = weight_of(layer, lm.gate)[0] if lm.gate is not None else None
        act = layer.get_submodule(lm.mlp).get_submodule(lm.act_module)
        d = wu.shape[1]
        reader = Reader.fit(ls, wu, bu, wg, wd, act, router_rank(choice["router"], o, d),
                            input_dims=choice.get("gate_input_dims", d))
        x = ls.x[: ls.ERROR_ROWS]
        score, h_run = reader.read(x, wu, bu)
        return score, wd, h_run

    def verify(self, model: nn.Module, mm: ModelMap, eval_ids: torch.Tensor, infos) -> dict:
        """Tokens per expert on held-out text, per layer: max/mean and normalised entropy."""
        loads = {}
        hooks = []
        for lm in mm.layers:
            mod = model.get_submodule(lm.prefix).get_submodule(lm.mlp)
            if isinstance(mod, MoEMLP):
                loads[lm.index] = torch.zeros(mod.num_experts)

                def hook(m, _inp, _out, i=lm.index):
                    loads[i] += routing_counts(m)
                hooks.append(mod.register_forward_hook(hook))
        try:
            with torch.no_grad():
                for w in eval_ids:
                    model(input_ids=w[None], use_cache=False)
        finally:
            for h in hooks:
                h.remove()
        return {"balance": [balance_record(i, c) for i, c in loads.items()], "balance_text": "eval windows (held-out)"}


def router_rank(router: str, o, d: int) -> int:
    """Rank of the gate reader a router kind uses: the exact gate is full rank; the low-rank one takes
    ``--moe-router-rank``, by default at most a quarter of the hidden size (on a small model a rank-128 router
    would cost more than the experts it routes)."""
    if router == "gate":
        return d
    return min(o.router_rank, d if "router_rank" in o.model_fields_set else max(1, d // 4))


def _fits(sizing: dict, target) -> bool:
    size, shared = sizing["expert_size"], sizing["shared_size"]
    return size % target.expert_size_multiple == 0 and not (target.shared_whole_experts and shared % size)


def neuron_fraction(sizing: dict, inter: int) -> float:
    return (sizing["shared_size"] + sizing["top_k"] * sizing["expert_size"]) / inter


def routing_counts(mlp: MoEMLP) -> torch.Tensor:
    """Tokens per expert in the MoE layer's last forward."""
    return torch.bincount(mlp.last_routing.reshape(-1), minlength=mlp.num_experts).float()


def balance_record(layer: int, counts: torch.Tensor) -> dict:
    """One layer's load: tokens per expert, max over mean, and the normalised entropy of the load."""
    p = counts / counts.sum().clamp_min(1)
    ent = float(-(p[p > 0] * p[p > 0].log()).sum() / math.log(len(p))) if len(p) > 1 else 1.0
    return {"layer": layer, "tokens_per_expert": counts.tolist(), "max_over_mean": float(counts.max() / counts.mean()),
            "entropy": ent}


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


@dataclass
class LayerStats:
    """Calibration rows of one MLP: its input ``x`` and the activations ``h`` that enter the down projection."""
    x: torch.Tensor
    h: torch.Tensor
    _energy: tuple | None = None  # (rows, output energy) of the dense layer, cached for masked_error
    ERROR_ROWS = 4096  # calibration rows the neuron-level error is measured on

    @classmethod
    def of(cls, lm: LayerMap, stats: dict) -> "LayerStats":
        return cls(stats[(lm.up.module, "inputs")].float(), stats[(lm.down.module, "inputs")].float())

    @cached_property
    def cov(self) -> torch.Tensor:
        return (self.x.double().T @ self.x.double()) / self.x.shape[0]

    def importance(self, wd: torch.Tensor) -> torch.Tensor:
        """Each neuron's mean output energy on the calibration text: E[h_j²]·‖W_down[:, j]‖²."""
        return (self.h ** 2).mean(0) * wd.float().norm(dim=0) ** 2

    def masked_error(self, sizing: dict, score: torch.Tensor, wd: torch.Tensor, h_run: torch.Tensor | None = None
                     ) -> float:
        """Relative output error of the layer when each token keeps the shared neurons plus the routed neurons
        with the highest router ``score`` (neuron level, so it ignores how neurons are grouped into experts).
        ``score``: the router's neuron scores on the first ``len(score)`` calibration rows (``Reader.scores``);
        ``h_run``: the activations kept neurons run with, when not the dense ones (``Reader.activations``)."""
        h = self.h[: len(score)]
        s = sizing["shared_size"]
        if s:
            score = score.clone()
            score[:, self.importance(wd).argsort(descending=True)[:s]] = float("inf")
        keep = torch.zeros_like(h).scatter_(1, score.topk(s + sizing["top_k"] * sizing["expert_size"], dim=1)[1], 1.0)
        if self._energy is None or self._energy[0] != len(score):  # the same for every option of the layer
            self._energy = (len(score), float((h @ wd.float().T).pow(2).sum().clamp_min(1e-30)))
        missed = h * (1 - keep) if h_run is None else h - h_run * keep
        return float((missed @ wd.float().T).pow(2).sum()) / self._energy[1]


def neuron_scale(ls: LayerStats, wu, wg, wd, rows=slice(None)) -> torch.Tensor:
    """What multiplies |act(pre-activation)| in a neuron's output: ‖W_down[:, j]‖ (how much neuron j can move the
    output) times its mean |up| on calibration data when the MLP is gated."""
    col = wd.float().norm(dim=0)[rows]
    return col * (ls.x @ wu[rows].float().T).abs().mean(0) if wg is not None else col


@dataclass
class Reader:
    """Router reading the MLP's own pre-activation: score_j = |act(x·Dᵀ·Uᵀ + b)_j|·scale_j — low-rank, or exact
    (full rank) on the token's ``input_dims`` largest input dims (the gate router)."""
    down: torch.Tensor
    up: torch.Tensor
    bias: torch.Tensor | None
    scale: torch.Tensor
    act: nn.Module
    input_scale: torch.Tensor | None = None  # set when it reads only some input dims
    input_dims: int = 0
    gated: bool = False

    @classmethod
    def fit(cls, ls: LayerStats, wu, bu, wg, wd, act: nn.Module, rank: int, rows=None,
            input_dims: int | None = None) -> "Reader":
        rows = slice(None) if rows is None else rows
        reader = (wg if wg is not None else wu)[rows].double()  # the pre-activation that decides firing
        up, down = low_rank(reader, ls.cov, rank)
        bias = bu[rows].float() if wg is None and bu is not None else None
        sparse = input_dims is not None and input_dims < reader.shape[1]
        return cls(down.float(), up.float(), bias, neuron_scale(ls, wu, wg, wd, rows), act,
                   gate_input_scale(reader) if sparse else None, input_dims or 0, wg is not None)

    def read(self, x: torch.Tensor, wu, bu) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(neuron scores, the activations the routed neurons run with): act(gate read)·up when the router's gates
        replace the dense ones (it reads only some input dims), ``None`` when they run with the dense ones."""
        with torch.no_grad():
            sparse = self.input_scale is not None
            z = ((largest_inputs(x, self.input_scale, self.input_dims) if sparse else x) @ self.down.T) @ self.up.T
            a = self.act(z if self.bias is None else z + self.bias)
            if not (sparse and self.gated):
                return a.abs() * self.scale, None
            u = x @ wu.float().T
            return a.abs() * self.scale, a * (u if bu is None else u + bu.float())


def gate_input_scale(wg: torch.Tensor) -> torch.Tensor:
    """How much input dim i can move the gates: ‖W_g[:, i]‖ (ranks the dims the gate router reads)."""
    return wg.float().norm(dim=0)


def _fill_split(new: MoEMLP, wu, bu, wg, wd, bd, ls: LayerStats, sizing, o, seed) -> dict:
    e, m, s = sizing["experts"], sizing["expert_size"], sizing["shared_size"]
    x, h = ls.x, ls.h
    col = wd.float().norm(dim=0)
    shared = ls.importance(wd).argsort(descending=True)[:s]
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
        # ‖W_g·h_g‖ = √(h_gᵀ·(W_gᵀW_g)·h_g): per-expert Gram matrices instead of per-expert (tokens × d) outputs
        wg_ = wd[:, order].float().T.reshape(e, m, -1)
        gram = wg_ @ wg_.transpose(1, 2)  # (e, m, m)
        hx = h[:, order].float().view(h.shape[0], e, m)
        target = torch.einsum("tea,eab,teb->te", hx, gram, hx).clamp_min(0).sqrt()
        if new.router == "linear":
            cov = ls.cov
            ridge = 1e-3 * cov.diagonal().mean()
            r = torch.linalg.solve(cov + ridge * torch.eye(cov.shape[0], dtype=cov.dtype),
                                   x.double().T @ target.double() / x.shape[0])
            new.gate.weight.copy_(r.T)
            if new.weights == "prob":
                spread = (x.to(new.gate.weight.dtype) @ new.gate.weight.T).std().clamp_min(1e-12)
                new.gate.weight.mul_(DEEPSEEK_LOGIT_SPREAD / spread)
        elif new.router == "gate":  # the experts' own gate rows route; only the per-neuron scale is new
            new.router_scale.copy_(neuron_scale(ls, wu, wg, wd, order))
            if new.gate_input_dims < x.shape[1]:
                new.gate_input_scale.copy_(gate_input_scale(wg[order]))
        else:
            rd = Reader.fit(ls, wu, bu, wg, wd, new.act, new.router_down.weight.shape[0], order)
            new.router_down.weight.copy_(rd.down)
            new.router_up.weight.copy_(rd.up)
            if new.router_up.bias is not None:
                new.router_up.bias.copy_(rd.bias)
            new.router_scale.copy_(rd.scale)
        chosen = _choose(new, x)
        hit = torch.zeros_like(target, dtype=torch.bool).scatter_(1, chosen, True)
        oracle = target.topk(new.top_k, dim=1)[1]
        kept = float((target * hit).sum() / target.sum().clamp_min(1e-12))
        best = float(target.gather(1, oracle).sum() / target.sum().clamp_min(1e-12))
        balanced = o.balance and new.routing == "sigmoid"
        if balanced:
            _balance(new, x)
        # the refit needs the routing the model will use: the balance bias changes it, otherwise it is `chosen`
        refit = o.refit_down and refit_down(new, h, order, shared, wd, _choose(new, x) if balanced else chosen,
                                            h_run=_routed_activations(new, x, h, order, wu, bu))
    return {"router_recall": float(hit.gather(1, oracle).float().mean()), "energy_kept": kept,
            "energy_kept_oracle": best, "down_refit": refit}


def _routed_activations(new: MoEMLP, x, h, order, wu, bu) -> torch.Tensor | None:
    """``h`` with the routed neurons' activations as the MoE runs them, when its gate router reads only some
    input dims (its gates then replace the dense ones); ``None`` when they are the dense activations."""
    if new.router != "gate" or new.gate_input_dims >= x.shape[1]:
        return None
    with torch.no_grad():
        xr = x.to(new.experts_up.dtype)
        u = xr @ wu[order].T + (bu[order] if bu is not None else 0)
        out = h.clone()
        out[:, order] = (new.act(new.all_gates(xr)) * u).float()
    return out


def refit_down(new: MoEMLP, h: torch.Tensor, order: torch.Tensor, shared: torch.Tensor, wd: torch.Tensor,
               chosen: torch.Tensor, damp: float = 0.01, h_run: torch.Tensor | None = None) -> bool:
    """Refit the down projection for the neurons that actually run: min Σ_t ‖W'·(h_t ⊙ m_t) − W·h_t‖² + λ‖W' − W‖².

    Routing drops each token's other neurons; the neurons kept are correlated with the dropped ones, so
    a least-squares W' over the calibration tokens (their real routing masks m_t) carries part of the dropped
    output. Ridge towards W (λ = ``damp`` × mean diagonal) keeps rarely chosen neurons as they were. The refit is
    kept only when, fitted on the first three quarters of the tokens, it lowers the error on the last quarter
    (it does under the low-rank router at 0.5 active; under the exact gate router it can overfit). Returns whether
    it was kept.
    """
    e, _, m = new.experts_down.shape
    cols = torch.cat([order, shared])
    hf = h[:, cols].double()
    keep = torch.ones_like(hf)
    keep[:, : e * m] = torch.zeros(len(h), e, dtype=hf.dtype).scatter_(1, chosen, 1.0).repeat_interleave(m, 1)
    hm = (hf if h_run is None else h_run[:, cols].double()) * keep  # what the kept neurons run with
    w = wd[:, cols].double()

    def fit(rows):
        gram = hm[rows].T @ hm[rows]
        lam = damp * gram.diagonal().mean().clamp_min(1e-12)
        rhs = (w @ (hf[rows].T @ hm[rows]) + lam * w).T
        return torch.linalg.solve(gram + lam * torch.eye(len(cols), dtype=gram.dtype), rhs).T

    cut = len(h) * 3 // 4
    held = slice(cut, None)
    target = hf[held] @ w.T
    if ((hm[held] @ fit(slice(0, cut)).T - target) ** 2).sum() >= ((hm[held] @ w.T - target) ** 2).sum():
        return False
    fitted = fit(slice(None))
    with torch.no_grad():
        new.experts_down.copy_(fitted[:, : e * m].T.reshape(e, m, -1).transpose(1, 2))
        if len(shared):
            new.shared_down.weight.copy_(fitted[:, e * m:])
    return True


# Router logit std in the DeepSeek layout. σ(l) ≈ ½ + l/4: the chosen experts' normalised weights stay near 1
# (spread/2 relative), but float32 resolves σ near ½ only to 6·10⁻⁸, so the top-k boundary falls within an ulp,
# where engines round σ differently, at a rate ∝ 1/spread (8·10⁻³ of SmolLM2's layer-0 tokens at 4·10⁻³).
# 4·10⁻² trades 1–2 % weight deviations for ten times fewer such ties.
DEEPSEEK_LOGIT_SPREAD = 4e-2


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

