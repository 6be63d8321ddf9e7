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
