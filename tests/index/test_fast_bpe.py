"""The tiktoken-backed byte-level BPE fast path gives exactly the HF tokenizer's ids."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from retrogram.index.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tok():
    t = load_tokenizer("smollm2")
    assert t.fast is not None, "SmolLM2's tokenizer is plain byte-level BPE: the fast path must apply"
    return t


def same_ids(tok, texts: list[str]) -> None:
    fast = tok.encode_batch(texts)
    ref = tok._encode_batch_hf(texts)
    for text, a, b in zip(texts, fast, ref):
        assert a.tolist() == b.tolist(), repr(text[:200])


def test_demo_corpus(tok, demo_corpus):
    with gzip.open(demo_corpus, "rt", encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    # whole documents and line-sized pieces (many short texts in one batch)
    same_ids(tok, texts + [line for t in texts[:2] for line in t.splitlines()[:2000]])


ADVERSARIAL = [
    "", " ", "\n\n\n", "  \t\n  x", "a  b   c    ", "trailing space ", " leading", "\u3000ideographic space",
    "it's they're we've I'm you'll he'd IT'S 'S", "12345678901234567890 1,000.5 ٣٤٥ ①②",
    "<|im_start|>user\nhi<|im_end|>", "a<filename>b", "<|endoftext|><|endoftext|>", "<file_sep",
    "ctrl \x04 \x06 \x13 \x14 \x16 \x1d \x00 \x7f bytes", "plane 4 \U00040000 \U000b0000 \U0010fffd",
    "emoji 👩‍👩‍👧 🇫🇷 \ufe0f", "中文 日本語 한국어 العربية עברית हिन्दी", "café naïve Ångström ß ǅ",
    "\u200b\u200d\u2060 zero width", "tabs\t\tand\r\nwindows\rnewlines", "x" * 5000, "ab " * 3000,
]


def test_adversarial(tok):
    same_ids(tok, ADVERSARIAL)
    assert tok.encode_batch(["a<filename>b"])[0].tolist() == tok._encode_batch_hf(["a<filename>b"])[0].tolist()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.text(max_size=60), min_size=1, max_size=8))
def test_random_unicode(tok, texts):
    same_ids(tok, texts)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.text(alphabet=st.sampled_from(list(" \t\n'sdlmtrve0123456789aZ.,!-_<|>é中\u00a0\u2028")),
                        max_size=80), min_size=1, max_size=8))
def test_whitespace_contractions_digits(tok, texts):
    same_ids(tok, texts)


def test_not_applied_to_other_tokenizers(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    wl = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "b": 2}, unk_token="[UNK]"))
    wl.pre_tokenizer = pre_tokenizers.Whitespace()
    from retrogram.index.fast_bpe import FastByteLevelBPE

    assert FastByteLevelBPE.from_tokenizer_json(wl.to_str()) is None
    assert load_tokenizer("bytes").encode_batch(["héllo"])[0].tolist() == list("héllo".encode())
    assert isinstance(load_tokenizer("bytes").encode_batch(["x"])[0], np.ndarray)
