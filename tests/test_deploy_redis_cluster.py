"""deploy/k8s-redis-cluster: the Kubernetes base on an external Redis / Valkey Cluster (issue 16 item 5).

Validated, not run (no cluster here): `kubectl kustomize` builds the overlay (it needs no cluster),
the built manifests match the Kubernetes API schemas, the single Valkey pod is gone, every agentkv
pod gets a `redis+cluster://` URL that `kvstore.valkey.connect` treats as a cluster, and the gateway
runs more than one replica.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from kvstore.valkey import cluster_seed_url, is_cluster_url

OVERLAY = Path(__file__).resolve().parents[1] / "deploy" / "k8s-redis-cluster"

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="no kubectl here")


@pytest.fixture(scope="module")
def built() -> list[dict]:
    proc = subprocess.run(["kubectl", "kustomize", str(OVERLAY)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def test_the_overlay_drops_the_single_valkey_and_points_every_pod_at_a_cluster(built):
    kinds = {(d["kind"], d["metadata"]["name"]) for d in built}
    assert ("StatefulSet", "valkey") not in kinds and ("Service", "valkey") not in kinds
    assert {("Deployment", "agentkv-gateway"), ("Deployment", "agentkv-prefill"), ("Deployment", "agentkv-decode")} <= kinds
    [config] = [d for d in built if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "agentkv-config"]
    url = config["data"]["AGENTKV_REDIS_URL"]
    assert is_cluster_url(url) and cluster_seed_url(url).startswith("redis://")
    for d in built:
        if d["kind"] == "Deployment":  # every agentkv pod reads the URL from the ConfigMap
            for c in d["spec"]["template"]["spec"]["containers"]:
                if c["image"].startswith("agentkv"):
                    assert {"configMapRef": {"name": "agentkv-config"}} in c["envFrom"], d["metadata"]["name"]


def test_the_overlay_runs_several_gateways(built):
    [gateway] = [d for d in built if d["kind"] == "Deployment" and d["metadata"]["name"] == "agentkv-gateway"]
    assert gateway["spec"]["replicas"] > 1


def test_the_built_overlay_matches_the_kubernetes_api_schemas(built):
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="test dependency kubernetes-validate")
    version = kubernetes_validate.latest_version()
    for doc in built:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {exc}")
