"""deftrec.training.worker: the per-worker Ray Train loop (DeepSpeed steps, validation, checkpoints).

:func:`train_loop_per_worker` reads top to bottom as the canonical Ray Train skeleton::

    set up (context, DeepSpeed engine), restored from ray.train.get_checkpoint()
    per epoch, while every rank still has a full step of ray.train.get_dataset_shard("train"):
        step -> log line when due -> validation when due -> _checkpoint_or_report
    at the epoch end: validation when due -> _checkpoint_or_report

The helpers are module functions over one explicit state object, :class:`_Run`. Every rank takes
every decision from the same values (all-reduced flags and metrics, identical step counters), so
all ranks run the collectives (all-reduces, ZeRO-3 gathers) and ``ray.train.report`` the same
number of times.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from deftrec.config.model import DeftRecConfig
from deftrec.core.config import to_dict

if TYPE_CHECKING:
    import pyarrow as pa

    from deftrec.data.samples import EvalSet, ItemCatalog
    from deftrec.model.deftrec import DeftRec
from deftrec.artifacts.model import load_consolidated
from deftrec.config.training import DistributedConfig
from deftrec.core.log import Log, quiet_worker_logs, rank_zero
from deftrec.training.checkpoint import (
    DS_DIR,
    DS_TAG,
    SCORE_KEY,
    TrainerState,
    read_checkpoint,
    write_checkpoint,
)
from deftrec.training.collectives import (
    all_ranks,
    max_over_ranks,
    mean_over_ranks,
    peak_memory_mb,
)
from deftrec.training.dataset import plan_steps
from deftrec.training.ds_config import build_deepspeed_config, resolve_precision
from deftrec.training.optim import LOSS_PARTS, LossWindow, PlateauScale, step_line
from deftrec.training.validation import (
    _Validator,
    early_stop_line,
    primary_score,
    valid_line,
)


@dataclass
class _WorkerContext:
    """Everything the workers need besides the sample stream (shipped once via the object store)."""

    cfg: DeftRecConfig
    dist: DistributedConfig
    catalog: ItemCatalog
    item_emb: np.ndarray
    user_emb: np.ndarray | None
    valid: EvalSet
    n_samples: int
    fingerprint: str  # config_fingerprint of the run
    inputs: dict[str, str]  # run_inputs: identities of the data and collab artifacts it trains on
    item_counts: np.ndarray | None = None  # training counts per item (diffusion.ce_negative_sampler mixed)


@dataclass
class _Run:
    """One worker's run: what the loop reads (engine, plan) and what it updates (state, bookkeeping)."""

    rank: int
    world: int
    device: torch.device
    cfg: DeftRecConfig  # the model's config (d_llm filled in)
    dist: DistributedConfig
    model: DeftRec
    engine: Any  # deepspeed.DeepSpeedEngine around DeftRecTask(model)
    scheduler: torch.optim.lr_scheduler.LambdaLR
    plateau: PlateauScale  # read by the scheduler; follows state.lr_decays
    validator: _Validator
    state: TrainerState  # what rank 0 checkpoints
    total: int  # optimizer steps of the whole run
    gen: torch.Generator  # diffusion noise of this rank
    say: Log  # rank 0 writes, the others are silent
    callback: Callable[[int, int], None] | None
    last_ckpt_step: int  # step of the latest checkpoint of this attempt (the restored one counts), else -1
    last_valid_step: int  # step of the latest validation (restored history included), else -1
    window: LossWindow = field(default_factory=LossWindow)  # steps since the last log line

    @property
    def per_step(self) -> int:
        """Samples per optimizer step, all ranks together."""
        return self.cfg.train.batch_size * self.cfg.train.grad_accum * self.world


def train_loop_per_worker(config: dict) -> None:
    """Ray Train worker: restore, train with DeepSpeed, validate, checkpoint, report.

    ``config``: ``{"context": ObjectRef[_WorkerContext] | _WorkerContext, "step_callback": callable | None}``.
    ``step_callback(step, rank)`` runs after every optimizer step (monitoring, fault injection).
    """
    import ray
    import ray.train

    quiet_worker_logs()
    ctx = config["context"]
    if isinstance(ctx, ray.ObjectRef):
        ctx = ray.get(ctx)
    checkpoint = ray.train.get_checkpoint()
    with checkpoint.as_directory() if checkpoint is not None else contextlib.nullcontext() as ckpt_dir:
        run = _start(ctx, Path(ckpt_dir) if ckpt_dir is not None else None, config.get("step_callback"))
    # the restored checkpoint is released here: Ray may delete it once newer ones exist
    shard = ray.train.get_dataset_shard("train")
    s = run.state
    stop = s.stopped_early or s.step >= run.total
    run.model.train()
    while not stop and s.epoch < run.cfg.train.epochs:
        for tables, t0 in _full_steps(run, shard):  # ends for all ranks when one runs out of data
            _train_step(run, tables, t0)
            metrics = _log_if_due(run)
            validated = _validation_due(run, epoch_end=False)
            stopped_early = False
            if validated:
                metrics.update(_validate(run))
                stopped_early = _early_stop(run)
            stop = s.done = stopped_early or s.step >= run.total
            _checkpoint_or_report(run, metrics, validated, epoch_end=False)
            if stop:
                break
        if stop:
            break
        s.epoch += 1
        s.samples_in_epoch = 0
        validated = _validation_due(run, epoch_end=True)
        metrics = _validate(run) if validated else {}
        stop = s.done = (validated and _early_stop(run)) or s.epoch >= run.cfg.train.epochs
        _checkpoint_or_report(run, metrics, validated, epoch_end=True)


# --------------------------------------------------------------------------------------------- setup


def _start(ctx: _WorkerContext, ckpt_dir: Path | None, callback: Callable[[int, int], None] | None) -> _Run:
    """This worker's device, config and DeepSpeed engine, restored from ``ckpt_dir`` when given."""
    import ray.train

    tctx = ray.train.get_context()
    rank, world = tctx.get_world_rank(), tctx.get_world_size()
    dist = ctx.dist
    torch.set_num_threads(dist.threads)
    device = _device(dist)
    cfg = ctx.cfg
    precision = resolve_precision(dist.precision, dist.use_gpu)
    say = rank_zero(rank)
    steps_per_epoch, total = plan_steps(ctx.n_samples, cfg.train, world, dist.debug_steps)

    state = TrainerState(world_size=world, zero_stage=dist.zero_stage, precision=precision,
                         fingerprint=ctx.fingerprint, inputs=dict(ctx.inputs), config=to_dict(cfg))
    old, weights, same_layout = None, {}, False
    if ckpt_dir is not None:  # restore first: the old state decides how the model is built and loaded
        old, weights = read_checkpoint(ckpt_dir, ctx.fingerprint, ctx.inputs)
        same_layout = (old.world_size == world and old.zero_stage == dist.zero_stage
                       and old.precision == precision and (ckpt_dir / DS_DIR).is_dir())
        state = dataclasses.replace(old, world_size=world, zero_stage=dist.zero_stage, precision=precision,
                                    attempts=old.attempts + 1, config=to_dict(cfg))
    plateau = PlateauScale(cfg.train.plateau_decay, state.lr_decays)
    model, engine, scheduler, n_llm, n_heads = _build_engine(ctx, cfg, device, world, precision, total, weights,
                                                             same_layout, plateau)
    del weights
    if old is not None:
        if same_layout:
            engine.load_checkpoint(str(ckpt_dir / DS_DIR), tag=DS_TAG, load_module_strict=False)
            say(f"[deftrec] resumed at step {state.step} (epoch {state.epoch + 1}) from {ckpt_dir}")
        else:
            say(f"[deftrec] resumed at step {state.step} (epoch {state.epoch + 1}) from consolidated weights "
                f"in {ckpt_dir}: layout changed (world {old.world_size}->{world}, ZeRO "
                f"{old.zero_stage}->{dist.zero_stage}, {old.precision}->{precision}); optimizer moments reset")
        _set_schedule_step(scheduler, state.step)

    t = cfg.train
    run = _Run(rank=rank, world=world, device=device, cfg=model.cfg, dist=dist, model=model, engine=engine,
               scheduler=scheduler, plateau=plateau, state=state, total=total, say=say, callback=callback,
               validator=_Validator(model, ctx.valid, rank, world, dist.zero_stage == 3, precision, device),
               gen=torch.Generator(device=device).manual_seed(_mix_seed(t.seed, rank, state.step, state.attempts)),
               last_ckpt_step=state.step if ckpt_dir is not None else -1,
               last_valid_step=state.validations[-1]["step"] if state.validations else -1)
    say(f"[deftrec] {ctx.n_samples:,} samples, {len(ctx.valid):,} validation users, {total:,} steps "
        f"(~{steps_per_epoch:,}/epoch, {run.per_step} samples/step = {t.batch_size} x {t.grad_accum} x {world} "
        f"workers), ZeRO-{dist.zero_stage}, {precision}; trainable: llm {n_llm:,}, heads {n_heads:,}")
    return run


def _device(dist: DistributedConfig) -> torch.device:
    if not dist.use_gpu:
        return torch.device("cpu")
    import ray.train.torch

    device = ray.train.torch.get_device()
    torch.cuda.set_device(device)
    return device


def _build_engine(ctx: _WorkerContext, cfg: DeftRecConfig, device: torch.device, world: int, precision: str,
                  total: int, weights: dict[str, torch.Tensor], same_layout: bool, plateau: PlateauScale) -> tuple:
    """(model, DeepSpeed engine, scheduler, trainable LLM params, trainable head params).

    Restored consolidated weights are loaded before ``deepspeed.initialize`` so that ZeRO partitions
    them (the trainable ones only when the DeepSpeed states cannot be restored: another layout).
    """
    if not ctx.dist.use_gpu:  # DeepSpeed would probe for one and warn "Setting accelerator to CPU" per rank
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    from deftrec.model.deftrec import DeftRec, DeftRecTask
    from deftrec.training.optim import build_scheduler

    torch.manual_seed(cfg.train.seed)  # identical initialisation on every rank
    model = DeftRec.from_config(cfg, ctx.item_emb, ctx.user_emb, ctx.catalog)
    if weights:
        load_consolidated(model, weights, trainable=not same_layout)
    n_llm = sum(p.numel() for p in model.param_groups()["llm"])  # before ZeRO-3 partitions them
    n_heads = sum(p.numel() for p in model.param_groups()["heads"])
    model.to(device)
    optimizer = _client_optimizer(model, model.cfg, ctx.dist)
    scheduler = build_scheduler(optimizer, model.cfg, total, plateau)
    task = DeftRecTask(model, item_counts=ctx.item_counts)
    engine, _, _, _ = deepspeed.initialize(model=task, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=build_deepspeed_config(cfg.train, ctx.dist, world, precision),
                                           dist_init_required=False)
    return model, engine, scheduler, n_llm, n_heads


def _client_optimizer(model: DeftRec, cfg: DeftRecConfig, dist: DistributedConfig) -> torch.optim.Optimizer:
    """torch's AdamW over the two groups of :func:`build_optimizer`, or DeepSpeed's CPU/fused Adam on them."""
    from deftrec.training.optim import build_optimizer

    opt = build_optimizer(model, cfg)
    if dist.torch_adam or not (dist.offload_optimizer or dist.use_gpu):
        return opt
    groups = [{k: v for k, v in g.items() if k != "initial_lr"} for g in opt.param_groups]
    wd = cfg.train.weight_decay
    if dist.offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=cfg.train.lr, weight_decay=wd, adamw_mode=True)
    from deepspeed.ops.adam import FusedAdam

    return FusedAdam(groups, lr=cfg.train.lr, weight_decay=wd, adam_w_mode=True)


def _set_schedule_step(scheduler: torch.optim.lr_scheduler.LambdaLR, step: int) -> None:
    """Put a LambdaLR at optimizer step ``step`` (lr = peak x f(step)), e.g. after a resume."""
    scheduler.last_epoch = step - 1
    with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()": intended here
        warnings.simplefilter("ignore")
        scheduler.step()


def _mix_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


# --------------------------------------------------------------------------------------------- steps


def _full_steps(run: _Run, shard: Any) -> Iterator[tuple[list[pa.Table], float]]:
    """This epoch's steps: (``grad_accum`` micro-batch tables, start time), while every rank has a full one.

    Resuming inside an epoch skips the batches already consumed (Ray Data does not replay the
    same rows per rank, only the same number of them).
    """
    s, t = run.state, run.cfg.train
    batches = iter(shard.iter_batches(batch_size=t.batch_size, batch_format="pyarrow", drop_last=True,
                                      local_shuffle_buffer_size=run.dist.shuffle_buffer,
                                      local_shuffle_seed=_mix_seed(t.seed, s.epoch, run.rank)))
    skip = s.samples_in_epoch // run.per_step
    for _ in islice(batches, skip * t.grad_accum):
        pass
    s.samples_in_epoch = skip * run.per_step
    while True:
        t0 = time.perf_counter()  # the window times data loading and steps, not validation/checkpoints
        tables = list(islice(batches, t.grad_accum))
        # some rank ran out: the epoch ends for all
        if not all_ranks(len(tables) == t.grad_accum, run.device, run.world):
            return
        yield tables, t0


def _train_step(run: _Run, tables: list[pa.Table], t0: float) -> None:
    """One optimizer step over the micro-batches (DeepSpeed steps optimizer + scheduler at the boundary)."""
    from deftrec.data.samples import Ragged, TrainingSamples
    from deftrec.training.optim import make_batch

    accum = run.cfg.train.grad_accum
    parts_sum = dict.fromkeys(LOSS_PARTS, 0.0)
    for tb in tables:
        samples = TrainingSamples(tb.column("user").to_numpy().astype(np.int64),
                                  Ragged.from_arrow(tb.column("history")),
                                  tb.column("target").to_numpy().astype(np.int64))
        parts = run.engine(make_batch(run.model, samples, slice(None)), generator=run.gen)
        run.engine.backward(parts["total"])
        run.engine.step()
        for key in LOSS_PARTS:
            parts_sum[key] += float(parts[key].detach()) / accum
    run.state.step += 1
    run.state.samples_in_epoch += run.per_step
    run.window.add(parts_sum, run.per_step, time.perf_counter() - t0)
    if run.callback is not None:
        run.callback(run.state.step, run.rank)


def _log_if_due(run: _Run) -> dict[str, Any]:
    """Every ``log_every`` steps and at the last one: the window's metrics (averaged over ranks) and a line."""
    s = run.state
    if not (s.step % run.cfg.train.log_every == 0 or s.step >= run.total):
        return {}
    means = run.window.means()
    lm, pos, neg, ce, tot = mean_over_ranks([means[k] for k in LOSS_PARTS], run.device, run.world)
    metrics = {"step": s.step, "epoch": s.epoch + 1, "loss": tot, "lm": lm, "pos": pos, "neg": neg, "ce": ce,
               "lr": run.scheduler.get_last_lr()[0], "samples_per_s": run.window.samples_per_s(),
               "peak_memory_mb": max_over_ranks(peak_memory_mb(run.device), run.device, run.world),
               "world_size": run.world}
    run.say(step_line(s.step, run.total, s.epoch + 1, {"lm": lm, "pos": pos, "neg": neg, "ce": ce, "total": tot},
                      metrics["lr"], metrics["samples_per_s"]))
    run.window = LossWindow()
    return metrics


# --------------------------------------------------------------------------------------------- validation


def _validation_due(run: _Run, epoch_end: bool) -> bool:
    """After a step: every ``validate_every`` steps and at the last step. At an epoch end (already
    counted in ``state.epoch``): without ``validate_every``, or at the last epoch, unless this step was
    just validated."""
    s, every = run.state, run.cfg.train.validate_every
    if epoch_end:
        return (every is None or s.epoch >= run.cfg.train.epochs) and run.last_valid_step != s.step
    return s.step >= run.total or (every is not None and s.step % every == 0)


def _validate(run: _Run) -> dict[str, Any]:
    """Validate (collective), record it in the state, track the best score; the metrics to report."""
    s = run.state
    tv = time.perf_counter()
    metrics = run.validator()
    score = primary_score(metrics, run.cfg.eval.exclude_history)
    # lr: the next step's, set before this validation counts towards the plateau decay
    s.validations.append({"step": s.step, "epoch": s.epoch + 1, **metrics, "seconds": time.perf_counter() - tv,
                          "lr": run.scheduler.get_last_lr()[0]})
    run.say(valid_line(s.step, metrics))
    if score > s.best_score:
        s.best_score, s.best_step, s.bad_validations = score, s.step, 0
    else:
        s.bad_validations += 1
        if s.bad_validations % run.cfg.train.plateau_patience == 0:
            s.lr_decays += 1
            run.plateau.plateaus = s.lr_decays
    run.last_valid_step = s.step
    return {**_flatten_valid(metrics), SCORE_KEY: score}


def _early_stop(run: _Run) -> bool:
    """Patience ran out (``train.patience`` validations without a gain): stop for good."""
    s, patience = run.state, run.cfg.train.patience
    if patience is None or s.bad_validations < patience:
        return False
    run.say(early_stop_line(s.step, s.best_score, s.best_step))
    s.stopped_early = True
    return True


def _flatten_valid(metrics: dict[str, dict[str, float]]) -> dict[str, float]:
    out = {}
    for protocol, values in metrics.items():
        tag = "valid" if protocol == "history_excluded" else "valid_kept"
        for k, v in values.items():
            out[f"{tag}_{k}"] = float(v)
    return out


# --------------------------------------------------------------------------------------------- reporting


def _checkpoint_or_report(run: _Run, metrics: dict[str, Any], validated: bool, epoch_end: bool) -> None:
    """The one decision: checkpoint (with ``metrics``), report ``metrics`` alone, or nothing.

    Checkpoint after every validation; after a step also every ``checkpoint_every`` steps and when
    the run is done; at an epoch end whenever the state moved on since the last checkpoint. Otherwise
    a log line's metrics are reported without a checkpoint. Checkpoints carry ``step``, ``epoch`` and
    the score key (the validation's, or -1 so the checkpoint manager drops them first).
    """
    s, every = run.state, run.dist.checkpoint_every
    if epoch_end:
        due = validated or s.step != run.last_ckpt_step
    else:
        due = validated or s.done or (every is not None and s.step % every == 0)
    if due:
        metrics = {**metrics, "step": s.step, "epoch": s.epoch if epoch_end else s.epoch + 1}
        metrics.setdefault(SCORE_KEY, -1.0)
        _save_and_report(run, metrics)
        run.last_ckpt_step = s.step
    elif metrics:
        import ray.train

        ray.train.report(metrics)


def _save_and_report(run: _Run, metrics: dict[str, Any]) -> None:
    """Write the checkpoint on every rank (ZeRO-3 consolidation is collective) and report it."""
    import ray.train

    with tempfile.TemporaryDirectory(prefix="deftrec-ckpt-") as tmp:
        write_checkpoint(Path(tmp), run.engine, run.model, run.state, run.rank)
        name = f"checkpoint_{run.state.step:08d}_{uuid.uuid4().hex[:6]}"  # rank 0's name is used by all
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=name)
