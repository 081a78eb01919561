"""OAuth wired into the routes: the egress token source and the ingress token endpoint."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint
from twisted.python.failure import Failure
from twisted.web.client import URI
from twisted.web.iweb import IAgentEndpointFactory, IPolicyForHTTPS
from zope.interface import implementer

from proxy import config as cfg
from proxy.oauth import client as oauth
from proxy.oauth import hsm, server
from proxy.pkcs11uri import Pkcs11URI
from proxy.telemetry.metrics import Metrics
from proxy.tls import contexts as tls
from proxy.wire.http import ProxyError, RequestHead
from proxy.wire.tunnel import ProxyHop, TunnelEndpoint, hop_for


@implementer(IPolicyForHTTPS)
class _RoutePolicy:
    """The token call goes over the route's own mutual TLS, with its current material."""

    def __init__(self, client: tls.ClientTLS) -> None:
        self.client = client

    def creatorForNetloc(self, hostname: bytes, port: int) -> tls.ClientTLS:
        return tls.ClientTLS(self.client.material, hostname.decode("idna"))


@implementer(IAgentEndpointFactory)
class _ThroughProxy:
    """The token call through the route's forward proxy: CONNECT to the token host by name."""

    def __init__(self, reactor: Any, hop: ProxyHop, policy: _RoutePolicy, timeout: float) -> None:
        self.reactor, self.hop, self.policy, self.timeout = reactor, hop, policy, timeout

    def endpointForURI(self, uri: URI) -> TunnelEndpoint:
        # the proxy's name is resolved on every connect (HostnameEndpoint asks each time)
        to_proxy = HostnameEndpoint(self.reactor, self.hop.host, self.hop.port, self.timeout)
        host = uri.host.decode("idna")
        creator = self.policy.creatorForNetloc(uri.host, uri.port)
        return TunnelEndpoint(
            self.reactor, to_proxy, self.hop, host, uri.port, creator, self.timeout
        )


class EgressToken:
    """Bearer headers for an egress route's requests, from one shared TokenSource."""

    def __init__(self, source: oauth.TokenSource, token_url: str) -> None:
        self.source = source
        self.token_url = token_url

    def headers(self) -> defer.Deferred[list[tuple[bytes, bytes]]]:
        d = self.source.token()
        return d.addCallbacks(self._bearer, self._failed)

    @staticmethod
    def _bearer(token: str) -> list[tuple[bytes, bytes]]:
        return [(b"Authorization", oauth.authorization_value(token))]

    def _failed(self, failure: Failure) -> list[tuple[bytes, bytes]]:
        if isinstance(failure.value, oauth.TokenError):
            # The TokenSource's detail names the endpoint and quotes its own error fields.
            raise ProxyError(502, "oauth_token_unavailable", failure.value.detail)
        failure.raiseException()
        raise AssertionError("unreachable")

    def rejected(self, sent: list[tuple[bytes, bytes]]) -> None:
        """The upstream answered 401 to the token we sent: drop it (once)."""
        for name, value in sent:
            if name == b"Authorization" and value.startswith(b"Bearer "):
                self.source.invalidate(value[7:].decode("ascii"))


def signing_key(o: cfg.EgressOAuth | cfg.IngressOAuth) -> Any:
    """The ES256 key (a file's, or a token's), or MaterialError naming the key and the file
    or the URI part at fault."""
    try:
        if isinstance(o.signing_key, Pkcs11URI):
            return hsm.open_key(o.signing_key)
        if isinstance(o, cfg.EgressOAuth):
            return oauth.load_signing_key(o.signing_key)
        return server.load_private_key(o.signing_key)
    except ValueError as e:
        raise tls.MaterialError(f"oauth.signing_key {e}") from None


def egress_token_source(
    reactor: Any,
    metrics: Metrics,
    rc: cfg.EgressRoute,
    client: tls.ClientTLS,
    hop: ProxyHop | None = None,
) -> EgressToken:
    """hop: the route's forward proxy as its pool uses it (credentials swapped on reload);
    read from the config when not given."""
    o = rc.oauth
    assert o is not None
    key = signing_key(o)
    try:
        settings = oauth.OAuthSettings(
            token_url=o.token_url,
            issuer=o.issuer,
            signing_key=key,
            key_id=o.key_id,
            audience=o.audience,
            body=o.body,  # type: ignore[arg-type]
            authorization_mode=o.authorization,  # type: ignore[arg-type]
        )
    except ValueError as e:
        raise tls.MaterialError(f"oauth: {e}") from None
    policy = _RoutePolicy(client)
    hop = hop if hop is not None else hop_for(rc.proxy)
    fetch = oauth.AgentFetcher(
        reactor,
        o.token_url,
        policy,
        connect_timeout=rc.timeouts.connect,
        endpoints=_ThroughProxy(reactor, hop, policy, rc.timeouts.connect) if hop else None,
    )
    source = oauth.TokenSource(reactor, settings, fetch, metrics=metrics, route=rc.name)
    return EgressToken(source, o.token_url)


class IngressTokens:
    """The token endpoint D1 calls on our side, and the bearer check on the route."""

    def __init__(self, endpoint: server.TokenEndpoint, path: str) -> None:
        self.endpoint = endpoint
        self.path = path.encode()

    def answer(self, head: RequestHead, body: bytes) -> tuple[int, Any, bytes]:
        reply = self.endpoint.handle(
            head.method, head.get(b"content-type"), head.get(b"authorization"), body
        )
        return reply.status, reply.headers, reply.body

    def check(self, head: RequestHead) -> None:
        if self.endpoint.issuer.check_bearer(head.get(b"authorization")) is None:
            raise ProxyError(401, "unauthorized", "a valid bearer token is required")


def hosted_token_keys(o: cfg.IngressOAuth) -> server.TokenKeys:
    """The hosted tokens' keys, or MaterialError naming the key and the file."""
    signing = signing_key(o)
    verify = []
    for index, path in enumerate(o.verify_keys):
        try:
            verify.append(server.load_public_key(path))
        except ValueError as e:
            raise tls.MaterialError(f"oauth.verify_keys[{index}] {e}") from None
    try:
        return server.TokenKeys.of(signing, verify)
    except ValueError as e:
        raise tls.MaterialError(f"oauth.signing_key {e}") from None


def ingress_token_endpoint(reactor: Any, ri: cfg.IngressRoute) -> IngressTokens:
    o = ri.oauth
    assert o is not None
    try:
        clients = server.load_client_secrets(o.clients_file)
    except (ValueError, OSError) as e:
        raise tls.MaterialError(f"oauth.clients_file {o.clients_file}: {e}") from None
    issuer = server.TokenIssuer(
        reactor,
        clients,
        hosted_token_keys(o),
        issuer=o.issuer,
        audience=o.audience or ri.name,  # unset: the route's name, the same on every replica
        lifetime=o.token_lifetime,
    )
    return IngressTokens(server.TokenEndpoint(issuer), o.token_path)
