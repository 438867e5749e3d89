"""IDX/store.sqlite: one row per document (and, from the chunks stage, per chunk), through sqlite-utils."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

import sqlite_utils

from .errors import IndexFormatError

STORE = "store.sqlite"

DOCUMENTS_SCHEMA = {"id": int, "source": str, "external_id": str, "token_offset": int,
                    "token_len": int, "metadata": str}


def create_store(path: Path) -> sqlite_utils.Database:
    """A new store for a build: journal off, since the whole file is renamed into place only when complete."""
    db = sqlite_utils.Database(str(path))
    db.execute("PRAGMA journal_mode=OFF")
    db.execute("PRAGMA synchronous=OFF")
    db["documents"].create(DOCUMENTS_SCHEMA, pk="id", not_null={"source", "token_offset", "token_len"})
    return db


def metadata_json(metadata: dict[str, Any]) -> str | None:
    """A document's metadata as stored: JSON, or NULL when there is none."""
    return json.dumps(metadata, ensure_ascii=False) if metadata else None


def insert_documents(db: sqlite_utils.Database, rows: Iterable[tuple]) -> None:
    """Rows as (id, source, external_id, token_offset, token_len, metadata JSON), in DOCUMENTS_SCHEMA order.
    Plain executemany: sqlite-utils' per-row conversion costs more than tokenizing on small documents."""
    db.conn.executemany("INSERT INTO documents VALUES (?, ?, ?, ?, ?, ?)", rows)


def open_store(index_dir: Path | str, readonly: bool = True) -> sqlite_utils.Database:
    """store.sqlite, checked to be a whole SQLite database with its documents table (IndexFormatError
    naming the file otherwise: sqlite3 would report a truncated or emptied file only at some later query)."""
    import sqlite3

    path = Path(index_dir) / STORE
    if not path.is_file():
        raise IndexFormatError(f"{path}: missing document store")
    check_store_file(path)
    if readonly:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
        db = sqlite_utils.Database(conn)
    else:
        db = sqlite_utils.Database(str(path))
    try:
        tables = db.table_names()
    except sqlite3.DatabaseError as e:
        raise IndexFormatError(f"{path}: not a readable SQLite database ({e}); {_rebuild(path)}") from None
    if "documents" not in tables:
        raise IndexFormatError(f"{path}: has no documents table; {_rebuild(path)}")
    return db


def check_store_file(path: Path) -> None:
    """The file's size against what its SQLite header says it holds (page size x page count, bytes 16 and
    28 of the header, valid when the change counter at 24 equals the one at 92)."""
    size = path.stat().st_size
    if size == 0:
        raise IndexFormatError(f"{path}: empty (0 bytes); {_rebuild(path)}")
    with open(path, "rb") as f:
        header = f.read(100)
    if len(header) < 100 or not header.startswith(b"SQLite format 3\0"):
        raise IndexFormatError(f"{path}: not an SQLite database ({size} bytes, no SQLite header); {_rebuild(path)}")
    page_size = int.from_bytes(header[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    pages = int.from_bytes(header[28:32], "big")
    if pages and header[24:28] == header[92:96] and size < page_size * pages:
        raise IndexFormatError(f"{path}: truncated ({size:,} bytes; its header says {page_size * pages:,}); "
                               f"{_rebuild(path)}")


def _rebuild(path: Path) -> str:
    return f"rebuild it with `retrogram build-index --out {path.parent}`"


def get_document(db: sqlite_utils.Database, doc_id: int) -> dict[str, Any]:
    """A document's row with its metadata decoded; KeyError if there is none."""
    rows = list(db.query("SELECT * FROM documents WHERE id = ?", [int(doc_id)]))
    if not rows:
        raise KeyError(doc_id)
    row = rows[0]
    row["metadata"] = json.loads(row["metadata"]) if row["metadata"] else {}
    return row


def table_rows(db: sqlite_utils.Database, table: str) -> int:
    return db[table].count if table in db.table_names() else -1
