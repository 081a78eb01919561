"""allow_subjects entries: the three DN forms openssl and RFC 4514 use, parsed and compared as
names (types, values, order), globs in values, clear errors for what is not a DN."""

from __future__ import annotations

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy import subjects
from proxy.subjects import PatternError, parse, rfc4514

D1 = x509.Name.from_rfc4514_string(
    'CN=TLSMA-ECDSA/abcdefghij/D1.PPR,OU=Payments,O=Merchant \\"SAS\\"\\, Paris,ST=IDF,C=FR'
)
# what `openssl x509 -noout -subject` and `-nameopt compat` print for D1 (checked against the
# real openssl in tests/integration/test_ingress.py)
ONELINE = (
    'C = FR, ST = IDF, O = "Merchant \\"SAS\\", Paris", OU = Payments, '
    "CN = TLSMA-ECDSA/abcdefghij/D1.PPR"
)
COMPAT = '/C=FR/ST=IDF/O=Merchant "SAS", Paris/OU=Payments/CN=TLSMA-ECDSA/abcdefghij/D1.PPR'
RFC4514 = 'CN=TLSMA-ECDSA/abcdefghij/D1.PPR,OU=Payments,O=Merchant \\"SAS\\"\\, Paris,ST=IDF,C=FR'


@pytest.mark.parametrize("entry", [ONELINE, COMPAT, RFC4514], ids=["oneline", "compat", "4514"])
def test_each_form_reads_as_the_same_name(entry: str) -> None:
    pattern = parse(entry)
    assert str(pattern) == rfc4514(D1) == RFC4514
    assert pattern.matches(D1)
    assert not pattern.common_name_only


def test_slash_form_keeps_the_literal_slashes_of_a_d1_common_name() -> None:
    pattern = parse("/C=FR/O=X/CN=TLSMA-ECDSA/abcdefghij/D1.PPR")
    assert [str(a) for rdn in pattern.rdns for a in rdn] == [
        "C=FR",
        "O=X",
        "CN=TLSMA-ECDSA/abcdefghij/D1.PPR",
    ]
    # a '/' starts an RDN only before a known type and '=': this one stays in the value
    assert [str(a) for a in parse("/CN=a/b=c/O=x").rdns[0]] == ["CN=a/b=c"]


# a value with every character the forms escape, and what OpenSSL 3.0 prints for it
TRICKY = x509.Name(
    [
        x509.NameAttribute(NameOID.COUNTRY_NAME, "FR"),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, 'A/B+C, "D" =E\\F Zoë'),
        x509.NameAttribute(NameOID.COMMON_NAME, "TLSMA-ECDSA/ab/D1.PPR"),
    ]
)


@pytest.mark.parametrize(
    "printed",
    [
        'C = FR, O = "A/B+C, \\"D\\" =E\\\\F Zo\\C3\\AB", CN = TLSMA-ECDSA/ab/D1.PPR',
        '/C=FR/O=A\\/B\\+C, "D" =E\\F Zo\\xC3\\xAB/CN=TLSMA-ECDSA\\/ab\\/D1.PPR',
        'CN=TLSMA-ECDSA/ab/D1.PPR,O=A/B\\+C\\, \\"D\\" =E\\\\F Zo\\C3\\AB,C=FR',
    ],
    ids=["default", "compat", "RFC2253"],
)
def test_what_openssl_3_prints_for_every_escape_reads_back(printed: str) -> None:
    pattern = parse(printed)
    assert pattern.matches(TRICKY)
    assert str(pattern) == rfc4514(TRICKY)


def test_globs_in_each_form() -> None:
    for entry in (
        "C = FR, ST = *, O = *, OU = Payments, CN = TLSMA-ECDSA/*/D1.PPR",
        "/C=FR/ST=*/O=*/OU=Payments/CN=TLSMA-ECDSA/*/D1.PPR",
        "CN=TLSMA-ECDSA/*/D1.PPR,OU=Payments,O=*,ST=*,C=FR",
        "CN=TLSMA-?????/abcdefghij/D1.PPR,OU=Payments,O=*,ST=IDF,C=FR",
    ):
        assert parse(entry).matches(D1), entry
    assert not parse("/C=FR/ST=*/O=*/OU=Payments/CN=TLSMA-ECDSA/*/D1.PRD").matches(D1)


def test_order_is_what_each_form_implies() -> None:
    name = x509.Name.from_rfc4514_string("CN=y,O=x,C=FR")
    assert parse("CN=y,O=x,C=FR").matches(name)
    assert parse("C = FR, O = x, CN = y").matches(name)
    assert parse("/C=FR/O=x/CN=y").matches(name)
    # the same RDNs in the other order are another name
    assert not parse("C=FR,O=x,CN=y").matches(name)
    assert not parse("CN = y, O = x, C = FR").matches(name)
    assert not parse("/CN=y/O=x/C=FR").matches(name)


def test_a_pattern_is_the_whole_name_except_a_lone_common_name() -> None:
    name = x509.Name.from_rfc4514_string("CN=x.d1.example,O=Acme,C=FR")
    assert parse("CN=*.d1.example").matches(name)
    assert parse("CN = *.d1.example").matches(name)
    assert parse("/CN=*.d1.example").matches(name)
    assert not parse("O=Acme").matches(name)
    assert not parse("CN=*.d1.example,O=Acme").matches(name)  # C=FR is missing
    assert not parse("CN=*,O=Acme,C=FR,DC=extra").matches(name)


def test_a_star_never_spans_two_attributes() -> None:
    evil = x509.Name.from_rfc4514_string("CN=x,O=evil.d1.example")
    assert rfc4514(evil) == "CN=x,O=evil.d1.example"
    assert not parse("CN=*.d1.example").matches(evil)
    assert not parse("CN=*").matches(x509.Name.from_rfc4514_string("O=only"))


def test_types_ignore_case_and_values_do_not() -> None:
    name = x509.Name.from_rfc4514_string("CN=Client,O=Acme")
    assert parse("cn=Client,o=Acme").matches(name)
    assert parse("commonName = Client").matches(name)
    assert not parse("CN=client,O=Acme").matches(name)


def test_escaped_wildcards_are_literal() -> None:
    star = x509.Name.from_rfc4514_string("CN=a*b")
    assert parse("CN=a\\*b").matches(star)
    assert not parse("CN=a\\*b").matches(x509.Name.from_rfc4514_string("CN=axxb"))
    assert str(parse("CN=a\\*b")) == "CN=a\\*b"
    assert str(parse("/CN=a\\*b")) == "CN=a\\*b"


def test_multi_valued_rdns_compare_as_sets() -> None:
    name = x509.Name(
        [
            x509.RelativeDistinguishedName(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Acme"),
                    x509.NameAttribute(NameOID.COMMON_NAME, "x"),
                ]
            )
        ]
    )
    for entry in ("CN=x+O=Acme", "O=Acme+CN=x", "O = Acme + CN = x", "/O=Acme+CN=x"):
        assert parse(entry).matches(name), entry
    assert not parse("CN=x+O=Other").matches(name)


def test_non_ascii_values_in_each_escape() -> None:
    name = x509.Name.from_rfc4514_string("CN=Zoë")
    for entry in ("CN=Zoë", "CN=Zo\\C3\\AB", "CN = Zo\\C3\\AB", "/CN=Zo\\xC3\\xAB"):
        assert parse(entry).matches(name), entry
        assert str(parse(entry)) == rfc4514(name) == "CN=Zo\\C3\\AB"


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("client.example", "expected TYPE=value"),
        ("*,O=Thales,C=FR", "expected TYPE=value"),
        ("XY=1", "unknown attribute type 'XY'"),
        ("CN=", "empty value"),
        ("CN=a,", "nothing after the last ','"),
        ('O = "open', "no closing"),
        ("CN=a\\", "lone"),
        ("CN=#0403", "hex-encoded"),
        ("CN=\\C3", "not UTF-8"),
        ("/", "'/' alone"),
        ("/d1.example/CN=x", "'d1.example': expected TYPE=value"),
        ("/CN", "expected TYPE=value"),
    ],
)
def test_what_is_not_a_name_is_an_error_that_says_why(entry: str, problem: str) -> None:
    with pytest.raises(PatternError, match=problem.replace("(", r"\(")):
        parse(entry)


def test_rfc4514_in_openssl_order_is_flagged() -> None:
    assert parse("C=FR,O=x,CN=y").looks_reversed
    assert not parse("CN=y,O=x,C=FR").looks_reversed
    assert not parse("C = FR, O = x, CN = y").looks_reversed
    assert not parse("/C=FR/CN=y").looks_reversed


def test_the_attribute_names_are_cryptography_s() -> None:
    for kind, oid in subjects.TYPES.items():
        value = "FR" if oid == NameOID.COUNTRY_NAME else "v"
        attribute = x509.NameAttribute(oid, value)
        assert subjects.attribute_name(oid) == attribute.rfc4514_attribute_name, kind


# --- properties --------------------------------------------------------------------------------

OIDS = [
    NameOID.COMMON_NAME,
    NameOID.ORGANIZATION_NAME,
    NameOID.ORGANIZATIONAL_UNIT_NAME,
    NameOID.LOCALITY_NAME,
    NameOID.SERIAL_NUMBER,
]
VALUES = st.text(st.characters(codec="utf-8"), min_size=1, max_size=12)


def names() -> st.SearchStrategy[x509.Name]:
    attribute = st.builds(x509.NameAttribute, st.sampled_from(OIDS), VALUES)
    rdn = st.lists(attribute, min_size=1, max_size=2, unique_by=lambda a: a.oid).map(
        x509.RelativeDistinguishedName
    )
    return st.lists(rdn, min_size=1, max_size=4).map(x509.Name)


@settings(max_examples=300, deadline=None)
@given(names())
def test_a_subject_as_logged_is_a_pattern_that_admits_it(name: x509.Name) -> None:
    logged = rfc4514(name)
    pattern = parse(logged)
    assert pattern.matches(name)
    assert parse(str(pattern)) == pattern  # the normalised form reads back as itself
    if "*" not in logged and "?" not in logged:
        assert str(pattern) == logged


@settings(max_examples=300, deadline=None)
@given(names(), names())
def test_an_exact_pattern_admits_only_its_own_name(a: x509.Name, b: x509.Name) -> None:
    pattern = parse(rfc4514(a).replace("*", "\\*").replace("?", "\\?"))
    if pattern.common_name_only:
        return  # one CN alone admits any subject holding that CN
    same = [sorted((x.oid.dotted_string, x.value) for x in r) for r in a.rdns] == [
        sorted((x.oid.dotted_string, x.value) for x in r) for r in b.rdns
    ]
    assert pattern.matches(b) is same


@settings(max_examples=500, deadline=None)
@given(st.text(st.characters(codec="utf-8"), max_size=40))
def test_any_text_parses_or_says_why(text: str) -> None:
    try:
        pattern = parse(text)
    except PatternError as e:
        assert str(e)
    else:
        assert parse(str(pattern)) == pattern
