"""Training checkpoints are verified against the checksums recorded at save time before anything is
loaded: a changed, truncated, planted or unlisted file is refused by name and nothing is unpickled.

The DeepSpeed state file here is a real pickle whose loading creates a marker directory (what
``torch.load(weights_only=False)`` in DeepSpeed's loader would run), so "nothing was unpickled" is
observable. Real files, no Ray."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from deftrec.artifacts.model import STATE_FILE, WEIGHTS_FILE
from deftrec.training.checkpoint import (
    CHECKSUM_DIR,
    DS_DIR,
    DS_TAG,
    CheckpointIntegrityError,
    TrainerState,
    read_checkpoint,
    record_checksums,
    verify_checkpoint,
)

FP = "0123456789abcdef"
INPUTS = {"data": "d0d0d0d0d0d0d0d0", "collab": "c0c0c0c0c0c0c0c0"}


class _Payload:
    """Unpickling this creates ``marker`` (stands for arbitrary code run by a tampered pickle)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def _write_rank(directory: Path, rank: int, marker: Path, world: int) -> None:
    """What write_checkpoint leaves on one rank: its DeepSpeed state file(s), rank 0 the weights and
    trainer state, and, last, its checksum list."""
    ds = directory / DS_DIR / DS_TAG
    ds.mkdir(parents=True, exist_ok=True)
    torch.save({"module": _Payload(str(marker)), "rank": rank}, ds / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
    if rank == 0:
        from safetensors.torch import save_file

        save_file({"w": torch.arange(12, dtype=torch.float32).reshape(3, 4)}, str(directory / WEIGHTS_FILE))
        (directory / STATE_FILE).write_text(json.dumps(TrainerState(step=4, fingerprint=FP, inputs=INPUTS,
                                                                   world_size=world).to_json()))
        (directory / DS_DIR / "latest").write_text(DS_TAG)
    record_checksums(directory, rank)


@pytest.fixture
def ckpt(tmp_path) -> tuple[Path, Path]:
    """A two-rank checkpoint, the ranks written in separate folders and merged as Ray's storage does."""
    merged, marker = tmp_path / "checkpoint_00000004", tmp_path / "UNPICKLED"
    for rank in (0, 1):
        part = tmp_path / f"rank{rank}"
        _write_rank(part, rank, marker, world=2)
        for f in part.rglob("*"):
            if f.is_file():
                dst = merged / f.relative_to(part)
                dst.parent.mkdir(parents=True, exist_ok=True)
                dst.write_bytes(f.read_bytes())
    return merged, marker


def _state_file(ckpt_dir: Path, rank: int = 0) -> Path:
    return ckpt_dir / DS_DIR / DS_TAG / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"


def test_intact_checkpoint_verifies_and_reads_without_unpickling(ckpt):
    d, marker = ckpt
    assert sorted(p.name for p in (d / CHECKSUM_DIR).iterdir()) == ["rank-00000.json", "rank-00001.json"]
    state, weights = read_checkpoint(d, FP, INPUTS)
    assert state.step == 4 and state.world_size == 2
    assert torch.equal(weights["w"], torch.arange(12, dtype=torch.float32).reshape(3, 4))
    assert not marker.exists()
    # the payload is live: loading the state the way DeepSpeed does runs it
    torch.load(_state_file(d, 1), weights_only=False)
    assert marker.is_dir()


def _flip_one_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("tamper,culprit,match", [
    (lambda d: _flip_one_byte(_state_file(d, 1)), lambda d: _state_file(d, 1), "sha256"),
    (lambda d: _state_file(d, 0).write_bytes(_state_file(d, 0).read_bytes()[:-7]), lambda d: _state_file(d, 0),
     "bytes"),
    (lambda d: _flip_one_byte(d / WEIGHTS_FILE), lambda d: d / WEIGHTS_FILE, "does not match"),
    (lambda d: _state_file(d, 0).unlink(), lambda d: _state_file(d, 0), "missing"),
    (lambda d: (d / DS_DIR / DS_TAG / "mp_rank_00_model_states.pt").write_bytes(_state_file(d, 0).read_bytes()),
     lambda d: d / DS_DIR / DS_TAG / "mp_rank_00_model_states.pt", "not listed"),
    (lambda d: (d / STATE_FILE).write_text((d / STATE_FILE).read_text().replace('"step": 4', '"step": 5')),
     lambda d: d / STATE_FILE, "does not match"),
])
def test_tampered_checkpoint_is_refused_by_name_before_loading(ckpt, tamper, culprit, match):
    d, marker = ckpt
    tamper(d)
    with pytest.raises(CheckpointIntegrityError, match=match) as e:
        read_checkpoint(d, FP, INPUTS)
    assert str(culprit(d)) in str(e.value)
    assert not marker.exists()


def test_missing_or_incomplete_checksum_lists_are_refused(ckpt):
    d, marker = ckpt
    (d / CHECKSUM_DIR / "rank-00001.json").unlink()
    with pytest.raises(CheckpointIntegrityError, match="not listed"):  # rank 1's files are now unlisted
        verify_checkpoint(d)
    for f in (d / DS_DIR / DS_TAG).glob("zero_pp_rank_1_*"):
        f.unlink()
    with pytest.raises(CheckpointIntegrityError, match=r"ranks \[0\] found, ranks 0..1 expected"):
        verify_checkpoint(d)
    (d / CHECKSUM_DIR / "rank-00000.json").write_text("{not json")
    with pytest.raises(CheckpointIntegrityError, match="unreadable checksum list"):
        verify_checkpoint(d)
    for f in (d / CHECKSUM_DIR).iterdir():
        f.unlink()
    with pytest.raises(CheckpointIntegrityError, match="no recorded checksums|has no recorded"):
        read_checkpoint(d, FP, INPUTS)
    assert not marker.exists()


@pytest.mark.parametrize("changed", [["data"], ["collab"], ["data", "collab"]])
def test_checkpoint_of_other_data_or_collab_is_refused_naming_what_changed(ckpt, changed):
    d, marker = ckpt
    now = {k: ("f" * 16 if k in changed else v) for k, v in INPUTS.items()}
    with pytest.raises(ValueError, match="trained on other input artifacts") as e:
        read_checkpoint(d, FP, now)
    msg = str(e.value)
    for k in ("data", "collab"):
        assert (f"{k} (artifact {INPUTS[k]} then, {'f' * 16} now)" in msg) == (k in changed), msg
    assert str(d) in msg and "--name" in msg
    with pytest.raises(ValueError, match="different configuration"):  # the config is checked first
        read_checkpoint(d, "fedcba9876543210", now)
    assert not marker.exists()


def test_state_without_recorded_inputs_is_never_taken_for_this_run():
    from deftrec.training.checkpoint import check_run_identity

    old = TrainerState.from_json({"step": 3, "fingerprint": FP})  # trainer_state.json of an older version
    assert old.inputs == {}
    with pytest.raises(ValueError, match="does not record which data and collab"):
        check_run_identity(old, FP, INPUTS, "runs/old")
    check_run_identity(TrainerState(fingerprint=FP, inputs=dict(INPUTS)), FP, INPUTS, "runs/same")  # no error
