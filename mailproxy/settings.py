"""
What the session core needs to know of the configuration: the limits on
what a client may cost, and what one listener does.  The configuration
parser (L{mailproxy.config}) builds these; the core reads them without
loading the parser.
"""

from __future__ import annotations

from attrs import field, frozen

from mailproxy.protocols import Lookup, ProtocolDescriptor, protocolNamed

__all__ = ["HTTPSettings", "Limits", "Listener"]


@frozen
class Limits:
    """
    Bounds on what one client may cost before and after login.

    @ivar lineLength: longest pre-auth command line, in octets (literals
        excluded), for IMAP, ManageSieve and SMTP (POP3 keeps RFC 2449's
        255); L{None} for each protocol's own default (L{lineLengthFor}).
    @ivar literalSize: largest pre-auth literal (IMAP LOGIN arguments).
    @ivar preauthTimeout: seconds from connect until the login must be done.
    @ivar connectionsPerAddress: concurrent connections from one client
        address; 0 means unlimited.
    @ivar loginFailures: failed logins after which the connection is closed.
    @ivar failureDelay: seconds; the n-th failure is answered after
        C{n * failureDelay}.
    @ivar idleTimeout: seconds without traffic either way after login.
    @ivar backendTimeout: seconds for the backend's greeting and login
        dialogue.
    @ivar shutdownGrace: seconds open sessions may go on after SIGTERM
        before the proxy says goodbye and closes them.
    """

    lineLength: int | None = None
    literalSize: int = 8192
    preauthTimeout: float = 120.0
    connectionsPerAddress: int = 50
    loginFailures: int = 3
    failureDelay: float = 1.0
    idleTimeout: float = 1800.0
    backendTimeout: float = 30.0
    shutdownGrace: float = 30.0

    def lineLengthFor(self, default: int) -> int:
        """
        The pre-auth line limit of a protocol whose own default is
        C{default}: the configured C{line_length}, else that default.

        The protocols' defaults are their backends' own limits (Dovecot's
        C{imap_max_line_length} for IMAP, for instance), so that what a
        client may send to the backend directly still passes the proxy.
        """
        return default if self.lineLength is None else self.lineLength


@frozen
class HTTPSettings:
    """
    The C{[http]} section: how HTTP listeners route requests that carry no
    credentials, and what one request may cost.

    @ivar cookieSecret: the key that signs the routing cookie (HMAC-SHA256).
    @ivar cookieSecretFile: the file it was read from, if any (else it is
        random, made at start).
    @ivar cookieName: the routing cookie's name.
    @ivar defaultBackend: the backend of requests with neither credentials,
        a pinned path nor a valid cookie.
    @ivar pins: path prefixes and the backend each is pinned to, longest
        prefix first.
    @ivar realm: the realm of the C{WWW-Authenticate: Basic} challenge the
        proxy sends when a router refuses credentials.
    @ivar maxHeaderSize: octets of a request's line and headers, or of a
        response's; more gets 431 (a backend's: 502).
    @ivar maxHeaders: header fields of a request; more gets 431.
    @ivar keepaliveTimeout: seconds a connection may wait for its next
        request; then it is closed.
    @ivar headerTimeout: seconds from a request's first octet until its
        headers are complete; then 408 and the connection is closed.
    @ivar responseTimeout: seconds the backend may take to start its
        response once the request was sent; then 504.
    """

    # Not compared: a random key differs at each reading, and a reload
    # must not take that for a changed listener.
    cookieSecret: bytes = field(repr=False, eq=False)
    cookieSecretFile: str | None = None
    cookieName: str = "mailproxy_backend"
    defaultBackend: str = ""
    pins: tuple[tuple[str, str], ...] = ()
    realm: str = "mail"
    maxHeaderSize: int = 32768
    maxHeaders: int = 100
    keepaliveTimeout: float = 75.0
    headerTimeout: float = 30.0
    responseTimeout: float = 60.0


@frozen
class Listener:
    """
    One C{[[listener]]}: where to accept clients and how.

    @ivar protocol: one of L{mailproxy.protocols.LISTENER_PROTOCOLS}.
    @ivar endpoint: a Twisted server endpoint string, known to parse.
    @ivar tls: one of L{mailproxy.config.LISTENER_TLS_MODES}.
    @ivar proxyProtocol: every connection starts with a PROXY v1/v2 header
        from a load balancer in C{proxyTrusted}.
    @ivar proxyTrusted: addresses or CIDR networks of those balancers.
    @ivar digestAuth: offer the digest mechanisms (CRAM-MD5, and APOP
        on POP3), which only a router holding cleartext passwords can check.
    @ivar oauth: offer the OAuth 2.0 mechanisms (OAUTHBEARER, XOAUTH2)
        once TLS is active.
    @ivar mode: the kind of listener, for protocols in L{mailproxy.protocols.LISTENER_MODES}
        (SMTP: C{"submission"} or C{"mx"}); L{None} for the others.
    @ivar localDomains: for an MX listener, the domains the proxy receives
        mail for (lower case, A-labels): a recipient there that the router
        refuses is an unknown user (C{550 5.1.1}), not relaying (C{5.7.1}).
    @ivar http: for an HTTP listener, the C{[http]} section.
    """

    protocol: str
    endpoint: str
    tls: str
    proxyProtocol: bool = False
    proxyTrusted: tuple[str, ...] = ()
    digestAuth: bool = False
    mode: str | None = None
    oauth: bool = False
    localDomains: frozenset[str] = frozenset()
    http: HTTPSettings | None = None

    @property
    def descriptor(self) -> ProtocolDescriptor:
        """
        What the proxy knows of this listener's protocol.
        """
        return protocolNamed(self.protocol)

    @property
    def portName(self) -> str:
        """
        The key of a backend's C{ports} this listener's sessions connect to.
        """
        return self.descriptor.portFor(self.mode)

    @property
    def lookup(self) -> Lookup:
        """
        What this listener's sessions ask the router: C{"login"}, or
        C{"recipient"} (SMTP MX).
        """
        return self.descriptor.lookupFor(self.mode)

    @property
    def applicationProtocols(self) -> tuple[bytes, ...]:
        """
        The TLS ALPN protocol ids this listener's clients may negotiate.
        """
        return self.descriptor.applicationProtocols
