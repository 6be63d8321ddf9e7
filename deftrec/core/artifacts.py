"""Artifacts: atomic directories, checksums, manifests and the one fingerprint rule.

Every artifact directory is built under a temporary sibling name and renamed into place only
after its ``manifest.json`` (written last) is complete, so a crash never leaves a directory that
looks finished. Readers call :func:`read_manifest` and trust nothing without ``status: complete``.

"Is this artifact up to date?" has one answer, used by every stage whether it runs alone
(``python -m pipelines.<stage>``) or inside ``pipelines.end_to_end``::

    fingerprint = sha256(canonical JSON of {"config": <the settings the stage reads>,
                                            "inputs": {name: <identity of each input>}})[:16]

An input that is an artifact is identified by :func:`artifact_id` (its manifest's output
checksums); any other file or folder by :func:`input_id` (its content: every file's sha256,
sub-folders included). The stage writes the fingerprint into its manifest and skips its work
when :func:`up_to_date` finds a complete artifact carrying the same one. This module imports no
other project module but :mod:`deftrec.core.errors`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import time
import uuid
from pathlib import Path
from typing import Any, Iterator, Sequence

from deftrec.core.errors import UserError

MANIFEST = "manifest.json"


class ArtifactError(UserError, RuntimeError):
    """An artifact is missing, incomplete or inconsistent."""


def sha256_file(path: str | os.PathLike, bufsize: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


def file_checksums(root: str | os.PathLike, skip: tuple[str, ...] = (MANIFEST,)) -> dict[str, dict]:
    """sha256 and size of every file under ``root``, keyed by posix relative path (sorted)."""
    root = Path(root)
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name not in skip:
            out[p.relative_to(root).as_posix()] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    return out


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as strict JSON (no NaN or infinity) to ``path`` via a temporary sibling and a
    rename. On any error nothing is left behind and ``path`` keeps its old content."""
    path = Path(path)
    try:
        text = json.dumps(obj, indent=2, sort_keys=False, default=_json_default, allow_nan=False)
    except ValueError as e:
        where = _non_finite_key(obj) if "Out of range float" in str(e) else None
        if where is None:
            raise ArtifactError(f"{path}: cannot write it as JSON: {e}") from None
        raise ArtifactError(f"{path}: {where} is not a finite number and JSON has no NaN or "
                            "infinity; nothing was written") from None
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _non_finite_key(obj: Any, where: str = "") -> str | None:
    """The path (``a.b[2]``) of the first non-finite float inside ``obj``, if any."""
    import math

    if isinstance(obj, float) or type(obj).__name__.startswith("float"):
        try:
            return None if math.isfinite(float(obj)) else (where or "<root>")
        except (TypeError, ValueError):
            return None
    if isinstance(obj, dict):
        for k, v in obj.items():
            if (found := _non_finite_key(v, f"{where}.{k}" if where else str(k))) is not None:
                return found
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            if (found := _non_finite_key(v, f"{where}[{i}]")) is not None:
                return found
    return None


def _json_default(o):
    import numpy as np

    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_manifest(directory: str | os.PathLike, require_complete: bool = True,
                  files: Sequence[str] = ()) -> dict:
    """Load ``directory/manifest.json``; raise ArtifactError if absent or not complete, or if any
    of ``files`` is missing (see :func:`require_files`)."""
    p = Path(directory) / MANIFEST
    if not p.is_file():
        raise ArtifactError(f"{directory}: no {MANIFEST}; the artifact is missing or was never finished")
    with open(p, encoding="utf-8") as f:
        m = json.load(f)
    if require_complete and m.get("status") != "complete":
        raise ArtifactError(f"{p}: status is {m.get('status')!r}, not 'complete'")
    require_files(directory, files)
    return m


def require_files(directory: str | os.PathLike, files: Sequence[str]) -> None:
    """Raise ArtifactError naming every one of ``files`` missing under ``directory``. A name may be
    a file or a directory (a partitioned Parquet dataset); a trailing ``/`` requires a directory."""
    root = Path(directory)
    missing = [f for f in files if not ((root / f).is_dir() if f.endswith("/") else (root / f).exists())]
    if missing:
        raise ArtifactError(f"{directory}: complete manifest but missing {missing}")


def is_complete(directory: str | os.PathLike) -> bool:
    try:
        read_manifest(directory)
        return True
    except (ArtifactError, json.JSONDecodeError):
        return False


@contextlib.contextmanager
def atomic_directory(final: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory next to ``final``; on success rename it to ``final``.

    The temporary name starts with a dot and carries the host and pid, so concurrent or crashed
    runs never collide and never look like the artifact. On an exception the temp dir is removed.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists() and not overwrite:
        raise ArtifactError(f"{final} already exists (pass overwrite/--overwrite to replace it)")
    tmp = final.parent / f".{final.name}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if overwrite and final.exists():
        # Move the old artifact aside first: rename is atomic, rmtree is not.
        old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:6]}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        _rename_no_replace(tmp, final)


def _rename_no_replace(tmp: Path, final: Path) -> None:
    """Rename the finished ``tmp`` to ``final`` unless something appeared there meanwhile (a
    concurrent run's artifact): then drop ``tmp`` and raise. A directory renamed onto a non-empty
    directory fails on POSIX (and onto anything on Windows), so the check and the commit are one
    atomic step; ``tmp`` always holds at least its manifest."""
    try:
        os.rename(tmp, final)
    except OSError as e:
        if not final.exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        raise ArtifactError(f"{final} appeared while this run was writing it (a concurrent run?); "
                            "kept it and dropped this run's copy (pass overwrite/--overwrite to "
                            f"replace it) [{e.strerror}]") from None


def finish_manifest(directory: str | os.PathLike, manifest: dict) -> dict:
    """Add output checksums and ``status: complete``, then write the manifest (last step)."""
    manifest = dict(manifest)
    manifest["outputs"] = file_checksums(directory)
    manifest["status"] = "complete"
    manifest["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    write_json_atomic(Path(directory) / MANIFEST, manifest)
    return manifest


def verify_outputs(directory: str | os.PathLike) -> None:
    """Re-hash every output listed in the manifest; raise on any mismatch or missing file."""
    m = read_manifest(directory)
    for rel, meta in m.get("outputs", {}).items():
        p = Path(directory) / rel
        if not p.is_file():
            raise ArtifactError(f"{directory}: output {rel} listed in the manifest is missing")
        if sha256_file(p) != meta["sha256"]:
            raise ArtifactError(f"{directory}: output {rel} does not match its manifest checksum")


def fingerprint(obj: Any) -> str:
    """The project's one hashing rule: sha256 of ``obj`` as canonical JSON, first 16 hex digits."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def artifact_id(directory: str | os.PathLike) -> str:
    """Content identity of a complete artifact: the fingerprint of its output checksums."""
    return fingerprint(read_manifest(directory).get("outputs", {}))


def input_id(path: str | os.PathLike) -> str:
    """Content identity of an input file or folder (every file below it, sub-folders included).

    A file that a complete artifact lists among its outputs is identified by that recorded
    checksum (no re-hashing of a large log); anything else is hashed. Content, not mtime: an
    append inside a folder changes the identity, a ``touch`` does not.
    """
    p = Path(path)
    if p.is_file():
        parent = p.parent
        if (parent / MANIFEST).is_file() and is_complete(parent):
            meta = read_manifest(parent).get("outputs", {}).get(p.name)
            if meta and meta.get("bytes") == p.stat().st_size:
                return meta["sha256"][:16]
        return sha256_file(p)[:16]
    if p.is_dir():
        return fingerprint({k: v["sha256"] for k, v in file_checksums(p).items()})
    raise ArtifactError(f"{p}: input does not exist")


def stage_fingerprint(config: Any, inputs: dict[str, str] | None = None) -> str:
    """Fingerprint of a stage: the settings it reads plus the identities of its inputs."""
    return fingerprint({"config": config, "inputs": dict(inputs or {})})


def up_to_date(directory: str | os.PathLike, fp: str) -> bool:
    """Whether ``directory`` holds a complete artifact whose manifest carries fingerprint ``fp``."""
    if not is_complete(directory):
        return False
    return read_manifest(directory).get("fingerprint") == fp


def artifact_version(directory: str | os.PathLike) -> str:
    """The version string an artifact's manifest declares (what indexes and serving pin
    themselves to), else its :func:`artifact_id`."""
    m = read_manifest(directory)
    return str(m["version"]) if m.get("version") else artifact_id(directory)
