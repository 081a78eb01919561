"""The `csr` and `oauth-key` commands: key material an operator sends to Thales at onboarding."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

from proxy.pkcs11uri import parse as parse_pkcs11
from proxy.tls import pki

KEY_MODE = 0o600
PUBLIC_MODE = 0o644

_CSR_EPILOG = """\
Client (default): --env, --gateway-id, --country, --state, --locality, --org, --org-unit.
D1 accepts two keys only: ECDSA P-256 (default) or RSA 4096; Thales refuses RSA 2048, so no
key size is offered. One CSR per environment: run this once for PPR and once for PRD.
The key is written unencrypted (PKCS#8 PEM, mode 0600) because the service reads it unattended,
e.g. from a systemd credential; existing files are never overwritten.
The gateway id must match D1's published merchantGatewayId format (no override: Thales
enforces the CN, and a certificate with a wrong CN is useless for five years).
Server (--server): --dns NAME [--dns NAME ...]; C, ST, L, O, OU are optional. Send the CSR to a
CA in Mozilla's program, or to a private CA whose bundle you hand to Thales.
"""
_CLIENT_ARGS = ("env", "gateway_id", "country", "state", "locality", "org", "org_unit")


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add the `csr` and `oauth-key` subcommands."""
    csr = sub.add_parser(
        "csr",
        help="new key pair + CSR: D1's client certificate, or (--server) the ingress server's",
        description="Make a private key and a certificate signing request for D1's mutual TLS:"
        " CN=TLSMA-<ECDSA|RSA>/<gateway id>/D1.<env>, plus C, ST, L, O, OU. With --server:"
        " a key and CSR for the ingress route's server certificate, every --dns name in the"
        " subjectAltName, under the generic key policy.",
        epilog=_CSR_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    csr.add_argument(
        "--server",
        action="store_true",
        help="a CSR for the ingress server certificate (the host name D1 calls) instead",
    )
    csr.add_argument(
        "--dns",
        action="append",
        default=[],
        metavar="NAME",
        help="with --server: a DNS name for the subjectAltName (repeat for more; the first is"
        " also the CN)",
    )
    csr.add_argument(
        "--env",
        type=str.upper,
        choices=pki.D1_ENVS,
        help="D1 environment: PPR (pre-production) or PRD (production)",
    )
    csr.add_argument(
        "--gateway-id",
        metavar="ID",
        help="merchantGatewayId assigned by Thales: exactly 10 characters of A-Z a-z 0-9 _ -",
    )
    csr.add_argument(
        "--key-type",
        default="ecdsa",
        metavar="{ecdsa,rsa}",
        help="ecdsa = P-256 (default), rsa = RSA 4096; with --server also ecdsa-p384,"
        " ecdsa-p521, rsa2048, rsa3072",
    )
    csr.add_argument("--country", metavar="C", help="two-letter country code")
    csr.add_argument("--state", metavar="ST", help="state or province")
    csr.add_argument("--locality", metavar="L", help="city")
    csr.add_argument("--org", metavar="O", help="organization (the merchant)")
    csr.add_argument("--org-unit", metavar="OU", help="organizational unit")
    csr.add_argument("--key-out", required=True, type=Path, metavar="FILE", help="new key file")
    csr.add_argument("--csr-out", required=True, type=Path, metavar="FILE", help="new CSR file")
    csr.set_defaults(func=run_csr, parser=csr)

    oauth = sub.add_parser(
        "oauth-key",
        help="new ES256 key for D1's OAuth client assertions or for hosted ingress tokens",
        description="Make a P-256 key for ES256 signatures and print its public half as PEM and"
        " as JWK. Two uses: the key that signs D1's OAuth JWT assertions (register the public"
        " half with Thales at onboarding), or the key that signs the tokens an ingress route's"
        " [ingress.oauth] endpoint issues.",
        epilog="The kid defaults to the key's RFC 7638 thumbprint; use it as key_id in the"
        " route's [egress.oauth] table. Hosted ingress tokens always carry the thumbprint as"
        " kid (--kid does not apply): set signing_key in [ingress.oauth] on every replica, or"
        " give the --public-out file to replicas that only accept the key's tokens"
        " (verify_keys), e.g. while a new key rolls out. Existing files are never overwritten.",
    )
    where = oauth.add_mutually_exclusive_group(required=True)
    where.add_argument("--key-out", type=Path, metavar="FILE", help="new private key (0600)")
    where.add_argument(
        "--pkcs11",
        metavar="URI",
        help="make the key inside a PKCS#11 token instead (RFC 7512 URI with object=, "
        "module-path= and pin-source=); it is sensitive and never extractable",
    )
    oauth.add_argument("--kid", help="key id for the JWK (default: RFC 7638 thumbprint)")
    oauth.add_argument("--jwk-out", type=Path, metavar="FILE", help="also write the public JWK")
    oauth.add_argument(
        "--public-out",
        type=Path,
        metavar="FILE",
        help="also write the public key PEM (for D1, or for verify_keys in [ingress.oauth])",
    )
    oauth.set_defaults(func=run_oauth_key)


def run_csr(args: argparse.Namespace) -> int:
    parser: argparse.ArgumentParser = args.parser
    if args.server:
        return _run_server_csr(args, parser)
    missing = [f"--{a.replace('_', '-')}" for a in _CLIENT_ARGS if getattr(args, a) is None]
    if args.dns:
        parser.error("argument --dns: only with --server (a client CSR's name is D1's CN)")
    if missing:
        parser.error(f"the following arguments are required: {', '.join(missing)}")
    try:
        key_type = pki.parse_key_type(args.key_type)
    except ValueError as e:
        parser.error(f"argument --key-type: {e}")
    key_out: Path = args.key_out
    csr_out: Path = args.csr_out
    try:
        subject = dict(
            env=args.env,
            gateway_id=args.gateway_id,
            country=args.country,
            state=args.state,
            locality=args.locality,
            org=args.org,
            org_unit=args.org_unit,
        )
        # Every refusal comes before the (slow, for RSA) key generation and before any write.
        pki.d1_subject(key_type, **subject)
        _refuse_existing(key_out, csr_out)
        key = pki.make_key(key_type)
        csr = pki.make_csr(key, **subject)
        csr_pem = csr.public_bytes(serialization.Encoding.PEM)
        _write_all([(key_out, _key_pem(key), KEY_MODE), (csr_out, csr_pem, PUBLIC_MODE)])
    except (ValueError, OSError) as e:
        return _fail(e)
    key_desc = pki.describe_key(key.public_key())
    print(f"subject: {csr.subject.rfc4514_string()}")
    print(f"key:     {key_out} ({key_desc}, mode 0600)")
    print(f"csr:     {csr_out}")
    print("next steps:")
    print(f"  1. send {csr_out} to Thales as the {args.env} client certificate request")
    print(f"  2. keep {key_out} secret on this host: the certificate works only with it")
    print(
        "  3. with the certificate Thales returns, set client_cert and client_key of the"
        f" {args.env} egress route, then run: mtls-sidecar check -c FILE"
    )
    return 0


def _run_server_csr(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """The ingress server's key and CSR: the names D1 calls, the generic key policy (the
    certificate comes from a public or private CA, not from Thales)."""
    for name in ("env", "gateway_id"):
        if getattr(args, name) is not None:
            option = "--" + name.replace("_", "-")
            parser.error(f"argument {option}: not with --server (it names D1's client CN)")
    if not args.dns:
        parser.error("argument --dns: --server needs at least one --dns NAME")
    try:
        spec = pki.parse_server_key_type(args.key_type)
    except ValueError as e:
        parser.error(f"argument --key-type: {e}")
    key_out: Path = args.key_out
    csr_out: Path = args.csr_out
    fields = ("country", "state", "locality", "org", "org_unit")
    subject = {f: getattr(args, f) for f in fields if getattr(args, f) is not None}
    try:
        names = [pki.server_dns_name(d) for d in args.dns]
        _refuse_existing(key_out, csr_out)
        key = pki.make_server_key(spec)
        csr = pki.make_server_csr(key, names, subject)
        csr_pem = csr.public_bytes(serialization.Encoding.PEM)
        _write_all([(key_out, _key_pem(key), KEY_MODE), (csr_out, csr_pem, PUBLIC_MODE)])
    except (ValueError, OSError) as e:
        return _fail(e)
    print(f"subject: {csr.subject.rfc4514_string()}")
    print(f"names:   {', '.join(dict.fromkeys(names))}")
    print(f"key:     {key_out} ({pki.describe_key(key.public_key())}, mode 0600)")
    print(f"csr:     {csr_out}")
    print("next steps:")
    print(
        f"  1. send {csr_out} to a CA in Mozilla's program, or sign it with your private CA"
        " and hand that CA's bundle (PEM) to Thales"
    )
    print(f"  2. keep {key_out} secret on this host: the certificate works only with it")
    print(
        "  3. set server_cert (leaf, then intermediates) and server_key of the ingress route,"
        " then run: mtls-sidecar check -c FILE"
    )
    return 0


def run_oauth_key(args: argparse.Namespace) -> int:
    key_out: Path | None = args.key_out
    extra = [p for p in (args.jwk_out, args.public_out) if p is not None]
    kid: str | None = args.kid
    try:
        if kid is not None and (not kid or not kid.isprintable()):
            raise ValueError(f"--kid {kid!r}: empty or not printable")
        uri = parse_pkcs11(args.pkcs11, Path.cwd()) if args.pkcs11 else None
        _refuse_existing(*([key_out] if key_out else []), *extra)
        key: Any = None
        if uri is not None:
            from proxy.oauth import hsm

            public = hsm.generate(uri)  # the last refusal: nothing is written before it
        else:
            key = pki.make_oauth_key()
            public = key.public_key()
        public_pem = public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        jwk = pki.public_jwk(public, None)
        jwk["kid"] = kid if kid is not None else pki.jwk_thumbprint(jwk)
        jwk_json = json.dumps(jwk, indent=2) + "\n"
        outputs = [(key_out, _key_pem(key), KEY_MODE)] if key_out is not None else []
        if args.jwk_out is not None:
            outputs.append((args.jwk_out, jwk_json.encode(), PUBLIC_MODE))
        if args.public_out is not None:
            outputs.append((args.public_out, public_pem, PUBLIC_MODE))
        _write_all(outputs)
    except (ValueError, OSError) as e:
        return _fail(e)
    where = f"{args.pkcs11} (ECDSA P-256 for ES256, in the token, never extractable)"
    if key_out is not None:
        where = f"{key_out} (ECDSA P-256 for ES256, mode 0600)"
    key_ref = str(key_out) if key_out is not None else args.pkcs11
    print(f"key: {where}")
    print(f"kid: {jwk['kid']}")
    print("public key (PEM):")
    print(public_pem.decode(), end="")
    print("public key (JWK):")
    print(jwk_json, end="")
    print(
        "next steps: register the public key with Thales; in the egress route's [egress.oauth]"
        f" set signing_key = {key_ref!r} and key_id = {jwk['kid']!r}"
    )
    public_hint = f" = [{str(args.public_out)!r}]" if args.public_out is not None else ""
    print(
        f"  or, for hosted tokens: in [ingress.oauth] set signing_key = {key_ref!r}"
        f" (kid {pki.jwk_thumbprint(jwk)}); replicas that should only accept its tokens list"
        f" the public key in verify_keys{public_hint}"
    )
    return 0


_key_pem = pki.private_key_pem


def _refuse_existing(*paths: Path) -> None:
    """Check every output before writing any, so a refusal leaves nothing half done."""
    seen: set[Path] = set()
    for path in paths:
        resolved = path.absolute()
        if resolved in seen:
            raise ValueError(f"{path} is given for two outputs")
        seen.add(resolved)
        if path.exists() or path.is_symlink():
            raise FileExistsError(f"{path} already exists; refusing to overwrite it")
        # `exists()` is False under a file ("key.pem/client.key"): name the file in the way
        blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
        if blocker is not None:
            raise NotADirectoryError(f"{path}: {blocker} is a file, not a folder")
        if not path.parent.is_dir():
            raise FileNotFoundError(f"{path}: folder {path.parent} does not exist")


def _write_all(outputs: list[tuple[Path, bytes, int]]) -> None:
    """Write every file or, when one fails, remove those this call created."""
    written: list[Path] = []
    try:
        for path, data, mode in outputs:
            pki.write_new_file(path, data, mode)
            written.append(path)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise


def _fail(error: Exception) -> int:
    reason = str(error)
    if isinstance(error, OSError) and error.strerror:
        reason = error.strerror if error.filename is None else f"{error.filename}: {error.strerror}"
    print(f"mtls-sidecar: error: {reason}", file=sys.stderr)
    return 1
