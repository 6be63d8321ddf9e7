"""deftrec.training.worker."""

from __future__ import annotations
import contextlib
import dataclasses
import json
import resource
import tempfile
import time
import uuid
import warnings
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any
import numpy as np
import torch
from deftrec.config.model import DeftRecConfig
from deftrec.core.config import to_dict
if TYPE_CHECKING:

    from deftrec.data.samples import ItemCatalog, EvalSet
    from deftrec.model.deftrec import DeftRec
from deftrec.training.checkpoint import DS_DIR
from deftrec.training.checkpoint import DS_TAG
from deftrec.config.training import DistributedConfig
from deftrec.training.checkpoint import SCORE_KEY
from deftrec.training.checkpoint import STATE_FILE
from deftrec.training.checkpoint import TrainerState
from deftrec.training.checkpoint import WEIGHTS_FILE
from deftrec.training.validation import _Validator
from deftrec.core.log import _stdout_line
from deftrec.training.ds_config import build_deepspeed_config
from deftrec.training.checkpoint import consolidated_state
from deftrec.artifacts.model import load_consolidated
from deftrec.training.dataset import plan_steps
from deftrec.training.checkpoint import read_trainer_state
from deftrec.training.ds_config import resolve_precision
from deftrec.training.validation import _primary


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
    fingerprint: str


def _mix_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _flatten_valid(metrics: dict[str, dict[str, float]]) -> dict[str, float]:
    out = {}
    for protocol, values in metrics.items():
        tag = "valid" if protocol == "history_excluded" else "valid_kept"
        for k, v in values.items():
            out[f"{tag}_{k}"] = float(v)
    return out


def _client_optimizer(model: DeftRec, cfg: DeftRecConfig, dist: DistributedConfig) -> torch.optim.Optimizer:
    """train_local's AdamW (two groups), or DeepSpeed's CPU/fused Adam on the same groups."""
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


def train_loop_per_worker(config: dict) -> None:
    """Ray Train worker: restore, train with DeepSpeed, validate, checkpoint, report.

    ``config``: ``{"context": ObjectRef[_WorkerContext] | _WorkerContext, "step_callback": callable | None}``.
    ``step_callback(step, rank)`` runs after every optimizer step (monitoring, fault injection).
    """
    import deepspeed
    import ray
    import ray.train
    import torch.distributed as tdist

    from deftrec.data.samples import Ragged, TrainingSamples
    from deftrec.model.deftrec import DeftRec, DeftRecTask
    from deftrec.training.optim import build_scheduler, make_batch

    ctx = config["context"]
    if isinstance(ctx, ray.ObjectRef):
        ctx = ray.get(ctx)
    callback = config.get("step_callback")
    tctx = ray.train.get_context()
    rank, world = tctx.get_world_rank(), tctx.get_world_size()
    dcfg: DistributedConfig = ctx.dist
    torch.set_num_threads(dcfg.threads)
    if dcfg.use_gpu:
        device = ray.train.torch.get_device()
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    cfg = dataclasses.replace(ctx.cfg, train=dataclasses.replace(ctx.cfg.train, device=str(device)))
    t = cfg.train
    precision = resolve_precision(dcfg.precision, dcfg.use_gpu)
    say = _stdout_line if rank == 0 else (lambda s: None)
    spe_est, total = plan_steps(ctx.n_samples, t, world, dcfg.debug_steps)

    with contextlib.ExitStack() as stack:
        # -- restore first: the state decides how the model is built and what is loaded
        state = TrainerState(world_size=world, zero_stage=dcfg.zero_stage, precision=precision,
                             fingerprint=ctx.fingerprint, config=to_dict(cfg))
        ckpt = ray.train.get_checkpoint()
        ckpt_dir: Path | None = None
        weights: dict[str, torch.Tensor] = {}
        same_layout = False
        if ckpt is not None:
            ckpt_dir = Path(stack.enter_context(ckpt.as_directory()))
            old = read_trainer_state(ckpt_dir)
            if old.fingerprint != ctx.fingerprint:
                raise ValueError(f"checkpoint {ckpt_dir} was written with a different configuration "
                                 f"(fingerprint {old.fingerprint} != {ctx.fingerprint}); use another run name")
            from safetensors.torch import load_file

            weights = load_file(str(ckpt_dir / WEIGHTS_FILE))
            same_layout = (old.world_size == world and old.zero_stage == dcfg.zero_stage
                           and old.precision == precision and (ckpt_dir / DS_DIR).is_dir())
            state = dataclasses.replace(old, world_size=world, zero_stage=dcfg.zero_stage, precision=precision,
                                        attempts=old.attempts + 1, config=to_dict(cfg))

        torch.manual_seed(t.seed)  # identical initialisation on every rank
        model = DeftRec.from_config(cfg, ctx.item_emb, ctx.user_emb, ctx.catalog)
        cfg = model.cfg
        if weights:
            load_consolidated(model, weights, trainable=not same_layout)
        n_llm = sum(p.numel() for p in model.param_groups()["llm"])  # before ZeRO-3 partitions them
        n_heads = sum(p.numel() for p in model.param_groups()["heads"])
        model.to(device)
        task = DeftRecTask(model)
        optimizer = _client_optimizer(model, cfg, dcfg)
        scheduler = build_scheduler(optimizer, cfg, total)
        ds_config = build_deepspeed_config(t, dcfg, world, precision)
        engine, _, _, _ = deepspeed.initialize(model=task, optimizer=optimizer, lr_scheduler=scheduler,
                                               config=ds_config, dist_init_required=False)
        if ckpt_dir is not None:
            if same_layout:
                engine.load_checkpoint(str(ckpt_dir / DS_DIR), tag=DS_TAG, load_module_strict=False)
                say(f"[deftrec] resumed at step {state.step} (epoch {state.epoch + 1}) from {ckpt_dir}")
            else:
                say(f"[deftrec] resumed at step {state.step} (epoch {state.epoch + 1}) from consolidated weights "
                    f"in {ckpt_dir}: layout changed (world {old.world_size}->{world}, ZeRO "
                    f"{old.zero_stage}->{dcfg.zero_stage}, {old.precision}->{precision}); optimizer moments reset")
            _set_schedule_step(scheduler, state.step)
        del weights
        stack.close()  # release the restored checkpoint: Ray may delete it once newer ones exist

        zero3 = dcfg.zero_stage == 3
        validator = _Validator(model, ctx.valid, rank, world, zero3, precision, device)
        micro, accum = t.batch_size, t.grad_accum
        per_step = micro * accum * world
        gen = torch.Generator(device=device).manual_seed(_mix_seed(t.seed, rank, state.step, state.attempts))
        shard = ray.train.get_dataset_shard("train")
        say(f"[deftrec] {ctx.n_samples:,} samples, {len(ctx.valid):,} validation users, {total:,} steps "
            f"(~{spe_est:,}/epoch, {per_step} samples/step = {micro} x {accum} x {world} workers), ZeRO-"
            f"{dcfg.zero_stage}, {precision}; trainable: llm {n_llm:,}, heads {n_heads:,}")

        def all_ranks(flag: bool) -> bool:
            v = torch.tensor([1 if flag else 0], device=device)
            if world > 1:
                tdist.all_reduce(v, op=tdist.ReduceOp.MIN)
            return bool(v.item())

        def mean_over_ranks(values: list[float]) -> list[float]:
            v = torch.tensor(values, dtype=torch.float64, device=device)
            if world > 1:
                tdist.all_reduce(v)
                v /= world
            return v.tolist()

        def peak_mb() -> float:
            v = torch.tensor([_peak_memory_mb(device)], dtype=torch.float64, device=device)
            if world > 1:
                tdist.all_reduce(v, op=tdist.ReduceOp.MAX)
            return float(v.item())

        def checkpoint_and_report(metrics: dict[str, Any]) -> None:
            with tempfile.TemporaryDirectory(prefix="deftrec-ckpt-") as tmp_name:
                tmp = Path(tmp_name)
                engine.save_checkpoint(str(tmp / DS_DIR), tag=DS_TAG, exclude_frozen_parameters=True)
                w = consolidated_state(model, rank)  # collective under ZeRO-3
                if rank == 0:
                    from safetensors.torch import save_file

                    save_file({k: v.contiguous() for k, v in w.items()}, str(tmp / WEIGHTS_FILE))
                    (tmp / STATE_FILE).write_text(json.dumps(state.to_json(), indent=2, default=str))
                name = f"checkpoint_{state.step:08d}_{uuid.uuid4().hex[:6]}"  # rank 0's name is used by all
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(tmp)),
                                 checkpoint_dir_name=name)

        def validate() -> dict[str, Any]:
            tv = time.perf_counter()
            metrics = validator()
            score = _primary(metrics, cfg.eval.exclude_history)
            state.validations.append({"step": state.step, "epoch": state.epoch + 1, **metrics,
                                      "seconds": time.perf_counter() - tv})
            ex, kept = metrics["history_excluded"], metrics["history_kept"]
            say(f"[deftrec] valid step {state.step}: HR@10 {ex['hr@10']:.4f} NDCG@10 {ex['ndcg@10']:.4f} (history "
                f"excluded) | HR@10 {kept['hr@10']:.4f} NDCG@10 {kept['ndcg@10']:.4f} (kept)")
            if score > state.best_score:
                state.best_score, state.best_step, state.bad_validations = score, state.step, 0
            else:
                state.bad_validations += 1
            return {**_flatten_valid(metrics), SCORE_KEY: score}

        def early_stop() -> bool:
            if t.patience is not None and state.bad_validations >= t.patience:
                say(f"[deftrec] early stop at step {state.step}: best NDCG@10 {state.best_score:.4f} "
                    f"at step {state.best_step}")
                state.stopped_early = True
                return True
            return False

        # Training-time window for samples/s: data loading and steps only, not validation/checkpoints.
        win = {"sums": [0.0, 0.0, 0.0, 0.0], "n": 0, "samples": 0, "seconds": 0.0}
        last_ckpt_step = state.step if ckpt_dir is not None else -1
        last_valid_step = state.validations[-1]["step"] if state.validations else -1
        stop = state.stopped_early or state.step >= total
        model.train()
        while not stop and state.epoch < t.epochs:
            epoch_seed = _mix_seed(t.seed, state.epoch, rank)
            batches = iter(shard.iter_batches(batch_size=micro, batch_format="pyarrow", drop_last=True,
                                              local_shuffle_buffer_size=dcfg.shuffle_buffer,
                                              local_shuffle_seed=epoch_seed))
            skip = state.samples_in_epoch // per_step
            for _ in islice(batches, skip * accum):  # resume inside an epoch: skip what was consumed
                pass
            state.samples_in_epoch = skip * per_step
            while not stop:
                t0 = time.perf_counter()
                tables = list(islice(batches, accum))
                if not all_ranks(len(tables) == accum):  # some rank ran out: the epoch ends for all
                    break
                sums = [0.0, 0.0, 0.0, 0.0]
                for tb in tables:
                    samples = TrainingSamples(tb.column("user").to_numpy().astype(np.int64),
                                              Ragged.from_arrow(tb.column("history")),
                                              tb.column("target").to_numpy().astype(np.int64))
                    batch = make_batch(model, samples, slice(None))
                    parts = engine(batch, generator=gen)
                    engine.backward(parts["total"])
                    engine.step()  # DeepSpeed steps optimizer + scheduler at the accumulation boundary
                    for i, key in enumerate(("lm", "pos", "neg", "total")):
                        sums[i] += float(parts[key].detach()) / accum
                state.step += 1
                state.samples_in_epoch += per_step
                win["sums"] = [a + b for a, b in zip(win["sums"], sums)]
                win["n"] += 1
                win["samples"] += per_step
                win["seconds"] += time.perf_counter() - t0
                if callback is not None:
                    callback(state.step, rank)
                final = state.step >= total
                metrics: dict[str, Any] = {}
                if state.step % t.log_every == 0 or final:
                    lm, pos, neg, tot = mean_over_ranks([s / win["n"] for s in win["sums"]])
                    metrics = {"step": state.step, "epoch": state.epoch + 1, "loss": tot, "lm": lm, "pos": pos,
                               "neg": neg, "lr": scheduler.get_last_lr()[0],
                               "samples_per_s": win["samples"] / max(win["seconds"], 1e-9),
                               "peak_memory_mb": peak_mb(), "world_size": world}
                    say(f"[deftrec] step {state.step}/{total} epoch {state.epoch + 1} loss {tot:.4f} (lm {lm:.3f} "
                        f"pos {pos:.4f} neg {neg:.4f}) lr {metrics['lr']:.2e} {metrics['samples_per_s']:.1f} "
                        f"samples/s")
                    win.update(sums=[0.0, 0.0, 0.0, 0.0], n=0, samples=0, seconds=0.0)
                validated = final or (t.validate_every is not None and state.step % t.validate_every == 0)
                if validated:
                    metrics.update(validate())
                    last_valid_step = state.step
                    final = early_stop() or final
                stop = state.done = final
                periodic = dcfg.checkpoint_every is not None and state.step % dcfg.checkpoint_every == 0
                if validated or periodic or final:
                    metrics.setdefault(SCORE_KEY, -1.0)
                    metrics.update(step=state.step, epoch=state.epoch + 1)
                    checkpoint_and_report(metrics)
                    last_ckpt_step = state.step
                elif metrics:
                    ray.train.report(metrics)
            if stop:
                break
            # Epoch end: every rank got here after the same all-reduced "out of data" decision.
            state.epoch += 1
            state.samples_in_epoch = 0
            last_epoch = state.epoch >= t.epochs
            metrics = {"step": state.step, "epoch": state.epoch}
            if (t.validate_every is None or last_epoch) and last_valid_step != state.step:
                metrics.update(validate())
                last_valid_step = state.step
                stop = early_stop()
            stop = state.done = stop or last_epoch
            if state.step != last_ckpt_step or SCORE_KEY in metrics:
                metrics.setdefault(SCORE_KEY, -1.0)
                checkpoint_and_report(metrics)
                last_ckpt_step = state.step
