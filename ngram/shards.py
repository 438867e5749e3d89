"""infini-gram's v4 shard layout, as files in one directory (IDX/ngram/ in a retrogram index):

    tokenized.K   the shard's documents, each prefixed by the separator (the largest value of the token
                  width: 0xff, 0xffff or 0xffffffff), token ids little-endian, u8/u16/u32
    table.K       the suffix array: for every token position, in the byte order of the suffixes starting
                  there, its byte offset in tokenized.K as a `ptr_size`-byte little-endian integer, with
                  ptr_size = ceil(log2(size of tokenized.K) / 8), the smallest width that holds any offset
    offset.K      u64 [documents]: the byte offset of each document's separator in tokenized.K
    metadata.K    optional: one JSON line per document
    metaoff.K     optional (with metadata.K): u64 [documents], each line's byte offset

Shard K holds the documents after those of shards 0..K-1, so a document's global index is the same in
every engine that opens the directory. This module opens and validates shards (memory-mapped, read-only).
"""

from __future__ import annotations

import math
import mmap
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..index.errors import IndexFormatError
from ..index.tokenizer import TOKEN_DTYPES
from . import suffix_array
from .suffix_array import (BK_ADDR, BK_BYTES, DOC_CNT, DS_ADDR, DS_SIZE, MT_ADDR, MT_SIZE, OD_ADDR, OM_ADDR,
                           PTR_SIZE, SA_ADDR, TABLE_COLUMNS, TOK_CNT)

NGRAM_DIR = "ngram"   # a retrogram index keeps its shards in IDX/ngram/
DTYPE_NAMES = {f"u{8 * w}": w for w in TOKEN_DTYPES}   # infini-gram's token_dtype names: 'u8' -> 1 byte
SHARD_FILE = re.compile(r"^(tokenized|table|offset|metadata|metaoff)\.(\d+)$")


def separator(width: int) -> int:
    return (1 << (8 * width)) - 1


def pointer_size(ds_size: int) -> int:
    """Bytes per suffix-array entry: ceil(log2(ds_size) / 8), as infini-gram's indexer computes it."""
    return max(1, math.ceil(math.log2(max(ds_size, 2)) / 8))


def _map(path: Path) -> np.ndarray:
    """A read-only uint8 view of a whole file (an empty array for an empty file)."""
    size = path.stat().st_size
    if size == 0:
        return np.zeros(0, np.uint8)
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    if hasattr(mm, "madvise"):
        mm.madvise(mmap.MADV_RANDOM)   # binary searches: don't read ahead
    return np.frombuffer(mm, dtype=np.uint8)


@dataclass
class Shard:
    """One shard's mapped files."""

    dir: Path
    k: int
    width: int
    ds: np.ndarray                 # tokenized.K bytes
    sa: np.ndarray                 # table.K bytes
    od: np.ndarray                 # offset.K bytes
    mt: np.ndarray | None = None   # metadata.K bytes
    om: np.ndarray | None = None   # metaoff.K bytes
    tokens: np.ndarray = field(init=False)    # tokenized.K as token ids
    offsets: np.ndarray = field(init=False)   # offset.K as u64
    buckets: np.ndarray | None = field(init=False, default=None)   # suffix_array.prefix_buckets, on first use

    def __post_init__(self):
        self.tokens = self.ds.view(TOKEN_DTYPES[self.width])
        self.offsets = self.od.view(np.uint64)

    @property
    def tok_cnt(self) -> int:
        return len(self.ds) // self.width

    @property
    def doc_cnt(self) -> int:
        return len(self.od) // 8

    @property
    def ptr_size(self) -> int:
        return len(self.sa) // self.tok_cnt

    def table_row(self) -> list[int]:
        row = [0] * TABLE_COLUMNS
        row[DS_ADDR], row[DS_SIZE] = self.ds.ctypes.data, len(self.ds)
        row[SA_ADDR], row[PTR_SIZE], row[TOK_CNT] = self.sa.ctypes.data, self.ptr_size, self.tok_cnt
        row[OD_ADDR], row[DOC_CNT] = self.od.ctypes.data, self.doc_cnt
        if self.mt is not None and len(self.mt):
            row[MT_ADDR], row[MT_SIZE], row[OM_ADDR] = self.mt.ctypes.data, len(self.mt), self.om.ctypes.data
        if self.buckets is None:
            self.buckets = suffix_array.prefix_buckets(self.ds, self.sa, self.ptr_size, self.tok_cnt,
                                                       suffix_array.bucket_bytes(self.width))
        row[BK_ADDR], row[BK_BYTES] = self.buckets.ctypes.data, suffix_array.bucket_bytes(self.width)
        return row


def shard_ids(directory: Path) -> list[int]:
    """The shard numbers K present in a directory (by their tokenized.K files), ascending."""
    return sorted(int(m.group(2)) for p in directory.iterdir()
                  if (m := SHARD_FILE.match(p.name)) and m.group(1) == "tokenized")


def infer_width(directory: Path, k: int) -> int:
    """The token width of an infini-gram shard written by its indexer (or ours): the one for which the
    table size is tok_cnt * pointer_size(ds_size) and the file starts with that width's separator."""
    ds_path, sa_path = directory / f"tokenized.{k}", directory / f"table.{k}"
    ds_size, sa_size = ds_path.stat().st_size, sa_path.stat().st_size
    with open(ds_path, "rb") as f:
        head = f.read(4)
    for width in (2, 1, 4):
        if ds_size % width or head[:width] != b"\xff" * width:
            continue
        if sa_size == (ds_size // width) * pointer_size(ds_size):
            return width
    for width in (4, 2, 1):   # a damaged table: guess from the separator, and let open_shard name the file
        if ds_size % width == 0 and head[:width] == b"\xff" * width:
            return width
    raise IndexFormatError(f"{ds_path}: cannot tell its token width (u8/u16/u32) from its size ({ds_size} bytes), "
                           f"{sa_path.name}'s ({sa_size} bytes) and its first separator; pass token_dtype")


def open_shard(directory: Path, k: int, width: int) -> Shard:
    """Map shard k of `directory` and check that its files agree with each other and with `width`."""
    paths = {name: directory / f"{name}.{k}" for name in ("tokenized", "table", "offset", "metadata", "metaoff")}
    for name in ("tokenized", "table", "offset"):
        if not paths[name].is_file():
            raise IndexFormatError(f"{paths[name]}: missing (shard {k} of {directory})")
    ds_size = paths["tokenized"].stat().st_size
    if ds_size == 0 or ds_size % width:
        raise IndexFormatError(f"{paths['tokenized']}: {ds_size} bytes, not a whole number of u{8 * width} tokens")
    tok_cnt = ds_size // width
    sa_size = paths["table"].stat().st_size
    if sa_size == 0 or sa_size % tok_cnt or not 1 <= sa_size // tok_cnt <= 8:
        raise IndexFormatError(f"{paths['table']}: {sa_size} bytes for {tok_cnt} tokens; truncated, or the shard "
                               f"is not of u{8 * width} tokens")
    if sa_size // tok_cnt < pointer_size(ds_size):
        raise IndexFormatError(f"{paths['table']}: {sa_size // tok_cnt}-byte pointers cannot address "
                               f"{paths['tokenized'].name} ({ds_size} bytes); the shard is not of u{8 * width} tokens")
    od_size = paths["offset"].stat().st_size
    if od_size == 0 or od_size % 8:
        raise IndexFormatError(f"{paths['offset']}: {od_size} bytes, not a whole number of u64 document offsets")
    has_meta = paths["metadata"].is_file()
    if has_meta != paths["metaoff"].is_file():
        raise IndexFormatError(f"{directory}: shard {k} has one of metadata.{k} / metaoff.{k} without the other")
    if has_meta and paths["metaoff"].stat().st_size != od_size:
        raise IndexFormatError(f"{paths['metaoff']}: {paths['metaoff'].stat().st_size} bytes, expected {od_size} "
                               f"(one u64 per document of offset.{k})")
    shard = Shard(directory, k, width, _map(paths["tokenized"]), _map(paths["table"]), _map(paths["offset"]),
                  _map(paths["metadata"]) if has_meta else None, _map(paths["metaoff"]) if has_meta else None)
    sep = separator(width)
    offs = shard.offsets
    if offs[0] != 0 or np.any(offs[1:] <= offs[:-1]) or int(offs[-1]) >= ds_size or np.any(offs % width):
        raise IndexFormatError(f"{paths['offset']}: document offsets are not increasing token offsets within "
                               f"{paths['tokenized'].name} ({ds_size} bytes)")
    if np.any(shard.tokens[(offs // width).astype(np.int64)] != sep):
        raise IndexFormatError(f"{paths['tokenized']}: a document of offset.{k} does not start with the separator "
                               f"{sep:#x}; the shard is not of u{8 * width} tokens, or its files do not belong together")
    if has_meta:
        moffs = shard.om.view(np.uint64)
        if np.any(moffs[1:] < moffs[:-1]) or (len(moffs) and int(moffs[-1]) > len(shard.mt)):
            raise IndexFormatError(f"{paths['metaoff']}: offsets do not fit {paths['metadata'].name} ({len(shard.mt)} bytes)")
    return shard


def open_shards(directory: Path, width: int | None) -> tuple[list[Shard], int]:
    """Every shard of a directory of infini-gram v4 files; the width is inferred when None."""
    directory = Path(directory)
    if not directory.is_dir():
        raise IndexFormatError(f"{directory}: no such directory")
    ks = shard_ids(directory)
    if not ks:
        raise IndexFormatError(f"{directory}: no tokenized.K files; not an infini-gram index or a retrogram "
                               "index with its 'ngram' stage")
    if ks != list(range(len(ks))):
        raise IndexFormatError(f"{directory}: shards {ks} are not numbered 0..{len(ks) - 1}; one is missing")
    if width is None:
        width = infer_width(directory, ks[0])
    return [open_shard(directory, k, width) for k in ks], width


def shard_table(shards: list[Shard]) -> np.ndarray:
    return np.array([s.table_row() for s in shards], dtype=np.int64).reshape(len(shards), suffix_array.TABLE_COLUMNS)

