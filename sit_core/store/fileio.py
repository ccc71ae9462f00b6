"""Crash-safe file primitives shared by every stage.

Whole files are written to a temp file in the same directory, fsynced, then renamed, so a
reader sees the old file or the new one, never half of one. JSONL logs are appended with
fsync, and a torn last line (a kill mid-append) is detected and dropped on read.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator


_UMASK = os.umask(0)
os.umask(_UMASK)


def fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # some filesystems (Drive's FUSE) refuse directory fds
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; the final file should look like any other
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def jsonl_text(records: Iterable[dict]) -> str:
    """Records as JSONL, serialized as every log is, so a log rewritten whole (a merge of shard
    logs) equals one appended record by record byte for byte."""
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records)


def append_jsonl(path: Path, records: Iterable[dict]) -> int:
    """Append records in one write and fsync. Returns how many were written."""
    records = list(records)
    if not records:
        return 0
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(jsonl_text(records))
        f.flush()
        os.fsync(f.fileno())
    return len(records)


def read_jsonl(path: Path, *, repair: bool = False) -> list[dict]:
    """Read a JSONL file, dropping a torn last line.

    A line that fails to parse anywhere but at the end is real corruption and raises. With
    `repair=True` the torn tail is also cut from the file so later appends start clean.
    """
    path = Path(path)
    if not path.exists():
        return []
    raw = path.read_bytes()
    records: list[dict] = []
    good_bytes = 0
    lines = raw.split(b"\n")
    for i, line in enumerate(lines):
        is_last = i == len(lines) - 1
        if not line.strip():
            if not is_last:
                good_bytes += len(line) + 1
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if is_last or all(not rest.strip() for rest in lines[i + 1 :]):
                break
            from sit_core.errors import CorruptFileError

            raise CorruptFileError(
                f"{path}: line {i + 1} is not valid JSON and is not the last line: the file is corrupt",
                "restore it (from the hub mirror or a backup), or discard its stage with `sit reset RUN_DIR STAGE` "
                "and rerun to recompute it") from None
        if is_last:  # a complete record without its newline: still a torn write
            records.pop()
            break
        good_bytes += len(line) + 1
    if repair and good_bytes != len(raw):
        with open(path, "r+b") as f:
            f.truncate(good_bytes)
            f.flush()
            os.fsync(f.fileno())
    return records


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str).encode()).hexdigest()


def iter_files(root: Path) -> Iterator[Path]:
    """Regular files under root, sorted, skipping temp files of in-flight atomic writes."""
    for p in sorted(Path(root).rglob("*")):
        if p.is_file() and not (p.name.startswith(".") and p.name.endswith(".tmp")):
            yield p
