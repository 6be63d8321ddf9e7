"""Shared fixtures: one Ray instance for the whole session, the shared datasets, small synthetic logs,
one briefly trained toy run (built by ``tests/helpers.py``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# Keep torch and BLAS from oversubscribing the 2-core CI machine.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# Ray Train's controller polls its workers every 2 s, and a worker's report waits for the poll that
# collects the previous one: toy runs report every step or two, so they would mostly wait.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance shared by every test that needs Ray."""
    import ray

    from deftrec.core.cluster import configure_data_context

    if not ray.is_initialized():
        # address="local": always a fresh instance, never a `ray start` cluster left on the machine
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="warning",
                 log_to_driver=False)
    configure_data_context()
    yield ray


@pytest.fixture
def no_console_setup(monkeypatch):
    """The entry points' console set-up (stdout/stderr tees, a handler on Ray's logger, environment
    variables) would outlive an in-process call; it is not what the tests calling ``main`` pin down."""
    import pipelines._cli

    monkeypatch.setattr(pipelines._cli, "configure_console", lambda **kwargs: None)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        raise RuntimeError(f"the shared datasets are expected at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def synth_small(tmp_path_factory):
    """A small synthetic log (deterministic) shared by several tests."""
    from deftrec.config.data import SynthConfig
    from deftrec.data.synth import generate

    out = tmp_path_factory.mktemp("synth") / "small"
    generate(SynthConfig(users=300, items=120, mean_length=20, seed=7), out, log=lambda s: None)
    return out


@pytest.fixture(scope="session")
def toy_trained(tmp_path_factory, synth_small, ray_session) -> Path:
    """One ``toy_run`` (``data/``, ``collab/``, ``model/``) for the modules that serve it unchanged:
    copy it with ``copy_toy_run`` before adding to it."""
    from tests.helpers import toy_run

    root = tmp_path_factory.mktemp("toy_trained")
    toy_run(root, synth_small)
    return root
