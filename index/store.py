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
    path = Path(index_dir) / STORE
    if not path.is_file():
        raise IndexFormatError(f"{path}: missing document store")
    if readonly:
        import sqlite3

        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
        return sqlite_utils.Database(conn)
    return sqlite_utils.Database(str(path))


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
