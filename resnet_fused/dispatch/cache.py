"""The persistent decision cache: one JSON file, so a second run of a program measures nothing.

Where: ``$RESNET_FUSED_CACHE_DIR/dispatch-v1.json``; without the variable, the user cache directory
(``$XDG_CACHE_HOME/resnet_fused``, default ``~/.cache/resnet_fused``). An empty
``RESNET_FUSED_CACHE_DIR`` turns persistence off (decisions then live in the process only).

The file maps a key string (:func:`resnet_fused.dispatch.keys.key_string`: every field that can
change a decision, versions included) to the decision: ``{"chosen", "candidates", "noise",
"measured_at", "fields"}``. Writes are atomic (a temporary file in the same directory, then
``os.replace``) and merge with what other processes wrote meanwhile (read–merge–write under an
advisory lock where the platform has one), so concurrent programs never leave a torn file. A file
that cannot be read or parsed is ignored with one warning and rewritten on the next decision; a
directory that cannot be written costs one warning and persistence, nothing else.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Dict, Optional

ENV_DIR = "RESNET_FUSED_CACHE_DIR"
FILE_NAME = "dispatch-v1.json"
FORMAT = 1
MAX_ENTRIES = 20000  # oldest dropped beyond this: a file that grows without bound is a bug too

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: atomic replace only, no lock
    fcntl = None


def cache_path() -> Optional[Path]:
    """The cache file, or None when persistence is off (``RESNET_FUSED_CACHE_DIR=""``)."""
    env = os.environ.get(ENV_DIR)
    if env is not None:
        return Path(env).expanduser() / FILE_NAME if env.strip() else None
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "resnet_fused" / FILE_NAME


class DecisionFile:
    """Reads and writes :func:`cache_path`'s file (thread-safe; process-safe where fcntl exists)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: Dict[str, dict] = {}
        self._loaded: Optional[Path] = None
        self._warned: set = set()

    def _warn(self, what: str, message: str) -> None:
        if what not in self._warned:
            self._warned.add(what)
            warnings.warn(f"resnet_fused: {message}", RuntimeWarning, stacklevel=5)

    def _read(self, path: Path) -> Dict[str, dict]:
        """The file's entries; {} when it is missing, unreadable or corrupt (warned once)."""
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            self._warn(f"corrupt:{path}", f"ignoring the dispatch cache {path}: it cannot be read "
                                          f"({type(exc).__name__}: {exc}); it will be rewritten")
            return {}
        entries = data.get("entries") if isinstance(data, dict) and data.get("format") == FORMAT else None
        if not isinstance(entries, dict):
            self._warn(f"corrupt:{path}", f"ignoring the dispatch cache {path}: not a format-{FORMAT} "
                                          f"decision file; it will be rewritten")
            return {}
        return {k: v for k, v in entries.items() if _valid(v)}

    def lookup(self, key: str) -> Optional[dict]:
        """The stored decision for ``key``, or None. Re-reads the file on a miss: another process
        may have decided meanwhile."""
        path = cache_path()
        if path is None:
            return None
        with self._lock:
            if self._loaded != path:
                self._entries, self._loaded = self._read(path), path
            hit = self._entries.get(key)
            if hit is None:
                self._entries = self._read(path)
                hit = self._entries.get(key)
            return hit

    def entries(self) -> Dict[str, dict]:
        """A snapshot of every stored decision (read from the file)."""
        path = cache_path()
        if path is None:
            return {}
        with self._lock:
            self._entries, self._loaded = self._read(path), path
            return dict(self._entries)

    def store(self, key: str, entry: dict) -> None:
        """Add ``key`` to the file: read, merge, write a temporary file, replace."""
        path = cache_path()
        if path is None:
            return
        with self._lock:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                with _file_lock(path):
                    entries = self._read(path)
                    entries[key] = entry
                    if len(entries) > MAX_ENTRIES:
                        for old in sorted(entries, key=lambda k: entries[k].get("measured_at", ""))[
                                :len(entries) - MAX_ENTRIES]:
                            del entries[old]
                    fd, tmp = tempfile.mkstemp(prefix=".dispatch-", suffix=".tmp", dir=path.parent)
                    try:
                        with os.fdopen(fd, "w", encoding="utf-8") as f:
                            json.dump({"format": FORMAT, "entries": entries}, f, indent=1, sort_keys=True)
                            f.write("\n")
                        os.replace(tmp, path)
                    except BaseException:
                        with contextlib.suppress(OSError):
                            os.unlink(tmp)
                        raise
                self._entries, self._loaded = entries, path
            except OSError as exc:
                self._warn(f"write:{path}", f"cannot write the dispatch cache {path} ({exc}); decisions "
                                            f"stay in this process only")

    def forget(self) -> None:
        """Drop what was read (the next lookup reads the file again)."""
        with self._lock:
            self._entries, self._loaded = {}, None


def _valid(entry) -> bool:
    return (isinstance(entry, dict) and isinstance(entry.get("chosen"), str)
            and isinstance(entry.get("candidates"), dict))


@contextlib.contextmanager
def _file_lock(path: Path):
    """An exclusive advisory lock on ``path.lock`` (no-op without fcntl)."""
    if fcntl is None:
        yield
        return
    with open(str(path) + ".lock", "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
