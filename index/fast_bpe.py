"""A faster encoder for byte-level BPE tokenizers (GPT-2 style, as SmolLM2's): the same vocabulary and
merges run through tiktoken's engine, several times faster than the HF tokenizer on long documents.

It gives exactly the HF tokenizer's ids (tests/index/test_fast_bpe.py checks them against each other). The two
algorithms agree when no token is the product of two different merges (tiktoken merges by the rank of
the product, HF by the rank of the pair), which `from_tokenizer_json` checks before building one. Texts it
cannot encode the same way — containing an added token's text (HF matches those before splitting) or a
byte with no token (HF drops it) — are left for the HF tokenizer, and `encode_batch` says which.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache

import numpy as np

# GPT-2's pre-tokenizer pattern, which HF's ByteLevel(use_regex=True) uses.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


@lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: the printable stand-in character of every byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, extra = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class FastByteLevelBPE:
    def __init__(self, encoding, rank_to_id: np.ndarray, fallback: re.Pattern):
        self.encoding = encoding          # tiktoken.Encoding over merge ranks
        self.rank_to_id = rank_to_id      # [n_ranks] i64: tiktoken's rank -> the HF token id
        self.fallback = fallback          # bytes regex: texts the HF tokenizer must encode

    @classmethod
    def from_tokenizer_json(cls, tokenizer_json: str) -> "FastByteLevelBPE | None":
        """Build one for a tokenizer.json of plain byte-level BPE; None for anything else."""
        try:
            import tiktoken
        except ImportError:
            return None
        d = json.loads(tokenizer_json)
        model, pre = d.get("model") or {}, d.get("pre_tokenizer") or {}
        if (model.get("type") != "BPE" or d.get("normalizer") is not None or model.get("dropout")
                or model.get("byte_fallback") or model.get("continuing_subword_prefix")
                or model.get("end_of_word_suffix") or model.get("ignore_merges")
                or pre.get("type") != "ByteLevel" or not pre.get("use_regex", True) or pre.get("add_prefix_space")):
            return None
        u2b = _unicode_to_byte()
        vocab: dict[str, int] = model["vocab"]
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        special = [t["content"] for t in d.get("added_tokens", [])]
        try:
            to_bytes = {tok: bytes(u2b[ch] for ch in tok) for tok in vocab if tok not in special}
        except KeyError:   # a vocabulary entry outside the byte alphabet: not plain byte-level BPE
            return None
        ranks: dict[bytes, int] = {}
        for tok in sorted((t for t in to_bytes if len(to_bytes[t]) == 1), key=vocab.get):
            ranks[to_bytes[tok]] = len(ranks)
        for a, b in merges:
            product = bytes(u2b[ch] for ch in a + b)
            if product in ranks:   # two merges make the same token: the two algorithms could differ
                return None
            ranks[product] = len(ranks)
        if set(ranks) != set(to_bytes.values()):
            return None
        by_bytes = {v: k for k, v in to_bytes.items()}
        rank_to_id = np.empty(len(ranks), np.int64)
        for bs, r in ranks.items():
            rank_to_id[r] = vocab[by_bytes[bs]]
        missing = [b for b in range(256) if bytes([b]) not in ranks]
        parts = [re.escape(s.encode()) for s in special if s]
        if missing:
            parts.append(b"[" + b"".join(re.escape(bytes([b])) for b in missing) + b"]")
        fallback = re.compile(b"|".join(parts) if parts else b"(?!)")
        encoding = tiktoken.Encoding("retrogram-bpe", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={})
        return cls(encoding, rank_to_id, fallback)

    def encode_batch(self, texts: list[str]) -> tuple[list[np.ndarray | None], list[int]]:
        """-> (ids per text, or None where the HF tokenizer must encode it; the indices of those)."""
        out: list[np.ndarray | None] = [None] * len(texts)
        easy, hard = [], []
        for i, t in enumerate(texts):
            (hard if self.fallback.search(t.encode("utf-8", "surrogatepass")) else easy).append(i)
        ranks = self.encoding.encode_ordinary_batch([texts[i] for i in easy], num_threads=1)
        for i, r in zip(easy, ranks):
            out[i] = self.rank_to_id[np.asarray(r, dtype=np.int64)]
        return out, hard
