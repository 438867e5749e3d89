"""`Engine`: exact n-gram and ∞-gram queries over suffix arrays, with infini-gram's API.

    from retrogram.ngram import Engine
    engine = Engine("IDX")                          # a retrogram index (its IDX/ngram/ shards)
    engine = Engine(["shards_a", "shards_b"])       # or directories of infini-gram v4 shard files
    engine.count([791, 2198, 282])                  # {'count': 12, 'approx': False}
    engine.count_text("to be or not")               # the words, wherever they stand (see text_forms)

Every method takes token ids (a list of ints or a 1-d integer numpy array) and returns what infini-gram's
`InfiniGramEngine` method of the same name returns, with the same keys, so its users can switch. Counts
over several shards are added. Differences, all deliberate:

- Bad input raises `QueryError` (a `UserError`: the CLI prints it on one line and exits 2; the gRPC service
  answers INVALID_ARGUMENT) naming the argument, instead of returning {'error': ...}. Token ids must be
  below the vocabulary size and never the separator; `count`, `find` and search queries must not be
  empty (the empty prompt of `prob`/`ntd`/`infgram_*` is allowed: it asks for the unigram distribution,
  whose denominator is every token position, separators included, as in infini-gram).
- `approx`: `ntd`/`infgram_ntd` sample exactly as infini-gram does (when the prompt occurs more than
  `max_support` times, every `unit`-th suffix stands for `unit` of them; unit = the smallest power of two
  with count <= unit * max_support), so their results are identical. `count_cnf`/`find_cnf` subsample a
  clause with more than `max_clause_freq` matches per shard with infini-gram's generator (std::mt19937,
  seed 19260817, libstdc++'s uniform_int_distribution), so approximate CNF counts are identical too.
- `search_docs`/`search_docs_cnf` draw min(maxnum, matches) *distinct* matches uniformly (without
  replacement; infini-gram draws with replacement, so it can return one match twice, certainly when
  there are fewer matches than `maxnum`). The generator is unseeded, as infini-gram's is, so the
  matches drawn differ run to run; `cnt` and `approx` are the same.
- Text queries (the `*_text` methods but `score_text`) mean the words wherever they stand, not the text's
  own token sequence (see `text_forms`): count, search, prob and ntd add up the words' mid-line and
  line-start forms; infgram_prob / infgram_ntd back off along the mid-line form; exact=True takes the
  text as typed. `tokenize` is the plain tokenizer.
- `count_many` and `score_sequence` are ours (batched forms, one compiled call each).

Opening an engine computes each shard's prefix buckets (suffix_array.prefix_buckets: the first suffix-array
rank of every first token, 512 KiB) by galloping over the suffix array, ~0.2 s for a 16M-token shard;
every search over a whole shard then starts in its query's bucket.

Thread safety: an Engine is read-only after it opens; every query runs in compiled code with the GIL
released, so threads query one Engine in parallel.
"""

from __future__ import annotations

import random

import threading
from array import array
from itertools import chain
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from ..index.errors import IndexFormatError, UserError
from ..index.handle import Index
from ..index.manifest import MANIFEST
from ..index.tokenizer import TOKEN_DTYPES
from . import suffix_array
from .shards import DTYPE_NAMES, NGRAM_DIR, Shard, open_shards, separator, shard_table

# Bounds on the tuning arguments (infini-gram's defaults in the middle of each range).
LIMITS = {"max_support": (1, 1_000_000), "max_clause_freq": (1, 10_000_000), "max_diff_tokens": (1, 1_000_000),
          "maxnum": (1, 10_000), "max_disp_len": (1, 10_000_000)}


class QueryError(UserError):
    """A query argument out of range or of the wrong type; the message names the argument."""


def _check_int(name: str, value: Any) -> int:
    lo, hi = LIMITS[name]
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not lo <= value <= hi:
        raise QueryError(f"{name}: expected an integer in [{lo}, {hi}], got {value!r}")
    return int(value)


def distinct_draws(n: int, k: int) -> np.ndarray:
    """min(k, n) distinct integers of [0, n), uniformly at random (unseeded), ascending: the matches a
    search shows. Drawing with replacement (infini-gram's way) shows one match twice whenever n < k, and
    often when n is small. random.sample over a range costs about a microsecond for a few draws (a numpy
    Generator costs ~50 us to create and ~25 us per choice without replacement, more than the search)."""
    return np.array(sorted(random.sample(range(n), min(k, n))), dtype=np.int64)


def text_forms(tokenize, text: str, exact: bool = False) -> list[list[int]]:
    """The token sequences that a text query stands for (tokenize: the index's tokenizer, text -> ids).

    A byte-level BPE tokenizer writes a word differently after a space (' king', one token) than at the
    start of a text or line ('king'), so the text's own tokens, as typed, match only where its first word
    follows a newline or punctuation, opens a document, or ends a longer word. A user means the words
    wherever they stand:
    - default: the words after a space (tokenize(' ' + text): mid-line, where words almost always are)
      and at the start of a line (tokenize('\\n' + text): the newline token is part of that match). A text
      that starts with whitespace is taken as typed (the user gave its first word's context). Words that
      open a document, with nothing before them, are found only with exact=True.
    - exact: the text's own token sequence as typed (anywhere, also inside longer words).
    A form that another form begins with is dropped (the other's matches are its own), so no two forms
    match at one position and their counts add up exactly. The mid-line form comes first.
    """
    if not isinstance(text, str):
        raise QueryError(f"text: expected a string, got {type(text).__name__}")
    if not text.strip():
        raise QueryError(f"text: {text!r} has no words to look for")
    if exact or text[0].isspace():
        return [[int(t) for t in tokenize(text)]]
    forms: list[list[int]] = []
    for ids in ([int(t) for t in tokenize(" " + text)], [int(t) for t in tokenize("\n" + text)]):
        if any(ids[:len(f)] == f for f in forms):   # a kept form begins it: already counted
            continue
        forms = [f for f in forms if f[:len(ids)] != ids] + [ids]
    return forms


def count_forms(engine, forms: list[list[int]]) -> dict:
    """`count` of every form (see text_forms) and their sum: {'count', 'approx', 'forms': [{'tokens',
    'count'}]}. engine: an Engine or an NgramClient."""
    counts = [int(engine.count(f)["count"]) for f in forms]
    return {"count": sum(counts), "approx": False,
            "forms": [{"tokens": f, "count": n} for f, n in zip(forms, counts)]}


def search_forms(engine, forms: list[list[int]], maxnum: int, max_disp_len: int | None = None) -> dict:
    """`search_docs` over the matches of all forms together: min(maxnum, cnt) distinct matches drawn
    uniformly among them (each form gets as many as a draw without replacement gives it); idxs number the
    matches form after form. engine: an Engine or an NgramClient."""
    counted = count_forms(engine, forms)
    cnts = [f["count"] for f in counted["forms"]]
    out = {"cnt": counted["count"], "approx": False, "idxs": [], "documents": [], "forms": counted["forms"]}
    if counted["count"] == 0:
        return out
    per_form = np.random.default_rng().multivariate_hypergeometric(cnts, min(maxnum, counted["count"]))
    base = 0
    for f, n, k in zip(forms, cnts, per_form.tolist()):
        if k:
            r = engine.search_docs(f, maxnum=k, max_disp_len=max_disp_len)
            out["idxs"] += [base + i for i in r["idxs"]]
            out["documents"] += r["documents"]
        base += n
    return out


def prob_forms(engine, forms: list[list[int]]) -> dict:
    """`prob` of the last token after the tokens before it, every form's counts added (forms whose last
    token is not the first form's are left out: a one-token text asks the probability of its mid-line
    token). engine: an Engine or an NgramClient."""
    forms = [f for f in forms if f[-1] == forms[0][-1]]
    rs = [engine.prob(f[:-1], f[-1]) for f in forms]
    prompt_cnt, cont_cnt = sum(r["prompt_cnt"] for r in rs), sum(r["cont_cnt"] for r in rs)
    return {"prompt_cnt": prompt_cnt, "cont_cnt": cont_cnt, "prob": cont_cnt / prompt_cnt if prompt_cnt else -1.0,
            "forms": [{"tokens": f, "prompt_cnt": r["prompt_cnt"], "cont_cnt": r["cont_cnt"]} for f, r in zip(forms, rs)]}


def ntd_forms(engine, forms: list[list[int]], max_support: int | None = None) -> dict:
    """`ntd` after the words wherever they stand: every form's next-token counts added.
    engine: an Engine or an NgramClient."""
    rs = [engine.ntd(f, max_support) for f in forms]
    prompt_cnt = sum(r["prompt_cnt"] for r in rs)
    cont: dict[int, int] = {}
    for r in rs:
        for t, c in r["result_by_token_id"].items():
            cont[t] = cont.get(t, 0) + c["cont_cnt"]
    return {"prompt_cnt": prompt_cnt, "result_by_token_id": {t: {"cont_cnt": c, "prob": c / prompt_cnt}
                                                             for t, c in cont.items()},
            "approx": any(r["approx"] for r in rs),
            "forms": [{"tokens": f, "prompt_cnt": r["prompt_cnt"]} for f, r in zip(forms, rs)]}


class Engine:
    """Exact n-gram statistics over one or more sets of infini-gram v4 shards (see the module doc).

    index: a retrogram index (an `Index`, or its directory; built with its `ngram` stage), a directory of
        infini-gram shard files (tokenized.K, table.K, offset.K[, metadata.K, metaoff.K]), or a list of
        them, queried together.
    token_dtype: 'u8' | 'u16' | 'u32'; read from the manifest, else inferred from the files; when given,
        the files must agree.
    eos_token_id: the id reported for "end of document" in next-token distributions (default: the
        tokenizer's end-of-sequence id from the manifest; without one, the separator id itself).
    vocab_size: ids must be below it (default: the tokenizer's vocabulary; for bare shard directories,
        any id below the separator).
    The other arguments are the defaults of the methods' arguments of the same names.
    """

    def __init__(self, index: Index | str | Path | Sequence[Index | str | Path], *, token_dtype: str | None = None,
                 eos_token_id: int | None = None, vocab_size: int | None = None, max_support: int = 1000,
                 max_clause_freq: int = 50000, max_diff_tokens: int = 100, maxnum: int = 1,
                 max_disp_len: int = 1000) -> None:
        dirs = [index] if isinstance(index, (Index, str, Path)) else list(index)
        if not dirs:
            raise UserError("index: expected at least one index or shard directory")
        if token_dtype is not None and token_dtype not in DTYPE_NAMES:
            raise UserError(f"token_dtype: expected one of {', '.join(DTYPE_NAMES)}, got {token_dtype!r}")
        self.max_support = _check_int("max_support", max_support)
        self.max_clause_freq = _check_int("max_clause_freq", max_clause_freq)
        self.max_diff_tokens = _check_int("max_diff_tokens", max_diff_tokens)
        self.maxnum = _check_int("maxnum", maxnum)
        self.max_disp_len = _check_int("max_disp_len", max_disp_len)

        width = DTYPE_NAMES[token_dtype] if token_dtype else None
        self.shards: list[Shard] = []
        self.indexes: list[Index] = []        # the retrogram indexes among the inputs
        self.index_dirs: list[Path] = []      # their directories
        self.tokenizer_info: dict | None = None
        for d in dirs:
            d, shard_dir, manifest_width = self._resolve(d)
            if manifest_width is not None:
                if width is not None and width != manifest_width:
                    raise IndexFormatError(f"{d}: an index of u{8 * manifest_width} tokens, but "
                                           f"{'token_dtype' if token_dtype else 'the other shards'} say u{8 * width}")
                width = manifest_width
            # a bare directory's width is read from its files (then compared), unless token_dtype says it
            shards, found = open_shards(shard_dir, width if manifest_width or token_dtype else None)
            if width is not None and found != width:
                raise IndexFormatError(f"{shard_dir}: shards of u{8 * found} tokens, expected u{8 * width}")
            width = found
            self.shards += shards
        self.width = width
        self.token_dtype = np.dtype(TOKEN_DTYPES[width]).newbyteorder("<")
        self.sep = separator(width)
        self._typecode = self.token_dtype.char   # array.array's code of the width: B, H or I
        info = self.tokenizer_info or {}
        vocab = vocab_size if vocab_size is not None else info.get("vocab_size") or self.sep
        if isinstance(vocab, bool) or not isinstance(vocab, (int, np.integer)) or vocab < 1:
            raise UserError(f"vocab_size: expected a positive integer, got {vocab!r}")
        # ids must be below it; the separator is never a token (a byte vocabulary of 256 never holds 0xff)
        self.vocab_size = min(int(vocab), self.sep)
        eos = eos_token_id if eos_token_id is not None else info.get("eos_token_id")
        self.eos_token_id = int(eos) if eos is not None else self.sep
        self._table = shard_table(self.shards)
        self._tok_cnt = int(self._table[:, suffix_array.TOK_CNT].sum())
        self._doc_cnt = int(self._table[:, suffix_array.DOC_CNT].sum())
        self._doc_base = np.concatenate([[0], np.cumsum(self._table[:, suffix_array.DOC_CNT])]).astype(np.int64)
        self._tokenizer = None
        self._lock = threading.Lock()

    def _resolve(self, d: Index | str | Path) -> tuple[Path, Path, int | None]:
        """(the input's directory, directory of shard files, token width from the manifest or None) for one
        input: a retrogram index (its ngram/ shards) or a directory of shard files."""
        if isinstance(d, Index) or (Path(d) / MANIFEST).is_file():
            index = Index.of(d)
            index.require("ngram")
            d, manifest = index.dir, index.manifest
            if self.tokenizer_info is not None and manifest.tokenizer.get("sha256") != self.tokenizer_info.get("sha256"):
                raise IndexFormatError(
                    f"{d}: built with tokenizer {manifest.tokenizer.get('name')!r} (sha256 "
                    f"{manifest.tokenizer.get('sha256', '')[:12]}), but {self.index_dirs[0]} with "
                    f"{self.tokenizer_info.get('name')!r} ({self.tokenizer_info.get('sha256', '')[:12]}); "
                    "shards queried together must share one tokenizer")
            if self.tokenizer_info is None:
                self.tokenizer_info = dict(manifest.tokenizer)
            self.indexes.append(index)
            self.index_dirs.append(d)
            return d, d / NGRAM_DIR, manifest.token_width
        return Path(d), Path(d), None

    # -- argument checks (the boundary) ---------------------------------------------------------------

    def _arg(self, name: str, value: Any) -> int:
        """A tuning argument of a query (max_support, maxnum, ...): the engine's default when None, else checked."""
        return getattr(self, name) if value is None else _check_int(name, value)

    def _bad_id(self, name: str, bad: int) -> QueryError:
        what = "the document separator" if bad == self.sep else f"outside the vocabulary [0, {self.vocab_size})"
        return QueryError(f"{name}: token id {bad} is {what}")

    def _ids(self, name: str, ids: Any, allow_empty: bool = False) -> np.ndarray:
        """Token ids -> the query's bytes (little-endian tokens of the index's width)."""
        if type(ids) is list and ids:   # the fast path: array() accepts only ints that fit the width
            try:
                buf = array(self._typecode, ids)
            except (TypeError, OverflowError):
                pass   # the checks below say what is wrong
            else:
                if max(ids) < self.vocab_size:
                    return np.frombuffer(buf, np.uint8)
        if isinstance(ids, np.ndarray):
            arr = ids
            if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
                raise QueryError(f"{name}: expected a 1-d array of integer token ids, got {arr.dtype} "
                                 f"with shape {arr.shape}")
            lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
        elif isinstance(ids, (list, tuple)):
            arr = np.array(ids) if ids else np.zeros(0, np.int64)
            if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
                raise QueryError(f"{name}: expected a list of integer token ids, got {ids[:8]!r}"
                                 f"{'...' if len(ids) > 8 else ''}")
            lo, hi = (min(ids), max(ids)) if ids else (0, 0)
        else:
            raise QueryError(f"{name}: expected a list of token ids, got {type(ids).__name__}")
        if arr.size == 0 and not allow_empty:
            raise QueryError(f"{name}: empty query; give at least one token id")
        if lo < 0 or hi >= self.vocab_size:
            raise self._bad_id(name, next(int(x) for x in arr if not 0 <= int(x) < self.vocab_size))
        return arr.astype(self.token_dtype).view(np.uint8)

    def _not_longer_than_corpus(self, name: str, q: np.ndarray) -> None:
        n = len(q) // self.width
        if n > self._tok_cnt:
            raise QueryError(f"{name}: {n} tokens, longer than the whole corpus ({self._tok_cnt} tokens)")

    def _cont(self, cont_id: Any) -> np.ndarray:
        if isinstance(cont_id, bool) or not isinstance(cont_id, (int, np.integer)):
            raise QueryError(f"cont_id: expected one integer token id, got {cont_id!r}")
        return self._ids("cont_id", [int(cont_id)])

    def _cnf(self, cnf: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A CNF (list of clauses, each a list of terms, each a list of ids) -> (bytes, term offsets, clause offsets)."""
        if not isinstance(cnf, (list, tuple)) or not cnf:
            raise QueryError("cnf: expected a non-empty list of clauses (each a non-empty list of terms)")
        parts, term_off, clause_off = [], [0], [0]
        for c, clause in enumerate(cnf):
            if not isinstance(clause, (list, tuple)) or not clause:
                raise QueryError(f"cnf: clause {c} is not a non-empty list of terms")
            for t, term in enumerate(clause):
                q = self._ids(f"cnf clause {c} term {t}", term)
                self._not_longer_than_corpus(f"cnf clause {c} term {t}", q)
                parts.append(q)
                term_off.append(term_off[-1] + len(q))
            clause_off.append(len(term_off) - 1)
        return np.concatenate(parts), np.array(term_off, np.int64), np.array(clause_off, np.int64)

    # -- counting -------------------------------------------------------------------------------------

    def count(self, input_ids) -> dict:
        """{'count': occurrences of the sequence, 'approx': False}."""
        q = self._ids("input_ids", input_ids)
        self._not_longer_than_corpus("input_ids", q)
        return {"count": int(suffix_array.count(self._table, q)), "approx": False}

    def find(self, input_ids) -> dict:
        """{'cnt': count, 'segment_by_shard': [(start, end) rank range in each shard's suffix array]}."""
        q = self._ids("input_ids", input_ids)
        self._not_longer_than_corpus("input_ids", q)
        cnt, seg = suffix_array.find(self._table, q)
        return {"cnt": int(cnt), "segment_by_shard": [(int(a), int(b)) for a, b in seg]}

    def count_many(self, list_of_ids: Iterable) -> np.ndarray:
        """The counts of many sequences in one compiled call: int64 array, one count per sequence. The
        searches of 32 queries advance together (prefetching), so their memory latencies overlap."""
        if not isinstance(list_of_ids, (list, tuple)):
            raise QueryError(f"list_of_ids: expected a list of token-id lists, got {type(list_of_ids).__name__}")
        flat, offsets = self._many_ids("list_of_ids", list_of_ids)
        return suffix_array.count_many(self._table, flat, offsets)

    def count_packed(self, ids, lengths) -> np.ndarray:
        """count_many over queries packed in two flat arrays: query i is ids[sum(lengths[:i]) :
        sum(lengths[:i + 1])]. No list per query is built (the gRPC CountMany path)."""
        ids = np.asarray(ids)
        lengths = np.asarray(lengths)
        for name, a in (("ids", ids), ("lengths", lengths)):
            if a.ndim != 1 or (a.size and a.dtype.kind not in "iu"):
                raise QueryError(f"{name}: expected a 1-d array of integers, got {a.dtype} with shape {a.shape}")
        if lengths.size and int(lengths.min()) < 1:
            i = int(np.argmax(lengths < 1))
            raise QueryError(f"list_of_ids[{i}]: empty query; give at least one token id")
        total = int(lengths.sum()) if lengths.size else 0
        if total != ids.size:
            raise QueryError(f"lengths: they add up to {total:,} but there are {ids.size:,} ids")
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            k = int(np.argmax((ids < 0) | (ids >= self.vocab_size)))
            i = int(np.searchsorted(np.cumsum(lengths), k, side="right"))
            raise self._bad_id(f"list_of_ids[{i}]", int(ids[k]))
        offsets = np.zeros(lengths.size + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        offsets *= self.width
        return suffix_array.count_many(self._table, ids.astype(self.token_dtype).view(np.uint8), offsets)

    def _many_ids(self, name: str, list_of_ids: list | tuple) -> tuple[np.ndarray, np.ndarray]:
        """Many queries -> (their bytes concatenated, byte offsets [n + 1]). Lists of ints are converted
        and checked all at once; anything else, or any bad id, goes query by query (naming the bad one)."""
        n = len(list_of_ids)
        offsets = np.zeros(n + 1, np.int64)
        if n and all(type(ids) is list for ids in list_of_ids):
            lens = list(map(len, list_of_ids))
            flat = list(chain.from_iterable(list_of_ids))
            try:
                buf = array(self._typecode, flat) if min(lens) > 0 else None
            except (TypeError, OverflowError):
                buf = None
            if buf is not None and max(flat) < self.vocab_size:
                np.cumsum(lens, out=offsets[1:])
                offsets *= self.width
                return np.frombuffer(buf, np.uint8), offsets
        qs = [self._ids(f"{name}[{i}]", ids) for i, ids in enumerate(list_of_ids)]
        if qs:
            np.cumsum([len(q) for q in qs], out=offsets[1:])
        return (np.concatenate(qs) if qs else np.zeros(0, np.uint8)), offsets

    def prob(self, prompt_ids, cont_id: int) -> dict:
        """{'prompt_cnt', 'cont_cnt', 'prob'}: P(cont | prompt) = cont_cnt / prompt_cnt (-1.0 when the prompt
        does not occur)."""
        q = np.concatenate([self._ids("prompt_ids", prompt_ids, allow_empty=True), self._cont(cont_id)])
        self._not_longer_than_corpus("prompt_ids", q[:-self.width])
        prompt_cnt, cont_cnt = suffix_array.prob(self._table, q, self.width)
        return {"prompt_cnt": int(prompt_cnt), "cont_cnt": int(cont_cnt),
                "prob": cont_cnt / prompt_cnt if prompt_cnt else -1.0}

    def _dist(self, toks: np.ndarray, cnts: np.ndarray, total: int) -> dict:
        return {t: {"cont_cnt": c, "prob": c / total} for t, c in zip(toks.tolist(), cnts.tolist())}

    def ntd(self, prompt_ids, max_support: int | None = None) -> dict:
        """{'prompt_cnt', 'result_by_token_id': {token id: {'cont_cnt', 'prob'}}, 'approx'}: the
        distribution of the token after the prompt (end of document reported as eos_token_id)."""
        max_support = self._arg("max_support", max_support)
        q = self._ids("prompt_ids", prompt_ids, allow_empty=True)
        self._not_longer_than_corpus("prompt_ids", q)
        cnt, approx, toks, cnts = suffix_array.ntd(self._table, q, self.width, max_support, self.eos_token_id, self.sep)
        return {"prompt_cnt": int(cnt), "result_by_token_id": self._dist(toks, cnts, cnt), "approx": bool(approx)}

    def infgram_prob(self, prompt_ids, cont_id: int) -> dict:
        """`prob` given the longest suffix of the prompt that occurs: {'prompt_cnt', 'cont_cnt', 'prob',
        'suffix_len'} (suffix_len in tokens)."""
        q = np.concatenate([self._ids("prompt_ids", prompt_ids, allow_empty=True), self._cont(cont_id)])
        L, prompt_cnt, cont_cnt = suffix_array.infgram_prob(self._table, q, self.width)
        return {"prompt_cnt": int(prompt_cnt), "cont_cnt": int(cont_cnt),
                "prob": cont_cnt / prompt_cnt if prompt_cnt else -1.0, "suffix_len": int(L)}

    def infgram_ntd(self, prompt_ids, max_support: int | None = None) -> dict:
        """`ntd` after the longest suffix of the prompt that occurs, plus 'suffix_len'."""
        max_support = self._arg("max_support", max_support)
        q = self._ids("prompt_ids", prompt_ids, allow_empty=True)
        L, cnt, approx, toks, cnts = suffix_array.infgram_ntd(self._table, q, self.width, max_support,
                                                         self.eos_token_id, self.sep)
        return {"prompt_cnt": int(cnt), "result_by_token_id": self._dist(toks, cnts, cnt), "approx": bool(approx),
                "suffix_len": int(L)}

    def score_sequence(self, input_ids) -> dict:
        """The ∞-gram probability of every token of a sequence given all the tokens before it, in one call:
        {'prob', 'prompt_cnt', 'cont_cnt', 'suffix_len'}, numpy arrays with one entry per token; entry i
        equals infgram_prob(input_ids[:i], input_ids[i]). Each position reuses the previous one's
        suffix-array range, so the cost per token does not grow with the length of the context."""
        q = self._ids("input_ids", input_ids)
        L, prompt_cnt, cont_cnt = suffix_array.score_sequence(self._table, q, self.width)
        return {"prob": cont_cnt / prompt_cnt, "prompt_cnt": prompt_cnt, "cont_cnt": cont_cnt, "suffix_len": L}

    # -- CNF ------------------------------------------------------------------------------------------

    def find_cnf(self, cnf, max_clause_freq: int | None = None, max_diff_tokens: int | None = None) -> dict:
        """{'cnt', 'approx', 'ptrs_by_shard'}: matches of an AND of ORs of n-grams, each clause's term within
        max_diff_tokens of the others, all in one document (ptrs: byte offsets of each match's start)."""
        mcf = self._arg("max_clause_freq", max_clause_freq)
        mdt = self._arg("max_diff_tokens", max_diff_tokens)
        q, term_off, clause_off = self._cnf(cnf)
        cnt, approx, ptrs, off = suffix_array.find_cnf(self._table, q, term_off, clause_off, self.width, self.sep,
                                                       mcf, mdt)
        if len(off) == 0:   # a clause matches nothing anywhere
            return {"cnt": 0, "approx": False, "ptrs_by_shard": []}
        return {"cnt": int(cnt), "approx": bool(approx),
                "ptrs_by_shard": [ptrs[off[s]:off[s + 1]].tolist() for s in range(len(self.shards))]}

    def count_cnf(self, cnf, max_clause_freq: int | None = None, max_diff_tokens: int | None = None) -> dict:
        """{'count', 'approx'} of a CNF query (see find_cnf)."""
        mcf = self._arg("max_clause_freq", max_clause_freq)
        mdt = self._arg("max_diff_tokens", max_diff_tokens)
        q, term_off, clause_off = self._cnf(cnf)
        cnt, approx, _, _ = suffix_array.find_cnf(self._table, q, term_off, clause_off, self.width, self.sep, mcf, mdt)
        return {"count": int(cnt), "approx": bool(approx)}

    # -- documents ------------------------------------------------------------------------------------

    def _doc(self, s: int, doc_ix: int, doc_len: int, a: int, b: int, needle: int, ma: int, mb: int) -> dict:
        shard = self.shards[s]
        w = self.width
        meta = bytes(shard.mt[ma:mb]).decode("utf-8", errors="replace") if shard.mt is not None else ""
        return {"doc_ix": int(doc_ix), "doc_len": int(doc_len), "disp_len": int((b - a) // w),
                "needle_offset": int(needle), "metadata": meta, "token_ids": shard.tokens[a // w:b // w].tolist(),
                "blocked": False}

    def _doc_at_ptr(self, s: int, ptr: int, max_disp_len: int) -> dict:
        r = suffix_array.locate_doc(self._table, s, ptr, self.width, max_disp_len // 2, (max_disp_len + 1) // 2)
        return self._doc(s, *r)

    def search_docs(self, input_ids, maxnum: int | None = None, max_disp_len: int | None = None) -> dict:
        """{'cnt', 'approx', 'idxs', 'documents'}: min(maxnum, cnt) distinct occurrences drawn uniformly,
        each with its document: up to max_disp_len tokens around the match ('needle_offset' is where the
        match starts in 'token_ids'). idxs: each draw's index among all cnt occurrences."""
        maxnum = self._arg("maxnum", maxnum)
        max_disp_len = self._arg("max_disp_len", max_disp_len)
        q = self._ids("input_ids", input_ids)
        self._not_longer_than_corpus("input_ids", q)
        cnt, seg = suffix_array.find(self._table, q)
        if cnt == 0:
            return {"cnt": 0, "approx": False, "idxs": [], "documents": []}
        idxs = distinct_draws(int(cnt), maxnum)
        shards, ptrs = suffix_array.match_pointers(self._table, seg, idxs)
        docs = [self._doc_at_ptr(int(s), int(p), max_disp_len) for s, p in zip(shards, ptrs)]
        return {"cnt": int(cnt), "approx": False, "idxs": idxs.tolist(), "documents": docs}

    def search_docs_cnf(self, cnf, maxnum: int | None = None, max_disp_len: int | None = None,
                        max_clause_freq: int | None = None, max_diff_tokens: int | None = None) -> dict:
        """`search_docs` for a CNF query: draws among its distinct match locations (find_cnf lists one location
        once per pairing of its clauses, so cnt counts some twice), idxs scaled to cnt as infini-gram does."""
        maxnum = self._arg("maxnum", maxnum)
        max_disp_len = self._arg("max_disp_len", max_disp_len)
        mcf = self._arg("max_clause_freq", max_clause_freq)
        mdt = self._arg("max_diff_tokens", max_diff_tokens)
        q, term_off, clause_off = self._cnf(cnf)
        cnt, approx, ptrs, off = suffix_array.find_cnf(self._table, q, term_off, clause_off, self.width, self.sep,
                                                       mcf, mdt)
        if cnt == 0:
            return {"cnt": 0, "approx": False, "idxs": [], "documents": []}
        shard_of = np.repeat(np.arange(len(off) - 1), np.diff(off))   # [len(ptrs)]
        keep = np.sort(np.unique(np.stack([shard_of, ptrs]), axis=1, return_index=True)[1])   # each location once
        ptrs, shard_of = ptrs[keep], shard_of[keep]
        picks = distinct_draws(len(ptrs), maxnum)
        idxs = [int(i / len(ptrs) * cnt) for i in picks.tolist()]
        docs = [self._doc_at_ptr(int(shard_of[i]), int(ptrs[i]), max_disp_len) for i in picks]
        return {"cnt": int(cnt), "approx": bool(approx), "idxs": idxs, "documents": docs}

    def get_num_shards(self) -> int:
        return len(self.shards)

    def get_tok_cnt(self, s: int) -> int:
        self._check_shard(s)
        return self.shards[s].tok_cnt

    def get_total_tok_cnt(self) -> int:
        """Token positions in all shards, separators included (the denominator of unigram probabilities)."""
        return self._tok_cnt

    def get_total_doc_cnt(self) -> int:
        return self._doc_cnt

    def _check_shard(self, s: Any) -> int:
        if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or not 0 <= s < len(self.shards):
            raise QueryError(f"s: expected a shard number in [0, {len(self.shards)}), got {s!r}")
        return int(s)

    def get_doc_by_rank(self, s: int, rank: int, max_disp_len: int | None = None) -> dict:
        """The document around the suffix at `rank` of shard s's suffix array (a DocResult)."""
        s = self._check_shard(s)
        max_disp_len = self._arg("max_disp_len", max_disp_len)
        n = self.shards[s].tok_cnt
        if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or not 0 <= rank < n:
            raise QueryError(f"rank: expected an integer in [0, {n}) for shard {s}, got {rank!r}")
        return self._doc_at_ptr(s, int(suffix_array.rank_to_ptr(self._table, s, int(rank))), max_disp_len)

    def get_docs_by_ranks(self, list_of_s_and_rank, max_disp_len: int | None = None) -> list[dict]:
        return [self.get_doc_by_rank(s, rank, max_disp_len) for s, rank in list_of_s_and_rank]

    def get_doc_by_ix(self, doc_ix: int, max_disp_len: int | None = None) -> dict:
        """Document `doc_ix` (global index: its id in store.sqlite for a retrogram index), its first
        max_disp_len tokens (a DocResult)."""
        max_disp_len = self._arg("max_disp_len", max_disp_len)
        if isinstance(doc_ix, bool) or not isinstance(doc_ix, (int, np.integer)) or not 0 <= doc_ix < self._doc_cnt:
            raise QueryError(f"doc_ix: expected an integer in [0, {self._doc_cnt}), got {doc_ix!r}")
        s = int(np.searchsorted(self._doc_base, doc_ix, side="right")) - 1
        doc_len, a, b, ma, mb = suffix_array.doc_window(self._table, s, int(doc_ix - self._doc_base[s]), self.width,
                                                   max_disp_len)
        return self._doc(s, int(doc_ix), doc_len, a, b, 0, ma, mb)

    def get_docs_by_ixs(self, list_of_doc_ix, max_disp_len: int | None = None) -> list[dict]:
        return [self.get_doc_by_ix(i, max_disp_len) for i in list_of_doc_ix]

    def get_document(self, doc_ix: int) -> dict:
        """Document `doc_ix`'s row in store.sqlite (id, source, external_id, token_offset, token_len,
        metadata as a dict): only for a single retrogram index."""
        if len(self.index_dirs) != 1 or len(self.index_dirs) != len(dict.fromkeys(s.dir for s in self.shards)):
            raise QueryError("doc_ix: document rows need an engine opened on exactly one retrogram index")
        if isinstance(doc_ix, bool) or not isinstance(doc_ix, (int, np.integer)) or not 0 <= doc_ix < self._doc_cnt:
            raise QueryError(f"doc_ix: expected an integer in [0, {self._doc_cnt}), got {doc_ix!r}")
        from ..index.store import get_document

        with self._lock:
            return get_document(self._open_store(), int(doc_ix))

    def _open_store(self):
        return self.indexes[0].store

    # -- text -----------------------------------------------------------------------------------------

    @property
    def tokenizer(self):
        """The index's tokenizer (retrogram indexes only)."""
        if self._tokenizer is None:
            if not self.index_dirs:
                raise UserError("text queries need a retrogram index (its tokenizer); these shards are bare "
                                "infini-gram files: pass token ids")
            self._tokenizer = self.indexes[0].tokenizer
        return self._tokenizer

    def tokenize(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise QueryError(f"text: expected a string, got {type(text).__name__}")
        return [int(t) for t in self.tokenizer.encode(text)]

    def decode(self, ids) -> str:
        return self.tokenizer.decode(ids)

    def text_forms(self, text: str, exact: bool = False) -> list[list[int]]:
        """The token sequences a text query stands for: the words after a space and at a line start, or with
        exact=True the text's own tokens (see the module function `text_forms`)."""
        return text_forms(self.tokenize, text, exact)

    def count_text(self, text: str, exact: bool = False) -> dict:
        """The count of the words wherever they stand (every form added; 'forms': each one's tokens and count)."""
        return count_forms(self, self.text_forms(text, exact))

    def prob_text(self, text: str, exact: bool = False) -> dict:
        """P(last token of text | the tokens before it), the words wherever they stand (see prob_forms)."""
        return prob_forms(self, self.text_forms(text, exact))

    def ntd_text(self, text: str, max_support: int | None = None, exact: bool = False) -> dict:
        return ntd_forms(self, self.text_forms(text, exact), max_support)

    def infgram_prob_text(self, text: str, exact: bool = False) -> dict:
        """infgram_prob of the words as they read mid-line (the ∞-gram backs off along one sequence)."""
        ids = self.text_forms(text, exact)[0]
        return self.infgram_prob(ids[:-1], ids[-1])

    def infgram_ntd_text(self, text: str, max_support: int | None = None, exact: bool = False) -> dict:
        return self.infgram_ntd(self.text_forms(text, exact)[0], max_support)

    def search_docs_text(self, text: str, maxnum: int | None = None, max_disp_len: int | None = None,
                         exact: bool = False) -> dict:
        maxnum = self.maxnum if maxnum is None else _check_int("maxnum", maxnum)
        return search_forms(self, self.text_forms(text, exact), maxnum, max_disp_len)

    def cnf_from_text(self, cnf_text: list[list[str]], exact: bool = False) -> list[list[list[int]]]:
        """Each term becomes one alternative of its clause per form."""
        return [[f for term in clause for f in self.text_forms(term, exact)] for clause in cnf_text]

    def count_cnf_text(self, cnf_text: list[list[str]], max_clause_freq=None, max_diff_tokens=None,
                       exact: bool = False) -> dict:
        return self.count_cnf(self.cnf_from_text(cnf_text, exact), max_clause_freq, max_diff_tokens)

    def search_docs_cnf_text(self, cnf_text: list[list[str]], maxnum=None, max_disp_len=None,
                             max_clause_freq=None, max_diff_tokens=None, exact: bool = False) -> dict:
        return self.search_docs_cnf(self.cnf_from_text(cnf_text, exact), maxnum, max_disp_len, max_clause_freq,
                                    max_diff_tokens)

    def score_text(self, text: str) -> dict:
        """score_sequence of the text's own tokens, as typed (a whole text, not words to look for)."""
        return self.score_sequence(self.tokenize(text))
