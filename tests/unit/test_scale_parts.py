"""大模型所用的部件：分块加权、Gram/随机 SVD、满秩捷径、分片读写。"""

from __future__ import annotations

import json

import pytest
import torch

from converters import lowrank, mla
from patcher.errors import SourceError
from patcher.formats.shards import LazyWeights, shard_name, write_index, write_shard


def _decaying(rows, cols, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(rows, cols, generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(cols, cols, generator=g, dtype=torch.float64)).Q
    return (u * torch.logspace(0, -4, cols, dtype=torch.float64)) @ v.T


def test_block_diagonal_products_and_solves_match_the_dense_matrix():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 3, generator=g, dtype=torch.float64)
    blocks = [torch.rand(4, generator=g, dtype=torch.float64) + 0.5, a @ a.T + torch.eye(3, dtype=torch.float64)]
    bd = lowrank.BlockDiagonal(blocks)
    x = torch.randn(7, 5, generator=g, dtype=torch.float64)
    assert torch.allclose(bd @ x, bd.dense() @ x)
    assert torch.allclose(bd.solve(x), torch.linalg.solve(bd.dense(), x))


def test_gram_and_randomized_svd_give_the_leading_factors(monkeypatch):
    m = _decaying(300, 200)
    U, S, Vh = torch.linalg.svd(m, full_matrices=False)
    monkeypatch.setattr(lowrank, "GRAM_SVD_MIN", 64)
    for rank, exact in ((100, True), (20, False)):  # 100: through the Gram matrix; 20 (≤ 200/8): randomized
        u, s, vh = lowrank.thin_svd(m, rank)
        best = (U[:, :rank] * S[:rank]) @ Vh[:rank]
        got = (u[:, :rank] * s[:rank]) @ vh[:rank]
        if exact:
            assert torch.allclose(s[:rank], S[:rank], rtol=1e-9) and (got - best).norm() / best.norm() < 1e-9
        else:  # near-optimal: the truncation error within 0.1 % of the best possible
            assert torch.allclose(s[:rank], S[:rank], rtol=1e-4)
            assert (m - got).norm() <= (m - best).norm() * 1.001
    again = lowrank.thin_svd(m, 20)
    assert torch.equal(again[0], lowrank.thin_svd(m, 20)[0])  # fixed seed: a resumed run draws the same numbers


def test_full_rank_is_exact_without_factorizing():
    w = torch.randn(12, 8, dtype=torch.float64)
    up, down = mla.low_rank(w, torch.eye(8, dtype=torch.float64), rank=8)
    assert torch.equal(up @ down, w)


def test_quad_diag_matches_float64():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(6, 10, generator=g, dtype=torch.float64)
    c = torch.randn(10, 10, generator=g, dtype=torch.float64)
    c = c @ c.T
    assert torch.allclose(mla.quad_diag(a, c), torch.einsum("ij,jk,ik->i", a, c, a), rtol=1e-5)


def test_shards_round_trip_and_index(tmp_path):
    write_shard(tmp_path, shard_name(0, 2), {"a.weight": torch.ones(2, 3), "a.ids": torch.arange(4)}, torch.bfloat16)
    write_shard(tmp_path, shard_name(1, 2), {"b.weight": torch.full((5,), 2.0)})
    wm = write_index(tmp_path)
    assert wm == {"a.ids": shard_name(0, 2), "a.weight": shard_name(0, 2), "b.weight": shard_name(1, 2)}
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 2 * 6 + 8 * 4 + 4 * 5
    lw = LazyWeights(tmp_path)
    got = lw.read(["a.weight", "a.ids"], torch.float32)
    assert got["a.weight"].dtype == torch.float32 and got["a.ids"].dtype == torch.int64  # ids are never cast
    assert lw.dtype() == torch.bfloat16
    with pytest.raises(SourceError, match="没有张量"):
        lw.read(["c.weight"])


def test_our_shards_and_the_safetensors_library_read_each_other(tmp_path):
    from safetensors.torch import load_file, save_file

    tensors = {"w": torch.randn(300, 7).to(torch.bfloat16), "ids": torch.arange(5), "flag": torch.tensor([True, False])}
    write_shard(tmp_path, "ours.safetensors", tensors)
    back = load_file(str(tmp_path / "ours.safetensors"))
    assert all(torch.equal(back[k], tensors[k]) for k in tensors)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    lw = LazyWeights(tmp_path)
    assert torch.equal(lw.read_one("w"), tensors["w"]) and torch.equal(lw.read_one("w", torch.float32),
                                                                        tensors["w"].float())
    lw.copy_to(["w", "ids"], tmp_path / "copy.safetensors")
    copied = load_file(str(tmp_path / "copy.safetensors"))
    assert set(copied) == {"w", "ids"} and torch.equal(copied["w"], tensors["w"])


def test_lazy_weights_refuse_what_they_cannot_read(tmp_path):
    with pytest.raises(SourceError, match="safetensors"):
        LazyWeights(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": {"x": "gone.safetensors"}}')
    with pytest.raises(SourceError, match="gone.safetensors"):
        LazyWeights(tmp_path)
    write_shard(tmp_path, "model.safetensors", {"x": torch.tensor([1.0, float("inf")])})
    (tmp_path / "model.safetensors.index.json").unlink()
    with pytest.raises(SourceError, match="NaN 或 Inf"):
        LazyWeights(tmp_path).read(["x"])
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(SourceError, match="截断"):
        LazyWeights(tmp_path)
