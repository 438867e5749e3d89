"""Combining the answers of several n-gram servers (or engines), each over some shards of one index, into
the answer one engine over all of them gives — as infini-gram combines its shards:

- counts add (count, count_many, count_cnf, prob and ntd's counts; probabilities recomputed from the sums);
- ∞-gram queries take the longest suffix found anywhere, and the counts of the parts that found it;
- documents are sampled across parts in proportion to their counts; document indexes and shard numbers run
  across the parts in the order given (`ShardLayout`).

Pure functions over the engine's result dicts (`Engine.count`, `.ntd`, ...): the clients convert each
server's answer to that dict first, and the gateway reuses these on whatever it gathered. Each takes the
answers in part order; one answer is returned as it is.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

SCORE_COLUMNS = ("prob", "suffix_len", "prompt_cnt", "cont_cnt")


def ratio(cont_cnt: int, prompt_cnt: int) -> float:
    """cont / prompt, -1.0 when the prompt occurs nowhere (the engine's convention)."""
    return cont_cnt / prompt_cnt if prompt_cnt > 0 else -1.0


@dataclass(frozen=True)
class ShardLayout:
    """Where each part's documents and shards start in the combined numbering."""

    doc_offsets: tuple[int, ...]
    shard_offsets: tuple[int, ...]
    num_documents: int
    num_shards: int

    @classmethod
    def of(cls, num_documents: Sequence[int], num_shards: Sequence[int]) -> ShardLayout:
        """From each part's document and shard counts, in part order."""
        docs, shards = [0], [0]
        for d, s in zip(num_documents, num_shards):
            docs.append(docs[-1] + int(d))
            shards.append(shards[-1] + int(s))
        return cls(tuple(docs[:-1]), tuple(shards[:-1]), docs[-1], shards[-1])

    @staticmethod
    def _find(offsets: tuple[int, ...], i: int) -> tuple[int, int]:
        for k in range(len(offsets) - 1, -1, -1):
            if i >= offsets[k]:
                return k, i - offsets[k]
        return 0, i

    def by_doc(self, doc_ix: int) -> tuple[int, int]:
        """(part, its own doc_ix) of a combined doc_ix."""
        return self._find(self.doc_offsets, doc_ix)

    def by_shard(self, s: int) -> tuple[int, int]:
        """(part, its own shard number) of a combined shard number."""
        return self._find(self.shard_offsets, s)


# ----------------------------------------------------------------------------------------------- counts

def count(rs: list[dict]) -> dict:
    """{'count', 'approx'} (and the 'tokens' a text query was tokenized to, when the answers carry them)."""
    if len(rs) == 1:
        return rs[0]
    out = {"count": sum(r["count"] for r in rs), "approx": any(r["approx"] for r in rs)}
    if "tokens" in rs[0]:
        out["tokens"] = rs[0]["tokens"]
    return out


def count_many(rs: list[list[int]]) -> list[int]:
    if len(rs) == 1:
        return rs[0]
    return [sum(c) for c in zip(*rs)]


def prob(rs: list[dict]) -> dict:
    if len(rs) == 1:
        return rs[0]
    p = sum(r["prompt_cnt"] for r in rs)
    c = sum(r["cont_cnt"] for r in rs)
    return {"prompt_cnt": p, "cont_cnt": c, "prob": ratio(c, p)}


def ntd(rs: list[dict]) -> dict:
    """Next-token distributions: counts per token add, probabilities over the summed counts."""
    if len(rs) == 1:
        return rs[0]
    counts: dict[int, int] = {}
    for r in rs:
        for t, v in r["result_by_token_id"].items():
            counts[t] = counts.get(t, 0) + v["cont_cnt"]
    total = sum(counts.values())
    return {"prompt_cnt": total,
            "result_by_token_id": {t: {"cont_cnt": c, "prob": c / (total or 1)} for t, c in sorted(counts.items())},
            "approx": any(r["approx"] for r in rs)}


def longest(rs: list[dict]) -> tuple[int, list[dict]]:
    """∞-gram across parts: the longest suffix_len and the answers that found it (the others count 0 for
    that suffix, so adding theirs would change nothing)."""
    L = max(r["suffix_len"] for r in rs)
    return L, [r for r in rs if r["suffix_len"] == L]


def infgram_prob(rs: list[dict]) -> dict:
    if len(rs) == 1:
        return rs[0]
    L, top = longest(rs)
    p = sum(r["prompt_cnt"] for r in top)
    c = sum(r["cont_cnt"] for r in top)
    return {"prompt_cnt": p, "cont_cnt": c, "prob": ratio(c, p), "suffix_len": L}


def infgram_ntd(rs: list[dict]) -> dict:
    if len(rs) == 1:
        return rs[0]
    L, top = longest(rs)
    out = {k: v for k, v in ntd(top).items() if k != "suffix_len"}
    out["suffix_len"] = L
    return out


# -------------------------------------------------------------------------------------------- documents

def shift_doc(doc: dict, doc_offset: int) -> dict:
    """A part's document with its doc_ix in the combined numbering."""
    return {**doc, "doc_ix": doc["doc_ix"] + doc_offset} if doc_offset else doc


def search_docs(rs: list[dict], doc_offsets: Sequence[int] | None = None, maxnum: int | None = None,
                rng: random.Random | None = None) -> dict:
    """{'cnt', 'approx', 'idxs', 'documents'} across parts. Each part drew its documents uniformly from its own
    matches; drawing each of the maxnum results from part k with probability cnt_k / cnt reproduces drawing
    across all shards at once. idxs run across the parts (part k's start after the counts of those before)."""
    if len(rs) == 1:
        return rs[0]
    doc_offsets = doc_offsets or [0] * len(rs)
    cnts = [r["cnt"] for r in rs]
    total = sum(cnts)
    out = {"cnt": total, "approx": any(r["approx"] for r in rs), "idxs": [], "documents": []}
    if total == 0:
        return out
    n = maxnum if maxnum else max(len(r["documents"]) for r in rs)
    pools = [list(zip(r["idxs"], r["documents"])) for r in rs]
    cnt_offsets = [sum(cnts[:k]) for k in range(len(rs))]
    rng = rng or random.Random()
    for _ in range(n):
        live = [k for k in range(len(rs)) if pools[k] and cnts[k] > 0]
        if not live:
            break
        k = rng.choices(live, weights=[cnts[k] for k in live])[0]
        idx, d = pools[k].pop(0)
        out["idxs"].append(idx + cnt_offsets[k])
        out["documents"].append(shift_doc(d, doc_offsets[k]))
    return out


# ---------------------------------------------------------------------------------------------- scoring

def score_blocks(blocks: list[dict]) -> dict:
    """One part's score_sequence blocks (each {'offset', 'prob', ..., 'tokens'}, in order) as columns over
    every position: {'prob', 'suffix_len', 'prompt_cnt', 'cont_cnt', 'tokens'}."""
    out: dict[str, list] = {k: [] for k in (*SCORE_COLUMNS, "tokens")}
    for b in blocks:
        for key, col in out.items():
            col.extend(b[key])
    return out


def score_sequence(cols: list[dict]) -> dict:
    """Columns over all positions, several parts combined position by position as infgram_prob combines."""
    if len(cols) == 1:
        return cols[0]
    out = {"prob": [], "suffix_len": [], "prompt_cnt": [], "cont_cnt": []}
    if "tokens" in cols[0]:   # the clients' columns carry the scored ids too
        out["tokens"] = cols[0]["tokens"]
    for i in range(len(cols[0]["prob"])):
        L = max(c["suffix_len"][i] for c in cols)
        top = [c for c in cols if c["suffix_len"][i] == L]
        p = sum(c["prompt_cnt"][i] for c in top)
        n = sum(c["cont_cnt"][i] for c in top)
        out["suffix_len"].append(L)
        out["prompt_cnt"].append(p)
        out["cont_cnt"].append(n)
        out["prob"].append(ratio(n, p))
    return out
