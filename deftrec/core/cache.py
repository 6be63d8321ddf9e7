"""Locked cache publishing: build a folder once under a lock, publish it with an atomic rename and
a manifest, reuse it while the manifest says it is valid (converted LLMs, the tiny tokenizer).
Imports no other project module.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

MANIFEST_NAME = "deftrec_manifest.json"


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[bool]:
    """Exclusive inter-process lock (flock), so concurrent workers on one node convert a model only once.

    Yields whether the lock is held: without fcntl, or on file systems that refuse flock, the atomic rename
    alone still keeps the cache consistent (at worst two workers convert the same model).
    """
    try:
        import fcntl
    except ImportError:
        yield False
        return
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        except OSError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _fsync_tree(root: Path) -> None:
    # Data must be on disk before the rename publishes the folder, or a crash could leave a complete-looking
    # folder with truncated files.
    for path in root.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _read_manifest(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None


def materialize_cache_dir(
    final: Path,
    build: Callable[[Path], dict[str, Any]],
    is_valid: Callable[[dict[str, Any]], bool] = lambda manifest: True,
) -> Path:
    """Make sure ``final`` is a complete cache folder, building it atomically if needed.

    A folder counts as complete only when it holds ``MANIFEST_NAME`` (written last) and ``is_valid(manifest)``.
    ``build(tmp)`` fills a fresh temporary sibling folder and returns the manifest; the folder is then fsynced
    and renamed onto ``final`` in one step, so readers see either nothing or a finished folder. Leftover
    ``.tmp-*`` folders of crashed builds are never read, and are removed by the next builder (it holds the
    lock, so nobody else can be writing them).
    """
    final = Path(final)
    manifest = _read_manifest(final)
    if manifest is not None and is_valid(manifest):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(final.parent / f".{final.name}.lock") as locked:
        manifest = _read_manifest(final)
        if manifest is not None and is_valid(manifest):  # another process finished while we waited
            return final
        if locked:  # without the lock a leftover might be another worker's build in progress
            for leftover in final.parent.glob(f".tmp-{final.name}-*"):
                shutil.rmtree(leftover, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
        try:
            manifest = build(tmp)
            (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True))
            _fsync_tree(tmp)
            _publish(tmp, final, is_valid)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def _publish(tmp: Path, final: Path, is_valid: Callable[[dict[str, Any]], bool]) -> None:
    """Rename the finished ``tmp`` onto ``final``; if a concurrent builder got there first, keep theirs.

    Races only happen without the lock (file systems that refuse flock); with it this is a plain rename.
    """

    def published() -> bool:
        manifest = _read_manifest(final)
        return manifest is not None and is_valid(manifest)

    if published():
        shutil.rmtree(tmp, ignore_errors=True)
        return
    if final.exists():  # incomplete or outdated folder: move it aside first, rename needs the name free
        stale = final.parent / f".stale-{final.name}-{uuid.uuid4().hex}"
        with contextlib.suppress(FileNotFoundError):
            os.rename(final, stale)
        shutil.rmtree(stale, ignore_errors=True)
    try:
        os.rename(tmp, final)
    except OSError:
        if not published():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
