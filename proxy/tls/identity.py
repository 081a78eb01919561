"""The verified TLS peer as headers for the internal app, and which incoming headers to strip.

Three header families, each enabled by name in ``identity_headers`` (see ``FAMILIES``):

- ``client-cert``: RFC 9440. ``client-cert: :<base64 DER of the leaf>:`` and, when the peer's
  chain holds more than the leaf, ``client-cert-chain: :<b64>:, :<b64>:`` with the certificates
  after the leaf in the order given; self-signed ones (trust anchors) are left out, as RFC 9440
  allows, since the app has the anchor from configuration anyway.
- ``xfcc``: Envoy's ``x-forwarded-client-cert``: ``Hash=<sha256 hex>;Subject="<DN>"`` then one
  ``URI=`` per URI SAN and one ``DNS=`` per DNS SAN. Subject is always quoted; any other value
  is quoted when it holds ``,``, ``;``, ``=``, ``"``, ``\\`` or whitespace, and inside quotes
  ``"`` and ``\\`` are backslash-escaped (Envoy's documented grammar). There is no ``By`` key:
  the element describes the peer only.
- ``x-client``: ``x-client-verify: SUCCESS``, ``x-client-subject``, ``x-client-issuer`` (DNs),
  ``x-client-serial`` (upper-case hex, even length), ``x-client-fingerprint-sha256`` (lower-case
  hex of the DER's SHA-256) and ``x-client-not-after`` (RFC 3339, UTC).

Every incoming header of these families is removed whatever is enabled (``is_identity_header``),
so an app behind the sidecar never sees an identity the peer wrote itself.

Wire encoding. Every value produced here is visible ASCII (0x21-0x7E) with inner spaces only,
so it survives HTTP/1.1 and no control character ever passes through. Distinguished names are
RFC 4514 strings in the order and with the attribute names of cryptography's
``Name.rfc4514_string()``, and with its escapes for ``"+,;<>\\`` and a leading ``#``; on top of
that every character outside printable ASCII (non-ASCII text, control characters, DEL, NUL) is
written as RFC 4514 ``\\XX`` hex escapes of its UTF-8 bytes, and a space at either end of a value
as ``\\20``. Any RFC 4514 parser reverses this, e.g. ``x509.Name.from_rfc4514_string`` gives back
the certificate's name; for ASCII subjects without such edge cases the string is exactly
``rfc4514_string()``. SAN values are ASCII by construction (IA5String); a space, control
character or DEL in one is percent-encoded (``%20``) as RFC 3986 requires of a URI, so valid URIs
and host names pass unchanged.

``allow_subjects`` matching (``subject_matches``): each entry is a distinguished name pattern,
compared as a name (``proxy.subjects``), never as text.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Collection, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding

from proxy import subjects
from proxy.subjects import SubjectPattern, hex_bytes

FAMILIES = ("client-cert", "xfcc", "x-client")

STRIPPED_NAMES = frozenset((b"client-cert", b"client-cert-chain", b"x-forwarded-client-cert"))
STRIPPED_PREFIX = b"x-client-"


def is_identity_header(name: bytes) -> bool:
    """True for an identity header the peer must not set; ``name`` is already lower-case."""
    return name in STRIPPED_NAMES or name.startswith(STRIPPED_PREFIX)


def identity_headers(
    chain: Sequence[x509.Certificate], families: Collection[str]
) -> list[tuple[bytes, bytes]]:
    """(lower-case name, value) pairs describing ``chain`` (leaf first) for ``families``."""
    unknown = set(families).difference(FAMILIES)
    if unknown:
        raise ValueError(f"unknown identity header families {sorted(unknown)}; known: {FAMILIES}")
    if not chain:
        raise ValueError("identity headers need at least the peer's leaf certificate")
    leaf = chain[0]
    der = leaf.public_bytes(Encoding.DER)
    headers: list[tuple[bytes, bytes]] = []
    if "client-cert" in families:
        headers.append((b"client-cert", _sf_binary(der)))
        intermediates = [c for c in chain[1:] if c.issuer != c.subject]
        if intermediates:
            value = b", ".join(_sf_binary(c.public_bytes(Encoding.DER)) for c in intermediates)
            headers.append((b"client-cert-chain", value))
    if "xfcc" not in families and "x-client" not in families:
        return headers
    fingerprint = leaf.fingerprint(hashes.SHA256()).hex()
    subject = rfc4514_subject(leaf)
    if "xfcc" in families:
        headers.append((b"x-forwarded-client-cert", _xfcc_element(leaf, fingerprint, subject)))
    if "x-client" in families:
        headers += [
            (b"x-client-verify", b"SUCCESS"),
            (b"x-client-subject", subject.encode("ascii")),
            (b"x-client-issuer", _rfc4514(leaf.issuer).encode("ascii")),
            (b"x-client-serial", _serial_hex(leaf.serial_number).encode("ascii")),
            (b"x-client-fingerprint-sha256", fingerprint.encode("ascii")),
            (
                b"x-client-not-after",
                leaf.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ").encode("ascii"),
            ),
        ]
    return headers


def rfc4514_subject(cert: x509.Certificate) -> str:
    """The certificate's subject as a wire-safe RFC 4514 string (see the module docstring)."""
    return _rfc4514(cert.subject)


def subject_matches(cert: x509.Certificate, patterns: Sequence[str | SubjectPattern]) -> bool:
    """True when any ``allow_subjects`` pattern accepts the subject (``proxy.subjects``)."""
    parsed = (p if isinstance(p, SubjectPattern) else subjects.parse(p) for p in patterns)
    return subjects.any_matches(parsed, cert.subject)


def _sf_binary(data: bytes) -> bytes:
    """An RFC 8941 byte sequence, as RFC 9440 carries certificates."""
    return b":" + base64.b64encode(data) + b":"


def _xfcc_element(leaf: x509.Certificate, fingerprint: str, subject: str) -> bytes:
    parts = [f"Hash={fingerprint}", f"Subject={_xfcc_quote(subject)}"]
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        pass
    else:
        parts += [
            "URI=" + _xfcc_value(_san_text(v))
            for v in san.get_values_for_type(x509.UniformResourceIdentifier)
        ]
        parts += ["DNS=" + _xfcc_value(_san_text(v)) for v in san.get_values_for_type(x509.DNSName)]
    return ";".join(parts).encode("ascii")


_XFCC_NEEDS_QUOTES = re.compile(r'[,;="\\\s]')


def _xfcc_value(value: str) -> str:
    return _xfcc_quote(value) if _XFCC_NEEDS_QUOTES.search(value) else value


def _xfcc_quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


_SAN_UNSAFE = re.compile(r"[^!-~]")


def _san_text(value: str) -> str:
    return _SAN_UNSAFE.sub(lambda m: hex_bytes(m.group(), "%"), value)


def _rfc4514(name: x509.Name) -> str:
    return subjects.rfc4514(name)


def _serial_hex(serial: int) -> str:
    digits = f"{abs(serial):X}"
    if len(digits) % 2:
        digits = "0" + digits
    return "-" + digits if serial < 0 else digits
