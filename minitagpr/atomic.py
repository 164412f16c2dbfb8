"""Atomic file writes: a reader (or a run resumed after a kill or a power loss) sees the old file or the whole new
one, never half of one. Folders have their own swaps: exports `model/checkpoint.py`'s `atomic_dir`, training
checkpoints `distributed.save_checkpoint` (a .tmp folder renamed once every rank has written)."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to a temporary file beside `path`, fsync it, then rename it over `path`. The temporary name is
    unique per writer (two processes writing one path never share it) and the file gets the umask's modes (mkstemp's
    would be 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")  # same folder: rename is atomic
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the rename makes them the file
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """`text` as UTF-8, written with `atomic_write_bytes`."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = None) -> Path:
    """`obj` as JSON (non-ASCII kept as is), written with `atomic_write_bytes`."""
    return atomic_write_text(path, json.dumps(obj, ensure_ascii=False, indent=indent))
