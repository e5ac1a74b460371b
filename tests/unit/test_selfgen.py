"""自生成训练文本：贪心续写与 transformers 的贪心 generate() 一致、提示取自训练窗口、从不写结束符、可复现、续训复用。"""

import pytest
import torch

from conftest import tiny_model
from patcher import selfgen


@pytest.fixture(scope="module")
def model():
    # a larger init makes the tiny model's choices depend on its context, so a wrong cache would show
    return tiny_model("llama", seed=3, initializer_range=0.2)


def windows(n=6, seq=48):
    return torch.randint(4, 250, (n, seq), generator=torch.Generator().manual_seed(1))


def test_greedy_continuation_equals_transformers_greedy_generate(model):
    prompts = windows()[:3, :20]
    ours = selfgen.continue_text(model, prompts, 40, 0.0, torch.Generator(), )
    with torch.no_grad():  # min_new_tokens: transformers also never ends early, as ours never picks an end token
        ref = model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=20, min_new_tokens=20,
                             do_sample=False, pad_token_id=0)
    assert torch.equal(ours, ref)


def test_generated_windows_start_from_training_text_and_never_end(model):
    w = windows()
    new, summary = selfgen.generate_windows(model, w, 8 * 48, temperature=1.0, seed=5, batch_size=3, )
    assert new.shape == (8, 48)
    assert summary["windows"] == 8 and summary["tokens"] == 8 * 48 and summary["new_tokens"] == 8 * (48 - 32)
    text = [row.tolist() for row in w]
    for row in new:
        prompt = row[:32].tolist()
        assert any(prompt == t[s:s + 32] for t in text for s in range(len(t) - 31))
    assert not (new[:, 32:] == model.config.eos_token_id).any()
    again, _ = selfgen.generate_windows(model, w, 8 * 48, temperature=1.0, seed=5, batch_size=3, )
    other, _ = selfgen.generate_windows(model, w, 8 * 48, temperature=1.0, seed=6, batch_size=3, )
    assert torch.equal(new, again) and not torch.equal(new, other)


def test_a_resumed_run_reuses_the_written_text(tmp_path):
    path = tmp_path / "state" / "generated.safetensors"
    made = []

    def make():
        made.append(1)
        return torch.arange(12).view(3, 4), {"tokens": 12, "seconds": 1.5}

    first = selfgen.windows_for(path, resume=False, make=make)
    again = selfgen.windows_for(path, resume=True, make=make)
    assert len(made) == 1 and torch.equal(first[0], again[0]) and again[1] == {"tokens": 12, "seconds": 1.5}
    selfgen.windows_for(path, resume=False, make=make)  # a fresh run writes its text again
    assert len(made) == 2


def test_nothing_asked_nothing_written(model):
    from patcher.recipe import MTPOptions

    w = windows()
    same, summary = selfgen.extended(model, w, MTPOptions(), 0, None, False)
    assert same is w and summary is None


def test_sampling_follows_the_tempered_distribution():
    """The inverse-CDF draw picks each token as often as softmax(logits / T) says, and never a banned one."""
    class Fixed(torch.nn.Module):  # a "model" whose next-token logits never change
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.config = type("C", (), {"vocab_size": 5, "eos_token_id": 4})()

        def forward(self, input_ids, **kw):
            logits = torch.tensor([0.0, 1.0, 2.0, -1.0, 3.0]).repeat(*input_ids.shape, 1)
            return type("O", (), {"logits": logits})()

    out = selfgen.continue_text(Fixed(), torch.zeros(4000, 1, dtype=torch.long), 2, 0.5, torch.Generator().manual_seed(0))
    freq = torch.bincount(out[:, 1], minlength=5).float() / 4000
    want = torch.softmax(torch.tensor([0.0, 1.0, 2.0, -1.0, float("-inf")]) / 0.5, -1)
    assert freq[4] == 0 and torch.allclose(freq, want, atol=0.03)
