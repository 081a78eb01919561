"""ES256 signatures made inside a PKCS#11 token (python-pkcs11): the private key never leaves it.

One logged-in session per token and PIN, opened at the first use and kept for the process;
a session the token dropped (removed, restarted) is opened again once. Signing is CKM_ECDSA
over a SHA-256 digest made here, which every token with EC keys offers; the token returns
r || s, which is exactly a JWS ES256 signature.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature

from proxy.pkcs11uri import Pkcs11URI

P256_PARAMS = bytes.fromhex("06082a8648ce3d030107")  # DER OID prime256v1, as CKA_EC_PARAMS
_SESSIONS: dict[tuple[Any, ...], Any] = {}  # (module, token, serial, PIN) -> open session
_KEY_TYPES = {0: "an RSA key", 1: "a DSA key", 2: "a DH key", 3: "an EC key"}


class HsmError(ValueError):
    """The token key cannot be used; the message names the URI and the part at fault."""


def _lib() -> Any:
    try:
        import pkcs11
    except ImportError:
        raise HsmError(
            "a pkcs11: signing_key needs python-pkcs11, which is not installed: "
            "pip install 'mtls-sidecar[hsm]'"
        ) from None
    return pkcs11


class TokenKey:
    """A P-256 private key in a token, usable wherever ES256 signs (has `curve`)."""

    curve = ec.SECP256R1()

    def __init__(self, uri: Pkcs11URI, session_key: tuple[Any, ...], key: Any, public: Any):
        self.uri = uri
        self._session_key = session_key
        self._key = key
        self._public = public

    def __repr__(self) -> str:
        return f"TokenKey({self.uri})"

    def public_key(self) -> ec.EllipticCurvePublicKey:
        if self._public is None:
            raise HsmError(
                f"{self.uri}: {self.uri.part('object')}: no public key object beside the private "
                "key in the token; the public half is needed here (store it with the same label)"
            )
        return self._public  # type: ignore[no-any-return]

    def sign_digest(self, digest: bytes) -> bytes:
        """ECDSA over a SHA-256 digest, inside the token: r || s, 64 bytes."""
        pkcs11 = _lib()
        try:
            return bytes(self._key.sign(digest, mechanism=pkcs11.Mechanism.ECDSA))
        except (pkcs11.exceptions.SessionHandleInvalid, pkcs11.exceptions.SessionClosed,
                pkcs11.exceptions.DeviceRemoved, pkcs11.exceptions.TokenNotPresent,
                pkcs11.exceptions.UserNotLoggedIn, pkcs11.exceptions.KeyHandleInvalid,
                pkcs11.exceptions.ObjectHandleInvalid, pkcs11.exceptions.DeviceError):  # fmt: skip
            _SESSIONS.pop(self._session_key, None)  # the token dropped us: log in again, once
            fresh = open_key(self.uri)
            self._key, self._session_key = fresh._key, fresh._session_key
            return bytes(self._key.sign(digest, mechanism=pkcs11.Mechanism.ECDSA))
        except pkcs11.exceptions.PKCS11Error as e:
            raise HsmError(f"{self.uri}: the token could not sign: {_name(e)}") from None

    def sign_es256(self, signing_input: bytes) -> bytes:
        return self.sign_digest(hashlib.sha256(signing_input).digest())


def _name(e: BaseException) -> str:
    text = str(e)
    return f"{type(e).__name__}" + (f" ({text})" if text else "")


def _read_pin(uri: Pkcs11URI) -> str | None:
    if uri.pin_value is not None:
        return uri.pin_value
    if uri.pin_source is None:
        return None
    try:
        return uri.pin_source.read_text().rstrip("\r\n")
    except OSError as e:
        raise HsmError(
            f"{uri}: {uri.part('pin-source')}: cannot read the PIN: {e.strerror or e}"
        ) from None
    except UnicodeDecodeError:
        raise HsmError(f"{uri}: {uri.part('pin-source')}: the PIN file is not text") from None


def _session(uri: Pkcs11URI, rw: bool = False) -> tuple[tuple[Any, ...], Any]:
    pkcs11 = _lib()
    errors = pkcs11.exceptions
    pin = _read_pin(uri)
    key = (str(uri.module_path), uri.token, uri.serial, pin, rw)
    if key in _SESSIONS:
        return key, _SESSIONS[key]
    module = uri.part("module-path")
    if not uri.module_path.is_file():
        raise HsmError(f"{uri}: {module}: no such file")
    try:
        lib = pkcs11.lib(str(uri.module_path))
    except errors.PKCS11Error as e:
        reason = str(e).rsplit(": ", 1)[-1]
        raise HsmError(f"{uri}: {module}: does not load as a PKCS#11 module: {reason}") from None
    query: dict[str, Any] = {}
    if uri.token is not None:
        query["token_label"] = uri.token
    if uri.serial is not None:
        query["token_serial"] = uri.serial.encode()
    which = uri.part("token") if uri.token is not None else uri.part("serial")
    try:
        token = lib.get_token(**query)
    except errors.NoSuchToken:
        raise HsmError(f"{uri}: {which}: no such token in {module}") from None
    except errors.MultipleTokensReturned:
        raise HsmError(f"{uri}: several tokens in {module}: name one with token=") from None
    try:
        try:
            session = token.open(rw=rw, user_pin=pin)
        except errors.UserAlreadyLoggedIn:  # this process logged in already: sessions share it
            session = token.open(rw=rw)
    except (errors.PinIncorrect, errors.PinInvalid, errors.PinLenRange):
        source = uri.part("pin-source") if uri.pin_source else "pin-value"
        raise HsmError(f"{uri}: {source}: the token refused the PIN (wrong PIN)") from None
    except errors.PinLocked:
        raise HsmError(
            f"{uri}: {which}: the user PIN is locked; unlock it with the SO PIN"
        ) from None
    except errors.PKCS11Error as e:
        raise HsmError(f"{uri}: {which}: cannot open a session: {_name(e)}") from None
    _SESSIONS[key] = session
    return key, session


def _query(uri: Pkcs11URI) -> dict[str, Any]:
    q: dict[str, Any] = {}
    if uri.object is not None:
        q["label"] = uri.object
    if uri.id is not None:
        q["id"] = uri.id
    return q


def open_key(uri: Pkcs11URI) -> TokenKey:
    """The token's P-256 private key named by uri, in a logged-in session (HsmError)."""
    pkcs11 = _lib()
    errors = pkcs11.exceptions
    session_key, session = _session(uri)
    what = uri.part("object") if uri.object is not None else uri.part("id")
    where = uri.part("token") if uri.token is not None else "the token"
    try:
        key = session.get_key(object_class=pkcs11.ObjectClass.PRIVATE_KEY, **_query(uri))
    except errors.NoSuchKey:
        raise HsmError(f"{uri}: {what}: no private key by that name in {where}") from None
    except errors.MultipleObjectsReturned:
        raise HsmError(f"{uri}: {what}: several private keys match; add id= to pick one") from None
    if key.key_type != pkcs11.KeyType.EC:
        kind = _KEY_TYPES.get(int(key.key_type), f"a key of type {key.key_type}")
        raise HsmError(f"{uri}: {what}: {kind}; ES256 needs an EC P-256 key")
    if bytes(key[pkcs11.Attribute.EC_PARAMS]) != P256_PARAMS:
        raise HsmError(f"{uri}: {what}: an EC key on another curve; ES256 needs P-256")
    public = None
    try:
        pub = session.get_key(object_class=pkcs11.ObjectClass.PUBLIC_KEY, **_query(uri))
        public = _public_key(bytes(pub[pkcs11.Attribute.EC_POINT]))
    except (errors.NoSuchKey, errors.MultipleObjectsReturned, ValueError):
        public = None
    return TokenKey(uri, session_key, key, public)


def _public_key(ec_point: bytes) -> ec.EllipticCurvePublicKey:
    """CKA_EC_POINT: the uncompressed point, DER OCTET STRING-wrapped (or bare, by some tokens)."""
    if len(ec_point) == 67 and ec_point[:2] == b"\x04\x41":
        ec_point = ec_point[2:]
    return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), ec_point)


def self_test(key: TokenKey) -> str:
    """Sign a test digest in the token and, when its public half is there, verify it."""
    digest = hashlib.sha256(b"mtls-sidecar check " + os.urandom(16)).digest()
    sig = key.sign_digest(digest)
    if len(sig) != 64:
        raise HsmError(f"{key.uri}: the token returned a {len(sig)}-byte signature, not r || s")
    if key._public is None:
        return "signed a test digest (no public key object to verify it with)"
    r, s = int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big")
    try:
        key.public_key().verify(
            encode_dss_signature(r, s), digest, ec.ECDSA(Prehashed(hashes.SHA256()))
        )
    except InvalidSignature:
        raise HsmError(
            f"{key.uri}: the token's signature does not verify with the public key object "
            "of the same name: the two are not a pair"
        ) from None
    return "signed and verified a test digest"


def generate(uri: Pkcs11URI) -> ec.EllipticCurvePublicKey:
    """A new P-256 key pair in the token: private part sensitive and never extractable."""
    pkcs11 = _lib()
    errors = pkcs11.exceptions
    if uri.object is None:
        raise HsmError(f"{uri}: object= is required to name the new key")
    _, session = _session(uri, rw=True)
    try:
        session.get_key(object_class=pkcs11.ObjectClass.PRIVATE_KEY, **_query(uri))
    except errors.NoSuchKey:
        pass
    except errors.MultipleObjectsReturned:
        raise HsmError(f"{uri}: {uri.part('object')}: keys by that name exist already") from None
    else:
        raise HsmError(
            f"{uri}: {uri.part('object')}: a private key by that name exists already; "
            "refusing to add another"
        )
    attr = pkcs11.Attribute
    try:
        params = session.create_domain_parameters(
            pkcs11.KeyType.EC, {attr.EC_PARAMS: P256_PARAMS}, local=True
        )
        pub, _ = params.generate_keypair(
            store=True,
            label=uri.object,
            id=uri.id if uri.id is not None else os.urandom(8),
            public_template={attr.VERIFY: True, attr.TOKEN: True},
            private_template={
                attr.SIGN: True, attr.TOKEN: True, attr.PRIVATE: True,
                attr.SENSITIVE: True, attr.EXTRACTABLE: False,
            },
        )  # fmt: skip
    except errors.PKCS11Error as e:
        raise HsmError(f"{uri}: the token could not make the key: {_name(e)}") from None
    return _public_key(bytes(pub[attr.EC_POINT]))


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def encode_jwt(claims: Mapping[str, Any], key: Any, headers: Mapping[str, Any]) -> str:
    """A compact ES256 JWS: with PyJWT for a key object, signed in the token for a TokenKey."""
    if not isinstance(key, TokenKey):
        import jwt

        return jwt.encode(dict(claims), key, algorithm="ES256", headers=dict(headers))
    header = {"alg": "ES256", **headers}
    signing_input = ".".join(
        _b64(json.dumps(part, separators=(",", ":")).encode()) for part in (header, dict(claims))
    )
    return f"{signing_input}.{_b64(key.sign_es256(signing_input.encode('ascii')))}"
