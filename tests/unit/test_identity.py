"""proxy.identity: the verified peer as headers, and the headers a peer may not set itself."""

from __future__ import annotations

import base64
import datetime
import hashlib
import re
from urllib.parse import unquote

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID, ObjectIdentifier
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.tls.identity import (
    FAMILIES,
    identity_headers,
    is_identity_header,
    rfc4514_subject,
    subject_matches,
)
from tests.pkifactory import Issued, make_ca, name

ROOT = make_ca()
INTERMEDIATE = ROOT.issue("C=FR,O=Test PKI,CN=Test Intermediate CA", ca=True)
NOT_AFTER = datetime.datetime(2031, 5, 1, 12, 0, 0, tzinfo=datetime.UTC)
LEAF = INTERMEDIATE.issue(
    "C=FR,O=Thales,CN=TLSMA-ECDSA/abcdefghij/D1.PRD",
    client=True,
    dns=("a.d1.example", "b.d1.example"),
    uris=("spiffe://d1.example/notify",),
    not_after=NOT_AFTER,
)
PEER_CHAIN = [LEAF.cert, *LEAF.chain, ROOT.cert]  # as verified: leaf, intermediate, root


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(Encoding.DER)


def headers_of(
    chain: list[x509.Certificate], families: tuple[str, ...] = FAMILIES
) -> dict[bytes, bytes]:
    pairs = identity_headers(chain, families)
    assert len({n for n, _ in pairs}) == len(pairs), "a header name appears twice"
    return dict(pairs)


def reload(issued: Issued) -> x509.Certificate:
    """The certificate as a peer's DER would give it, not the builder's object."""
    return x509.load_der_x509_certificate(der(issued.cert))


def cert_with(subject: x509.Name, serial: int = 1) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ROOT.cert.subject)
        .public_key(LEAF.key.public_key())
        .serial_number(serial)
        .not_valid_before(NOT_AFTER - datetime.timedelta(days=365))
        .not_valid_after(NOT_AFTER)
    )
    return builder.sign(ROOT.key, hashes.SHA256())


# --- an independent reading of Envoy's XFCC grammar --------------------------------------------


def parse_xfcc(header: str) -> list[list[tuple[str, str]]]:
    """Elements split on unquoted ',', pairs on unquoted ';', key and value on the first '='.

    A value is either bare (no ',;="\\' and no whitespace) or wholly double-quoted with '"' and
    '\\' backslash-escaped inside. Anything else is a grammar error (ValueError).
    """
    elements: list[list[tuple[str, str]]] = [[]]
    i, end = 0, len(header)
    while True:
        eq = header.find("=", i)
        if eq < 0:
            raise ValueError(f"no '=' after offset {i}")
        key = header[i:eq]
        if not re.fullmatch(r"[A-Za-z]+", key):
            raise ValueError(f"bad key {key!r}")
        i = eq + 1
        if i < end and header[i] == '"':
            chars: list[str] = []
            i += 1
            while True:
                if i >= end:
                    raise ValueError("unterminated quoted value")
                ch = header[i]
                if ch == "\\":
                    if i + 1 >= end or header[i + 1] not in '"\\':
                        raise ValueError(f"bad escape at {i}")
                    chars.append(header[i + 1])
                    i += 2
                elif ch == '"':
                    i += 1
                    break
                else:
                    chars.append(ch)
                    i += 1
            value = "".join(chars)
        else:
            match = re.compile(r'[^,;="\\\s]*').match(header, i)
            assert match is not None
            value = match.group()
            i = match.end()
        elements[-1].append((key, value))
        if i == end:
            return elements
        if header[i] == ",":
            elements.append([])
        elif header[i] != ";":
            raise ValueError(f"unexpected {header[i]!r} at {i}")
        i += 1


def xfcc_of(chain: list[x509.Certificate]) -> list[tuple[str, str]]:
    value = headers_of(chain, ("xfcc",))[b"x-forwarded-client-cert"]
    elements = parse_xfcc(value.decode("ascii"))
    assert len(elements) == 1
    return elements[0]


def test_parse_xfcc_reads_envoys_documented_example() -> None:
    example = (
        "By=http://frontend.lyft.com;Hash=468ed33b;"
        'Subject="/C=US/ST=CA/L=San Francisco/OU=Lyft/CN=Test Client";'
        "URI=http://testclient.lyft.com,By=http://backend.lyft.com;DNS=a\\"
    )
    with pytest.raises(ValueError):
        parse_xfcc(example)  # a bare backslash is not allowed
    assert parse_xfcc(example[:-2] + '"a\\\\"') == [
        [
            ("By", "http://frontend.lyft.com"),
            ("Hash", "468ed33b"),
            ("Subject", "/C=US/ST=CA/L=San Francisco/OU=Lyft/CN=Test Client"),
            ("URI", "http://testclient.lyft.com"),
        ],
        [("By", "http://backend.lyft.com"), ("DNS", "a\\")],
    ]


# --- stripping ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "header",
    [
        b"client-cert",
        b"client-cert-chain",
        b"x-forwarded-client-cert",
        b"x-client-verify",
        b"x-client-subject",
        b"x-client-anything",
        b"x-client-",
    ],
)
def test_ingress_strips_spoofable_identity_header(header: bytes) -> None:
    assert is_identity_header(header)


@pytest.mark.parametrize(
    "header",
    [
        b"x-clientele",
        b"x-client",
        b"client-certificate-foo",
        b"client-cert-chains",
        b"x-forwarded-client-certificate",
        b"x-forwarded-for",
        b"x-correlation-id",
        b"authorization",
    ],
)
def test_ingress_keeps_lookalike_header(header: bytes) -> None:
    assert not is_identity_header(header)


def test_every_header_we_emit_is_one_we_strip() -> None:
    for header, _ in identity_headers(PEER_CHAIN, FAMILIES):
        assert header == header.lower()
        assert is_identity_header(header), header


# --- client-cert (RFC 9440) --------------------------------------------------------------------


def sf_binary(value: bytes) -> bytes:
    assert value.startswith(b":") and value.endswith(b":"), value
    return base64.b64decode(value[1:-1], validate=True)


def test_client_cert_carries_leaf_der() -> None:
    headers = headers_of(PEER_CHAIN, ("client-cert",))
    assert sf_binary(headers[b"client-cert"]) == der(LEAF.cert)


def test_client_cert_chain_lists_intermediates_without_leaf_or_root() -> None:
    headers = headers_of(PEER_CHAIN, ("client-cert",))
    items = headers[b"client-cert-chain"].split(b", ")
    assert [sf_binary(i) for i in items] == [der(INTERMEDIATE.cert)]


def test_client_cert_chain_keeps_order_of_several_intermediates() -> None:
    second = INTERMEDIATE.issue("C=FR,O=Test PKI,CN=Issuing CA", ca=True)
    leaf = second.issue("CN=leaf", client=True)
    chain = [leaf.cert, *leaf.chain, ROOT.cert]
    value = headers_of(chain, ("client-cert",))[b"client-cert-chain"]
    assert [sf_binary(i) for i in value.split(b", ")] == [der(second.cert), der(INTERMEDIATE.cert)]


def test_client_cert_chain_absent_when_peer_is_issued_by_the_root() -> None:
    leaf = ROOT.issue("CN=direct", client=True)
    headers = headers_of([leaf.cert, ROOT.cert], ("client-cert",))
    assert set(headers) == {b"client-cert"}


# --- xfcc (Envoy) ------------------------------------------------------------------------------


def test_xfcc_header_is_envoys_grammar_exactly() -> None:
    value = headers_of(PEER_CHAIN, ("xfcc",))[b"x-forwarded-client-cert"]
    assert value == (
        b"Hash=" + hashlib.sha256(der(LEAF.cert)).hexdigest().encode() + b";"
        b'Subject="CN=TLSMA-ECDSA/abcdefghij/D1.PRD,O=Thales,C=FR";'
        b"URI=spiffe://d1.example/notify;DNS=a.d1.example;DNS=b.d1.example"
    )


def test_xfcc_hash_is_sha256_of_leaf_der() -> None:
    pairs = dict(xfcc_of(PEER_CHAIN))
    assert pairs["Hash"] == hashlib.sha256(der(LEAF.cert)).hexdigest()


def test_xfcc_quotes_uri_holding_equals_and_semicolon() -> None:
    uri = 'https://d1.example/p;v=1?a=b,c&q="x"'
    leaf = ROOT.issue("CN=q", uris=(uri,))
    value = headers_of([leaf.cert], ("xfcc",))[b"x-forwarded-client-cert"]
    assert b'URI="https://d1.example/p;v=1?a=b,c&q=\\"x\\""' in value
    assert dict(xfcc_of([leaf.cert]))["URI"] == uri


def test_xfcc_escapes_backslash_and_quote_inside_subject() -> None:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, 'a"b\\c,d')])
    cert = cert_with(subject)
    value = headers_of([cert], ("xfcc",))[b"x-forwarded-client-cert"]
    # RFC 4514 first (CN=a\"b\\c\,d), then Envoy's quoting of '"' and '\'.
    assert b'Subject="CN=a\\\\\\"b\\\\\\\\c\\\\,d"' in value
    assert dict(xfcc_of([cert]))["Subject"] == 'CN=a\\"b\\\\c\\,d'


def test_xfcc_percent_encodes_control_characters_in_sans() -> None:
    leaf = ROOT.issue("CN=s", dns=("evil\r\nx-client-verify: SUCCESS",))
    value = headers_of([leaf.cert], ("xfcc",))[b"x-forwarded-client-cert"]
    assert value.endswith(b";DNS=evil%0D%0Ax-client-verify:%20SUCCESS")


def test_xfcc_has_no_san_keys_without_sans() -> None:
    leaf = ROOT.issue("CN=nosan")
    assert [k for k, _ in xfcc_of([leaf.cert])] == ["Hash", "Subject"]


# --- x-client ----------------------------------------------------------------------------------


def test_x_client_headers_describe_the_leaf() -> None:
    headers = headers_of(PEER_CHAIN, ("x-client",))
    assert headers == {
        b"x-client-verify": b"SUCCESS",
        b"x-client-subject": b"CN=TLSMA-ECDSA/abcdefghij/D1.PRD,O=Thales,C=FR",
        b"x-client-issuer": b"CN=Test Intermediate CA,O=Test PKI,C=FR",
        b"x-client-serial": headers[b"x-client-serial"],  # random; checked below
        b"x-client-fingerprint-sha256": hashlib.sha256(der(LEAF.cert)).hexdigest().encode(),
        b"x-client-not-after": b"2031-05-01T12:00:00Z",
    }
    serial = headers[b"x-client-serial"]
    assert re.fullmatch(rb"(?:[0-9A-F]{2})+", serial), serial
    assert int(serial, 16) == LEAF.cert.serial_number


@pytest.mark.parametrize(
    ("serial", "expected"),
    [(1, b"01"), (0xABC, b"0ABC"), (0xBEEF, b"BEEF"), (0x7F_FF_FF_FF_FF, b"7FFFFFFFFF")],
)
def test_x_client_serial_is_upper_case_hex_of_even_length(serial: int, expected: bytes) -> None:
    cert = cert_with(name("CN=serial"), serial=serial)
    assert headers_of([cert], ("x-client",))[b"x-client-serial"] == expected


# --- families ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("families", "names"),
    [
        ((), set()),
        (("client-cert",), {b"client-cert", b"client-cert-chain"}),
        (("xfcc",), {b"x-forwarded-client-cert"}),
        (
            ("x-client",),
            {
                b"x-client-verify",
                b"x-client-subject",
                b"x-client-issuer",
                b"x-client-serial",
                b"x-client-fingerprint-sha256",
                b"x-client-not-after",
            },
        ),
    ],
)
def test_only_enabled_families_are_emitted(families: tuple[str, ...], names: set[bytes]) -> None:
    assert set(headers_of(PEER_CHAIN, families)) == names


def test_unknown_family_is_refused() -> None:
    with pytest.raises(ValueError, match="x-ssl"):
        identity_headers(PEER_CHAIN, ["xfcc", "x-ssl"])


def test_empty_chain_is_refused() -> None:
    with pytest.raises(ValueError, match="leaf"):
        identity_headers([], FAMILIES)


# --- subject encoding --------------------------------------------------------------------------


def test_subject_is_cryptographys_rfc4514_string_for_plain_ascii() -> None:
    cert = reload(LEAF)
    assert rfc4514_subject(cert) == cert.subject.rfc4514_string()


def test_non_ascii_and_control_characters_become_utf8_hex_escapes() -> None:
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, " Zoë\r\n\x00\x7f "),
            x509.NameAttribute(NameOID.COMMON_NAME, "#€"),
        ]
    )
    cert = cert_with(subject)
    assert rfc4514_subject(cert) == "CN=\\#\\E2\\82\\AC,O=\\20Zo\\C3\\AB\\0D\\0A\\00\\7F\\20"
    assert x509.Name.from_rfc4514_string(rfc4514_subject(cert)) == subject


# --- allow_subjects ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("patterns", "allowed"),
    [
        (["CN=TLSMA-ECDSA/*/D1.PRD"], True),
        (["CN=TLSMA-*/D1.PPR"], False),
        (["CN=tlsma-ecdsa/*"], False),  # case-sensitive
        (["CN=*.d1.example", "CN=TLSMA-ECDSA/abcdefghij/D1.PRD"], True),
        (["CN=TLSMA-ECDSA/abcdefghij/D1.PRD,O=Thales,C=FR"], True),
        (["CN=TLSMA-*,O=Thales,C=FR"], True),
        (["CN=*,O=Thales,C=FR"], True),
        (["CN=*,O=Other,C=FR"], False),
        (["C = FR, O = Thales, CN = TLSMA-ECDSA/*/D1.PRD"], True),
        (["/C=FR/O=Thales/CN=TLSMA-ECDSA/abcdefghij/D1.PRD"], True),
        (["/C=FR/O=Thales/CN=TLSMA-ECDSA/abcdefghij/D1.PPR"], False),
        (["C=FR,O=Thales,CN=TLSMA-ECDSA/abcdefghij/D1.PRD"], False),  # RFC 4514: CN first
        (["O=Thales"], False),  # a pattern of several types must name the whole DN
        (["CN=*,C=FR"], False),
        ([], False),
    ],
)
def test_allow_subjects_patterns(patterns: list[str], allowed: bool) -> None:
    assert subject_matches(LEAF.cert, patterns) is allowed


def test_cn_pattern_does_not_match_across_rdns() -> None:
    cert = cert_with(name("C=FR,O=evil.d1.example,CN=x"))
    assert rfc4514_subject(cert) == "CN=x,O=evil.d1.example,C=FR"
    assert not subject_matches(cert, ["CN=*.d1.example"])
    assert subject_matches(cert_with(name("CN=x.d1.example")), ["CN=*.d1.example"])


def test_cn_pattern_tries_every_common_name() -> None:
    cert = cert_with(name("CN=first,CN=second.d1.example"))
    assert subject_matches(cert, ["CN=*.d1.example"])
    assert not subject_matches(cert, ["CN=third"])


def test_cn_pattern_compares_the_value_not_its_escaped_text() -> None:
    cert = cert_with(name("CN=Zoë"))
    assert subject_matches(cert, ["CN=Zo\\C3\\AB"])
    assert subject_matches(cert, ["CN=Zoë"])
    assert not subject_matches(cert, ["CN=Zo\\\\C3\\\\AB"])


# --- properties --------------------------------------------------------------------------------

SPECIALS = ',;="\\+<># \t\r\n\x00\x7f'
ANY_TEXT = st.characters(codec="utf-8")  # every code point a certificate can carry in UTF-8
OIDS = [
    NameOID.COMMON_NAME,
    NameOID.ORGANIZATION_NAME,
    NameOID.ORGANIZATIONAL_UNIT_NAME,
    NameOID.LOCALITY_NAME,
    ObjectIdentifier("1.3.6.1.4.1.99999.1"),
]


def attribute_values(alphabet: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.text(st.one_of(st.sampled_from(SPECIALS), alphabet), min_size=1, max_size=16)


def names(values: st.SearchStrategy[str]) -> st.SearchStrategy[x509.Name]:
    attribute = st.builds(x509.NameAttribute, st.sampled_from(OIDS), values)
    rdn = st.lists(attribute, min_size=1, max_size=2, unique=True).map(
        x509.RelativeDistinguishedName
    )
    return st.lists(rdn, min_size=1, max_size=4).map(x509.Name)


san_values = st.text(st.characters(max_codepoint=0x7F, exclude_characters="%"), max_size=24)


@settings(max_examples=200, deadline=None)
@given(
    subject=names(attribute_values(ANY_TEXT)),
    dns=st.lists(san_values.filter(bool), max_size=3),
    uris=st.lists(san_values.filter(bool), max_size=2),
)
def test_xfcc_round_trips_any_subject_and_sans(
    subject: x509.Name, dns: list[str], uris: list[str]
) -> None:
    issued = ROOT.issue("CN=unused", subject_name=subject, dns=tuple(dns), uris=tuple(uris))
    cert = reload(issued)
    pairs = xfcc_of([cert])
    fields = dict(pairs)
    assert fields["Hash"] == hashlib.sha256(der(cert)).hexdigest()
    assert x509.Name.from_rfc4514_string(fields["Subject"]) == cert.subject
    assert [unquote(v) for k, v in pairs if k == "URI"] == uris
    assert [unquote(v) for k, v in pairs if k == "DNS"] == dns


@settings(max_examples=200, deadline=None)
@given(subject=names(attribute_values(ANY_TEXT)), issuer=names(attribute_values(ANY_TEXT)))
def test_every_header_value_is_safe_on_the_wire(subject: x509.Name, issuer: x509.Name) -> None:
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(LEAF.key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOT_AFTER - datetime.timedelta(days=1))
        .not_valid_after(NOT_AFTER)
        .sign(ROOT.key, hashes.SHA256())
    )
    cert = x509.load_der_x509_certificate(der(cert))
    headers = headers_of([cert], FAMILIES)
    for value in headers.values():
        assert re.fullmatch(rb"[!-~]([ -~]*[!-~])?", value), value
    assert x509.Name.from_rfc4514_string(headers[b"x-client-subject"].decode()) == cert.subject
    assert x509.Name.from_rfc4514_string(headers[b"x-client-issuer"].decode()) == cert.issuer


def decode_utf8_hex_escapes(text: str) -> str:
    """Turn runs of RFC 4514 '\\XX' escapes back into text, leaving '\\c' escapes alone."""
    out: list[str] = []
    pending = bytearray()
    i = 0
    while i < len(text):
        if text[i] == "\\" and re.fullmatch(r"[0-9A-F]{2}", text[i + 1 : i + 3]):
            pending.append(int(text[i + 1 : i + 3], 16))
            i += 3
            continue
        if pending:
            out.append(pending.decode("utf-8"))
            pending.clear()
        step = 2 if text[i] == "\\" else 1
        out.append(text[i : i + step])
        i += step
    if pending:
        out.append(pending.decode("utf-8"))
    return "".join(out)


printable = st.characters(codec="utf-8", exclude_categories=("Cc", "Cs"))


@settings(max_examples=200, deadline=None)
@given(
    subject=names(
        st.text(
            st.one_of(st.sampled_from(',;="\\+<># '), printable), min_size=1, max_size=16
        ).filter(lambda v: v == v.strip(" "))
    )
)
def test_subject_decodes_to_cryptographys_rfc4514_string(subject: x509.Name) -> None:
    cert = cert_with(subject)
    encoded = rfc4514_subject(cert)
    assert re.fullmatch(r"[ -~]*", encoded)
    assert decode_utf8_hex_escapes(encoded) == cert.subject.rfc4514_string()
