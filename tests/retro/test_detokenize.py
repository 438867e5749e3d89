"""retro/detokenize.py with the real SmolLM2 tokenizer: streamed text equals the full decode and never
carries half a character; stop strings and stop tokens; the chat template."""

from __future__ import annotations

import random

import pytest

from retrogram.index.errors import UserError
from retrogram.index.tokenizer import load_tokenizer
from retrogram.retro.detokenize import IncrementalDetokenizer, StopChecker, TextStream, apply_chat_template
from retrogram.retro.sampling import SamplingParams

TEXTS = [
    "Hello 😀 world 🎉🎉 and 👩‍👩‍👧‍👦 family",
    "日本語のテキストと中文文本，还有한국어 텍스트。",
    "Café crème brûlée, naïve façade, Ærøskøbing, Łódź, ĳ ǅ",
    "mixed: ∑_{i=1}^n x_i ≈ ∞ → ✓ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 🏳️‍🌈 end",
]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("smollm2")


def stream_text(tok, prompt_ids, ids):
    d = IncrementalDetokenizer(tok, prompt_ids)
    deltas = [d.push(t) for t in ids]
    return deltas, d.flush()


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_add_up_to_the_decode_and_never_split_a_character(tok, text):
    ids = tok.encode(text).tolist()
    # the case is real: some tokens end inside a character
    assert any(tok.decode([t]).endswith("\ufffd") for t in ids)
    for prompt in ([], tok.encode("Some prompt text: ").tolist()):
        deltas, rest = stream_text(tok, prompt, ids)
        assert "".join(deltas) == tok.decode(prompt + ids)[len(tok.decode(prompt)):] == text
        assert rest == ""
        assert not any("\ufffd" in d for d in deltas)
        assert sum(1 for d in deltas if d) > 1   # it streams, not all at the end


def test_a_prompt_that_ends_inside_a_character(tok):
    ids = tok.encode("ab😀cd").tolist()
    cut = next(i for i in range(1, len(ids)) if tok.decode(ids[:i]).endswith("\ufffd"))
    deltas, _ = stream_text(tok, ids[:cut], ids[cut:])
    assert "".join(deltas) == "😀cd" and not any("\ufffd" in d for d in deltas)


def test_an_unfinished_character_at_the_end_is_flushed(tok):
    ids = tok.encode("x😀").tolist()
    deltas, rest = stream_text(tok, [], ids[:-1])
    assert "".join(deltas) == "x" and rest.startswith("\ufffd")


def reference_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    hits = [text.find(s) for s in stops if s in text]
    return (text[:min(hits)], True) if hits else (text, False)


@pytest.mark.parametrize("seed", range(40))
def test_stop_checker_against_a_plain_search(seed):
    rng = random.Random(seed)
    alphabet = "ab c😀\n"
    text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
    stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
    cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(0, 12))))
    pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
    sc = StopChecker(stops)
    out, stopped = [], False
    for p in pieces:
        emitted, stopped = sc.push(p)
        out.append(emitted)
        # what is out can never turn into a stop string later
        assert not any(s in "".join(out) for s in stops)
        if stopped:
            break
    if not stopped:
        out.append(sc.flush())
    assert ("".join(out), stopped) == reference_stop(text, stops)


def run_stream(tok, text: str, prompt: str = "Q: ", **params):
    p = SamplingParams(**params).validate()
    s = TextStream(tok, tok.encode(prompt).tolist(), p, eos_token_id=tok.eos_token_id)
    deltas, finish = [], None
    for t in tok.encode(text).tolist():
        d, finish = s.push(t)
        deltas.append(d)
        if finish:
            break
    return deltas, finish


def test_stop_string_across_several_tokens(tok):
    stop = "END OF ANSWER"
    text = "The answer is 42. END OF ANSWER and then more text"
    assert len(tok.encode(stop)) > 2
    deltas, finish = run_stream(tok, text, stop=[stop])
    assert "".join(deltas) == "The answer is 42. " and finish == "stop"
    # the text before the stop string streamed before the stop string completed
    assert "".join(deltas[:-1]).startswith("The answer is")


def test_stop_string_at_the_start_and_several_stop_strings(tok):
    deltas, finish = run_stream(tok, "###\nrest of it", stop=["###"])
    assert "".join(deltas) == "" and finish == "stop"
    deltas, finish = run_stream(tok, "one 🎉 two\n\nQuestion: three", stop=["Question:", "\n\n", "zzz"])
    assert "".join(deltas) == "one 🎉 two" and finish == "stop"
    deltas, finish = run_stream(tok, "a 😀 b", stop=["😀"])      # a stop string made of split tokens
    assert "".join(deltas) == "a " and finish == "stop"


def test_a_held_prefix_is_released_when_it_does_not_become_a_stop_string(tok):
    deltas, finish = run_stream(tok, "the ENTER key; ENDING", stop=["END."], max_tokens=100)
    assert "".join(deltas) == "the ENTER key; ENDING" and finish is None
    n = len(tok.encode("the ENTER key; EN"))
    deltas, finish = run_stream(tok, "the ENTER key; EN", stop=["END."], max_tokens=n)
    assert "".join(deltas) == "the ENTER key; EN" and finish == "length"


def test_stop_tokens_and_eos(tok):
    eos = tok.eos_token_id
    ids = tok.encode("hello there").tolist()
    p = SamplingParams(max_tokens=50)
    s = TextStream(tok, [], p, eos_token_id=eos)
    out = [s.push(t) for t in ids] + [s.push(eos)]
    assert "".join(d for d, _ in out) == "hello there" and out[-1][1] == "stop"
    assert [f for _, f in out[:-1]] == [None] * len(ids)
    with pytest.raises(RuntimeError):
        s.push(ids[0])
    s = TextStream(tok, [], SamplingParams(max_tokens=50, ignore_eos=True), eos_token_id=eos)
    assert s.push(eos)[1] is None
    s = TextStream(tok, [], SamplingParams(stop_token_ids=(ids[1],)), eos_token_id=eos)
    assert s.push(ids[0]) == (tok.decode(ids[:1]), None) and s.push(ids[1]) == ("", "stop")


def test_chat_template_has_the_role_markers(tok):
    ids = apply_chat_template(tok, "What is 2+2?")
    text = tok.decode(ids)
    assert text.startswith("<|im_start|>system\n")   # SmolLM2's template adds its default system prompt
    assert text.endswith("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    start, end = tok.backend.token_to_id("<|im_start|>"), tok.backend.token_to_id("<|im_end|>")
    assert ids.count(start) == 3 and ids.count(end) == 2   # special tokens, not their spelled-out text
    assert ids == tok.encode(text).tolist()
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
    text = tok.decode(apply_chat_template(tok, msgs))
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                    "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n"
                    "<|im_start|>assistant\n")
    assert not tok.decode(apply_chat_template(tok, msgs, add_generation_prompt=False)).endswith("assistant\n")
    with pytest.raises(UserError, match="messages"):
        apply_chat_template(tok, [{"role": "user"}])


def test_no_template_plain_prompt_only():
    byte_tok = load_tokenizer("bytes")
    assert apply_chat_template(byte_tok, "hé") == list("hé".encode())
    with pytest.raises(UserError, match="no chat template"):
        apply_chat_template(byte_tok, [{"role": "user", "content": "hi"}])
