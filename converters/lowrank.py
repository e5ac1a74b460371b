"""低秩分解：白化（按校准输入协方差）SVD，MLA 与 MoE 的低秩路由器共用。

``whitened`` 先乘以该层校准输入协方差的 Cholesky 因子 L（SVD-LLM 做法），使截断误差等于输出误差
||ΔW·X||；``plain`` 直接对权重做 SVD，仅供对比。
"""

from __future__ import annotations

import torch

from patcher.errors import PlanError


def whitening(cov: torch.Tensor) -> torch.Tensor:
    """Cholesky factor L of the input covariance (damped until it is positive definite)."""
    cov = cov.double()
    damp = 1e-6 * cov.diagonal().mean().clamp_min(1e-12)
    eye = torch.eye(cov.shape[0], dtype=cov.dtype)
    for _ in range(8):
        L, info = torch.linalg.cholesky_ex(cov + damp * eye)
        if int(info) == 0:
            return L
        damp *= 10
    raise PlanError("校准输入协方差无法分解（全零或含 NaN？）")


GRAM_SVD_MIN = 2048  # from this size on (7B-class K+V), the SVD goes through the Gram matrix: ~3× faster on CPU


def thin_svd(m: torch.Tensor, rank: int | None = None):
    """Thin SVD (float64). Large matrices: eigendecomposition of the smaller Gram matrix, then only the ``rank``
    leading singular vectors on the other side — the same leading factors, without LAPACK's full SVD; a rank far
    below the size (a router's 128 of 4096): randomized SVD with power iterations (only ``rank``+32 values)."""
    if min(m.shape) < GRAM_SVD_MIN:
        return torch.linalg.svd(m, full_matrices=False)
    if rank is not None and rank * 8 <= min(m.shape):
        return randomized_svd(m, rank)
    wide = m.shape[0] < m.shape[1]
    a = m.T if wide else m  # tall: the Gram matrix aᵀa is the small side
    evals, V = torch.linalg.eigh(a.T @ a)
    S = evals.flip(0).clamp_min(0).sqrt()
    V = V.flip(1)
    k = len(S) if rank is None else min(rank, len(S))
    U = (a @ V[:, :k]) / S[:k].clamp_min(float(S[0]) * 1e-12)
    return (V, S, U.T) if wide else (U, S, V.T)


def randomized_svd(m: torch.Tensor, rank: int, oversample: int = 32, iters: int = 3):
    """Leading ``rank``+``oversample`` singular triplets (Halko et al.), from a fixed seed: the same on every run."""
    g = torch.Generator().manual_seed(0)
    q = min(rank + oversample, min(m.shape))
    Q = torch.linalg.qr(m @ torch.randn(m.shape[1], q, generator=g, dtype=m.dtype)).Q
    for _ in range(iters):  # power iterations sharpen the decay, so the kept directions are the leading ones
        Q = torch.linalg.qr(m @ torch.linalg.qr(m.T @ Q).Q).Q
    Ub, S, Vh = torch.linalg.svd(Q.T @ m, full_matrices=False)
    return Q @ Ub, S, Vh


class BlockDiagonal:
    """A block-diagonal output weighting G (K rows: a diagonal; V rows: one block per KV group).

    Kept as blocks: at 7B sizes the dense G (8192²) costs more to multiply and solve than the SVD itself."""

    def __init__(self, blocks: list[torch.Tensor]):
        self.blocks = blocks  # 1-D: a diagonal; 2-D: a square block
        self.sizes = [b.shape[0] for b in blocks]

    def __matmul__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([b[:, None] * xs if b.dim() == 1 else b @ xs for b, xs in zip(self.blocks, x.split(self.sizes))])

    def solve(self, x: torch.Tensor) -> torch.Tensor:
        """G⁻¹·x."""
        return torch.cat([xs / b[:, None] if b.dim() == 1 else torch.linalg.solve(b, xs)
                          for b, xs in zip(self.blocks, x.split(self.sizes))])

    def dense(self) -> torch.Tensor:
        return torch.block_diag(*[torch.diag(b) if b.dim() == 1 else b for b in self.blocks])


def quad_diag(a: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """diag(A·C·Aᵀ): products in float32 (4× faster on CPU), result in float64. For weights and reported errors,
    never for the factors themselves."""
    a32 = a.float()
    return ((a32 @ c.float()) * a32).sum(1).double()


def factorize(w: torch.Tensor, cov: torch.Tensor | None, init: str, g: BlockDiagonal | None = None,
              rank: int | None = None):
    """SVD of G·W·L: L whitens the input side (init == 'whitened'), G weights the output side (or None).

    Returns U, S, Vh (of the weighted matrix; at least ``rank`` leading vectors), L (or None); the rank-r factors
    are then up = G⁻¹·U_r·√S_r and down = √S_r·Vh_r·L⁻¹.
    """
    w = w.double()
    L = whitening(cov) if init == "whitened" else None
    m = w @ L if L is not None else w
    if g is not None:
        m = g @ m
    U, S, Vh = thin_svd(m, rank)
    return U, S, Vh, L


def low_rank(w: torch.Tensor, cov: torch.Tensor | None, rank: int, init: str = "whitened",
             g: BlockDiagonal | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-``rank`` factors (up, down) with W ≈ up·down, minimising the (G-weighted, input-whitened) error."""
    if rank >= w.shape[1]:  # full rank: W = W·I exactly, whatever the weighting (an MHA model at ≥ 50 % of its cache)
        return w.double(), torch.eye(w.shape[1], dtype=torch.float64)
    U, S, Vh, L = factorize(w, cov, init, g, rank)
    root = S[:rank].sqrt()
    up = U[:, :rank] * root
    if g is not None:
        up = g.solve(up)
    down = root[:, None] * Vh[:rank]
    if L is not None:  # undo the whitening on the input side: down · L⁻¹
        down = torch.linalg.solve_triangular(L, down, upper=False, left=False)
    return up, down
