"""deploy/kubernetes: every manifest passes `kubernetes-validate --strict` for 1.29 (the first
release with native sidecars) and for the newest release it knows; every Service reaches a port
of its pods' main containers; the sidecar runs hardened, probed and sized; its config comes from
a ConfigMap that `mtls-sidecar check` accepts, its key material from a Secret mounted 0400."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from proxy.tls import pki
from tests.harness import SIDECAR
from tests.pkifactory import make_ca, write_ca

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
MANIFESTS = sorted(DEPLOY.glob("*.yaml"))
VALIDATE = str(Path(sys.executable).parent / "kubernetes-validate")
FIRST_WITH_NATIVE_SIDECARS = "1.29.0"
UID = 65532


def need_module(name: str) -> ModuleType:
    """kubernetes-validate (and the PyYAML it brings) come with the `test` extra."""
    try:
        return importlib.import_module(name)
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is required: pip install -e '.[test]' (kubernetes-validate)")
        pytest.skip(f"{name} not installed: pip install -e '.[test]' (kubernetes-validate)")


def documents() -> list[dict[str, Any]]:
    yaml = need_module("yaml")
    docs = []
    for path in MANIFESTS:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                doc["__file__"] = path.name
                docs.append(doc)
    return docs


def of_kind(kind: str) -> list[dict[str, Any]]:
    return [d for d in documents() if d["kind"] == kind]


def pod_specs() -> Iterator[tuple[str, dict[str, Any], dict[str, str]]]:
    """(name, pod spec, pod labels) of every Pod and every workload's pod template."""
    for doc in documents():
        if doc["kind"] == "Pod":
            yield doc["metadata"]["name"], doc["spec"], doc["metadata"].get("labels", {})
        elif doc["kind"] in {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}:
            template = doc["spec"]["template"]
            yield doc["metadata"]["name"], template["spec"], template["metadata"]["labels"]


def sidecars(spec: dict[str, Any]) -> list[dict[str, Any]]:
    every = spec.get("initContainers", []) + spec["containers"]
    return [c for c in every if "/mtls-sidecar:" in c["image"]]


def test_there_are_manifests_for_a_pod_a_deployment_a_service_and_a_pdb() -> None:
    kinds = {d["kind"] for d in documents()}
    assert {"ConfigMap", "Pod", "Deployment", "Service", "PodDisruptionBudget"} <= kinds


def newest_known_version() -> str:
    utils = need_module("kubernetes_validate.utils")
    return str(utils.latest_version())


@pytest.mark.parametrize("version", [FIRST_WITH_NATIVE_SIDECARS, "newest"])
def test_every_manifest_validates_strictly(version: str) -> None:
    if version == "newest":
        version = newest_known_version()
    need_module("kubernetes_validate")
    out = subprocess.run(
        [VALIDATE, "--strict", "--quiet", "--kubernetes-version", version,
         *map(str, MANIFESTS)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert "ERROR" not in out.stdout + out.stderr


def test_every_service_target_port_is_a_number_on_a_main_container_of_its_pods() -> None:
    services = of_kind("Service")
    assert services
    for service in services:
        selector = service["spec"]["selector"]
        pods = [
            (name, spec) for name, spec, labels in pod_specs() if selector.items() <= labels.items()
        ]
        assert pods, f"{service['metadata']['name']}: selects no pod in {DEPLOY}"
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            # A named targetPort is looked up in `containers` only: on a native sidecar it
            # leaves the Service without endpoints (kubernetes/kubernetes#127958).
            assert isinstance(target, int), f"{service['metadata']['name']}: {target!r}"
            for name, spec in pods:
                served = {
                    (p["containerPort"], p.get("protocol", "TCP"))
                    for c in spec["containers"]
                    for p in c.get("ports", [])
                }
                assert (target, port.get("protocol", "TCP")) in served, (
                    f"Service {service['metadata']['name']} -> {target}: no main container of "
                    f"{name} declares it ({sorted(served)})"
                )


def test_the_pod_runs_the_sidecar_natively_before_the_app() -> None:
    (pod,) = of_kind("Pod")
    (sidecar,) = pod["spec"]["initContainers"]
    assert "/mtls-sidecar:" in sidecar["image"] and sidecar["restartPolicy"] == "Always"
    assert sidecar["startupProbe"]["httpGet"]["path"] == "/readyz"


def test_ingress_runs_two_replicas_that_a_disruption_budget_keeps_serving() -> None:
    (deployment,) = of_kind("Deployment")
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    (pdb,) = of_kind("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["minAvailable"] == 1


def test_every_sidecar_is_hardened_probed_sized_and_reads_key_material_from_a_secret() -> None:
    specs = list(pod_specs())
    assert len(specs) >= 2
    for name, spec, _ in specs:
        pod_context = spec["securityContext"]
        assert pod_context["runAsNonRoot"] is True and pod_context["runAsUser"] == UID, name
        assert pod_context["seccompProfile"] == {"type": "RuntimeDefault"}, name
        # defaultMode 0400 is readable by the sidecar only through the group fsGroup gives
        assert pod_context["fsGroup"] == UID, name
        assert spec["terminationGracePeriodSeconds"] > 20, name  # above drain_timeout
        volumes = {v["name"]: v for v in spec["volumes"]}
        (sidecar,) = sidecars(spec)
        context = sidecar["securityContext"]
        assert context["runAsNonRoot"] is True and context["readOnlyRootFilesystem"] is True
        assert context["allowPrivilegeEscalation"] is False
        assert context["capabilities"] == {"drop": ["ALL"]}
        assert context["seccompProfile"] == {"type": "RuntimeDefault"}
        assert sidecar["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert sidecar["readinessProbe"]["httpGet"]["path"] == "/readyz"
        resources = sidecar["resources"]
        assert {"cpu", "memory"} <= resources["requests"].keys() <= resources["limits"].keys()
        mounts = {m["mountPath"]: m for m in sidecar["volumeMounts"]}
        tls = mounts["/etc/mtls-sidecar/tls"]
        assert "subPath" not in tls and tls["readOnly"] is True  # Secret updates reach it
        assert volumes[tls["name"]]["secret"]["defaultMode"] == 0o400
        config = mounts["/etc/mtls-sidecar/config.toml"]
        assert "configMap" in volumes[config["name"]]
        assert volumes[mounts["/tmp"]["name"]]["emptyDir"]["medium"] == "Memory"
        assert sidecar["args"] == ["run", "-c", "/etc/mtls-sidecar/config.toml"]


def key_material(config: Path) -> None:
    """Throwaway files under the names CONFIG uses, matching its D1 environment and issuer."""
    doc = tomllib.loads(config.read_text())
    folder = config.parent
    files: dict[str, bytes] = {}
    for egress in doc.get("egress", []):
        root = make_ca("C=FR,O=Thales-like,CN=Thales-like Client Root")
        ca = root.issue("C=FR,O=Thales-like,CN=Thales-like Client Issuing CA", ca=True)
        gateway = egress["oauth"]["issuer"]
        client = ca.issue(f"C=FR,O=Merchant,CN=TLSMA-ECDSA/{gateway}/D1.{egress['env']}",
                          client=True)  # fmt: skip
        files[egress["client_cert"]] = client.chain_pem()
        files[egress["client_key"]] = client.key_pem()
        files[egress["oauth"]["signing_key"]] = pki.private_key_pem(pki.make_oauth_key())
    for ingress in doc.get("ingress", []):
        issuing = make_ca("C=US,O=Public-like,CN=Web Root").issue(
            "C=US,O=Public-like,CN=Web Issuing CA", ca=True
        )
        server = issuing.issue("CN=callbacks.merchant.example",
                               dns=("callbacks.merchant.example",), server=True)  # fmt: skip
        files[ingress["server_cert"]] = server.chain_pem()
        files[ingress["server_key"]] = server.key_pem()
        write_ca(make_ca("C=FR,O=Thales-like,CN=Thales Client CA"), folder / ingress["client_ca"])
    for name, data in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        path.chmod(0o600)


@pytest.mark.parametrize("configmap", ["mtls-sidecar-egress", "mtls-sidecar-ingress"])
def test_configmap_config_passes_check_once_its_placeholders_are_filled(
    configmap: str, tmp_path: Path
) -> None:
    (doc,) = [d for d in of_kind("ConfigMap") if d["metadata"]["name"] == configmap]
    config = tmp_path / "config.toml"
    config.write_text(doc["data"]["config.toml"].replace('"CHANGE-ME-', '"registered-'))
    key_material(config)
    out = subprocess.run(
        [SIDECAR, "check", "-c", str(config), "--json"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    report = json.loads(out.stdout)
    # (a port of the manifest that something on this machine already binds is not the
    # config's fault: check says so as a warning, left out here)
    findings = [
        f for f in report["findings"] if f["level"] != "info" and "in use (" not in f["message"]
    ]
    assert out.returncode == 0 and report["ok"] is True, findings
    assert findings == []  # no error, and no warning either
