"""自生成训练文本：贪心续写与 transformers 的贪心 generate() 一致、提示取自训练窗口、从不写结束符、可复现、续训复用。"""

import pytest
import torch
from conftest import tiny_model

from patcher.training import selfgen


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


class Scripted(torch.nn.Module):
    """A stand-in language model: next token 2 (the byte tokenizer's end, which the template below uses to end
    a turn) at every ``period``-th position, else token 9; so both kinds of turn end on their own."""

    def __init__(self, period: int = 6):
        super().__init__()
        self.period = period
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.config = type("C", (), {"vocab_size": 300, "eos_token_id": 2})()
        self.generation_config = type("G", (), {"eos_token_id": [2, 3]})()  # 3: another end, never written
        self.seen = 0

    def forward(self, input_ids, cache=None, use_cache=True):
        self.seen += input_ids.shape[1]
        logits = torch.zeros(input_ids.shape[0], 1, 300)
        logits[..., 2 if self.seen % self.period == 0 else 9] = 50.0
        return type("Out", (), {"logits": logits})()


@pytest.fixture()
def chat_tokenizer():
    from conftest import byte_tokenizer

    tok = byte_tokenizer()
    tok.chat_template = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}</s>{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    return tok


def split_turns(row: list[int], turns: selfgen.ChatTurns) -> list[tuple[str, list[int]]]:
    """A written dialogue cut back into (role, message) turns; asserts the template's parts are where they belong."""
    assert tuple(row[: len(turns.opening)]) == turns.opening
    out, role, i, msg = [], "user", len(turns.opening), []
    while i < len(row):
        sep = turns.to_assistant if role == "user" else turns.to_user
        if row[i] == sep[0]:
            assert tuple(row[i: i + len(sep)]) == sep[: len(row) - i]
            out.append((role, msg))
            role, msg, i = ("assistant" if role == "user" else "user"), [], i + len(sep)
        else:
            msg.append(row[i])
            i += 1
    return out + [(role, msg)]


def test_chat_turns_cut_the_template_around_the_messages(chat_tokenizer):
    turns = selfgen.chat_turns(chat_tokenizer)
    text = chat_tokenizer.decode
    assert text(turns.opening) == "<user>" and text(turns.to_assistant) == "</s><assistant>"
    assert text(turns.to_user) == "</s><user>" and turns.to_assistant[0] == turns.to_user[0] == 2
    from conftest import byte_tokenizer
    assert selfgen.chat_turns(byte_tokenizer()) is None  # no template: no dialogues


@pytest.mark.parametrize("max_user", [64, 3])
def test_written_dialogues_follow_the_template_turn_by_turn(chat_tokenizer, max_user):
    turns = selfgen.chat_turns(chat_tokenizer)
    rows = selfgen.write_dialogues(Scripted(6 if max_user > 3 else 13), turns, 3, 60, 0.0,
                                   torch.Generator().manual_seed(0), max_user_tokens=max_user)
    assert rows.shape == (3, 60) and not (rows == 3).any()
    for row in rows.tolist():
        parts = split_turns(row, turns)
        assert [r for r, _ in parts[:4]] == ["user", "assistant", "user", "assistant"]
        assert all(set(m) <= {9} for _, m in parts)  # the model's own tokens fill the messages
        assert all(len(m) <= max_user for r, m in parts if r == "user")
        if max_user == 3:  # requests are cut at the limit, replies are not
            assert 3 in [len(m) for r, m in parts[:-1] if r == "user"]
            assert max(len(m) for r, m in parts if r == "assistant") > 3


def test_training_text_mixes_continuations_and_dialogues(model, chat_tokenizer):
    from patcher.recipe import MTPOptions

    turns = selfgen.chat_turns(chat_tokenizer)
    w = windows()
    opts = MTPOptions(heads=1, generate_tokens=8 * 48, generate_temperature=0.0)
    out, summary = selfgen.extended(model, w, opts, 0, None, False, chat=turns, chat_share=0.5)
    assert out.shape == (6 + 8, 48) and torch.equal(out[:6], w)
    talk = summary["dialogues"]
    assert talk["windows"] == 4 and summary["windows"] == 8 and summary["tokens"] == 8 * 48
    assert all(tuple(r[: len(turns.opening)].tolist()) == turns.opening for r in out[-4:])
    with pytest.raises(ValueError, match="对话模板"):
        selfgen.extended(model, w, opts, 0, None, False, chat=None, chat_share=0.5)
