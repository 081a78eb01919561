"""``allow_subjects`` entries: distinguished names in the three forms an operator copies, parsed
into attribute types and values and compared with a certificate's subject as names.

Forms (told apart by their shape):

- RFC 4514, most specific RDN first: ``CN=Y,O=X,C=FR`` (``-nameopt RFC2253`` prints it, and
  so does this sidecar in logs and identity headers). Spaces after ``,`` are allowed.
- OpenSSL's default one-line form, most general first: ``C = FR, O = X, CN = Y`` (what
  ``openssl x509 -noout -subject`` prints): the first ``=`` has spaces around it.
- OpenSSL's compat form, most general first: ``/C=FR/O=X/CN=Y`` (``-nameopt compat``). A ``/``
  starts a new RDN only when a known attribute type and ``=`` follow it, so D1's common names
  (``CN=TLSMA-ECDSA/<id>/D1.PPR``) keep their literal slashes, whether written ``\\/`` (as
  OpenSSL 3 prints them) or bare (OpenSSL 1.1).

In a value, ``*`` matches any run of characters and ``?`` one character; ``\\*``, ``\\?`` are
literal. Values are case sensitive, attribute types are not. Escapes: RFC 4514's ``\\,`` and
``\\XX`` (UTF-8 bytes in hex), OpenSSL's ``"quoted, values"``, compat ``\\xXX``, ``\\/``, ``\\+``.

Matching. A pattern of one common name alone (``CN=*.d1.example``) accepts a subject when any of
its common names matches. Every other pattern is a whole name: the same RDNs in the same order,
each with the same types and matching values; a ``*`` never spans two RDNs, so
``CN=*.d1.example`` never accepts ``CN=x,O=evil.d1.example``.

The normalised form (``str()``) is RFC 4514, with cryptography's attribute names and the escapes
``rfc4514`` uses for a certificate's subject, so a pattern reads like the subjects it matches.
"""

from __future__ import annotations

import enum
import itertools
import re
from collections.abc import Iterable

from cryptography import x509
from cryptography.x509.oid import NameOID, ObjectIdentifier

_EMAIL = ObjectIdentifier("1.2.840.113549.1.9.1")

# names accepted in a pattern (any case) -> OID; OpenSSL's short and long names, RFC 4514's
TYPES: dict[str, ObjectIdentifier] = {
    "cn": NameOID.COMMON_NAME,
    "commonname": NameOID.COMMON_NAME,
    "c": NameOID.COUNTRY_NAME,
    "countryname": NameOID.COUNTRY_NAME,
    "l": NameOID.LOCALITY_NAME,
    "localityname": NameOID.LOCALITY_NAME,
    "st": NameOID.STATE_OR_PROVINCE_NAME,
    "s": NameOID.STATE_OR_PROVINCE_NAME,
    "stateorprovincename": NameOID.STATE_OR_PROVINCE_NAME,
    "o": NameOID.ORGANIZATION_NAME,
    "organizationname": NameOID.ORGANIZATION_NAME,
    "ou": NameOID.ORGANIZATIONAL_UNIT_NAME,
    "organizationalunitname": NameOID.ORGANIZATIONAL_UNIT_NAME,
    "street": NameOID.STREET_ADDRESS,
    "streetaddress": NameOID.STREET_ADDRESS,
    "dc": NameOID.DOMAIN_COMPONENT,
    "domaincomponent": NameOID.DOMAIN_COMPONENT,
    "uid": NameOID.USER_ID,
    "userid": NameOID.USER_ID,
    "emailaddress": _EMAIL,
    "email": _EMAIL,
    "serialnumber": NameOID.SERIAL_NUMBER,
    "sn": NameOID.SURNAME,
    "surname": NameOID.SURNAME,
    "gn": NameOID.GIVEN_NAME,
    "givenname": NameOID.GIVEN_NAME,
    "title": NameOID.TITLE,
    "initials": NameOID.INITIALS,
    "generationqualifier": NameOID.GENERATION_QUALIFIER,
    "dnqualifier": NameOID.DN_QUALIFIER,
    "pseudonym": NameOID.PSEUDONYM,
    "businesscategory": NameOID.BUSINESS_CATEGORY,
    "postalcode": NameOID.POSTAL_CODE,
    "organizationidentifier": NameOID.ORGANIZATION_IDENTIFIER,
    "name": ObjectIdentifier("2.5.4.41"),
}

# the names cryptography's rfc4514_string() writes; every other type as its dotted OID
RFC4514_NAMES: dict[ObjectIdentifier, str] = {
    NameOID.COMMON_NAME: "CN",
    NameOID.LOCALITY_NAME: "L",
    NameOID.STATE_OR_PROVINCE_NAME: "ST",
    NameOID.ORGANIZATION_NAME: "O",
    NameOID.ORGANIZATIONAL_UNIT_NAME: "OU",
    NameOID.COUNTRY_NAME: "C",
    NameOID.STREET_ADDRESS: "STREET",
    NameOID.DOMAIN_COMPONENT: "DC",
    NameOID.USER_ID: "UID",
}

_DOTTED = r"\d+(?:\.\d+)+"
_TYPE_AHEAD = "(?:" + "|".join(sorted(TYPES, key=len, reverse=True)) + "|" + _DOTTED + r")\s*="
_SLASH_RDN = re.compile(r"(?<!\\)/(?=" + _TYPE_AHEAD + ")", re.IGNORECASE)
_SLASH_MULTI = re.compile(r"(?<!\\)\+(?=" + _TYPE_AHEAD + ")", re.IGNORECASE)
# OpenSSL's one-line form puts spaces around '=' ("C = FR"); RFC 4514 has none ("C=FR")
_OPENSSL_FORM = re.compile(r"^\s*[A-Za-z0-9.]+(?:\s+=|=\s)")


class Wild(enum.Enum):
    STAR = "*"  # any run of characters
    ONE = "?"  # one character


Token = str | Wild  # a value is a sequence of literal text and wildcards


class PatternError(ValueError):
    """An entry that is not a distinguished name; the message says where and why."""


def attribute_name(oid: ObjectIdentifier) -> str:
    return RFC4514_NAMES.get(oid, oid.dotted_string)


def rfc4514(name: x509.Name) -> str:
    """A subject as a wire-safe RFC 4514 string: RDNs last to first, multi-valued joined by +."""
    return ",".join(
        "+".join(f"{a.rfc4514_attribute_name}={escape_value(a.value)}" for a in rdn)
        for rdn in reversed(name.rdns)
    )


# RFC 4514 section 2.4 escapes, plus everything that is not printable ASCII.
_DN_NEEDS_ESCAPE = re.compile(r'["+,;<>\\]|[^ -~]')


def escape_value(value: str | bytes) -> str:
    if isinstance(value, bytes):
        return "#" + value.hex()
    return _edges(_escape_chars(value), value, value)


def _escape_chars(text: str) -> str:
    return _DN_NEEDS_ESCAPE.sub(_escape_char, text)


def _edges(text: str, first: str, last: str) -> str:
    """RFC 4514's escapes of a leading '#' or space and a trailing space; `first` and `last`
    are the value's literal ends ("" when a wildcard is there)."""
    if first.startswith("#"):
        text = "\\" + text
    elif first.startswith(" "):
        text = "\\20" + text[1:]
    if last.endswith(" ") and text.endswith(" "):
        text = text[:-1] + "\\20"
    return text


def _escape_char(match: re.Match[str]) -> str:
    char = match.group()
    return hex_bytes(char, "\\") if char < " " or char > "~" else "\\" + char


def hex_bytes(char: str, marker: str) -> str:
    # surrogatepass: a lone surrogate decoded from a BMPString still gets an escape, not a crash.
    return "".join(f"{marker}{b:02X}" for b in char.encode("utf-8", "surrogatepass"))


class Attr:
    """One ``type=value-glob`` of a pattern."""

    __slots__ = ("_regex", "oid", "tokens")

    def __init__(self, oid: ObjectIdentifier, tokens: tuple[Token, ...]) -> None:
        self.oid, self.tokens = oid, tokens
        body = "".join(
            (".*" if t is Wild.STAR else ".") if isinstance(t, Wild) else re.escape(t)
            for t in tokens
        )
        self._regex = re.compile(body, re.DOTALL)

    def matches(self, attribute: x509.NameAttribute[str | bytes]) -> bool:
        if attribute.oid != self.oid:
            return False
        value = attribute.value
        text = "#" + value.hex() if isinstance(value, bytes) else value
        return self._regex.fullmatch(text) is not None

    def __str__(self) -> str:
        text = "".join(
            t.value
            if isinstance(t, Wild)
            else _escape_chars(t).replace("*", "\\*").replace("?", "\\?")
            for t in self.tokens
        )
        first, last = self.tokens[0], self.tokens[-1]
        text = _edges(
            text, first if isinstance(first, str) else "", last if isinstance(last, str) else ""
        )
        return f"{attribute_name(self.oid)}={text}"


class SubjectPattern:
    """One ``allow_subjects`` entry, parsed. ``rdns`` in the certificate's order (most general
    first); ``str()`` is the normalised RFC 4514 form; ``source`` is the entry as written."""

    __slots__ = ("form", "rdns", "source")

    def __init__(self, rdns: tuple[tuple[Attr, ...], ...], source: str, form: str) -> None:
        self.rdns, self.source, self.form = rdns, source, form

    @property
    def looks_reversed(self) -> bool:
        """RFC 4514 written in openssl's order (C first, CN last): it matches no real subject."""
        general = (NameOID.COUNTRY_NAME, NameOID.DOMAIN_COMPONENT)
        return (
            self.form == "rfc4514"
            and len(self.rdns) > 1
            and self.rdns[-1][0].oid in general
            and self.rdns[0][0].oid == NameOID.COMMON_NAME
        )

    @property
    def common_name_only(self) -> bool:
        return (
            len(self.rdns) == 1
            and len(self.rdns[0]) == 1
            and self.rdns[0][0].oid == (NameOID.COMMON_NAME)
        )

    def matches(self, name: x509.Name) -> bool:
        if self.common_name_only:
            attr = self.rdns[0][0]
            return any(attr.matches(a) for a in name)
        rdns = list(name.rdns)
        return len(rdns) == len(self.rdns) and all(
            _rdn_matches(p, list(r)) for p, r in zip(self.rdns, rdns, strict=True)
        )

    def __str__(self) -> str:
        return ",".join("+".join(str(a) for a in rdn) for rdn in reversed(self.rdns))

    def __repr__(self) -> str:
        return f"SubjectPattern({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SubjectPattern) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))


def _rdn_matches(pattern: tuple[Attr, ...], rdn: list[x509.NameAttribute[str | bytes]]) -> bool:
    if len(pattern) != len(rdn):
        return False
    # a multi-valued RDN is a set: some pairing of its attributes must match (they are few)
    return any(
        all(p.matches(a) for p, a in zip(pattern, order, strict=True))
        for order in itertools.permutations(rdn)
    )


def any_matches(patterns: Iterable[SubjectPattern], name: x509.Name) -> bool:
    return any(p.matches(name) for p in patterns)


def parse(entry: str) -> SubjectPattern:
    """An entry in any of the three forms; PatternError says what is wrong with it."""
    text = entry.strip()
    if not text:
        raise PatternError("empty: write a distinguished name such as 'CN=client.example'")
    if text.startswith("/"):
        form, rdns = "compat", _parse_slash(text[1:])
    else:
        form = "openssl" if _OPENSSL_FORM.match(text) else "rfc4514"
        rdns = _parse_string(text)
        if form == "rfc4514":
            rdns.reverse()  # RFC 4514 writes the most specific RDN first
    return SubjectPattern(tuple(rdns), entry, form)


def _attr(type_text: str, tokens: list[Token]) -> Attr:
    kind = type_text.strip()
    oid = TYPES.get(kind.lower())
    if oid is None and re.fullmatch(_DOTTED, kind):
        oid = ObjectIdentifier(kind)
    if oid is None:
        raise PatternError(
            f"unknown attribute type {kind!r}; use CN, O, OU, C, ST, L, DC, UID, "
            "emailAddress, serialNumber, ... or a dotted OID"
        )
    if not tokens:
        raise PatternError(f"{kind} has an empty value (write * to accept any)")
    return Attr(oid, tuple(tokens))


def _parse_string(text: str) -> list[tuple[Attr, ...]]:
    """RFC 4514 and OpenSSL one-line: the same grammar, told apart only by order."""
    rdns: list[tuple[Attr, ...]] = []
    current: list[Attr] = []
    i, n = 0, len(text)
    while True:
        eq = text.find("=", i)
        if eq < 0:
            raise PatternError(f"{text[i:].strip() or text!r}: expected TYPE=value")
        kind = text[i:eq]
        if not kind.strip() or re.search(r'[,+;"\\]', kind):
            raise PatternError(f"expected TYPE=value, got {text[i : eq + 1].strip()!r}")
        tokens, i = _read_value(text, eq + 1)
        current.append(_attr(kind, tokens))
        if i >= n:
            break
        sep = text[i]
        i += 1
        if sep in ",;":
            rdns.append(tuple(current))
            current = []
        if i >= n or not text[i:].strip():
            raise PatternError(f"nothing after the last {sep!r}")
    rdns.append(tuple(current))
    return rdns


def _read_value(text: str, i: int) -> tuple[list[Token], int]:
    """A value from text[i:] up to an unescaped separator (',', ';', '+') or the end; a
    "quoted" value (OpenSSL's one-line form) may hold separators."""
    n = len(text)
    while i < n and text[i] == " ":
        i += 1
    if i < n and text[i] == "#":
        raise PatternError("hex-encoded (#...) values are not supported; write the value as text")
    quoted = i < n and text[i] == '"'
    i += quoted
    tokens: list[Token] = []
    raw = bytearray()  # literal text as UTF-8, so the \XX escapes of one character join up
    spaces = 0  # unescaped spaces at the end of `raw`: outside quotes, not part of the value

    def flush() -> None:
        if raw:
            try:
                tokens.append(raw.decode("utf-8"))
            except UnicodeDecodeError:
                raise PatternError("hex escapes that are not UTF-8") from None
            raw.clear()

    while i < n:
        c = text[i]
        if quoted and c == '"':
            break
        if not quoted and c in ",;+":
            break
        if c == "\\":
            if i + 1 >= n:
                raise PatternError("a value ends with a lone '\\'")
            pair = text[i + 1 : i + 3]
            if re.fullmatch(r"[0-9A-Fa-f]{2}", pair):
                raw.append(int(pair, 16))
                i += 3
            else:
                raw += text[i + 1].encode("utf-8", "surrogatepass")
                i += 2
            spaces = 0
            continue
        if c in "*?":
            flush()
            tokens.append(Wild(c))
            spaces = 0
        else:
            raw += c.encode("utf-8", "surrogatepass")
            spaces = spaces + 1 if c == " " and not quoted else 0
        i += 1
    if quoted:
        if i >= n:
            raise PatternError("a quoted value has no closing '\"'")
        i += 1
        while i < n and text[i] == " ":
            i += 1
        if i < n and text[i] not in ",;+":
            raise PatternError(f"unexpected {text[i]!r} after a quoted value")
    elif spaces:
        del raw[-spaces:]
    flush()
    return tokens, i


def _parse_slash(text: str) -> list[tuple[Attr, ...]]:
    """OpenSSL's compat form: '/' and '+' separate only before 'TYPE=' (OpenSSL 3 also writes
    them as '\\/' and '\\+' inside values; 1.1 and people do not)."""
    if not text:
        raise PatternError("'/' alone: expected /TYPE=value/...")
    rdns: list[tuple[Attr, ...]] = []
    for part in _SLASH_RDN.split(text):
        attrs: list[Attr] = []
        for item in _SLASH_MULTI.split(part):
            kind, eq, value = item.partition("=")
            if not eq:
                raise PatternError(f"{item!r}: expected TYPE=value")
            attrs.append(_attr(kind, _slash_value(value)))
        rdns.append(tuple(attrs))
    return rdns


_SLASH_ESCAPE = re.compile(r"\\(?:x([0-9A-Fa-f]{2})|([/+*?\\]))")


def _slash_value(value: str) -> list[Token]:
    """'\\xHH' is a byte of UTF-8, '\\/' '\\+' '\\*' '\\?' '\\\\' the character; any other
    backslash is itself (OpenSSL's compat form does not escape it)."""
    tokens: list[Token] = []
    raw = bytearray()
    i, n = 0, len(value)

    def flush() -> None:
        if raw:
            try:
                tokens.append(raw.decode("utf-8"))
            except UnicodeDecodeError:
                raise PatternError("\\x escapes that are not UTF-8") from None
            raw.clear()

    while i < n:
        m = _SLASH_ESCAPE.match(value, i)
        if m:
            raw += bytes([int(m[1], 16)]) if m[1] else m[2].encode()
            i = m.end()
            continue
        c = value[i]
        if c in "*?":
            flush()
            tokens.append(Wild(c))
        else:
            raw += c.encode("utf-8", "surrogatepass")
        i += 1
    flush()
    return tokens
