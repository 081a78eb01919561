"""[tracing] config and the pieces of W3C Trace Context the sidecar reads itself."""

from __future__ import annotations

import builtins
from pathlib import Path
from typing import Any

import pytest

from proxy.config import TracingConfig, parse
from proxy.telemetry.metrics import Metrics
from proxy.telemetry.tracing import Tracer, TracingError, read_headers, trace_id_of

TID = "4bf92f3577b34da6a3ce929d0e0e4736"
EGRESS = """
[[egress]]
name = "d1"
listen = "127.0.0.1:8080"
upstream = "https://api.example"
client_cert = "c.pem"
client_key = "c.key"
"""


def parsed(tmp_path: Path, tracing: str) -> tuple[Any, dict[str, str]]:
    for name in ("c.pem", "c.key", "otlp-headers"):
        (tmp_path / name).write_text("x: y\n")
    conf = tmp_path / "sidecar.toml"
    conf.write_text(tracing + EGRESS)
    config, findings = parse(conf, {})
    return config, {f.key: f.message for f in findings if f.level == "error"}


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (f"00-{TID}-00f067aa0ba902b7-01".encode(), TID),
        (f"01-{TID}-00f067aa0ba902b7-00-more".encode(), TID),  # a later version: read as 00
        (b"00-00000000000000000000000000000000-00f067aa0ba902b7-01", None),  # all-zero trace id
        (b"00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01", None),  # all-zero parent
        (b"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", None),  # invalid version
        (b"00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01", None),  # upper case
        (b"00-4bf92f35-00f067aa0ba902b7-01", None),
        (b"", None),
        (None, None),
    ],
)  # fmt: skip
def test_trace_id_of_a_traceparent(value: bytes | None, expected: str | None) -> None:
    assert trace_id_of(value) == expected


def test_tracing_config_defaults_and_the_standard_path(tmp_path: Path) -> None:
    config, errs = parsed(tmp_path, '[tracing]\notlp_endpoint = "http://127.0.0.1:4318"\n')
    assert errs == {}
    assert config.tracing == TracingConfig("http://127.0.0.1:4318/v1/traces")
    config, errs = parsed(
        tmp_path,
        '[tracing]\notlp_endpoint = "https://otel.example/custom"\nservice_name = "edge"\n'
        'sample_ratio = 0.25\nheaders_file = "otlp-headers"\nmax_queue_size = 100\n'
        "export_timeout = 2.5\n",
    )
    assert errs == {}
    assert config.tracing == TracingConfig(
        "https://otel.example/custom", "edge", 0.25, tmp_path / "otlp-headers", 100, 2.5
    )
    config, errs = parsed(tmp_path, "")
    assert config.tracing is None


def test_tracing_config_errors_name_the_key(tmp_path: Path) -> None:
    _, errs = parsed(
        tmp_path,
        '[tracing]\notlp_endpoint = "grpc://127.0.0.1:4317"\nsample_ratio = 1.5\n'
        'headers_file = "missing"\nmax_queue_size = 0\nexport_timeout = 0\nsampler = "x"\n',
    )
    keys = ("otlp_endpoint", "sample_ratio", "headers_file", "max_queue_size", "export_timeout",
            "sampler")  # fmt: skip
    assert set(errs) == {f"tracing.{k}" for k in keys}
    assert "http(s)://" in errs["tracing.otlp_endpoint"]
    assert errs["tracing.sample_ratio"] == "expected a number from 0 to 1, got 1.5"
    assert errs["tracing.sampler"].startswith("unknown key")
    _, errs = parsed(tmp_path, '[tracing]\notlp_endpoint = "http://u:p@127.0.0.1:4318"\n')
    assert "use headers_file for auth" in errs["tracing.otlp_endpoint"]
    _, errs = parsed(tmp_path, "[tracing]\n")
    assert errs == {"tracing.otlp_endpoint": "missing (required)"}


def test_headers_file_lines_and_a_bad_line_named_without_its_content(tmp_path: Path) -> None:
    path = tmp_path / "h"
    path.write_text("# auth\n\nAuthorization: Bearer abc:def\nX-Scope-OrgID: tenant-1\n")
    assert read_headers(path) == {"authorization": "Bearer abc:def", "x-scope-orgid": "tenant-1"}
    path.write_text("Authorization: Bearer ok\nsecret-without-colon\n")
    with pytest.raises(TracingError) as e:
        read_headers(path)
    assert str(e.value) == f"tracing.headers_file {path}: line 2: expected 'Name: value'"
    assert "secret" not in str(e.value).replace(str(path), "")


def test_without_the_tracing_extra_the_error_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real_import = builtins.__import__

    def no_otel(name: str, *args: Any, **kw: Any) -> Any:
        if name.startswith("opentelemetry"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kw)

    monkeypatch.setattr(builtins, "__import__", no_otel)
    with pytest.raises(TracingError, match=r"pip install 'mtls-sidecar\[tracing\]'"):
        Tracer(TracingConfig("http://127.0.0.1:1/v1/traces"), Metrics.create())


def test_the_tracing_package_is_not_imported_without_tracing() -> None:
    """The data path imports proxy.telemetry.tracing; OpenTelemetry stays unloaded."""
    import subprocess
    import sys

    code = ("import sys, proxy.routes.egress, proxy.ops.service\n"
            "print(any(m.startswith('opentelemetry') for m in sys.modules))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr
