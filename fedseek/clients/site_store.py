"""The site's own durable privacy history: every DP release this node made, in a SQLite file on
the site (node config `state-dir`, default `$FEDSEEK_HOME/site` or `~/.fedseek/site`), so the
site enforces its lifetime budget across jobs, restarts and coordinators — whatever the
coordinator's ledger says. Written before a reply leaves the node (a reply that is then lost is
still charged: conservative). Standard library only.
"""
from __future__ import annotations

import hashlib
import os
import sqlite3
import time
from functools import lru_cache
from pathlib import Path

from fedseek.privacy.ledger_math import Release

SCHEMA = """CREATE TABLE IF NOT EXISTS releases (
    id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, kind TEXT NOT NULL, scope TEXT NOT NULL,
    sigma REAL NOT NULL, q REAL NOT NULL, steps INTEGER NOT NULL, delta REAL NOT NULL)"""


def store_path(node_config: dict) -> Path:
    home = Path(os.environ.get("FEDSEEK_HOME") or Path.home() / ".fedseek")
    directory = Path(str(node_config.get("state-dir") or home / "site")).expanduser()
    name = str(node_config.get("institution") or "site").replace("/", "_")
    return directory / f"{name}.privacy.db"


class SiteStore:
    """Append-only list of releases; one file per institution node."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute(SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=30, isolation_level="IMMEDIATE")

    def releases(self) -> list[Release]:
        with self._connect() as db:
            rows = db.execute("SELECT scope, sigma, q, steps FROM releases ORDER BY id").fetchall()
        return [Release(scope, sigma, q, steps) for scope, sigma, q, steps in rows]

    def record(self, kind: str, release: Release, delta: float) -> None:
        with self._connect() as db:  # commits on exit; the file survives crashes of the node
            db.execute("INSERT INTO releases (at, kind, scope, sigma, q, steps, delta) VALUES (?,?,?,?,?,?,?)",
                       (time.time(), kind, release.scope, float(release.sigma), float(release.q),
                        int(release.steps), float(delta)))


def file_fingerprint(path: str | Path) -> str:
    """sha256 of the site's data file (cached per path, size and modification time)."""
    stat = Path(path).stat()
    return _fingerprint(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=8)
def _fingerprint(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]
