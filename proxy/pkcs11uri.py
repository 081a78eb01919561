"""RFC 7512 PKCS#11 URIs naming a private key in a token: parsed into a frozen value.

Only what naming one signing key needs is understood; any other attribute is refused, so a
URI never silently matches something other than what it says.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, unquote_to_bytes

import attrs

SCHEME = "pkcs11:"
_PATH_ATTRS = frozenset({"token", "serial", "object", "id", "type"})
_QUERY_ATTRS = frozenset({"module-path", "pin-source", "pin-value"})


class URIError(ValueError):
    """A URI that names no usable key; the message names the attribute at fault."""


@attrs.frozen
class Pkcs11URI:
    text: str  # as written, for messages (never holds a pin-value: see __str__)
    module_path: Path
    token: str | None = None  # the token's label
    serial: str | None = None
    object: str | None = None  # the key's label (CKA_LABEL)
    id: bytes | None = None  # the key's CKA_ID
    pin_source: Path | None = None  # a file holding the user PIN
    pin_value: str | None = attrs.field(default=None, repr=False)

    def __str__(self) -> str:
        return self.text

    def part(self, name: str) -> str:
        """One attribute as it reads in the URI, for an error naming it."""
        values = {
            "token": self.token,
            "serial": self.serial,
            "object": self.object,
            "id": self.id.hex() if self.id is not None else None,
            "module-path": str(self.module_path),
            "pin-source": f"file:{self.pin_source}" if self.pin_source else None,
        }
        value = values.get(name)
        return f"{name}={value}" if value is not None else name


def is_pkcs11(text: str) -> bool:
    return text.startswith(SCHEME)


def parse(text: str, base: Path | None = None) -> Pkcs11URI:
    """Parse a pkcs11: URI; relative module-path and pin-source files resolve against base."""
    if not is_pkcs11(text):
        raise URIError(f"not a pkcs11: URI: {text!r}")
    body = text[len(SCHEME) :]
    path_part, _, query_part = body.partition("?")
    path_attrs = _pairs(path_part, ";", _PATH_ATTRS)
    query_attrs = _pairs(query_part, "&", _QUERY_ATTRS)
    kind = path_attrs.get("type")
    if kind is not None and kind != "private":
        raise URIError(f"type={kind}: the signing key is a private key (type=private)")
    if "object" not in path_attrs and "id" not in path_attrs:
        raise URIError("no object= (the key's label) or id= in the URI: name the key")
    module = query_attrs.get("module-path")
    if not module:
        raise URIError("module-path= is required (the PKCS#11 module, e.g. libsofthsm2.so)")
    if "pin-source" in query_attrs and "pin-value" in query_attrs:
        raise URIError("pin-source and pin-value both given: keep one (pin-source)")
    pin_source = None
    if "pin-source" in query_attrs:
        source = query_attrs["pin-source"]
        if "://" in source or (":" in source and not source.startswith("file:")):
            raise URIError(f"pin-source={source}: only file: sources are understood")
        pin_source = _resolve(source.removeprefix("file:"), base)
    key_id = None
    if "id" in path_attrs:
        key_id = unquote_to_bytes(_raw(path_part, ";", "id"))
    return Pkcs11URI(
        text=_without_pin_value(text),
        module_path=_resolve(module, base),
        token=path_attrs.get("token"),
        serial=path_attrs.get("serial"),
        object=path_attrs.get("object"),
        id=key_id,
        pin_source=pin_source,
        pin_value=query_attrs.get("pin-value"),
    )


def _pairs(text: str, sep: str, known: frozenset[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in filter(None, text.split(sep)):
        name, eq, value = item.partition("=")
        if not eq:
            raise URIError(f"{item!r} is not an attribute=value pair")
        if name not in known:
            raise URIError(f"{name}= is not understood here (known: {', '.join(sorted(known))})")
        if name in out:
            raise URIError(f"{name}= given twice")
        out[name] = unquote(value)
    return out


def _raw(text: str, sep: str, name: str) -> str:
    for item in text.split(sep):
        if item.startswith(f"{name}="):
            return item[len(name) + 1 :]
    return ""


def _resolve(text: str, base: Path | None) -> Path:
    path = Path(text).expanduser()
    return path if path.is_absolute() or base is None else (base / path).absolute()


def _without_pin_value(text: str) -> str:
    """The URI as shown in messages and status: a pin-value is never printed."""
    head, sep, query = text.partition("?")
    if not sep:
        return text
    kept = [
        p if not p.startswith("pin-value=") else "pin-value=[redacted]" for p in query.split("&")
    ]
    return f"{head}?{'&'.join(kept)}"
