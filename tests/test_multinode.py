"""Multi-node fault tolerance: a 2-node ``ray.cluster_utils.Cluster`` loses a node mid-run and gets one back.

Why a subprocess: the other test modules share one local Ray instance (conftest ``ray_session``)
for the whole pytest session, and a process can be connected to only one Ray cluster. Shutting the
shared instance down here would break the modules that run after this one, so the cluster, its
driver and the training job live in a child process, and this test reads back what it recorded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "pipelines" / "configs" / "tiny.yaml"


def _cluster_main(work: str) -> None:
    """Child process: cluster (head without CPUs + 2 nodes x 1 CPU), data, training with a node removal."""
    import threading
    import time

    import ray
    from ray.cluster_utils import Cluster

    from deftrec.artifacts.collab import save_collab
    from deftrec.config.pipeline import load_pipeline_config
    from deftrec.config.training import DistributedConfig
    from deftrec.core.cluster import configure_data_context
    from deftrec.data.samples import load_dataset
    from deftrec.end_to_end import run_pipeline
    from deftrec.training.checkpoint import read_trainer_state
    from deftrec.training.driver import train_distributed
    from deftrec.training.collab_job import fit_collab

    work_dir = Path(work)
    events = str(work_dir / "events.txt")
    removed = str(work_dir / "node_removed")
    # The head only schedules (like a KubeRay head with num-cpus 0): the workers need one node each.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="warning", log_to_driver=False)
    configure_data_context()

    overrides = ["stages=[synth,preprocess]", "data.synth.users=200", "data.synth.items=80",
                 "data.synth.mean_length=15", "collab.dim=16", "collab.epochs=2", "train.batch_size=8",
                 "train.max_steps=8", "train.warmup_steps=1", "train.log_every=2", "train.validate_every=4",
                 "train.valid_users=16", "eval.batch_size=8", "eval.steps=1", "diffusion.hidden=64"]
    pcfg = load_pipeline_config(TINY, overrides)
    run_pipeline(pcfg, work_dir, log=lambda s: None)
    cfg = pcfg.model
    U, E, hist = fit_collab(cfg, load_dataset(work_dir / "data"), log=None)
    save_collab(work_dir / "collab", U, E, cfg.collab, hist)

    def step_callback(step: int, rank: int) -> None:
        import os as _os
        import time as _time

        import ray as _ray
        import ray.train as _train

        if step == 3 and not _os.path.exists(removed):
            # Reports reach Ray's controller when it polls the workers (every 2 s): make sure the
            # step-2 checkpoint is committed before the driver, which waits for this line, kills a node.
            _train.get_all_reported_checkpoints(consistency_mode=_train.CheckpointConsistencyMode.COMMITTED)
        with open(events, "a") as f:
            f.write(f"{_os.getpid()} {rank} {step} {_ray.get_runtime_context().get_node_id()}\n")
        # First attempt: hold at step 3 until the driver has taken a node away.
        if step == 3 and not _os.path.exists(removed):
            deadline = _time.time() + 120
            while not _os.path.exists(removed) and _time.time() < deadline:
                _time.sleep(0.2)

    result: dict = {}

    def train() -> None:
        try:
            res = train_distributed(cfg, DistributedConfig(num_workers=2, cpus_per_worker=1, zero_stage=2,
                                                           placement_strategy="SPREAD", checkpoint_every=2,
                                                           max_failures=3, name="mn"),
                                    work_dir, step_callback=step_callback, log=None)
            result["latest"] = read_trainer_state(res.latest_checkpoint).to_json()
            result["model"] = str(res.model_dir)
        except BaseException as e:  # noqa: BLE001 - reported to the parent test
            result["error"] = repr(e)

    thread = threading.Thread(target=train)
    thread.start()
    victim = None
    nodes_before = [n.node_id for n in cluster.list_all_nodes()]
    while thread.is_alive() and victim is None:  # wait until both ranks reached step 3
        time.sleep(0.2)
        if os.path.exists(events):
            rows = [ln.split() for ln in Path(events).read_text().splitlines()]
            at3 = {r[1]: r[3] for r in rows if r[2] == "3"}
            if len(at3) == 2:
                victim = at3["1"]  # the node running rank 1
    node = next(n for n in cluster.list_all_nodes() if n.node_id == victim)
    cluster.remove_node(node, allow_graceful=False)
    Path(removed).touch()
    time.sleep(2)
    new = cluster.add_node(num_cpus=1)
    thread.join(timeout=420)
    result.update(victim=victim, nodes_before=nodes_before, new_node=new.node_id,
                  finished=not thread.is_alive())
    (work_dir / "result.json").write_text(json.dumps(result))
    ray.shutdown()
    cluster.shutdown()


def test_node_removed_mid_run_and_added_back(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.setdefault("RAY_AUTH_MODE", "disabled")
    env["OMP_NUM_THREADS"] = "1"
    code = f"import sys; sys.path.insert(0, {str(REPO)!r}); from tests.test_multinode import _cluster_main; " \
           f"_cluster_main({str(tmp_path)!r})"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=560)
    res_path = tmp_path / "result.json"
    assert res_path.exists(), (proc.returncode, proc.stdout[-3000:], proc.stderr[-3000:])
    res = json.loads(res_path.read_text())
    assert res["finished"] and "error" not in res, res.get("error")
    rows = [ln.split() for ln in (tmp_path / "events.txt").read_text().splitlines()]
    by_pid: dict[str, set] = {}
    for pid, rank, step, node in rows:
        by_pid.setdefault(pid, set()).add((rank, node))
    attempts = {}
    for pid, rank, step, node in rows:
        attempts.setdefault(pid, []).append(int(step))
    # first attempt: one worker per node, both on the two original worker nodes
    first = [pid for pid in by_pid if min(attempts[pid]) == 1]
    assert len(first) == 2
    first_nodes = {node for pid in first for _, node in by_pid[pid]}
    assert len(first_nodes) == 2 and res["victim"] in first_nodes
    # the run went on after the node loss on the surviving node + the one added back, and completed
    later = [pid for pid in by_pid if pid not in first]
    later_nodes = {node for pid in later for _, node in by_pid[pid]}
    assert res["victim"] not in later_nodes and res["new_node"] in later_nodes and len(later_nodes) == 2
    assert min(min(attempts[pid]) for pid in later) > 1  # resumed from a checkpoint, not from step 0
    latest = res["latest"]
    assert latest["step"] == 8 and latest["done"] and latest["attempts"] >= 2
    assert Path(res["model"], "manifest.json").is_file()
