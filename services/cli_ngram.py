"""`retrogram ngram ...`: n-gram queries on an index from the command line.

    retrogram ngram count --index IDX "to be or not"            # the words, wherever they stand (see below)
    retrogram ngram count --index IDX --ids 12,34 --json        # {"count": N, "approx": false, "tokens": [12, 34]}
    retrogram ngram count --index IDX --cnf "king AND queen OR prince"
    retrogram ngram prob --index IDX "to be or"                  # P(last token | the tokens before it)
    retrogram ngram ntd --index IDX "to be or"                   # the distribution of the next token
    retrogram ngram infgram-prob / infgram-ntd ...               # the same after the longest occurring suffix
    retrogram ngram search --index IDX "to be" --maxnum 3        # documents with the n-gram (or --cnf EXPR)
    retrogram ngram doc --index IDX 42                           # document 42
    retrogram ngram count --index IDX --file queries.txt         # one query per line, one JSON object per line

A query is TEXT (tokenized with the index's tokenizer) or --ids (comma-separated token ids). The tokenizer
writes a word differently after a space than at the start of a line, so TEXT means the words wherever they
stand: count, search (and each --cnf term), prob and ntd find them after a space and at the start of a line
and add the two; infgram-prob and infgram-ntd back off along the words as they read mid-line. --exact takes
the text's own token sequence as typed instead (which also matches a document's first words, and inside
longer words). The token ids used are printed: with --json as "tokens", or "forms" (each sequence with its
counts).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from ..index.errors import UserError
from .cli_common import add_json_flag, console, print_json
from .cli_serve import add_server_flag

OPS = {
    "count": "the count of the words (or token ids, or a CNF with --cnf)",
    "prob": "P(last token | the tokens before it)",
    "ntd": "the distribution of the token after the sequence",
    "infgram-prob": "P(last token | the longest suffix of the tokens before it that occurs)",
    "infgram-ntd": "the next-token distribution after the longest suffix that occurs",
    "search": "documents that contain the words (or token ids, or match --cnf)",
}
# The engine's argument names in its error messages -> what the user typed (see _name_the_flag).
ENGINE_QUERY_ARGS = re.compile(r"^(input_ids|prompt_ids|cont_id|text|cnf (clause \d+ term \d+)|doc_ix)(?=:)")


def register(sub) -> None:
    p = sub.add_parser("ngram", help="n-gram queries: count, prob, ntd, infgram-prob, infgram-ntd, search, doc",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ops = p.add_subparsers(dest="op", required=True, metavar="OP", parser_class=sub._parser_class)
    for op, help_ in OPS.items():
        q = ops.add_parser(op, help=help_, description=help_)
        _common(q)
        q.add_argument("text", nargs="?", default=None, metavar="TEXT",
                       help="the query text: its words after a space or at the start of a line (see --exact)")
        q.add_argument("--exact", action="store_true",
                       help="TEXT (and --file / --cnf text) as the token sequence of the text exactly as typed, "
                            "instead of the words wherever they stand")
        q.add_argument("--ids", default=None, metavar="A,B,...", help="the query as comma-separated token ids")
        q.add_argument("--file", type=Path, default=None, metavar="F",
                       help="one query per line (text, or ids with --ids-per-line); prints one JSON object per line")
        q.add_argument("--ids-per-line", action="store_true", help="--file lines are comma-separated token ids")
        if op in ("ntd", "infgram-ntd"):
            q.add_argument("--max-support", type=int, default=1000, metavar="N",
                           help="sample the distribution from at most ~N occurrences (default 1000)")
            q.add_argument("--top", type=int, default=10, metavar="K", help="tokens shown without --json (default 10)")
        if op in ("count", "search"):
            q.add_argument("--cnf", default=None, metavar="EXPR",
                           help='"a AND b OR c": n-grams joined by AND (all, within --max-diff-tokens of each other, '
                                'in one document) of ORs; with --ids, each n-gram is comma-separated ids')
            q.add_argument("--max-clause-freq", type=int, default=50000, metavar="N",
                           help="subsample a clause with more matches (default 50000; count is then approximate)")
            q.add_argument("--max-diff-tokens", type=int, default=100, metavar="N",
                           help="the most tokens between the terms of a CNF match (default 100)")
        if op == "search":
            q.add_argument("--maxnum", type=int, default=1, metavar="N",
                           help="matches drawn, each a different occurrence (default 1)")
            q.add_argument("--max-disp-len", type=int, default=100, metavar="N",
                           help="tokens shown around each match (default 100)")
        q.set_defaults(func=cmd_ngram)
    q = ops.add_parser("doc", help="a document by its index (its id in store.sqlite)")
    _common(q)
    q.add_argument("doc_ix", type=int, metavar="DOC_IX")
    q.add_argument("--max-disp-len", type=int, default=1000, metavar="N", help="tokens shown (default 1000)")
    q.set_defaults(func=cmd_doc)


def _common(q) -> None:
    q.add_argument("--index", type=Path, action="append", metavar="DIR",
                   help="a retrogram index, or a directory of infini-gram shard files; repeat to query several")
    add_server_flag(q, "ngram")
    add_json_flag(q)


def _open(args):
    _check_numbers(args)
    if args.server:   # a running `retrogram serve`: the client has the engine's methods and results
        if args.index:
            raise UserError("--index and --server: give one (the server opens the index)")
        from .client import connect

        return connect(args.server, "ngram")
    if not args.index:
        raise UserError("--index DIR is required (or --server HOST:PORT to ask a running server)")
    from ..ngram import Engine

    return Engine(args.index if len(args.index) > 1 else args.index[0])


def _check_numbers(args) -> None:
    """The numeric flags, named as typed (the engine would name its own arguments)."""
    from ..ngram.engine import LIMITS

    for name, (lo, hi) in LIMITS.items():
        v = getattr(args, name, None)
        if v is not None and not lo <= v <= hi:
            raise UserError(f"--{name.replace('_', '-')} {v}: expected an integer in [{lo:,}, {hi:,}]")
    top = getattr(args, "top", None)
    if top is not None and top < 1:
        raise UserError(f"--top {top}: expected a positive number of tokens to show")


def _name_the_flag(e: UserError, flag: str) -> UserError:
    """An engine's or server's error about the query, its argument name replaced by the flag that gave it."""
    from .client import ServiceError

    def rename(msg: str) -> str:
        m = ENGINE_QUERY_ARGS.match(msg)
        if m is None:
            return msg
        where = f"{flag} {m.group(2)}" if m.group(2) else ("DOC_IX" if m.group(1) == "doc_ix" else flag)
        return where + msg[m.end():]

    if isinstance(e, ServiceError):
        return ServiceError(e.target, e.method, e.code, rename(e.details))
    return UserError(rename(str(e)))


def parse_ids(s: str, what: str = "--ids") -> list[int]:
    try:
        ids = [int(x) for x in s.replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise UserError(f"{what}: expected comma-separated integer token ids, got {s!r}") from None
    if not ids:
        raise UserError(f"{what}: no token ids in {s!r}")
    return ids


def parse_cnf(expr: str, to_forms) -> list[list[list[int]]]:
    """'a AND b OR c' -> [[a], [b, c]] (AND binds looser than OR); to_forms(term) gives the token sequences a
    term stands for, each one more alternative of its clause."""
    clauses = [c.strip() for c in expr.split(" AND ")]
    if not expr.strip() or any(not c for c in clauses):
        raise UserError(f"--cnf: expected terms joined by AND / OR, got {expr!r}")
    cnf = []
    for clause in clauses:
        terms = [t.strip() for t in clause.split(" OR ")]
        if any(not t for t in terms):
            raise UserError(f"--cnf: an empty term in {clause!r}")
        cnf.append([form for t in terms for form in to_forms(t)])
    return cnf


@dataclass
class Query:
    """One query of the command line. forms: the token sequences it stands for (one for ids; for text, the
    words after a space and at a line start, see ngram.engine.text_forms); flag: where it came from."""

    forms: list[list[int]] | None
    cnf: str | None
    as_ids: bool
    flag: str


def _text_forms(engine, args, text: str, flag: str) -> list[list[int]]:
    from ..ngram.engine import text_forms

    try:
        return text_forms(engine.tokenize, text, args.exact)
    except UserError as e:
        raise _name_the_flag(e, flag) from None


def run_query(engine, args, q: Query) -> dict:
    from ..ngram.engine import count_forms, ntd_forms, prob_forms, search_forms

    op = args.op
    if q.cnf is not None:
        to_forms = (lambda t: [parse_ids(t, "--cnf")]) if q.as_ids else (lambda t: _text_forms(engine, args, t, "--cnf"))
        cnf = parse_cnf(q.cnf, to_forms)
        if op == "count":
            out = engine.count_cnf(cnf, args.max_clause_freq, args.max_diff_tokens)
        else:
            out = engine.search_docs_cnf(cnf, args.maxnum, args.max_disp_len, args.max_clause_freq, args.max_diff_tokens)
        return {**out, "cnf": cnf}
    if not q.as_ids and op in ("count", "search", "prob", "ntd"):   # every form of the words, counts added
        if op == "count":
            return count_forms(engine, q.forms)
        if op == "search":
            return search_forms(engine, q.forms, args.maxnum, args.max_disp_len)
        if op == "prob":
            return prob_forms(engine, q.forms)
        return ntd_forms(engine, q.forms, args.max_support)
    ids = q.forms[0]   # ids, or the words as they read mid-line (infgram ops back off along one sequence)
    if op == "count":
        out = engine.count(ids)
    elif op in ("prob", "infgram-prob"):
        fn = engine.prob if op == "prob" else engine.infgram_prob
        out = fn(ids[:-1], ids[-1])
    elif op in ("ntd", "infgram-ntd"):
        fn = engine.ntd if op == "ntd" else engine.infgram_ntd
        out = fn(ids, args.max_support)
    else:
        out = engine.search_docs(ids, args.maxnum, args.max_disp_len)
    return {**out, "tokens": ids}


def _queries(engine, args):
    """The Query of each query the arguments give."""
    cnf = getattr(args, "cnf", None)
    given = sum(x is not None for x in (args.text, args.ids, args.file))
    if cnf is not None:
        if args.text is not None or args.file is not None:
            raise UserError("--cnf: give the expression alone (not with TEXT or --file)")
        yield Query(None, cnf, args.ids is not None or args.ids_per_line, "--cnf")
        return
    if given != 1:
        raise UserError("give exactly one query: TEXT, --ids A,B,... or --file F")
    if args.file is not None:
        if not args.file.is_file():
            raise UserError(f"--file {args.file}: no such file")
        with open(args.file, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                line = line.rstrip("\n")
                if not line.strip():
                    continue
                flag = f"--file {args.file} line {n}"
                if args.ids_per_line:
                    yield Query([parse_ids(line, flag)], None, True, flag)
                else:
                    yield Query(_text_forms(engine, args, line, flag), None, False, flag)
    elif args.ids is not None:
        yield Query([parse_ids(args.ids)], None, True, "--ids")
    else:
        yield Query(_text_forms(engine, args, args.text, "TEXT"), None, False, "TEXT")


def cmd_ngram(args) -> int:
    engine = _open(args)
    for q in _queries(engine, args):
        try:
            out = run_query(engine, args, q)
        except UserError as e:
            raise _name_the_flag(e, q.flag) from None
        if args.json or args.file is not None:
            print_json(out)
        else:
            _print_human(engine, args, out)
    return 0


def _tok(engine, t: int) -> str:
    try:
        return repr(engine.decode([t]))
    except UserError:
        return str(t)


def _ids_text(engine, ids: list[int]) -> str:
    """'comma,separated,ids' and what they decode to: the token ids a query used, shown to the user."""
    try:
        return f"{','.join(map(str, ids))}  {engine.decode(ids)!r}"
    except UserError:   # bare infini-gram shards: no tokenizer
        return ",".join(map(str, ids))


def _print_forms(engine, out: dict) -> None:
    if "forms" in out:   # count: the form's count; prob: cont_cnt / prompt_cnt; ntd: prompt_cnt
        for f in out["forms"]:
            n = f["count"] if "count" in f else f"{f['cont_cnt']} / {f['prompt_cnt']}" if "cont_cnt" in f else f["prompt_cnt"]
            print(f"  {n:>8}  {_ids_text(engine, f['tokens'])}")
    elif "cnf" in out:
        for c, clause in enumerate(out["cnf"]):
            print(("  AND " if c else "      ") + " | ".join(_ids_text(engine, t) for t in clause))


def _print_human(engine, args, out: dict) -> None:
    op = args.op
    approx = " (approximate)" if out.get("approx") else ""
    tokens = f"  tokens {_ids_text(engine, out['tokens'])}" if "tokens" in out else ""
    if op == "count":
        print(f"{out['count']}{tokens}")
        _print_forms(engine, out)
        if approx:
            console.print(f"[yellow]approximate[/]: a clause was subsampled (--max-clause-freq {args.max_clause_freq})")
    elif op in ("prob", "infgram-prob"):
        suffix = f"  suffix_len={out['suffix_len']}" if "suffix_len" in out else ""
        print(f"{out['prob']:.6g}  ({out['cont_cnt']} / {out['prompt_cnt']}){suffix}{tokens}")
        _print_forms(engine, out)
    elif op in ("ntd", "infgram-ntd"):
        suffix = f"  suffix_len={out['suffix_len']}" if "suffix_len" in out else ""
        print(f"prompt_cnt={out['prompt_cnt']}{suffix}{approx}{tokens}")
        _print_forms(engine, out)
        ranked = sorted(out["result_by_token_id"].items(), key=lambda kv: -kv[1]["cont_cnt"])
        for t, r in ranked[:args.top]:
            print(f"{r['prob']:.4f}  {r['cont_cnt']:>8}  {t:>6}  {_tok(engine, t)}")
    else:
        print(f"cnt={out['cnt']}{approx}{tokens}")
        _print_forms(engine, out)
        for idx, d in zip(out["idxs"], out["documents"]):
            text = _decode(engine, d["token_ids"])
            print(f"--- match {idx}: document {d['doc_ix']} ({d['doc_len']} tokens), match at token "
                  f"{d['needle_offset']} of this window")
            print(text)


def _decode(engine, ids: list[int]) -> str:
    try:
        return engine.decode(ids)
    except UserError:
        return ",".join(map(str, ids))


def document_metadata(meta: str):
    """A document's metadata line (JSON in a retrogram index) as an object; a line that is not JSON stays text."""
    meta = meta.strip()
    if not meta:
        return {}
    try:
        return json.loads(meta)
    except json.JSONDecodeError:
        return meta


def cmd_doc(args) -> int:
    engine = _open(args)
    try:
        d = engine.get_doc_by_ix(args.doc_ix, args.max_disp_len)
    except UserError as e:
        raise _name_the_flag(e, "DOC_IX") from None
    meta = document_metadata(d["metadata"])
    if args.json:
        print_json({**d, "metadata": meta, "text": _decode(engine, d["token_ids"])})
        return 0
    print(f"document {d['doc_ix']}: {d['doc_len']} tokens (showing {d['disp_len']})")
    if meta:
        print(json.dumps(meta, ensure_ascii=False) if not isinstance(meta, str) else meta)
    print(_decode(engine, d["token_ids"]))
    sys.stdout.flush()
    return 0
