"""deploy/prometheus: the alert rules pass `promtool check rules`, every alert fires and stays
quiet in `promtool test rules`, each says what to do, and the PrometheusRule carries the same
groups in a shape the Prometheus Operator accepts."""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
RULES = DEPLOY / "mtls-sidecar-rules.yaml"
RULE_TESTS = DEPLOY / "mtls-sidecar-rules.test.yaml"
OPERATOR_RULE = DEPLOY / "mtls-sidecar-prometheusrule.yaml"
VALIDATE = str(Path(sys.executable).parent / "kubernetes-validate")

# What the issue asks to be alerted on, by alert name.
EXPECTED_ALERTS = {
    "MtlsSidecarCertificateExpiresSoon": "warning",
    "MtlsSidecarCertificateExpiresVerySoon": "critical",
    "MtlsSidecarRouteDown": "critical",
    "MtlsSidecarTokenFetchFailing": "warning",
    "MtlsSidecarReloadFailed": "warning",
    "MtlsSidecarUpstream5xxRatioHigh": "warning",
    "MtlsSidecarHandshakeFailures": "warning",
    "MtlsSidecarWorkersRestarting": "warning",
    "MtlsSidecarAbsent": "critical",
}


def need_module(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is required: pip install -e '.[test]'")
        pytest.skip(f"{name} not installed: pip install -e '.[test]'")


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is required: apt-get install prometheus (.ci/run does)")
        pytest.skip("promtool not installed (Debian package prometheus)")
    return path


def load(path: Path) -> Any:
    return need_module("yaml").safe_load(path.read_text())


def rules() -> list[dict[str, Any]]:
    return [rule for group in load(RULES)["groups"] for rule in group["rules"]]


def test_promtool_checks_the_rules() -> None:
    out = subprocess.run([promtool(), "check", "rules", str(RULES)],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(EXPECTED_ALERTS)} rules found" in out.stdout


def test_promtool_unit_tests_pass() -> None:
    out = subprocess.run([promtool(), "test", "rules", RULE_TESTS.name], cwd=DEPLOY,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_a_broken_rule_fails_its_unit_test(tmp_path: Path) -> None:
    """The unit tests bite: a threshold moved from 14 to 30 days makes them fail."""
    broken = RULES.read_text().replace("< 14 * 86400", "< 30 * 86400")
    assert broken != RULES.read_text()
    (tmp_path / RULES.name).write_text(broken)
    shutil.copy(RULE_TESTS, tmp_path / RULE_TESTS.name)
    out = subprocess.run([promtool(), "test", "rules", RULE_TESTS.name], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode != 0
    assert "MtlsSidecarCertificateExpiresSoon" in out.stdout + out.stderr


def test_every_alert_asked_for_is_there_with_severity_and_what_to_do() -> None:
    found = {r["alert"]: r for r in rules()}
    assert set(found) == set(EXPECTED_ALERTS)
    for name, severity in EXPECTED_ALERTS.items():
        rule = found[name]
        assert rule["labels"]["severity"] == severity, name
        assert rule["annotations"]["summary"].strip(), name
        # a description that tells the reader what to run or change, not only what happened
        description = rule["annotations"]["description"]
        assert len(description) > 120, name
        assert any(w in description for w in ("Run", "Check", "Install", "Renew", "Fix", "Look",
                                               "`")), name  # fmt: skip


def test_every_alert_is_unit_tested_firing_and_not_firing() -> None:
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in load(RULE_TESTS)["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check["exp_alerts"] else quiet).add(check["alertname"])
    assert firing == set(EXPECTED_ALERTS)
    assert quiet == set(EXPECTED_ALERTS)


def test_the_prometheus_rule_resource_holds_the_same_groups() -> None:
    resource = load(OPERATOR_RULE)
    assert resource["apiVersion"] == "monitoring.coreos.com/v1"
    assert resource["kind"] == "PrometheusRule"
    assert resource["spec"]["groups"] == load(RULES)["groups"]


# The PrometheusRule CRD's schema (monitoring.coreos.com/v1, prometheus-operator 0.7x), the parts
# a rule file uses: kubernetes-validate ships only the built-in kinds, so the shape is checked here.
_RULE = {
    "type": "object",
    "required": ["expr"],
    "additionalProperties": False,
    "properties": {
        "alert": {"type": "string"},
        "record": {"type": "string"},
        "expr": {"type": ["string", "integer"]},
        "for": {
            "type": "string",
            "pattern": "^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?"
            "(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$",
        },
        "keep_firing_for": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}
PROMETHEUS_RULE_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PrometheusRule"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            },
        },
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "groups": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["name"],
                        "additionalProperties": False,
                        "properties": {
                            "name": {"type": "string", "minLength": 1},
                            "interval": {"type": "string"},
                            "limit": {"type": "integer"},
                            "partial_response_strategy": {"type": "string"},
                            "rules": {"type": "array", "items": _RULE},
                        },
                    },
                }
            },
        },
    },
}


def test_the_prometheus_rule_resource_validates() -> None:
    """Against the CRD's schema when kubernetes-validate knows it, else the shape above."""
    need_module("kubernetes_validate")
    out = subprocess.run([VALIDATE, "--strict", str(OPERATOR_RULE)],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    if "Couldn't find schema for kind PrometheusRule" not in out.stdout + out.stderr:
        return  # validated against the CRD's own schema
    jsonschema = need_module("jsonschema")
    jsonschema.validate(load(OPERATOR_RULE), PROMETHEUS_RULE_SCHEMA)


def test_the_shape_check_refuses_a_misspelt_key() -> None:
    jsonschema = need_module("jsonschema")
    resource = load(OPERATOR_RULE)
    resource["spec"]["groups"][0]["rules"][0]["annotation"] = {"summary": "x"}
    with pytest.raises(jsonschema.ValidationError, match="annotation"):
        jsonschema.validate(resource, PROMETHEUS_RULE_SCHEMA)


def test_an_unknown_ca_alert_from_the_partner_gets_its_own_reason_label() -> None:
    """The handshake alert's description names unknown_ca: the label must exist."""
    from proxy.ops.service import _reason_label

    detail = "[('SSL routines', '', 'tlsv1 alert unknown ca')]"
    assert _reason_label(detail) == "unknown_ca"
    assert _reason_label("certificate has expired") == "certificate_expired"
