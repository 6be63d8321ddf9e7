"""Cluster configurations parse, validate against Ray's schema and agree with the pinned versions."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def pinned_ray() -> str:
    text = (REPO / "pyproject.toml").read_text()
    m = re.search(r'"ray\[[^\]]*\]==([0-9.]+)"', text)
    assert m, "pyproject.toml must pin ray[...]==X.Y.Z"
    return m.group(1)


def test_ray_is_the_pinned_version():
    import ray

    assert ray.__version__ == pinned_ray()


def test_cluster_launcher_config_validates_against_rays_schema():
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    cfg = yaml.safe_load((REPO / "ray_cluster.yaml").read_text())
    jsonschema.validate(cfg, schema)
    assert pinned_ray() in cfg["docker"]["image"]
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    gpu = [t for t in types.values() if t.get("resources", {}).get("GPU")]
    assert gpu and all(t["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot" for t in gpu)
    assert sum(t.get("max_workers", 0) for t in types.values()) <= cfg["max_workers"]
    # a schema-invalid variant is caught, so the validation above means something
    bad = dict(cfg, max_workers="many")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


def _images(doc) -> list[str]:
    found = []

    def walk(x):
        if isinstance(x, dict):
            if "image" in x and isinstance(x["image"], str):
                found.append(x["image"])
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    walk(doc)
    return found


@pytest.mark.parametrize("name,spec_key", [("rayjob.yaml", "rayClusterSpec"), ("rayservice.yaml", "rayClusterConfig")])
def test_kuberay_manifests_agree_with_pinned_ray(name, spec_key):
    doc = yaml.safe_load((REPO / "cluster" / name).read_text())
    assert doc["apiVersion"] == "ray.io/v1"
    cluster = doc["spec"][spec_key]
    assert cluster["rayVersion"] == pinned_ray()
    images = _images(cluster)
    assert images and all(f"ray{pinned_ray()}" in im for im in images)
    gpu_groups = [g for g in cluster["workerGroupSpecs"]
                  if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
    assert gpu_groups, "a GPU worker group is required"
    for g in cluster["workerGroupSpecs"]:
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]


def test_rayjob_runs_the_pipeline_entry_point():
    doc = yaml.safe_load((REPO / "cluster" / "rayjob.yaml").read_text())
    spec = doc["spec"]
    assert spec["entrypoint"].startswith("python -m pipelines.end_to_end --config pipelines/configs/")
    assert spec["shutdownAfterJobFinishes"] is True and spec["backoffLimit"] >= 1
    yaml.safe_load(spec["runtimeEnvYAML"])


# ------------------------------------------------------------------ the job's plan fits the cluster


def _plan_of(command: str, capsys) -> dict:
    """The ``--dry-run`` plan of a ``python -m pipelines.end_to_end ...`` command line, in-process, from the
    repository root (where the cluster runs it); the run directory is neither created nor read."""
    import shlex

    from pipelines.end_to_end import main

    argv = shlex.split(command)
    assert argv[:3] == ["python", "-m", "pipelines.end_to_end"], command
    run_dir = Path(argv[argv.index("--run-dir") + 1])
    existed = run_dir.exists()
    assert main([*argv[3:], "--dry-run"]) == 0, capsys.readouterr().err
    assert run_dir.exists() == existed
    return json.loads(capsys.readouterr().out)


def _launcher_command() -> str:
    """The pipeline command in ray_cluster.yaml's header comment (after `ray job submit ... --`)."""
    header = []
    for line in (REPO / "ray_cluster.yaml").read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line.lstrip("#").strip())
    m = re.search(r"-- (python -m pipelines\.end_to_end [^\n]+)", "\n".join(header))
    assert m, "ray_cluster.yaml's header shows the pipeline command"
    return m.group(1).strip()


def _gpu_group() -> dict:
    job = yaml.safe_load((REPO / "cluster" / "rayjob.yaml").read_text())
    return next(g for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"] if g["groupName"] == "gpu")


@pytest.mark.parametrize("source", ["rayjob", "ray_cluster"])
def test_cluster_commands_plan_gpu_training_that_fits_the_cluster(source, capsys, monkeypatch):
    """The RayJob entrypoint and the launcher's documented command resolve (--dry-run) to plans whose
    collab and train stages request a GPU per worker; train's workers are exactly the RayJob `gpu`
    group's GPUs (replicas x nvidia.com/gpu) and fit the launcher's GPU node type (GPU x max_workers)."""
    monkeypatch.chdir(REPO)
    command = (yaml.safe_load((REPO / "cluster" / "rayjob.yaml").read_text())["spec"]["entrypoint"]
               if source == "rayjob" else _launcher_command())
    plan = _plan_of(command, capsys)
    for name in ("collab", "train"):
        res = plan["stages"][name]["resources"]
        assert res["gpus_per_worker"] >= 1 and res["backend"] == "nccl", (name, res)
    assert plan["uses_gpu"] is True
    train = plan["stages"]["train"]["resources"]

    group = _gpu_group()
    gpus_per_pod = int(group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    assert train["workers"] * train["gpus_per_worker"] == group["replicas"] * gpus_per_pod

    gpu_types = [t for t in _launcher()["available_node_types"].values() if t.get("resources", {}).get("GPU")]
    capacity = sum(int(t["resources"]["GPU"]) * t["max_workers"] for t in gpu_types)
    assert train["workers"] * train["gpus_per_worker"] <= capacity
    ev = plan["stages"]["evaluate"]["resources"]
    assert ev["actors"] * ev["gpus_per_actor"] <= capacity


def test_rayservice_matches_serve_deploy_config():
    svc = yaml.safe_load((REPO / "cluster" / "rayservice.yaml").read_text())
    serve_v2 = yaml.safe_load(svc["spec"]["serveConfigV2"])
    deploy = yaml.safe_load((REPO / "cluster" / "serve_config.yaml").read_text())
    assert serve_v2["applications"] == deploy["applications"]
    app = deploy["applications"][0]
    assert app["import_path"] == "deftrec.serve:app"
    for d in app["deployments"]:
        if "max_ongoing_requests" in d:
            assert d["max_ongoing_requests"] >= 1


def test_runtime_env_and_dockerfile():
    env = yaml.safe_load((REPO / "cluster" / "runtime_env.yaml").read_text())
    for must in (".git", ".venv", "runs"):
        assert must in env["excludes"]
    assert "pip" not in env  # heavy dependencies live in the image
    docker = (REPO / "cluster" / "Dockerfile").read_text()
    assert f"rayproject/ray:{pinned_ray()}" in docker


# ------------------------------------------------------------------ exposure, images, locked dependencies

def _launcher() -> dict:
    return yaml.safe_load((REPO / "ray_cluster.yaml").read_text())


def test_launcher_dashboard_listens_on_loopback_only():
    """The dashboard's job API has no authentication: reached only through `ray dashboard`'s tunnel."""
    cfg = _launcher()
    head = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head
    commands = " ".join(c for k in ("head_start_ray_commands", "worker_start_ray_commands") for c in cfg[k])
    assert "0.0.0.0" not in commands


def _images_pinned() -> dict[str, str]:
    return yaml.safe_load((REPO / "cluster" / "images.yaml").read_text())


EXACT_IMAGE = re.compile(r"^[\w.\-/]+(:(?!latest\b)[\w.\-]*\d+\.\d+\.\d+[\w.\-]*|@sha256:[0-9a-f]{64})$")


def test_images_are_pinned_exactly_in_one_place():
    pinned = _images_pinned()
    assert set(pinned) == {"ray", "project"}
    for name, image in pinned.items():
        assert EXACT_IMAGE.match(image), f"{name}: {image} is not an exact tag or digest"
    assert f"ray:{pinned_ray()}-" in pinned["ray"] and f"ray{pinned_ray()}" in pinned["project"]
    for bad in ("rayproject/ray:latest", "rayproject/ray:2.60", "ghcr.io/x/y", "ghcr.io/x/y:nightly"):
        assert not EXACT_IMAGE.match(bad), bad
    assert _launcher()["docker"]["image"] == pinned["ray"]
    docker = (REPO / "cluster" / "Dockerfile").read_text()
    assert re.search(r"^ARG RAY_IMAGE=(\S+)$", docker, re.M).group(1) == pinned["ray"]
    assert [line for line in docker.splitlines() if line.startswith("FROM")] == ["FROM ${RAY_IMAGE}"]
    for name in ("rayjob.yaml", "rayservice.yaml"):
        text = (REPO / "cluster" / name).read_text()
        images = _images(yaml.safe_load(text))
        assert images and set(images) == {pinned["project"]}, (name, images)
        assert text.count(pinned["project"]) == 1, f"{name}: the image is written once (a YAML anchor)"


def _lock() -> dict[str, str]:
    pins = {}
    for line in (REPO / "cluster" / "requirements.lock").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._\-]*)==([0-9][0-9A-Za-z.\-]*)", line.strip())
        assert m, f"not an exact pin: {line!r}"
        pins[m.group(1)] = m.group(2)
    return pins


def test_lock_pins_every_runtime_dependency_within_pyproject_ranges():
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = _lock()
    assert len(pins) > 20 and all(name == canonicalize_name(name) for name in pins)
    # pyproject.toml's dependencies, as installed by .ci/setup (the test extra left out)
    runtime = [Requirement(r) for r in metadata.requires("deftrec") or []]
    runtime = [r for r in runtime if r.marker is None or "extra" not in str(r.marker)]
    assert any(canonicalize_name(r.name) == "ray" for r in runtime)
    for req in runtime:
        name = canonicalize_name(req.name)
        assert name in pins, f"{name} (pyproject.toml) is missing from cluster/requirements.lock"
        assert req.specifier.contains(pins[name], prereleases=True), (name, pins[name], str(req.specifier))
    assert pins["ray"] == pinned_ray() and "+" not in pins["torch"]  # no local (+cpu) build pinned
    assert {"uvicorn", "starlette", "pydantic"} <= set(pins)  # ray[serve]'s extras are followed
    assert not {"pytest", "schemathesis", "hypothesis"} & set(pins)  # the test extra is not


def test_every_node_and_the_image_install_the_lock():
    cfg = _launcher()
    setup = cfg["setup_commands"]  # every node, head included
    assert setup[0] == "pip install -q -r ~/deftrec/cluster/requirements.lock"
    for cmd in [c for k in ("setup_commands", "head_setup_commands", "worker_setup_commands") for c in cfg[k]]:
        for part in cmd.split("&&"):
            words = part.split()
            if words[:2] != ["pip", "install"]:
                continue
            args = [w for w in words[2:] if w not in ("-q", "-e", "--no-deps", "-r")]
            for a in args:  # an exact pin, the lock, or the project / a package without its dependencies
                assert "==" in a or a.endswith("requirements.lock") or ("--no-deps" in words and "=" not in a), cmd
                assert not re.search(r"[<>]|~=|!=", a), f"open range in {cmd!r}"
    docker = (REPO / "cluster" / "Dockerfile").read_text()
    assert "pip install --no-cache-dir -r cluster/requirements.lock" in docker
    assert "pip install --no-cache-dir --no-deps -e ." in docker


def test_lock_generator_follows_the_installed_closure():
    import importlib.util

    spec = importlib.util.spec_from_file_location("lock_requirements", REPO / "cluster" / "lock_requirements.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    pins = mod.closure()
    assert {"ray", "torch", "fastapi", "uvicorn", "deepspeed"} <= set(pins)
    assert "pytest" not in pins and all("+" not in v for v in pins.values())


def test_serve_config_bounds_every_queue():
    deploy = yaml.safe_load((REPO / "cluster" / "serve_config.yaml").read_text())
    app = deploy["applications"][0]
    assert float(app["args"]["request_timeout_s"]) > 0
    assert {d["name"] for d in app["deployments"]} == {"Recommender", "Ingress"}
    assert all(d["max_queued_requests"] >= 1 for d in app["deployments"])
