"""The whole pipeline through the Ray job API: `ray start --head`, `ray job submit`, artifacts, stop."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _upload_size(root: Path, excludes: list[str]) -> int:
    """Bytes Ray would upload for --working-dir with these excludes (top-level names and globs)."""
    import fnmatch

    total = 0
    for p in root.rglob("*"):
        rel = p.relative_to(root).as_posix()
        parts = rel.split("/")
        if any(fnmatch.fnmatch(part, pat.strip("*/")) or fnmatch.fnmatch(rel, pat) for pat in excludes
               for part in parts):
            continue
        if p.is_file():
            total += p.stat().st_size
    return total


def test_working_dir_stays_under_the_upload_limit():
    import yaml

    env = yaml.safe_load((REPO / "cluster" / "runtime_env.yaml").read_text())
    assert _upload_size(REPO, env["excludes"]) < 100 * 2**20


@pytest.mark.slow
def test_end_to_end_through_ray_job_submit(tmp_path, capsys, no_console_setup):
    ray_bin = str(Path(sys.executable).parent / "ray")
    env = dict(os.environ, RAY_AUTH_MODE="disabled",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("RAY_ADDRESS", None)
    port, dash = _free_port(), _free_port()
    # Every listening port explicit: a leftover agent from another Ray on the default ports must not
    # make this head's job agent fail to start ("No available agent to submit job").
    extra_ports = [f"--{name}={_free_port()}" for name in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
        "runtime-env-agent-port", "ray-client-server-port", "node-manager-port", "object-manager-port")]
    temp = Path("/tmp") / f"deftrec-job-{os.getpid()}"  # Ray's socket paths must stay short
    start = subprocess.run([ray_bin, "start", "--head", f"--port={port}", f"--dashboard-port={dash}",
                            "--dashboard-host=127.0.0.1", "--num-cpus=2", f"--temp-dir={temp}",
                            "--include-dashboard=true", "--disable-usage-stats", *extra_ports],
                           env=env, capture_output=True, text=True, timeout=180)
    assert start.returncode == 0, start.stderr[-3000:]
    run_dir = tmp_path / "run"
    try:
        cmd = [ray_bin, "job", "submit", "--address", f"http://127.0.0.1:{dash}", "--working-dir", ".",
               "--runtime-env", "cluster/runtime_env.yaml", "--",
               "python", "-m", "pipelines.end_to_end", "--config", "pipelines/configs/tiny.yaml",
               "--run-dir", str(run_dir),
               # toy size: the point is the job path, not the quality
               "--set", "data.synth.users=250", "--set", "data.synth.items=80", "--set", "collab.epochs=1",
               "--set", "train.max_steps=12", "--set", "train.warmup_steps=2", "--set", "train.validate_every=12",
               "--set", "train.valid_users=50", "--set", "distributed.num_workers=1",
               "--set", "evaluate.limit=60", "--set", "evaluate.baselines=[popularity,markov,ease]"]
        for _ in range(60):  # the head's job agent can take a while after `ray start` on a busy machine
            sub = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
            out = sub.stdout + sub.stderr
            if "No available agent to submit job" not in out:
                break
            time.sleep(5)
        assert sub.returncode == 0, out[-5000:]
        assert re.search(r"Job '\S+' succeeded", out) and "== summary ==" in out, out[-4000:]
        for d in ("synth", "data", "collab", "model", "index", "eval"):
            m = json.loads((run_dir / d / "manifest.json").read_text())
            assert m["status"] == "complete" and m.get("fingerprint"), d
        metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
        assert metrics["users"] == 60
        assert set(metrics["results"]) == {"deftrec", "popularity", "markov", "ease"}
        # the standalone stages (their `main`, in this process, outside the job's uploaded working
        # directory) read the config recorded in the run: they reproduce the run and skip
        import pipelines.end_to_end
        import pipelines.evaluate
        import pipelines.index

        before = (run_dir / "eval" / "metrics.json").read_bytes()
        capsys.readouterr()
        for stage in (pipelines.index, pipelines.evaluate):
            assert stage.main(["--run-dir", str(run_dir)]) == 0
            out = capsys.readouterr()
            assert "is up to date" in out.out + out.err, (stage.__name__, out)
        assert (run_dir / "eval" / "metrics.json").read_bytes() == before
        # and the dry-run plan of the same command finds every stage up to date
        assert pipelines.end_to_end.main([*cmd[cmd.index("--config"):], "--dry-run"]) == 0
        plan = json.loads(capsys.readouterr().out)
        assert {s["action"] for s in plan["stages"].values()} == {"skip"}
    finally:
        _stop_head(temp, port)


def _stop_head(temp: Path, port: int) -> None:
    """Stop only this head's processes (`ray stop` would also kill the test session's shared Ray)."""
    import psutil

    # `ray start` records the head for later `ray.init()` calls; drop the record with the head.
    marker = Path("/tmp/ray/ray_current_cluster")
    try:
        if marker.read_text().strip().endswith(f":{port}"):
            marker.unlink()
    except OSError:
        pass

    procs = {}
    for p in psutil.process_iter(["cmdline"]):
        try:
            if str(temp) in " ".join(p.info["cmdline"] or []):
                # agents rename themselves ("ray::DashboardAgent"): take each match's children too
                for q in [p, *p.children(recursive=True)]:
                    procs[q.pid] = q
        except psutil.Error:
            pass
    procs = list(procs.values())
    for p in procs:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=20)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
