"""README's "From zero to D1 PreProd", steps 2 to 4, run as written: the commands of step 2,
the config of step 3 and step 4's `check`, with /etc/mtls-sidecar moved to a temporary folder
and Thales (and the web CA) played by a test CA that signs the CSRs step 2 makes."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from tests.harness import SIDECAR
from tests.pkifactory import DAY, NOW, Issued, make_ca

pytestmark = pytest.mark.integration

README = Path(__file__).resolve().parents[2] / "README.md"


def section(text: str, title: str) -> str:
    start = text.index(f"### {title}")
    end = text.index("\n### ", start + 1)
    return text[start:end]


def blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, re.S)


def sign(csr_path: Path, ca: Issued, dns: tuple[str, ...] = ()) -> bytes:
    """What Thales (or the web CA) returns: a certificate for the CSR's key and subject."""
    csr = x509.load_pem_x509_csr(csr_path.read_bytes())
    builder = (
        x509.CertificateBuilder()
        .subject_name(csr.subject)
        .issuer_name(ca.cert.subject)
        .public_key(csr.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - DAY)
        .not_valid_after(NOW + 365 * DAY)
    )
    if dns:
        names = [x509.DNSName(d) for d in dns]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(ca.key, hashes.SHA256())  # type: ignore[arg-type]
    return cert.public_bytes(serialization.Encoding.PEM) + ca.cert_pem()


def test_steps_2_to_4_work_as_written(tmp_path: Path) -> None:
    text = README.read_text()
    etc = tmp_path / "etc" / "mtls-sidecar"

    def here(s: str) -> str:
        return s.replace("/etc/mtls-sidecar", str(etc))

    env = {k: v for k, v in os.environ.items() if k != "CREDENTIALS_DIRECTORY"}
    env["PATH"] = f"{Path(SIDECAR).parent}:{env['PATH']}"

    def sh(script: str) -> subprocess.CompletedProcess[str]:
        command = ["bash", "-euo", "pipefail", "-c", here(script)]
        return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=120, check=False)  # fmt: skip

    etc.parent.mkdir(parents=True)
    for script in blocks(section(text, "2. Keys and the CSR for Thales"), "sh"):
        done = sh(script)
        assert done.returncode == 0, f"{script}\n{done.stdout}{done.stderr}"

    # Thales signs the client CSR; a web CA the server one; Thales gives its client CA
    thales = make_ca("C=FR,O=Thales-like,CN=Thales-like Client Root")
    web = make_ca("C=US,O=Web-like,CN=Web Root")
    (etc / "keys" / "client-chain.pem").write_bytes(sign(tmp_path / "ppr-client.csr", thales))
    (etc / "tls").mkdir()
    server = sign(tmp_path / "server.csr", web, dns=("callbacks.merchant.example",))
    (etc / "tls" / "fullchain.pem").write_bytes(server)
    (etc / "thales-client-ca-ppr.pem").write_bytes(thales.cert_pem())

    (config,) = blocks(section(text, "3. Configure"), "toml")
    # the one value the reader fills in: the kid Thales confirmed at onboarding
    (etc / "config.toml").write_text(config.replace("<kid registered with Thales>", "kid-1"))

    step4 = blocks(section(text, "4. Check, then probe"), "sh")[0].splitlines()
    first_check = next(i for i, line in enumerate(step4) if line.startswith("mtls-sidecar check"))
    done = sh("\n".join(step4[: first_check + 1]))
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.rstrip().endswith("OK: 0 error(s)"), done.stdout
