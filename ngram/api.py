"""The n-gram query API, as types: what `Engine` (in process), `NgramClient` and `AsyncNgramClient` (over
gRPC, retrogram.services.client) all answer, with the same arguments and the same result dicts. Code that
takes `NgramQueries` (the decoder's ∞-gram interpolation) runs against any of the first two; the async client
satisfies `AsyncNgramQueries`, the same methods as coroutines.

The results are infini-gram's (see engine.py for each): `count` -> {'count', 'approx'}, `prob` ->
{'prompt_cnt', 'cont_cnt', 'prob'}, `ntd` -> {'prompt_cnt', 'result_by_token_id': {id: {'cont_cnt',
'prob'}}, 'approx'}, the ∞-gram ones add 'suffix_len'. Where the engine answers numpy arrays
(`count_many`, `score_sequence`'s columns) a client answers lists of the same numbers.

Implementations may take more than the Protocol names, as long as it has a default (the clients take a
keyword-only `timeout`; `score_sequence` a `block_size`). `conformance_errors` checks that, by name, kind,
position and default of every parameter: `isinstance` with a runtime-checkable Protocol only checks that
the names exist.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

TokenIds = Sequence[int]
Cnf = Sequence[Sequence[TokenIds]]   # an AND of ORs of token sequences


@runtime_checkable
class NgramQueries(Protocol):
    def count(self, input_ids: TokenIds) -> dict: ...

    def count_many(self, list_of_ids: Sequence[TokenIds]) -> Sequence[int]: ...

    def count_cnf(self, cnf: Cnf, max_clause_freq: int | None = None, max_diff_tokens: int | None = None) -> dict: ...

    def prob(self, prompt_ids: TokenIds, cont_id: int) -> dict: ...

    def ntd(self, prompt_ids: TokenIds, max_support: int | None = None) -> dict: ...

    def infgram_prob(self, prompt_ids: TokenIds, cont_id: int) -> dict: ...

    def infgram_ntd(self, prompt_ids: TokenIds, max_support: int | None = None) -> dict: ...

    def search_docs(self, input_ids: TokenIds, maxnum: int | None = None, max_disp_len: int | None = None) -> dict: ...

    def search_docs_cnf(self, cnf: Cnf, maxnum: int | None = None, max_disp_len: int | None = None,
                        max_clause_freq: int | None = None, max_diff_tokens: int | None = None) -> dict: ...

    def get_doc_by_rank(self, s: int, rank: int, max_disp_len: int | None = None) -> dict: ...

    def get_doc_by_ix(self, doc_ix: int, max_disp_len: int | None = None) -> dict: ...

    def score_sequence(self, input_ids: TokenIds) -> dict: ...

    def tokenize(self, text: str) -> list[int]: ...

    def decode(self, ids: TokenIds) -> str: ...


@runtime_checkable
class AsyncNgramQueries(Protocol):
    """NgramQueries with every method a coroutine (same arguments, same results once awaited)."""

    async def count(self, input_ids: TokenIds) -> dict: ...

    async def count_many(self, list_of_ids: Sequence[TokenIds]) -> Sequence[int]: ...

    async def count_cnf(self, cnf: Cnf, max_clause_freq: int | None = None,
                        max_diff_tokens: int | None = None) -> dict: ...

    async def prob(self, prompt_ids: TokenIds, cont_id: int) -> dict: ...

    async def ntd(self, prompt_ids: TokenIds, max_support: int | None = None) -> dict: ...

    async def infgram_prob(self, prompt_ids: TokenIds, cont_id: int) -> dict: ...

    async def infgram_ntd(self, prompt_ids: TokenIds, max_support: int | None = None) -> dict: ...

    async def search_docs(self, input_ids: TokenIds, maxnum: int | None = None,
                          max_disp_len: int | None = None) -> dict: ...

    async def search_docs_cnf(self, cnf: Cnf, maxnum: int | None = None, max_disp_len: int | None = None,
                              max_clause_freq: int | None = None, max_diff_tokens: int | None = None) -> dict: ...

    async def get_doc_by_rank(self, s: int, rank: int, max_disp_len: int | None = None) -> dict: ...

    async def get_doc_by_ix(self, doc_ix: int, max_disp_len: int | None = None) -> dict: ...

    async def score_sequence(self, input_ids: TokenIds) -> dict: ...

    async def tokenize(self, text: str) -> list[int]: ...

    async def decode(self, ids: TokenIds) -> str: ...


def protocol_methods(protocol: type) -> list[str]:
    """The methods a Protocol names, in definition order."""
    return [n for n, v in vars(protocol).items() if inspect.isfunction(v) and not n.startswith("_")]


def conformance_errors(obj: Any, protocol: type) -> list[str]:
    """What keeps `obj` (an instance or a class) from satisfying `protocol`, one line each; empty when it does.

    For every method of the protocol: obj has it; it is a coroutine function exactly when the protocol's is;
    each of the protocol's parameters is there with the same name, kind and position (a positional one
    may also be accepted by keyword), with a default where the protocol has one; every further parameter
    of obj's has a default (or is *args/**kwargs)."""
    errors = []
    for name in protocol_methods(protocol):
        want_fn = vars(protocol)[name]
        have_fn = getattr(obj, name, None)
        if have_fn is None or not callable(have_fn):
            errors.append(f"{name}: missing")
            continue
        want_async = inspect.iscoroutinefunction(want_fn)
        if inspect.iscoroutinefunction(have_fn) != want_async:
            errors.append(f"{name}: {'not ' if want_async else ''}a coroutine function, the protocol's is"
                          f"{'' if want_async else ' not'}")
        want = [p for p in inspect.signature(want_fn).parameters.values()][1:]   # without self
        have = list(inspect.signature(have_fn).parameters.values())
        if have and have[0].name == "self" and not inspect.ismethod(have_fn):
            have = have[1:]   # looked up on a class: an unbound function
        errors += [f"{name}: {e}" for e in _parameter_errors(want, have)]
    return errors


def _parameter_errors(want: list[inspect.Parameter], have: list[inspect.Parameter]) -> list[str]:
    P = inspect.Parameter
    errors = []
    by_name = {p.name: (i, p) for i, p in enumerate(have)}
    for i, w in enumerate(want):
        if w.name not in by_name:
            errors.append(f"parameter {w.name!r} missing")
            continue
        j, h = by_name[w.name]
        if w.kind in (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD):
            if j != i or h.kind not in (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD) or \
                    (w.kind == P.POSITIONAL_OR_KEYWORD and h.kind == P.POSITIONAL_ONLY):
                errors.append(f"parameter {w.name!r}: position {j} ({h.kind.description}), "
                              f"expected position {i} ({w.kind.description})")
        elif h.kind not in (P.KEYWORD_ONLY, P.POSITIONAL_OR_KEYWORD):
            errors.append(f"parameter {w.name!r}: {h.kind.description}, expected it by keyword")
        if w.default is not P.empty and h.default is P.empty:
            errors.append(f"parameter {w.name!r}: no default, the protocol's has one")
    names = {w.name for w in want}
    for h in have:
        if h.name not in names and h.default is P.empty and h.kind not in (P.VAR_POSITIONAL, P.VAR_KEYWORD):
            errors.append(f"parameter {h.name!r}: not in the protocol and without a default")
    return errors
