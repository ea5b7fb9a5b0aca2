"""deploy/: the Kubernetes manifest and the BentoCloud configuration agree with the service.

No cluster: each file is parsed and every field that must match the service is checked
against the service's own definitions (its limits, settings, port, traffic settings) and
BentoML's (its probe routes, its deployment schema). The service module loads a model when
imported, so its ``@bentoml.service`` arguments are read from its source.
"""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path
from typing import Any

import attr
import pytest
import yaml
from bentoml._internal.cloud.schemas.modelschemas import (
    DeploymentServiceConfig,
    DeploymentTargetHPAConf,
)
from bentoml._internal.cloud.schemas.schemasv2 import CreateDeploymentSchema
from bentoml._internal.configuration.containers import BentoMLContainer
from bentoml._internal.server.http.traffic import MaxConcurrencyMiddleware
from bentoml._internal.utils.cattr import bentoml_cattr
from helpers import service_declaration

from convtune.service.batching import LANES_ENV, lane_layout
from convtune.service.http import ENV_PREFIX, Limits

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
# CPUs of BentoCloud's instance types (`bentoml deployment list-instance-types`).
INSTANCE_CPUS = {"cpu.1": 0.5, "cpu.2": 1, "cpu.4": 2, "cpu.8": 4}
# What the image's environment must set, as bentofile.yaml sets it for the bento.
REQUIRED_ENVS = {"BENTOML_DO_NOT_TRACK", "NO_ALBUMENTATIONS_UPDATE"}


DECLARED = service_declaration()
SERVICE, SERVICE_CONFIG = DECLARED.name, DECLARED.arguments
MODEL_ENV = DECLARED.constants["MODEL_ENV"]
SETTINGS = {ENV_PREFIX + limit.name.upper() for limit in fields(Limits)} | {LANES_ENV, MODEL_ENV}


def service_port() -> int:
    """The port the service listens on: its own setting, else BentoML's default."""
    return SERVICE_CONFIG.get("http", {}).get("port", BentoMLContainer.http.port.get())


def check_environment(env: dict[str, str], *, cpus: float) -> None:
    """``env`` sets only settings the service reads, with values it accepts, its lanes
    fitted to ``cpus``, and what bentofile.yaml sets for the bento."""
    unknown = {name for name in env if name.startswith(ENV_PREFIX)} - SETTINGS
    assert not unknown, f"the service reads no {sorted(unknown)}"
    assert MODEL_ENV in env
    Limits.from_env(env)  # a bad value would stop the service at start
    bento_envs = yaml.safe_load((REPO / "bentofile.yaml").read_text())["envs"]
    assert {e["name"]: e["value"] for e in bento_envs if e["name"] in REQUIRED_ENVS} == {
        name: env[name] for name in REQUIRED_ENVS
    }
    # Set for the cores the pod gets: the fallback where a parent cgroup's quota is missed.
    assert LANES_ENV in env
    lanes, _ = lane_layout(int(cpus), {})
    assert lane_layout(int(cpus), env) == (lanes, 1), env.get(LANES_ENV)


def manifests() -> dict[str, dict]:
    documents = yaml.safe_load_all((DEPLOY / "kubernetes.yaml").read_text())
    return {document["kind"]: document for document in documents}


def quantity(text: str | int) -> float:
    """A Kubernetes CPU quantity in cores (``2``, ``1500m``)."""
    text = str(text)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


def nginx_size(text: str) -> int:
    """An nginx size (``20m``, ``512k``, ``1g``) in bytes."""
    number, unit = re.fullmatch(r"(\d+)([kmg]?)", text.lower()).groups()
    return int(number) * 1024 ** " kmg".index(unit or " ")


def test_the_service_is_what_the_deployments_assume() -> None:
    # One worker per replica, which spreads over the replica's cores; a timeout to wait for.
    assert SERVICE_CONFIG["workers"] == 1
    assert {"timeout", "max_concurrency"} <= set(SERVICE_CONFIG["traffic"])


def test_kubernetes_pods_serve_the_port_the_service_listens_on() -> None:
    found = manifests()
    [container] = found["Deployment"]["spec"]["template"]["spec"]["containers"]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"http": service_port()}
    service_ports = found["Service"]["spec"]["ports"]
    assert [port["targetPort"] for port in service_ports] == ["http"]
    backend = found["Ingress"]["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": found["Service"]["metadata"]["name"], "port": {"name": "http"}}
    selector = found["Service"]["spec"]["selector"]
    assert selector.items() <= found["Deployment"]["spec"]["template"]["metadata"]["labels"].items()


def test_kubernetes_probes_and_metrics_are_routes_bentoml_answers_under_load() -> None:
    found = manifests()
    pod = found["Deployment"]["spec"]["template"]
    [container] = pod["spec"]["containers"]
    probes = {kind: container[f"{kind}Probe"]["httpGet"] for kind in ("readiness", "liveness")}
    assert probes["readiness"] == {"path": "/readyz", "port": "http"}
    assert probes["liveness"] == {"path": "/livez", "port": "http"}
    assert container["startupProbe"]["httpGet"] == probes["liveness"]
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(service_port())
    # BentoML serves these before its concurrency limit: a replica at max_concurrency still
    # answers its probes (else Kubernetes would restart a busy replica) and its metrics.
    answered = {probes["readiness"]["path"], probes["liveness"]["path"]}
    assert answered | {annotations["prometheus.io/path"]} <= MaxConcurrencyMiddleware.BYPASS_PATHS


def test_kubernetes_resources_match_the_services_cores_model() -> None:
    found = manifests()
    pod = found["Deployment"]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    resources = container["resources"]
    # The service uses every core it sees: whole cores, requests == limits (Guaranteed).
    assert resources["requests"] == resources["limits"]
    cpus = quantity(resources["limits"]["cpu"])
    assert cpus == int(cpus) >= 1
    check_environment({e["name"]: e["value"] for e in container["env"]}, cpus=cpus)
    # Requests in flight when a pod stops finish before it is killed.
    assert pod["terminationGracePeriodSeconds"] > SERVICE_CONFIG["traffic"]["timeout"]
    hpa = found["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"]["name"] == found["Deployment"]["metadata"]["name"]
    assert [metric["resource"]["name"] for metric in hpa["metrics"]] == ["cpu"]
    assert 1 <= hpa["minReplicas"] <= hpa["maxReplicas"]


def test_the_ingress_passes_what_the_service_accepts() -> None:
    annotations = manifests()["Ingress"]["metadata"]["annotations"]
    prefix = "nginx.ingress.kubernetes.io/"
    # A proxy refusing smaller bodies, or giving up sooner, would hide the service's limits.
    assert nginx_size(annotations[prefix + "proxy-body-size"]) >= Limits().max_upload_bytes
    timeout = SERVICE_CONFIG["traffic"]["timeout"]
    assert int(annotations[prefix + "proxy-read-timeout"]) > timeout
    assert int(annotations[prefix + "proxy-send-timeout"]) > timeout
    assert {prefix + "limit-rps", prefix + "limit-connections"} <= set(annotations)


def unknown_keys(config: dict[str, Any], schema: type) -> set[str]:
    """Keys of ``config`` that ``schema`` does not have: BentoML ignores them silently."""
    return set(config) - {field.name for field in attr.fields(schema)}


def test_bentocloud_configuration_is_bentomls_schema_and_fits_the_service() -> None:
    config = yaml.safe_load((DEPLOY / "bentocloud.yaml").read_text())
    assert not unknown_keys(config, CreateDeploymentSchema) - {"cluster"}
    assert set(config["services"]) == {SERVICE}
    service = config["services"][SERVICE]
    assert not unknown_keys(service, DeploymentServiceConfig)
    assert not unknown_keys(service["scaling"], DeploymentTargetHPAConf)
    bentoml_cattr.structure(config, CreateDeploymentSchema)  # what `bentoml deploy` sends

    scaling = service["scaling"]
    assert 1 <= scaling["min_replicas"] <= scaling["max_replicas"]
    check_environment(
        {e["name"]: e["value"] for e in service["envs"]},
        cpus=INSTANCE_CPUS[service["instance_type"]],
    )
    traffic = service["config_overrides"]["traffic"]
    # The autoscaler's target: below the count at which a replica starts refusing.
    assert 1 <= traffic["concurrency"] < SERVICE_CONFIG["traffic"]["max_concurrency"]
    assert set(traffic) == {"concurrency"}  # the service's own timeout and limit stand


@pytest.mark.parametrize(
    ("text", "expected"), [("20m", 20 * 2**20), ("512k", 512 * 1024), ("100", 100)]
)
def test_nginx_sizes_are_read_as_nginx_reads_them(text: str, expected: int) -> None:
    assert nginx_size(text) == expected
