"""Artifact primitives: a concurrent run's finished artifact is never replaced, JSON is strict and
no temp file survives an error. Real processes and files, no Ray."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from deftrec.core.artifacts import ArtifactError, atomic_directory, finish_manifest, read_manifest, write_json_atomic

REPO = Path(__file__).resolve().parents[1]

# A writer process: enters atomic_directory(overwrite=False), writes its artifact, says "ready",
# then waits for "go" before leaving the block (the commit step).
WRITER = r"""
import sys, time
from pathlib import Path
from deftrec.core.artifacts import ArtifactError, atomic_directory, finish_manifest
final, name, sync = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
try:
    with atomic_directory(final, overwrite=False) as tmp:
        (tmp / "who.txt").write_text(name)
        finish_manifest(tmp, {"kind": "test", "writer": name})
        (sync / f"{name}.ready").touch()
        deadline = time.time() + 60
        while not (sync / f"{name}.go").exists():
            if time.time() > deadline:
                sys.exit(3)
            time.sleep(0.02)
except ArtifactError as e:
    print(e, file=sys.stderr)
    sys.exit(2)
"""


def _start(final: Path, name: str, sync: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WRITER, str(final), name, str(sync)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def test_concurrent_run_cannot_replace_a_finished_artifact(tmp_path):
    """Both writers pass the entry check; the first to commit wins, the second is refused at
    commit with a clear error, and the winner's artifact is intact with no temp dirs left."""
    final, sync = tmp_path / "artifact", tmp_path / "sync"
    sync.mkdir()
    a, b = _start(final, "a", sync), _start(final, "b", sync)
    try:
        _wait_for(sync / "a.ready", a)
        _wait_for(sync / "b.ready", b)
        assert not final.exists()
        (sync / "b.go").touch()
        _, b_err = b.communicate(timeout=60)
        assert b.returncode == 0, b_err
        (sync / "a.go").touch()
        _, a_err = a.communicate(timeout=60)
    finally:
        for p in (a, b):
            if p.poll() is None:
                p.kill()
    assert a.returncode == 2, a_err
    assert "appeared while this run was writing it" in a_err and str(final) in a_err
    assert (final / "who.txt").read_text() == "b"
    assert read_manifest(final)["writer"] == "b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifact", "sync"]


def test_overwrite_still_replaces(tmp_path):
    final = tmp_path / "artifact"
    for name in ("first", "second"):
        with atomic_directory(final, overwrite=True) as tmp:
            (tmp / "who.txt").write_text(name)
            finish_manifest(tmp, {"kind": "test"})
    assert (final / "who.txt").read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifact"]
    with pytest.raises(ArtifactError, match="already exists"):
        with atomic_directory(final):
            pass


@pytest.mark.parametrize("bad,where", [
    ({"metrics": {"ndcg@10": float("nan")}}, "metrics.ndcg@10"),
    ({"history": [{"loss": 1.0}, {"loss": float("inf")}]}, "history[1].loss"),
    ({"x": np.float32("-inf")}, "x"),
])
def test_write_json_atomic_refuses_non_finite_numbers(tmp_path, bad, where):
    path = tmp_path / "out.json"
    write_json_atomic(path, {"old": 1})
    with pytest.raises(ArtifactError) as e:
        write_json_atomic(path, bad)
    assert where in str(e.value) and "finite" in str(e.value)
    assert json.loads(path.read_text()) == {"old": 1}  # the old content is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_write_json_atomic_leaves_no_temp_file_on_error(tmp_path):
    path = tmp_path / "out.json"
    with pytest.raises(TypeError, match="not JSON serialisable"):
        write_json_atomic(path, {"obj": object()})
    with pytest.raises(ArtifactError, match="Circular reference"):
        loop: list = []
        loop.append(loop)
        write_json_atomic(path, loop)
    # an error at the rename step (the target is a directory) also removes the temp file
    (tmp_path / "adir").mkdir()
    (tmp_path / "adir" / "x").write_text("")
    with pytest.raises(OSError):
        write_json_atomic(tmp_path / "adir", {"a": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir"]
    write_json_atomic(path, {"a": 1.5, "n": np.int64(3)})
    assert json.loads(path.read_text()) == {"a": 1.5, "n": 3}
    assert not math.isnan(json.loads(path.read_text())["a"])
