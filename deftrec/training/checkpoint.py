"""deftrec.training.checkpoint: the training checkpoint (layout in :mod:`deftrec.training.driver`).

What a run is (:func:`config_fingerprint` of its config plus :func:`run_inputs`, the identities
of the data and collab artifacts it trains on; :func:`check_run_identity`), what rank 0 records
(:class:`TrainerState`), how a checkpoint directory is written (:func:`write_checkpoint`,
collective) and read back (:func:`read_checkpoint`), and the consolidation of (ZeRO-3
partitioned) weights.

Integrity: DeepSpeed's loader unpickles its state files (``torch.load(weights_only=False)``), so
every rank records the sha256 of each file it wrote (``checksums/rank-NNNNN.json``, written last)
and :func:`read_checkpoint` verifies all of them (:func:`verify_checkpoint`) before anything is
read or loaded. This detects files changed, truncated or planted after they were written; whoever
can write both a file and its checksum list can still run code (see README, "Trust boundary").
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from deftrec.config.model import DeftRecConfig
from deftrec.core.artifacts import (
    ArtifactError,
    artifact_id,
    file_checksums,
    fingerprint,
    sha256_file,
    write_json_atomic,
)
from deftrec.core.config import to_dict

if TYPE_CHECKING:

    from deftrec.model.deftrec import DeftRec
from deftrec.artifacts.model import (
    _BUFFERS,
    _ROWS_PREFIX,
    STATE_FILE,
    WEIGHTS_FILE,
    _frozen_embedding_weights,
)

#: Tag of the DeepSpeed checkpoint inside every Ray checkpoint directory.
DS_TAG = "state"
#: Directory of the (per-rank) DeepSpeed states inside every Ray checkpoint directory.
DS_DIR = "deepspeed"
#: Directory of the per-rank checksum lists inside every Ray checkpoint directory.
CHECKSUM_DIR = "checksums"


class CheckpointIntegrityError(ArtifactError):
    """A checkpoint file does not match the checksum recorded when it was written (or has none)."""


class RunIdentityError(ArtifactError, ValueError):
    """The run under this storage/name was trained with another config, data or collab artifact.
    Still a ValueError, which :func:`check_run_identity` raised before it had its own type."""


#: Metric the checkpoint manager ranks checkpoints by: validation NDCG@10 (primary protocol) on
#: checkpoints taken right after a validation, -1 on the others (so they are dropped first; Ray
#: always keeps the latest one for resume).
SCORE_KEY = "checkpoint_score"


def config_fingerprint(cfg: DeftRecConfig) -> str:
    """Hash of what a resumed run must share with the one that wrote the checkpoint.

    Run-length and bookkeeping fields (epochs, max_steps, patience, log/validation intervals,
    device) and the eval section may change between attempts; the model, the data sampling and the
    optimisation may not. The hash is the project's one rule, :func:`deftrec.core.artifacts.fingerprint`.
    """
    d = to_dict(cfg)
    d.pop("eval", None)
    d.pop("d_llm", None)
    for k in ("epochs", "max_steps", "patience", "log_every", "validate_every", "device"):
        d["train"].pop(k, None)
    for sec in ("collab", "llm"):
        d[sec].pop("device", None)
        d[sec].pop("cache_dir", None)
    return fingerprint(d)


#: The artifacts a training run reads, by the name :func:`run_inputs` and the messages use.
RUN_INPUTS = ("data", "collab")


def run_inputs(data_dir: str | Path, collab_dir: str | Path) -> dict[str, str]:
    """Identities of the artifacts a training run trains on: ``{"data": ..., "collab": ...}``, each
    the :func:`~deftrec.core.artifacts.artifact_id` (fingerprint of the manifest's output checksums)
    of the preprocessed data and of the collaborative (LightGCN) embeddings. Raises ArtifactError
    when either is missing or incomplete."""
    return {"data": artifact_id(data_dir), "collab": artifact_id(collab_dir)}


def check_run_identity(state: TrainerState, expected_fingerprint: str, expected_inputs: dict[str, str],
                       where: str | Path) -> None:
    """Raise :class:`RunIdentityError` unless the run that wrote ``state`` (at ``where``) has this configuration
    and trained on these data and collab artifacts; the message names what changed.

    A checkpoint that records no input identities (written before they were recorded) is refused
    too: nothing tells whether it was trained on the same data.
    """
    if state.fingerprint != expected_fingerprint:
        raise RunIdentityError(f"{where} holds a run with a different configuration (fingerprint "
                               f"{state.fingerprint} != {expected_fingerprint}): pass another run name (--name) "
                               "or remove it")
    if not state.inputs:
        raise RunIdentityError(f"{where} holds a run that does not record which data and collab artifacts it "
                               "was trained on (written by an older version): it cannot be resumed or re-exported "
                               "safely; pass another run name (--name) or remove it")
    changed = [f"{k} (artifact {state.inputs.get(k)} then, {expected_inputs.get(k)} now)"
               for k in RUN_INPUTS if state.inputs.get(k) != expected_inputs.get(k)]
    if changed:
        raise RunIdentityError(f"{where} holds a run trained on other input artifacts; changed: "
                               f"{', '.join(changed)}. Resuming or re-exporting it would mix its weights with the "
                               "new data/collab embeddings: pass another run name (--name) or remove it")


@dataclass
class TrainerState:
    """What rank 0 writes next to the DeepSpeed states (``trainer_state.json``)."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch (0-based)
    samples_in_epoch: int = 0  # samples consumed in the current epoch, all ranks together
    best_score: float = -1.0
    best_step: int | None = None
    bad_validations: int = 0
    lr_decays: int = 0  # validations without a gain so far: the lr is peak x f(step) x plateau_decay ** this
    world_size: int = 1
    zero_stage: int = 2
    precision: str = "fp32"
    fingerprint: str = ""  # config_fingerprint of the run
    inputs: dict[str, str] = field(default_factory=dict)  # run_inputs: the data and collab it trains on
    done: bool = False  # reached its step budget or stopped early (a larger budget continues it)
    stopped_early: bool = False  # patience ran out: never continued
    attempts: int = 1
    validations: list[dict] = field(default_factory=list)
    config: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> TrainerState:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def read_trainer_state(checkpoint_dir: str | Path) -> TrainerState:
    p = Path(checkpoint_dir) / STATE_FILE
    if not p.is_file():
        raise FileNotFoundError(f"{checkpoint_dir}: no {STATE_FILE}; not a DeftRec training checkpoint")
    return TrainerState.from_json(json.loads(p.read_text()))


def read_checkpoint(checkpoint_dir: Path, expected_fingerprint: str,
                    expected_inputs: dict[str, str]) -> tuple[TrainerState, dict[str, torch.Tensor]]:
    """(trainer state, consolidated weights) of a training checkpoint of the run with config
    fingerprint ``expected_fingerprint`` trained on ``expected_inputs`` (:func:`run_inputs`).

    Every file, the DeepSpeed states included, is first checked against the checksums recorded at
    save time (:func:`verify_checkpoint`), so ``engine.load_checkpoint`` afterwards unpickles only
    files this run wrote. Raises :class:`CheckpointIntegrityError` naming a file that does not
    match, :class:`RunIdentityError` (:func:`check_run_identity`) when the checkpoint was written with another
    configuration or on other data or collab artifacts.
    """
    verify_checkpoint(checkpoint_dir)
    old = read_trainer_state(checkpoint_dir)
    check_run_identity(old, expected_fingerprint, expected_inputs, f"checkpoint {checkpoint_dir}")
    from safetensors.torch import load_file

    return old, load_file(str(Path(checkpoint_dir) / WEIGHTS_FILE))


def record_checksums(directory: Path, rank: int) -> None:
    """Write ``checksums/rank-NNNNN.json``: sha256 and size of every file this rank wrote (last step)."""
    files = file_checksums(directory, skip=())
    files = {k: v for k, v in files.items() if not k.startswith(f"{CHECKSUM_DIR}/")}
    (directory / CHECKSUM_DIR).mkdir(exist_ok=True)
    write_json_atomic(directory / CHECKSUM_DIR / f"rank-{rank:05d}.json", {"rank": rank, "files": files})


def verify_checkpoint(checkpoint_dir: str | Path) -> None:
    """Check every file of a training checkpoint against the checksums its ranks recorded.

    Raises :class:`CheckpointIntegrityError` naming the first file that is missing, has another
    size or sha256, or is not listed at all (outside hidden files that Ray may add), and when a
    rank's list is missing. Reads no file other than the JSON lists and hashes.
    """
    root = Path(checkpoint_dir)
    lists = sorted((root / CHECKSUM_DIR).glob("rank-*.json"))
    if not lists:
        raise CheckpointIntegrityError(f"{root}: no {CHECKSUM_DIR}/rank-*.json; the checkpoint has no recorded "
                                       "checksums (written by an older version or tampered with): refusing to "
                                       "load it; start a fresh run (another name)")
    expected: dict[str, list[dict]] = {}
    ranks = set()
    for lst in lists:
        try:
            doc = json.loads(lst.read_text())
            ranks.add(int(doc["rank"]))
            for rel, meta in doc["files"].items():
                expected.setdefault(rel, []).append(meta)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointIntegrityError(f"{lst}: unreadable checksum list ({e})") from None
    for rel, metas in sorted(expected.items()):
        f = root / rel
        if not f.is_file():
            raise CheckpointIntegrityError(f"{f}: listed in {root / CHECKSUM_DIR} but missing")
        size = f.stat().st_size
        if size not in {m.get("bytes") for m in metas}:
            problem = f"{size} bytes, {metas[0].get('bytes')} recorded"
        elif (digest := sha256_file(f)) not in {m.get("sha256") for m in metas}:
            problem = f"sha256 {digest[:12]}..., {str(metas[0].get('sha256'))[:12]}... recorded"
        else:
            continue
        raise CheckpointIntegrityError(f"{f}: does not match the checksum recorded when it was saved ({problem}); "
                                       "it was changed, truncated or corrupted: refusing to load the checkpoint")
    for f in sorted(root.rglob("*")):
        rel = f.relative_to(root).as_posix()
        if f.is_file() and rel not in expected and not rel.startswith(f"{CHECKSUM_DIR}/") and \
                (rel.startswith(f"{DS_DIR}/") or not f.name.startswith(".")):
            raise CheckpointIntegrityError(f"{f}: not listed in {root / CHECKSUM_DIR}; refusing to load a "
                                           "checkpoint with files nobody recorded")
    world = read_trainer_state(root).world_size
    if ranks != set(range(world)):
        raise CheckpointIntegrityError(f"{root}: checksum lists of ranks {sorted(ranks)} found, "
                                       f"ranks 0..{world - 1} expected")


def write_checkpoint(directory: Path, engine: Any, model: DeftRec, state: TrainerState, rank: int) -> None:
    """Write this rank's part of a training checkpoint into ``directory``; every rank must call it.

    Every rank: its DeepSpeed states (``deepspeed/``). Rank 0: the consolidated weights (gathered
    collectively under ZeRO-3) and ``trainer_state.json``. Every rank last: the checksums of the
    files it wrote (:func:`record_checksums`), which :func:`read_checkpoint` verifies.
    """
    engine.save_checkpoint(str(directory / DS_DIR), tag=DS_TAG, exclude_frozen_parameters=True)
    weights = consolidated_state(model, rank)  # collective under ZeRO-3
    if rank == 0:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in weights.items()}, str(directory / WEIGHTS_FILE))
        (directory / STATE_FILE).write_text(json.dumps(state.to_json(), indent=2, default=str))
    record_checksums(directory, rank)


def _is_zero3(p: torch.nn.Parameter) -> bool:
    return hasattr(p, "ds_id")


@contextlib.contextmanager
def _gathered(params: list[torch.nn.Parameter]) -> Iterator[None]:
    """Full values of ZeRO-3 partitioned ``params`` inside the block (collective); no-op otherwise."""
    part = [p for p in params if _is_zero3(p)]
    if not part:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(part, modifier_rank=None):
        yield


def consolidated_state(model: DeftRec, rank: int = 0, chunk_numel: int = 1 << 27) -> dict[str, torch.Tensor]:
    """Full trainable weights, the E/U buffers and the placeholder rows of frozen embeddings, on CPU.

    Under ZeRO-3 parameters are gathered ``chunk_numel`` elements at a time (bounded memory): this
    is collective, every rank must call it; only rank ``0`` gets the tensors (others get {}).
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    out: dict[str, torch.Tensor] = {}
    chunk: list[tuple[str, torch.nn.Parameter]] = []
    size = 0

    def flush() -> None:
        nonlocal chunk, size
        with _gathered([p for _, p in chunk]):
            if rank == 0:
                for n, p in chunk:
                    out[n] = p.detach().cpu().clone()
        chunk, size = [], 0

    for n, p in named:
        chunk.append((n, p))
        size += p.ds_numel if _is_zero3(p) else p.numel()
        if size >= chunk_numel:
            flush()
    if chunk:
        flush()
    ids = torch.tensor(sorted(model.placeholders.all_ids()), dtype=torch.long)
    for kind, w in _frozen_embedding_weights(model).items():
        with _gathered([w]):
            if rank == 0:
                out[f"{_ROWS_PREFIX}{kind}"] = w.detach()[ids.to(w.device)].cpu().clone()
    if rank == 0:
        out[f"{_ROWS_PREFIX}ids"] = ids
        for name in _BUFFERS:
            buf = getattr(model, name)
            if buf is not None:
                out[name] = buf.detach().cpu().clone()
    return out
