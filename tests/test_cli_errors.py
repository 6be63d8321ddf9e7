"""The entry points' error tail: a user's mistake is one line and exit code 2, a bug keeps its traceback.

- Every user error (a bad config value, input file or artifact) is a ``UserError``; the CLI turns
  only those into ``error: ...`` and exit code 2.
- A plain ``ValueError`` from inside the library (a failed shape check, say) is a bug: it propagates
  with its traceback instead of looking like bad input.
- The checks that the audit moved to user-error types raise them with their messages unchanged.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from deftrec.core.artifacts import ArtifactError
from deftrec.core.config import ConfigError
from deftrec.core.errors import UserError
from deftrec.data.readers import InputError

REPO = Path(__file__).resolve().parents[1]


def _cli(*args: str, code: str | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def _shape_bug(*a, **k):
    raise ValueError("shape mismatch")


# ------------------------------------------------------------------ the hierarchy


def test_user_errors_share_one_base_and_keep_their_old_bases():
    from deftrec.data.preprocess import PreprocessError
    from deftrec.training.checkpoint import CheckpointIntegrityError, RunIdentityError

    for cls in (ConfigError, InputError, ArtifactError, PreprocessError, CheckpointIntegrityError, RunIdentityError):
        assert issubclass(cls, UserError), cls
    # `except ValueError` / `except RuntimeError` callers keep working
    assert issubclass(ConfigError, ValueError) and issubclass(InputError, ValueError)
    assert issubclass(ArtifactError, RuntimeError) and issubclass(RunIdentityError, ValueError)
    assert not issubclass(ValueError, UserError)


# ------------------------------------------------------------------ the CLI


def test_user_error_is_one_line_and_exit_code_2(tmp_path):
    r = _cli("pipelines.index", "--run-dir", str(tmp_path / "no_run"))
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no_run/model" in errors[0], r.stderr[-3000:]


@pytest.mark.parametrize("stage,argv,expect", [
    ("train", ["--set", "train.lr=-1"], "train.lr must be"),
    ("synth", ["--out", "{tmp}/s", "--users", "0"], "need users >= 1"),
    ("index", ["--run-dir", "{tmp}/no_run"], "no_run/model"),
    ("evaluate", ["--run-dir", "{tmp}/no_run"], "no complete model export"),
])
def test_user_errors_of_each_entry_point_exit_2(tmp_path, capsys, stage, argv, expect):
    import importlib

    main = importlib.import_module(f"pipelines.{stage}").main
    argv = [a.format(tmp=tmp_path) for a in argv]
    if stage == "train":
        argv = ["--run-dir", str(tmp_path / "run"), *argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expect in err, err


def test_a_bug_keeps_its_traceback_in_process(tmp_path, monkeypatch):
    import deftrec.batch.index_job
    from pipelines.index import main

    monkeypatch.setattr(deftrec.batch.index_job, "run_index_job", _shape_bug)
    with pytest.raises(ValueError, match="shape mismatch"):  # not turned into exit code 2
        main(["--run-dir", str(tmp_path)])


def test_a_bug_keeps_its_traceback_in_a_process(tmp_path):
    code = ("import sys, deftrec.batch.index_job as j\n"
            "def bug(*a, **k):\n    raise ValueError('shape mismatch')\n"
            "j.run_index_job = bug\n"
            "from pipelines.index import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    r = _cli("--run-dir", str(tmp_path), code=code)
    assert r.returncode not in (0, 2), r.stderr[-3000:]
    assert "Traceback" in r.stderr and "ValueError: shape mismatch" in r.stderr
    assert "error: shape mismatch" not in r.stderr


# ------------------------------------------------------------------ the converted checks


def _fake_collab(monkeypatch, d_c: int, n_items: int = 5):
    import deftrec.artifacts.collab
    import deftrec.training.driver

    art = SimpleNamespace(item_emb=np.zeros((n_items, d_c), np.float32), user_emb=np.zeros((3, d_c), np.float32))
    monkeypatch.setattr(deftrec.artifacts.collab, "load_collab", lambda path: art)
    monkeypatch.setattr(deftrec.training.driver, "train_fingerprint", lambda *a: "0" * 16)


@pytest.mark.parametrize("argv,dim_offset,expect", [
    ([], 1, "the collab artifact has d_c="),
    (["--zero-stage", "3", "--set", "condition=hidden_states", "--set", "train.lambda_lm=0.1"], 0,
     "cannot run in lockstep"),
])
def test_train_cross_checks_are_user_errors(tmp_path, capsys, monkeypatch, argv, dim_offset, expect):
    from deftrec.config.pipeline import load_pipeline_config
    from pipelines.train import main

    _fake_collab(monkeypatch, load_pipeline_config(None).model.collab.dim + dim_offset)
    assert main(["--run-dir", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err
    assert expect in err, err


def test_library_checks_raise_the_user_error_types(tmp_path):
    from deftrec.batch.baselines import EASE
    from deftrec.config.model import InferenceConfig
    from deftrec.config.training import TrainConfig
    from deftrec.retrieval.recommender import inference_overrides
    from deftrec.training.checkpoint import RunIdentityError, TrainerState, check_run_identity
    from deftrec.training.dataset import plan_steps

    with pytest.raises(ConfigError, match="give no full optimizer step"):
        plan_steps(3, TrainConfig(batch_size=4), 1)
    with pytest.raises(ConfigError, match="leave 'ease' out of evaluate.baselines"):
        EASE.check_memory(11, available_bytes=100)
    with pytest.raises(ConfigError, match="eval.steps must be set for the ddim sampler"):
        inference_overrides(InferenceConfig(sampler="ddpm", steps=None), sampler="ddim")
    with pytest.raises(RunIdentityError, match=r"runs/x holds a run with a different configuration \(fingerprint "
                       r"a != b\): pass another run name \(--name\) or remove it"):
        check_run_identity(TrainerState(fingerprint="a", inputs={"data": "d", "collab": "c"}), "b",
                           {"data": "d", "collab": "c"}, "runs/x")
    with pytest.raises(RunIdentityError, match=r"changed: data \(artifact d then, e now\)\. Resuming or "
                       r"re-exporting it would mix its weights with the new data/collab embeddings: pass"):
        check_run_identity(TrainerState(fingerprint="a", inputs={"data": "d", "collab": "c"}), "a",
                           {"data": "e", "collab": "c"}, "runs/x")


def test_faiss_settings_are_config_errors():
    pytest.importorskip("faiss")
    from deftrec.config.jobs import IndexConfig
    from deftrec.retrieval.index import build_index

    keys = np.random.default_rng(0).normal(size=(20, 4)).astype(np.float32)
    with pytest.raises(ConfigError, match="invalid FAISS factory string"):
        build_index(keys, IndexConfig(factory="NotAnIndex"))
    with pytest.raises(ConfigError, match=r"cannot train 'IVF64,Flat' on 20 vectors"):
        build_index(keys, IndexConfig(factory="IVF64,Flat"))
