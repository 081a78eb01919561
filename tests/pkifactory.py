"""The tests' certificate factory is the package's shipped testing module, plus CRLs."""

from __future__ import annotations

import datetime
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from proxy.tls.throwaway import DAY, NOW, Issued, make_ca, name, new_key, write_ca

__all__ = [
    "DAY", "NOW", "Issued", "crl_pem", "make_ca", "make_crl", "name", "new_key", "short_lived",
    "write_ca", "write_crl",
]  # fmt: skip


def short_lived(ca: Issued, subject: str, seconds: float, **kw: Any) -> Issued:
    """A certificate valid from a day ago until `seconds` from now. X.509 keeps whole seconds:
    read the exact end from the certificate's not_valid_after_utc."""
    now = datetime.datetime.now(datetime.UTC)
    end = now + datetime.timedelta(seconds=seconds)
    return ca.issue(subject, not_before=now - DAY, not_after=end, **kw)


def make_crl(
    ca: Issued,
    revoked: Iterable[x509.Certificate] = (),
    *,
    last_update: datetime.datetime | None = None,
    next_update: datetime.datetime | None = None,
    signer: Issued | None = None,
) -> x509.CertificateRevocationList:
    """A CRL naming `ca` as issuer that revokes `revoked`; signed by `signer` (default: the CA
    itself; another CA's key makes a CRL whose signature does not verify)."""
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.cert.subject)
        .last_update(last_update or now - DAY)
        .next_update(next_update or now + 7 * DAY)
    )
    for cert in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(cert.serial_number)
            .revocation_date(now - DAY / 2)
            .build()
        )
    return builder.sign((signer or ca).key, hashes.SHA256())


def crl_pem(*crls: x509.CertificateRevocationList) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in crls)


def write_crl(path: Path, *crls: x509.CertificateRevocationList, der: bool = False) -> Path:
    """Write the CRLs to path (PEM; one DER CRL with der=True), replacing it in one step."""
    data = crls[0].public_bytes(serialization.Encoding.DER) if der else crl_pem(*crls)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return path
