"""Certificate revocation lists for ingress: reading them, matching them to client_ca, and
telling when they go stale. The handshake itself is OpenSSL's (X509_V_FLAG_CRL_CHECK)."""

from __future__ import annotations

import datetime
import re
from pathlib import Path

import attrs
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

_PEM_CRL = re.compile(rb"-----BEGIN X509 CRL-----.+?-----END X509 CRL-----", re.DOTALL)

# OpenSSL X509_V_ERR_* of revocation checking
CRL_UNAVAILABLE = 3  # unable to get certificate CRL
CRL_SIGNATURE = 8  # CRL signature failure
CRL_NOT_YET_VALID = 11
CRL_EXPIRED = 12  # past its nextUpdate
REVOKED = 23


class CRLError(Exception):
    """A CRL file that cannot be used; the message names the file and the reason."""


@attrs.frozen
class Revocation:
    """What the server context checks against: the CRLs, how far up, what a stale one does."""

    path: Path
    crls: tuple[x509.CertificateRevocationList, ...]
    check: str = "leaf"  # "leaf" | "chain"
    stale: str = "warn"  # "warn" | "refuse"

    def stale_at(self) -> datetime.datetime | None:
        """When the first of the CRLs passes its nextUpdate (None: none has one)."""
        times = [t for t in (next_update(c) for c in self.crls) if t is not None]
        return min(times) if times else None

    def stale_ones(self, now: datetime.datetime) -> list[x509.CertificateRevocationList]:
        return [c for c in self.crls if (t := next_update(c)) is not None and t <= now]


def read_crls(path: Path, what: str = "client_crl") -> list[x509.CertificateRevocationList]:
    """Every CRL in a file: one or more PEM blocks, or a single DER CRL."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CRLError(f"{what} {path}: cannot read: {e.strerror or e}") from None
    if b"-----BEGIN" in data:
        blocks = _PEM_CRL.findall(data)
        if not blocks:
            raise CRLError(f"{what} {path}: no PEM CRL in it (expected -----BEGIN X509 CRL-----)")
        crls = []
        for i, block in enumerate(blocks, 1):
            try:
                crls.append(x509.load_pem_x509_crl(block))
            except ValueError as e:
                raise CRLError(f"{what} {path}: CRL number {i} does not parse: {e}") from None
        return crls
    try:
        return [x509.load_der_x509_crl(data)]
    except ValueError:
        raise CRLError(
            f"{what} {path}: neither PEM CRLs (-----BEGIN X509 CRL-----) nor a DER CRL"
        ) from None


def next_update(crl: x509.CertificateRevocationList) -> datetime.datetime | None:
    return crl.next_update_utc


def issuer_of(
    crl: x509.CertificateRevocationList, cas: tuple[x509.Certificate, ...] | list[x509.Certificate]
) -> x509.Certificate | None:
    """The CA among `cas` whose key signed the CRL (its name must match too)."""
    for ca in cas:
        if ca.subject != crl.issuer:
            continue
        key = ca.public_key()
        if isinstance(
            key,
            ec.EllipticCurvePublicKey
            | rsa.RSAPublicKey
            | ed25519.Ed25519PublicKey
            | ed448.Ed448PublicKey,
        ) and crl.is_signature_valid(key):
            return ca
    return None


def describe(crl: x509.CertificateRevocationList) -> str:
    """A CRL as an operator tells it apart: its issuer and its nextUpdate."""
    nu = next_update(crl)
    when = nu.strftime("%Y-%m-%dT%H:%M:%SZ") if nu else "none"
    return f"CRL of {crl.issuer.rfc4514_string()} (nextUpdate {when})"


def near_stale(crl: x509.CertificateRevocationList, now: datetime.datetime) -> bool:
    """Within the last quarter of its own validity (thisUpdate -> nextUpdate): a CA that
    publishes on schedule has replaced it well before then, whatever its period."""
    nu = next_update(crl)
    if nu is None:
        return False
    period = nu - crl.last_update_utc
    return now >= nu - period / 4


def is_self_signed(cert: x509.Certificate) -> bool:
    return cert.issuer == cert.subject
