"""Key and certificate policy: D1's DN and key rules, chain inspection, CSRs, JWKs, key files.

Pure functions over `cryptography` objects, shared by the `csr`, `oauth-key`, `check` and
`probe` commands. Problems are returned as sentences an operator can act on; only functions
that cannot produce a result raise (ValueError with the reason).
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
import itertools
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import service_identity
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, SignatureAlgorithmOID
from service_identity.cryptography import (
    verify_certificate_hostname,
    verify_certificate_ip_address,
)

CsrKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
KeyType = Literal["ecdsa", "rsa"]

D1_ENVS = ("PPR", "PRD")
D1_KEY_RULE = "D1 requires RSA 4096 or ECDSA P-256"
GATEWAY_ID = re.compile(r"^[A-Za-z0-9_-]{10}$")
D1_CN = re.compile(
    r"^TLSMA-(?P<alg>RSA|ECDSA)/(?P<gateway_id>[A-Za-z0-9_-]{10})/D1\.(?P<env>PPR|PRD)$"
)
D1_CN_TEMPLATE = "TLSMA-<RSA|ECDSA>/<merchantGatewayId>/D1.<PPR|PRD>"

_CURVE_NAMES = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}
_GENERIC_CURVES = frozenset(_CURVE_NAMES)
_GENERIC_RULE = "profile generic accepts RSA >= 2048, ECDSA P-256/P-384/P-521, Ed25519 or Ed448"
# Upper bounds from RFC 5280's ub-* values; a longer value makes a CSR the CA rejects.
_DN_MAX = {"state": 128, "locality": 128, "org": 64, "org_unit": 64}


# --- D1's subject DN policy -------------------------------------------------------------------


def d1_common_name(key_type: str, gateway_id: str, env: str) -> str:
    """The CN D1 requires: TLSMA-ECDSA/<id>/D1.<env> or TLSMA-RSA/<id>/D1.<env> (literal '/')."""
    alg = {"ecdsa": "ECDSA", "rsa": "RSA"}.get(key_type.lower())
    if alg is None:
        raise ValueError(f"key type {key_type!r}: expected ecdsa or rsa")
    _check_env(env)
    _check_gateway_id(gateway_id)
    return f"TLSMA-{alg}/{gateway_id}/D1.{env}"


def d1_client_cert_problems(cert: x509.Certificate, env: str | None) -> list[str]:
    """What in a client certificate breaks D1's DN policy (the key itself: key_policy_problem).

    `env` is the environment the route talks to ("PPR"/"PRD"), or None when unknown.
    """
    problems: list[str] = []
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(cns) != 1:
        what = "no CN" if not cns else f"{len(cns)} CNs"
        problems.append(f"subject has {what}; D1 requires one CN={D1_CN_TEMPLATE}")
    else:
        cn = _attr_text(cns[0])
        match = D1_CN.match(cn)
        if match is None:
            problems.append(f"CN {cn!r} does not match D1's pattern {D1_CN_TEMPLATE}")
        else:
            key_alg = _cn_alg_for_key(cert.public_key())
            if match["alg"] != key_alg:
                key = _key_phrase(cert.public_key())
                problems.append(f"CN {cn!r} names {match['alg']} but the key is {key}")
            if env is not None and match["env"] != env:
                problems.append(f"CN {cn!r} is for D1.{match['env']} but the route expects {env}")
    sig_hash = _signature_hash_name(cert)
    if sig_hash != "SHA-256":
        problems.append(f"signature uses {sig_hash}; D1 requires SHA-256")
    return problems


# --- key policy --------------------------------------------------------------------------------


def key_policy_problem(public_key: PublicKeyTypes, profile: str) -> str | None:
    """None when the key is acceptable under `profile` ("d1" or "generic"), else the reason.

    d1: RSA exactly 4096 bits or ECDSA P-256. generic: OpenSSL security level 2 (RSA >= 2048,
    ECDSA P-256/P-384/P-521, Ed25519, Ed448).
    """
    if profile == "d1":
        if isinstance(public_key, rsa.RSAPublicKey) and public_key.key_size == 4096:
            return None
        if isinstance(public_key, ec.EllipticCurvePublicKey) and public_key.curve.name == (
            "secp256r1"
        ):
            return None
        return f"{_key_phrase(public_key)}; {D1_KEY_RULE}"
    if profile == "generic":
        if isinstance(public_key, rsa.RSAPublicKey):
            if public_key.key_size >= 2048:
                return None
            return f"{_key_phrase(public_key)}; profile generic requires RSA >= 2048 bits"
        if isinstance(public_key, ec.EllipticCurvePublicKey):
            if public_key.curve.name in _GENERIC_CURVES:
                return None
            return f"{_key_phrase(public_key)}; {_GENERIC_RULE}"
        if isinstance(public_key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
            return None
        return f"{_key_phrase(public_key)}; {_GENERIC_RULE}"
    raise ValueError(f"unknown key profile {profile!r}: expected d1 or generic")


def describe_key(public_key: PublicKeyTypes) -> str:
    """Short key description: "ECDSA P-256", "RSA 4096", "Ed25519"."""
    if isinstance(public_key, rsa.RSAPublicKey):
        return f"RSA {public_key.key_size}"
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return f"ECDSA {_CURVE_NAMES.get(public_key.curve.name, public_key.curve.name)}"
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return "Ed25519"
    if isinstance(public_key, ed448.Ed448PublicKey):
        return "Ed448"
    if isinstance(public_key, dsa.DSAPublicKey):
        return f"DSA {public_key.key_size}"
    return type(public_key).__name__.removeprefix("_").removesuffix("PublicKey") or "unknown key"


def _key_phrase(public_key: PublicKeyTypes) -> str:
    # Sizes read better with their unit in a sentence: "RSA 2048 bits; D1 requires ...".
    text = describe_key(public_key)
    if isinstance(public_key, rsa.RSAPublicKey | dsa.DSAPublicKey):
        text += " bits"
    return text


def _cn_alg_for_key(public_key: PublicKeyTypes) -> str:
    if isinstance(public_key, rsa.RSAPublicKey):
        return "RSA"
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return "ECDSA"
    return describe_key(public_key)


def _signature_hash_name(cert: x509.Certificate) -> str:
    try:
        algorithm = cert.signature_hash_algorithm
    except UnsupportedAlgorithm:
        return f"an unsupported algorithm ({cert.signature_algorithm_oid.dotted_string})"
    if algorithm is None:  # Ed25519/Ed448 sign the message itself, without a separate hash
        oid = cert.signature_algorithm_oid
        return _PURE_SIGNATURES.get(oid, oid.dotted_string)
    return _HASH_NAMES.get(algorithm.name, algorithm.name.upper())


_HASH_NAMES = {
    "md5": "MD5",
    "sha1": "SHA-1",
    "sha224": "SHA-224",
    "sha256": "SHA-256",
    "sha384": "SHA-384",
    "sha512": "SHA-512",
}
_PURE_SIGNATURES = {
    SignatureAlgorithmOID.ED25519: "Ed25519",
    SignatureAlgorithmOID.ED448: "Ed448",
}


# --- certificate inspection --------------------------------------------------------------------

_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----\r?\n.+?-----END CERTIFICATE-----", re.DOTALL)


def load_pem_chain(data: bytes) -> list[x509.Certificate]:
    """Every CERTIFICATE block of a PEM file, in file order (other blocks, e.g. keys, skipped)."""
    blocks = _PEM_CERT.findall(data)
    if not blocks:
        raise ValueError("no PEM certificate found (expected -----BEGIN CERTIFICATE-----)")
    chain = []
    for index, block in enumerate(blocks, 1):
        try:
            chain.append(x509.load_pem_x509_certificate(block))
        except ValueError as e:
            raise ValueError(
                f"certificate {index} of {len(blocks)} is not valid PEM/DER: {e}"
            ) from e
    return chain


_WEAK_HASHES = frozenset({"MD5", "SHA-1"})


def weak_signature_problems(chain: Sequence[x509.Certificate]) -> list[str]:
    """Certificates signed with MD5 or SHA-1, which OpenSSL and partners refuse."""
    problems: list[str] = []
    for index, cert in enumerate(chain, 1):
        if cert.issuer == cert.subject:
            continue  # a root's self-signature is never checked
        sig_hash = _signature_hash_name(cert)
        if sig_hash in _WEAK_HASHES:
            problems.append(
                f"certificate {index} ({cert.subject.rfc4514_string()}) is signed with"
                f" {sig_hash}, which TLS peers refuse: have it reissued with SHA-256"
            )
    return problems


def chain_order_problems(chain: Sequence[x509.Certificate]) -> list[str]:
    """Each certificate must be issued (name and signature) by the one that follows it."""
    problems: list[str] = []
    for index, (cert, parent) in enumerate(itertools.pairwise(chain), 1):
        subject = cert.subject.rfc4514_string()
        if _signature_hash_name(cert) in _WEAK_HASHES:
            continue  # not verifiable here; weak_signature_problems says why
        if cert.issuer != parent.subject:
            problems.append(
                f"certificate {index} ({subject}) is issued by {cert.issuer.rfc4514_string()}"
                f" but certificate {index + 1} is {parent.subject.rfc4514_string()}:"
                " order the file leaf first, then each issuer"
            )
            continue
        try:
            cert.verify_directly_issued_by(parent)
        except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm) as e:
            reason = str(e) or "bad signature"
            problems.append(
                f"certificate {index} ({subject}) is not signed by certificate {index + 1}"
                f" ({parent.subject.rfc4514_string()}): {reason}"
            )
    return problems


def days_left(cert: x509.Certificate, now: datetime.datetime) -> float:
    """Days until notAfter (negative once expired); `now` must be timezone-aware."""
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    return (cert.not_valid_after_utc - now).total_seconds() / 86400


def key_matches_cert(private_key: PrivateKeyTypes, cert: x509.Certificate) -> bool:
    """True when the private key is the one whose public half the certificate carries."""
    return _spki(private_key.public_key()) == _spki(cert.public_key())


def san_covers(cert: x509.Certificate, hostname: str) -> bool:
    """RFC 6125 matching on SANs only (no CN fallback): DNS names, one left wildcard, IPs."""
    host = hostname.strip("[]")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        is_ip = False
    else:
        is_ip = True
    try:
        if is_ip:
            verify_certificate_ip_address(cert, host)
        else:
            verify_certificate_hostname(cert, host)
    except (service_identity.VerificationError, service_identity.CertificateError):
        return False
    return True


def describe(cert: x509.Certificate) -> dict[str, str]:
    """The facts an operator reads about a certificate, as strings."""
    return {
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "serial": f"{cert.serial_number:x}",
        "not_before": cert.not_valid_before_utc.isoformat(),
        "not_after": cert.not_valid_after_utc.isoformat(),
        "sha256": cert.fingerprint(hashes.SHA256()).hex(),
        "key": describe_key(cert.public_key()),
        "signature_hash": _signature_hash_name(cert),
    }


def _spki(public_key: PublicKeyTypes) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


# --- CSR ---------------------------------------------------------------------------------------

_KEY_TYPE_SPELLING = re.compile(
    r"^(?P<family>rsa|ecdsa|ec)(?:[-_:]?(?P<param>[a-z0-9-]+))?$", re.IGNORECASE
)


def parse_key_type(text: str) -> KeyType:
    """'ecdsa' or 'rsa' (also 'rsa4096', 'ecdsa-p256', ...); other sizes/curves: D1's reason."""
    match = _KEY_TYPE_SPELLING.match(text.strip())
    if match is None:
        raise ValueError(f"key type {text!r}: expected ecdsa (P-256) or rsa (4096 bits)")
    family = match["family"].lower()
    param = (match["param"] or "").lower().replace("-", "")
    if family == "rsa":
        if param in ("", "4096"):
            return "rsa"
        if not param.isdigit():
            raise ValueError(f"key type {text!r}: expected ecdsa (P-256) or rsa (4096 bits)")
        raise ValueError(f"RSA {param} bits; {D1_KEY_RULE}")
    curve = _CURVE_SPELLINGS.get(param, param)
    if curve == "P-256":
        return "ecdsa"
    raise ValueError(f"ECDSA {curve}; {D1_KEY_RULE}")


_CURVE_SPELLINGS = {
    "": "P-256",
    "256": "P-256",
    "p256": "P-256",
    "prime256v1": "P-256",
    "secp256r1": "P-256",
    "384": "P-384",
    "p384": "P-384",
    "secp384r1": "P-384",
    "521": "P-521",
    "p521": "P-521",
    "secp521r1": "P-521",
}


def make_key(key_type: str) -> CsrKey:
    """A new key D1 accepts: "ecdsa" -> P-256, "rsa" -> RSA 4096; anything else: ValueError."""
    if parse_key_type(key_type) == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=4096)
    return ec.generate_private_key(ec.SECP256R1())


def d1_subject(
    key_type: str,
    *,
    env: str,
    gateway_id: str,
    country: str,
    state: str,
    locality: str,
    org: str,
    org_unit: str,
) -> x509.Name:
    """Subject C, ST, L, O, OU, CN under D1's policy; ValueError names the bad value."""
    cn = d1_common_name(key_type, gateway_id, env)
    if not re.fullmatch(r"[A-Za-z]{2}", country):
        raise ValueError(f"country {country!r}: expected a two-letter ISO 3166 code such as FR")
    fields = {"state": state, "locality": locality, "org": org, "org_unit": org_unit}
    for field, value in fields.items():
        _check_dn_value(field, value)
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, country.upper()),
            x509.NameAttribute(NameOID.STATE_OR_PROVINCE_NAME, state),
            x509.NameAttribute(NameOID.LOCALITY_NAME, locality),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, org_unit),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def make_csr(
    key: CsrKey,
    *,
    env: str,
    gateway_id: str,
    country: str,
    state: str,
    locality: str,
    org: str,
    org_unit: str,
) -> x509.CertificateSigningRequest:
    """A SHA-256 CSR with subject C, ST, L, O, OU, CN; the CN follows D1's policy for `key`."""
    problem = key_policy_problem(key.public_key(), "d1")
    if problem is not None:
        raise ValueError(problem)
    subject = d1_subject(
        "rsa" if isinstance(key, rsa.RSAPrivateKey) else "ecdsa",
        env=env,
        gateway_id=gateway_id,
        country=country,
        state=state,
        locality=locality,
        org=org,
        org_unit=org_unit,
    )
    return x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256())


def _check_env(env: str) -> None:
    if env not in D1_ENVS:
        raise ValueError(f"environment {env!r}: expected PPR or PRD")


def _check_gateway_id(gateway_id: str) -> None:
    if not GATEWAY_ID.match(gateway_id):
        raise ValueError(
            f"gateway id {gateway_id!r}: D1's merchantGatewayId is exactly 10 characters"
            " of A-Z a-z 0-9 _ -"
        )


def _check_dn_value(field: str, value: str) -> None:
    option = "--" + field.replace("_", "-")
    if not value or value != value.strip():
        raise ValueError(f"{option} {value!r}: empty or surrounded by spaces")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise ValueError(f"{option} {value!r}: contains a control character")
    if len(value) > _DN_MAX[field]:
        raise ValueError(f"{option}: longer than {_DN_MAX[field]} characters")


def _attr_text(attribute: x509.NameAttribute[str | bytes]) -> str:
    value = attribute.value
    return value if isinstance(value, str) else value.decode("latin-1")


# --- server CSR (ingress) --------------------------------------------------------------------

_SERVER_RSA_SIZES = (2048, 3072, 4096)
_SERVER_CURVES: dict[str, ec.EllipticCurve] = {
    "P-256": ec.SECP256R1(),
    "P-384": ec.SECP384R1(),
    "P-521": ec.SECP521R1(),
}
_SERVER_RULE = (
    "a server key (profile generic) is RSA 2048, 3072 or 4096 bits or ECDSA P-256/P-384/P-521"
)
_DNS_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


def parse_server_key_type(text: str) -> tuple[KeyType, int | str]:
    """A server key under the generic policy: ('ecdsa', 'P-256'|'P-384'|'P-521') or
    ('rsa', 2048|3072|4096); 'ecdsa' alone is P-256 and 'rsa' alone is 4096 bits."""
    usage = "expected ecdsa (P-256), ecdsa-p384, ecdsa-p521, rsa (4096), rsa2048 or rsa3072"
    match = _KEY_TYPE_SPELLING.match(text.strip())
    if match is None:
        raise ValueError(f"key type {text!r}: {usage}")
    param = (match["param"] or "").lower().replace("-", "")
    if match["family"].lower() == "rsa":
        size = int(param) if param.isdigit() else 4096 if not param else 0
        if size in _SERVER_RSA_SIZES:
            return "rsa", size
        if size:
            raise ValueError(f"RSA {size} bits; {_SERVER_RULE}")
        raise ValueError(f"key type {text!r}: {usage}")
    curve = _CURVE_SPELLINGS.get(param, param.upper())
    if curve in _SERVER_CURVES:
        return "ecdsa", curve
    raise ValueError(f"ECDSA {curve}; {_SERVER_RULE}")


def make_server_key(spec: tuple[KeyType, int | str]) -> CsrKey:
    family, param = spec
    if family == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=int(param))
    return ec.generate_private_key(_SERVER_CURVES[str(param)])


def server_dns_name(text: str) -> str:
    """A DNS name for a server certificate's subjectAltName, as the CA wants it: lowercase
    A-labels, at most one leading '*.' wildcard; ValueError says what is wrong."""
    try:
        ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        pass
    else:
        raise ValueError(f"--dns {text!r}: an IP address, not a DNS name")
    name = text.rstrip(".").lower()
    wildcard = name.startswith("*.")
    try:
        ascii_name = name[2 if wildcard else 0 :].encode("idna").decode("ascii")
    except UnicodeError:
        raise ValueError(f"--dns {text!r}: not a valid DNS name") from None
    labels = ascii_name.split(".")
    if len(labels) < 2 or not all(_DNS_LABEL.match(label) for label in labels):
        raise ValueError(f"--dns {text!r}: not a fully qualified DNS name such as api.example.com")
    return ("*." if wildcard else "") + ascii_name


def make_server_csr(
    key: CsrKey, dns: Sequence[str], subject: Mapping[str, str] | None = None
) -> x509.CertificateSigningRequest:
    """A SHA-256 CSR for an ingress server certificate: every name in the subjectAltName, the
    first as CN, plus whichever of C, ST, L, O, OU are given (for OV certificates)."""
    problem = key_policy_problem(key.public_key(), "generic")
    if problem is not None:
        raise ValueError(problem)
    names = list(dict.fromkeys(server_dns_name(d) for d in dns))
    if not names:
        raise ValueError("a server CSR needs at least one --dns NAME")
    given = dict(subject or {})
    attributes = []
    country = given.pop("country", None)
    if country is not None:
        if not re.fullmatch(r"[A-Za-z]{2}", country):
            raise ValueError(f"country {country!r}: expected a two-letter ISO 3166 code such as FR")
        attributes.append(x509.NameAttribute(NameOID.COUNTRY_NAME, country.upper()))
    oids = {
        "state": NameOID.STATE_OR_PROVINCE_NAME,
        "locality": NameOID.LOCALITY_NAME,
        "org": NameOID.ORGANIZATION_NAME,
        "org_unit": NameOID.ORGANIZATIONAL_UNIT_NAME,
    }
    for field, oid in oids.items():
        value = given.pop(field, None)
        if value is not None:
            _check_dn_value(field, value)
            attributes.append(x509.NameAttribute(oid, value))
    if given:
        raise ValueError(f"unknown subject fields: {', '.join(sorted(given))}")
    # a CN holds at most 64 characters (RFC 5280 ub-common-name); the SAN carries every name
    if len(names[0]) <= 64:
        attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, names[0]))
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name(attributes))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .sign(key, hashes.SHA256())
    )


# --- OAuth assertion key (ES256) -------------------------------------------------------------


def make_oauth_key() -> ec.EllipticCurvePrivateKey:
    """A P-256 key for D1's ES256 client assertions; its public half is registered at onboarding."""
    return ec.generate_private_key(ec.SECP256R1())


def public_jwk(public_key: PublicKeyTypes, kid: str | None) -> dict[str, str]:
    """The public JWK (RFC 7517/7518) of a P-256 key, for ES256 signatures."""
    if not (
        isinstance(public_key, ec.EllipticCurvePublicKey) and public_key.curve.name == "secp256r1"
    ):
        raise ValueError(f"{describe_key(public_key)}: ES256 needs an ECDSA P-256 key")
    numbers = public_key.public_numbers()
    jwk = {
        "kty": "EC",
        "crv": "P-256",
        "x": _b64url(numbers.x.to_bytes(32, "big")),
        "y": _b64url(numbers.y.to_bytes(32, "big")),
        "alg": "ES256",
        "use": "sig",
    }
    if kid is not None:
        jwk["kid"] = kid
    return jwk


_THUMBPRINT_MEMBERS = {
    "EC": ("crv", "kty", "x", "y"),
    "RSA": ("e", "kty", "n"),
    "OKP": ("crv", "kty", "x"),
    "oct": ("k", "kty"),
}


def jwk_thumbprint(jwk: Mapping[str, str]) -> str:
    """RFC 7638 SHA-256 thumbprint, base64url without padding."""
    members = _THUMBPRINT_MEMBERS.get(jwk.get("kty", ""))
    if members is None:
        raise ValueError(f"JWK kty {jwk.get('kty')!r}: expected EC, RSA, OKP or oct")
    missing = [m for m in members if m not in jwk]
    if missing:
        raise ValueError(f"JWK lacks required member(s) {', '.join(missing)}")
    canonical = json.dumps({m: jwk[m] for m in members}, separators=(",", ":"), sort_keys=True)
    return _b64url(hashlib.sha256(canonical.encode("utf-8")).digest())


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


# --- files -------------------------------------------------------------------------------------


def write_new_file(path: Path, data: bytes, mode: int) -> None:
    """Create `path` with `mode` and write `data`; never replaces an existing file or symlink.

    The mode is set on the open descriptor, so the umask cannot widen or narrow it, and the file
    never exists with looser permissions. Data and directory entry are fsynced; a failed write
    removes the partial file.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, mode)
    except FileExistsError:
        raise FileExistsError(f"{path} already exists; refusing to overwrite it") from None
    except NotADirectoryError:
        # the OS says only "Not a directory": name the part of the path that is a file
        blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), path.parent)
        raise NotADirectoryError(f"{path}: {blocker} is a file, not a folder") from None
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: folder {path.parent} does not exist") from None
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories; the file itself is synced
    finally:
        os.close(fd)


def private_key_pem(key: PrivateKeyTypes) -> bytes:
    """Unencrypted PKCS#8 PEM (the service reads keys through systemd credentials, not a
    passphrase prompt)."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
