"""探测：DeepSeek-V3 格式的线性路由器（sigmoid(W·x) 取 top-k）在切分 MoE 上能做到多好，专家怎么分组、路由器怎么拟合才好。

SmolLM2-135M，0.5 激活的 DeepSeek-V3 切分（24 个专家 × 48 神经元、top-8，按重要性取 384 个神经元作共享专家）。
在内置校准文本（4096 token）上分组并拟合路由器，在内置评估文本（每领域 512 token）上量每层 MLP 输出的相对误差
‖MoE(x) − MLP(x)‖² / ‖MLP(x)‖²（专家权重取 1），并与按真实专家输出能量选 top-k 的神谕比较。

分组：coact（现在的做法：|h|·‖W_down 列‖ 的余弦 k-means）、gaterows（gate 行方向的 k-means，线性路由器最容易预测的分组）、
linpred（|h|·‖W_down 列‖ 在 x 上的最小二乘预测值的 k-means）。拟合：raw（最小二乘拟合每个专家的输出能量，现在的做法）、
centred / zscore / log（逐 token 去均值、标准化、取对数后再最小二乘）、ce（从 zscore 出发，按每 token 的能量份额做 softmax 交叉熵）。

用法：python scripts/probe_linear_router.py --out scripts/results/moe-smollm2-linear-router-probe.json [--layers 0,8,16,24,29]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from converters.moe import balanced_kmeans  # noqa: E402
from patcher.data.text import eval_windows, mixed_windows, read_domains  # noqa: E402
from patcher.model import sources  # noqa: E402

E, M, K, S = 24, 48, 8, 384  # experts, neurons per expert, top-k, shared neurons
FITS = ("raw", "centred", "zscore", "log", "ce")


def mlp_inputs(model, windows, layers) -> dict:
    cap = {i: [] for i in layers}
    hooks = [model.model.layers[i].mlp.register_forward_pre_hook(
        lambda m, inp, i=i: cap[i].append(inp[0].reshape(-1, inp[0].shape[-1]))) for i in layers]
    for w in windows:
        model(w[None])
    for h in hooks:
        h.remove()
    return {i: torch.cat(v).float() for i, v in cap.items()}


def activations(mlp, x):
    return torch.nn.functional.silu(x @ mlp.gate_proj.weight.T) * (x @ mlp.up_proj.weight.T)


def ridge_solve(x, t):
    xd = x.double()
    cov = xd.T @ xd / len(x)
    return torch.linalg.solve(cov + 1e-3 * cov.diagonal().mean() * torch.eye(cov.shape[0], dtype=cov.dtype),
                              xd.T @ t.double() / len(x))


def fit_ce(x, target, r0):
    """Softmax cross-entropy of the router logits against each token's expert energy shares (LBFGS)."""
    with torch.enable_grad():
        rt = r0.float().T.contiguous().requires_grad_(True)
        b = torch.zeros(target.shape[1], requires_grad=True)
        p = target / target.sum(1, keepdim=True).clamp_min(1e-9)
        scale = 1.0 / float((x @ r0.float()).std())
        opt = torch.optim.LBFGS([rt, b], max_iter=100, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = -(p * torch.log_softmax((x @ rt.T + b) * scale * 2, 1)).sum(1).mean()
            loss.backward()
            return loss
        opt.step(closure)
    return torch.cat([rt.detach().T, b.detach()[None]]).double()  # last row: bias


def fit_router(x, target, kind):
    t = target.double()
    if kind == "ce":
        return fit_ce(x, target, fit_router(x, target, "zscore"))
    if kind == "centred":
        t = t - t.mean(1, keepdim=True)
    elif kind == "zscore":
        t = (t - t.mean(1, keepdim=True)) / t.std(1, keepdim=True).clamp_min(1e-9)
    elif kind == "log":
        t = t.clamp_min(1e-6).log()
        t = t - t.mean(1, keepdim=True)
    return ridge_solve(x, t)


def logits(x, r):
    return x.double() @ r[:-1] + r[-1] if r.shape[0] == x.shape[1] + 1 else x.double() @ r


def expert_energy(h, wd, order):
    """‖W_down,e · h_e‖ per token and expert."""
    w = wd[:, order].T.reshape(E, M, -1)
    hx = h[:, order].reshape(h.shape[0], E, M)
    return torch.einsum("tea,eab,teb->te", hx, w @ w.transpose(1, 2), hx).clamp_min(0).sqrt()


def error_with(chosen, he, order, wd, dense):
    keep = torch.zeros(len(he), E).scatter_(1, chosen, 1.0).repeat_interleave(M, 1)
    hk = he.clone()
    hk[:, order] = he[:, order] * keep
    return float(((hk @ wd.T) - dense).pow(2).sum() / dense.pow(2).sum())


def probe_layer(mlp, xc, xe, i) -> list[dict]:
    wd = mlp.down_proj.weight.float()
    col = wd.norm(dim=0)
    hc, he = activations(mlp, xc), activations(mlp, xe)
    shared = ((hc ** 2).mean(0) * col ** 2).argsort(descending=True)[:S]
    mask = torch.ones(len(col), dtype=torch.bool)
    mask[shared] = False
    rest = mask.nonzero()[:, 0]
    a = hc[:, rest].abs() * col[rest]
    feats = {"coact": a, "gaterows": mlp.gate_proj.weight.float()[rest].T,
             "linpred": (xc.double() @ ridge_solve(xc, a)).float()}
    dense = he @ wd.T
    rows = []
    for name, f in feats.items():
        order = torch.cat([rest[torch.tensor(g)] for g in balanced_kmeans(f, E, M, 0)])
        tc, te = expert_energy(hc, wd, order), expert_energy(he, wd, order)
        oracle = te.topk(K, 1)[1]
        err_oracle = error_with(oracle, he, order, wd, dense)
        for kind in FITS:
            chosen = logits(xe, fit_router(xc, tc, kind)).topk(K, 1)[1]
            hit = torch.zeros(len(xe), E, dtype=torch.bool).scatter_(1, chosen, True)
            rows.append({"layer": i, "grouping": name, "fit": kind,
                         "err": round(error_with(chosen, he, order, wd, dense), 4),
                         "err_oracle": round(err_oracle, 4),
                         "recall": round(float(hit.gather(1, oracle).float().mean()), 3)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="scripts/results/moe-smollm2-linear-router-probe.json")
    ap.add_argument("--layers", default="0,8,16,24,29")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_grad_enabled(False)
    layers = [int(a) for a in args.layers.split(",")]
    model, tok, _ = sources.load("smollm2-135m")
    xc = mlp_inputs(model, mixed_windows(tok, read_domains(None, "calibration"), 4096, 512, 0), layers)
    xe = mlp_inputs(model, eval_windows(tok, read_domains(None, "evaluation"), 512, 512)[0], layers)
    rows = [r for i in layers for r in probe_layer(model.model.layers[i].mlp, xc[i], xe[i], i)]
    Path(args.out).write_text(json.dumps(
        {"model": "smollm2-135m", "experts": E, "expert_size": M, "top_k": K, "shared": S,
         "calibration": "builtin, 4096 tokens", "eval": "builtin, 512 tokens per domain",
         "command": " ".join(["python"] + sys.argv), "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
