"""A daemon's data directory: its stable node id, held by one daemon at a time (and its
shard cache, node/engine/shard_cache.py)."""

from __future__ import annotations

import fcntl
import os
import secrets
from pathlib import Path
from typing import IO

from node.errors import RinginferError

DEFAULT = Path.home() / ".ringinfer"
CACHE_SIZE = 32 << 30  # the shard cache's default limit (node/engine/shard_cache.py)


def cache_dir() -> Path:
    """Where files derived from installed packages and model files are kept, shared by all
    daemons and commands: a packaged model's joined GGUF, a converted tokenizer."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ringinfer"


def claim(path: Path) -> tuple[str, IO]:
    """(node id, lock handle): the id is made on first use and kept; the lock lives as long
    as the handle, so two daemons never share an id by sharing a directory."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        lock = open(path / "daemon.lock", "a+")  # noqa: SIM115 - held for the daemon's life
    except OSError as e:
        raise RinginferError(f"cannot use data dir {path}: {e.strerror}") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.close()
        raise RinginferError(
            f"another daemon is using data dir {path}; give this one its own --data-dir"
        ) from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    id_file = path / "node_id"
    node_id = id_file.read_text().strip() if id_file.exists() else ""
    if not (len(node_id) == 16 and all(c in "0123456789abcdef" for c in node_id)):
        node_id = secrets.token_hex(8)
        id_file.write_text(node_id + "\n")
    return node_id, lock
