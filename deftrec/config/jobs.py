"""The batch jobs' settings: the FAISS index job (``index:``) and the evaluation job (``evaluate:``).

``evaluate.sampler``/``steps``/``seed`` override the model's own inference settings (``eval:``,
:class:`deftrec.config.model.InferenceConfig`) for one evaluation run; None keeps them.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from deftrec.config.baselines import SASRecConfig

#: The baselines an evaluation can report beside DeftRec (deftrec.batch.baselines), in report order.
BASELINE_NAMES = ("popularity", "markov", "ease", "sasrec")


@dataclasses.dataclass
class IndexConfig:
    """The FAISS index over a model export's item keys. Its metric is not set here: it is the export's
    ``eval.score`` (one ranking rule for training, validation, the index and serving)."""

    factory: str = "Flat"
    ef_search: int = 128  # HNSW
    nprobe: int = 16  # IVF
    train_sample: int = 100_000  # IVF/PQ training sample size
    recall_queries: int = 1000  # queries for recall@10 against exact search in the manifest
    seed: int = 42

    def __post_init__(self):
        if not self.factory.strip():
            raise ValueError("factory must be a FAISS factory string such as 'Flat' or 'HNSW32,Flat'")
        for name in ("ef_search", "nprobe", "train_sample", "recall_queries"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")


@dataclasses.dataclass
class EvaluateJobConfig:
    split: str = "test"
    limit: Optional[int] = None  # evaluate the first N users (by user id) of the split
    sampler: Optional[str] = None  # override eval.sampler of the model config: ddim | ddpm
    steps: Optional[int] = None  # override eval.steps
    seed: Optional[int] = None  # override eval.seed
    explain: bool = False  # also generate the reasoning text when the condition does not need it
    batch_size: int = 32
    # model replicas in the actor pool; null: sized from the cluster Ray reports (evaluation_actors)
    actors: Optional[int] = None
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    # baselines computed beside DeftRec on the same users (all four by default; drop "sasrec" for speed),
    # each in its own Ray task: a crash, an out-of-memory kill or this many seconds end only that one
    baselines: list[str] = dataclasses.field(default_factory=lambda: list(BASELINE_NAMES))
    baseline_timeout_s: Optional[float] = None
    sasrec: SASRecConfig = dataclasses.field(default_factory=SASRecConfig)

    def __post_init__(self):
        unknown = [b for b in self.baselines if b not in BASELINE_NAMES]
        if unknown:
            raise ValueError(f"evaluate.baselines: unknown baseline(s) {unknown}; known: {list(BASELINE_NAMES)}")
        if len(set(self.baselines)) != len(self.baselines):
            raise ValueError(f"evaluate.baselines lists a baseline twice: {self.baselines}")
        if self.split not in ("test", "valid"):
            raise ValueError(f"split must be 'test' or 'valid', got {self.split!r}")
        if self.sampler not in (None, "ddim", "ddpm"):
            raise ValueError(f"sampler must be 'ddim' or 'ddpm', got {self.sampler!r}")
        if self.limit is not None and self.limit < 1:
            raise ValueError("limit must be >= 1")
        if self.steps is not None and self.steps < 1:
            raise ValueError("steps must be >= 1")
        if self.batch_size < 1 or (self.actors is not None and self.actors < 1):
            raise ValueError("batch_size and actors must be >= 1 (actors: null sizes the pool from the cluster)")
        if self.baseline_timeout_s is not None and not self.baseline_timeout_s > 0:
            raise ValueError(f"evaluate.baseline_timeout_s must be > 0 or null, got {self.baseline_timeout_s!r}")


@dataclasses.dataclass
class TuneConfig:
    """Validation chooses the settings (the ``tune:`` section, stage ``tune``): a grid of model-config
    overrides, the same for every dataset, each trial the pipeline's own training job, stopped early
    by ASHA on validation NDCG@10; the best trial's settings are what the train stage exports.

    ``space`` maps a model field (``section.field`` as in ``--set``) to the values to try, or a name
    of your choosing to settings that go together (each value a mapping of fields to values; ``{}``
    leaves the preset's); the trials are every combination (``num_samples`` times, ``train.seed`` +
    repeat). A trial runs at least ``grace_validations`` validations before ASHA may stop it;
    ``reduction_factor`` is ASHA's (1/rf of the trials continue at each rung).
    ``max_concurrent_trials`` run at once, each on ``distributed.num_workers`` Ray Train workers.
    """

    space: dict = dataclasses.field(default_factory=dict)
    num_samples: int = 1
    max_concurrent_trials: int = 1
    grace_validations: int = 2
    reduction_factor: int = 2

    def __post_init__(self):
        if not isinstance(self.space, dict):
            raise ValueError(f"tune.space must map model fields to lists of values, got {self.space!r}")
        for key, values in self.space.items():
            if not isinstance(values, list) or not values:
                raise ValueError(f"tune.space.{key} must be a non-empty list of values, got {values!r}")
            if any(isinstance(v, dict) for v in values) and not all(isinstance(v, dict) for v in values):
                raise ValueError(f"tune.space.{key} mixes values and groups of settings: make every value "
                                 f"a mapping of fields to values, or none, got {values!r}")
        for name in ("num_samples", "max_concurrent_trials", "grace_validations"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"tune.{name} must be a positive int, got {v!r}")
        if isinstance(self.reduction_factor, bool) or not isinstance(self.reduction_factor, int) \
                or self.reduction_factor < 2:
            raise ValueError(f"tune.reduction_factor must be an int >= 2, got {self.reduction_factor!r}")

    def trials(self, seed: int) -> list[list[str]]:
        """Every trial's model overrides (``key=value`` strings, as ``--set`` takes them), in a fixed
        order; repeats (``num_samples`` > 1) train with ``train.seed`` = ``seed`` + repeat."""
        import itertools
        import json

        keys = sorted(self.space)
        grid = [list(zip(keys, combo)) for combo in itertools.product(*(self.space[k] for k in keys))]

        def settings(key, value) -> list[tuple[str, object]]:  # a group sets each of its fields
            return list(value.items()) if isinstance(value, dict) else [(key, value)]

        out = []
        for repeat in range(self.num_samples):
            for combo in grid:
                sets = [f"{k}={json.dumps(v) if not isinstance(v, str) else v}"
                        for key, value in combo for k, v in settings(key, value)]
                out.append(sets + ([f"train.seed={seed + repeat}"] if self.num_samples > 1 else []))
        return out
