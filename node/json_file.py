"""JSON files: those that come with a model (one-line errors for bad ones) and our own."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from node.errors import RinginferError


def read_json(path: Path, missing_ok: bool = False) -> dict[str, Any]:
    """The object in `path`; {} for a missing file when `missing_ok` (optional files)."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        if missing_ok:
            return {}
        raise RinginferError(f"{path} not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RinginferError(f"{path} is not valid JSON ({e})") from None


def write_json(path: Path, data: Any) -> None:
    """Write atomically: a reader sees the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)
