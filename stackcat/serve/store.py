"""Reviewers' decisions, durably: ``CorrectionStore`` (SQLite, WAL, ``synchronous=FULL``).

A decision is acknowledged only after its transaction committed, so a
decision the client saw accepted survives a crash or ``kill -9`` of the
server. The export is the CSV that ``stackcat fit --corrections`` reads
(:mod:`stackcat.corrections`): the latest label of each id.

Examples
--------
>>> import tempfile, os
>>> store = CorrectionStore(os.path.join(tempfile.mkdtemp(), "corrections.sqlite"))
>>> store.add("42", "Tshirts", was="Shirts", source="predictions.csv")["id"]
'42'
>>> store.export_csv().splitlines()
['id,label', '42,Tshirts']
"""

from __future__ import annotations

import csv
import io
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS corrections (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL,
    label TEXT NOT NULL,
    was TEXT,
    source TEXT,
    decided_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS corrections_by_id ON corrections (id);
"""


class CorrectionStore:
    """An append-only SQLite log of decisions: (id, label, was, source, time).

    Parameters
    ----------
    path : str or Path
        The database file (created with its folder if missing).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)

    def add(self, product_id: str, label: str, *, was: str | None = None, source: str | None = None) -> dict[str, Any]:
        """Record one decision; returns it once committed (with its sequence number ``seq``)."""
        decided_at = time.time()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                cursor = self._db.execute(
                    "INSERT INTO corrections (id, label, was, source, decided_at) VALUES (?, ?, ?, ?, ?)",
                    (product_id, label, was, source, decided_at))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return {"seq": cursor.lastrowid, "id": product_id, "label": label, "was": was, "source": source,
                "decided_at": decided_at}

    def latest(self) -> dict[str, str]:
        """Each decided id's latest label."""
        with self._lock:
            rows = self._db.execute("SELECT id, label FROM corrections ORDER BY seq").fetchall()
        return dict(rows)

    def export_csv(self) -> str:
        """``id,label``: the latest label of every decided id (the input of ``stackcat fit --corrections``)."""
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["id", "label"])
        writer.writerows(self.latest().items())
        return out.getvalue()

    def close(self) -> None:
        with self._lock:
            self._db.close()


__all__ = ["CorrectionStore"]
