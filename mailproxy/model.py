"""
The data that flows between the front ends, the routers and the backends.

Everything here is frozen: a router receives a L{RouteRequest} and answers with
a L{Route} or a L{Rejection}; nothing it returns can be changed afterwards by
the session that uses it.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Literal

from attrs import Factory, field, frozen

from mailproxy.protocols import Lookup, protocolNamed

Protocol = str
"""
A protocol's name: one of L{mailproxy.protocols.PROTOCOLS}.
"""
BackendTLS = Literal["none", "starttls", "implicit"]
Forwarding = Literal["auto", "id", "xclient", "proxy-v1", "proxy-v2", "none"]
RejectionReason = Literal["", "unknown-user", "not-local"]


@frozen
class TLSInfo:
    """
    What the client's TLS connection to the proxy negotiated.

    @ivar version: e.g. C{"TLSv1.3"}.
    @ivar cipher: the OpenSSL cipher name.
    @ivar serverName: the SNI name the client asked for, or L{None}.
    """

    version: str
    cipher: str
    serverName: str | None = None


@frozen
class ClientInfo:
    """
    Who the client is and where it connected to.

    Addresses are the ones after any PROXY header, that is the real client's.

    @ivar sessionId: the proxy's id for this session, also sent to backends.
    """

    sessionId: str
    address: str
    port: int
    localAddress: str
    localPort: int
    tls: TLSInfo | None = None


@frozen
class Credentials:
    """
    What the client offered to log in.

    @ivar mechanism: C{"LOGIN"} (IMAP LOGIN, POP3 USER/PASS, SASL LOGIN),
        C{"PLAIN"}, C{"CRAM-MD5"}, C{"APOP"}, C{"OAUTHBEARER"} or
        C{"XOAUTH2"}.
    @ivar user: the authentication identity (for the OAuth mechanisms the
        user the client names: OAUTHBEARER's C{a=}, XOAUTH2's C{user=}),
        decoded as UTF-8 with C{surrogateescape} so that any byte string
        survives the round trip.
    @ivar password: the cleartext password, or L{None} for digest mechanisms.
    @ivar authzid: the SASL authorization identity, C{""} when none was given.
    @ivar challenge: for CRAM-MD5 and APOP, the challenge the proxy sent.
    @ivar response: for CRAM-MD5 and APOP, the client's hex digest.
    @ivar token: for OAUTHBEARER and XOAUTH2, the client's bearer token
        (never logged: it is a password for as long as it is valid).
    """

    mechanism: str
    user: str
    password: bytes | None = field(default=None, repr=False)
    authzid: str = ""
    challenge: bytes | None = None
    response: bytes | None = field(default=None, repr=False)
    token: bytes | None = field(default=None, repr=False)

    def check(self, secret: bytes) -> bool:
        """
        Whether these credentials prove knowledge of C{secret}.

        Works for cleartext and digest mechanisms alike, in constant time.
        """
        if self.password is not None:
            return hmac.compare_digest(self.password, secret)
        if self.challenge is None or self.response is None:
            return False
        if self.mechanism == "CRAM-MD5":
            expected = hmac.new(secret, self.challenge, hashlib.md5).hexdigest()
        elif self.mechanism == "APOP":
            expected = hashlib.md5(self.challenge + secret).hexdigest()
        else:
            return False
        return hmac.compare_digest(expected.encode("ascii"), self.response.lower())


def _defaultLookup(request: RouteRequest) -> Lookup:
    # A request made without saying: no credentials means a recipient (MX).
    return "recipient" if request.credentials is None else "login"


def _defaultPort(request: RouteRequest) -> str:
    try:
        protocol = protocolNamed(request.protocol)
    except KeyError:
        # A protocol the registry does not know (a test's, say): its name.
        return request.protocol
    return protocol.portForLookup(request.lookup)


@frozen
class RouteRequest:
    """
    One question to a router: where does this login (or this recipient's
    mail) go?

    @ivar protocol: the client's protocol (C{"imap"}, C{"smtp"}...).
    @ivar credentials: what the client offered to log in; L{None} for a
        recipient lookup.
    @ivar attempt: 1 for the session's first login attempt, then 2, 3...
    @ivar clientID: for IMAP, the key/value pairs of the client's ID command.
    @ivar helo: for SMTP, the client's HELO/EHLO name.
    @ivar mailFrom: for SMTP without authentication (MX), the envelope
        sender as the client wrote it, without the brackets.
    @ivar rcptTo: for SMTP without authentication (MX), the recipient this
        question is about, without the brackets.
    @ivar lookup: what is asked: C{"login"} (where the credentials' account
        lives) or C{"recipient"} (where mail for C{rcptTo} goes).  By
        default C{"recipient"} without credentials, else C{"login"}.
    @ivar port: the key of a backend's C{ports} the session will connect
        to (C{"imap"}, C{"smtp"} for submission, C{"mx"} for inbound
        mail); a router's backend must have it.  By default the one the
        protocol's registry entry gives for C{lookup}.
    """

    protocol: Protocol
    credentials: Credentials | None
    client: ClientInfo
    attempt: int = 1
    clientID: tuple[tuple[str, str], ...] = ()
    helo: str | None = None
    mailFrom: str | None = None
    rcptTo: str | None = None
    lookup: Lookup = field(default=Factory(_defaultLookup, takes_self=True))
    port: str = field(default=Factory(_defaultPort, takes_self=True))


@frozen
class Backend:
    """
    A mail server the proxy can send sessions to.

    @ivar name: the name it has in the configuration (C{[backend.NAME]}).
    @ivar ports: the port for each protocol it serves.
    @ivar tls: how to reach it: C{"none"}, C{"starttls"} or C{"implicit"}.
    @ivar portTLS: where a port is reached otherwise than C{tls}: the mode
        by C{ports} key (a store with STARTTLS on IMAP and plain SMTP on its
        MX port).
    @ivar verify: whether its certificate must be valid for C{serverName}.
    @ivar caFile: a PEM file of trusted CAs, instead of the system's.
    @ivar serverName: the name to verify (and send as SNI); defaults to host.
    @ivar forward: how the client's identity reaches the server.
    @ivar masterUser: log in as this master user on the account's behalf.
    @ivar masterSeparator: joins user and master for LOGIN (C{user*master}).
    @ivar connectTimeout: seconds to wait for TCP (and TLS) to be up.
    """

    name: str
    host: str
    ports: dict[str, int] = field(factory=dict, hash=False)
    tls: BackendTLS = "none"
    verify: bool = True
    caFile: str | None = None
    serverName: str | None = None
    forward: Forwarding = "auto"
    masterUser: str | None = None
    masterPassword: bytes | None = field(default=None, repr=False)
    masterSeparator: str = "*"
    connectTimeout: float = 10.0
    portTLS: dict[str, BackendTLS] = field(factory=dict, hash=False)

    def tlsFor(self, portName: str) -> BackendTLS:
        """
        How to reach this backend on the port C{ports[portName]}: its
        C{portTLS} entry, else C{tls}.
        """
        return self.portTLS.get(portName, self.tls)

    def port(self, protocol: str) -> int:
        """
        The port this backend serves C{protocol} on.

        @raise KeyError: if it does not serve that protocol.
        """
        return self.ports[protocol]


@frozen
class Route:
    """
    A router's answer: send the session to C{backend}.

    @ivar user: the login name to use on the backend; L{None} keeps the
        client's.
    @ivar password: the password to use on the backend; L{None} keeps the
        client's (which digest mechanisms do not have).
    @ivar useMaster: log in with the backend's master user on the user's
        behalf instead of with a password.
    @ivar authenticated: the router has verified the client's password.
    @ivar rule: a short text saying which rule decided, for logs.
    """

    backend: Backend
    user: str | None = None
    password: bytes | None = field(default=None, repr=False)
    useMaster: bool = False
    authenticated: bool = False
    rule: str = ""


@frozen
class Rejection:
    """
    A router's refusal.

    @ivar message: text for the client; the front end adds protocol syntax.
    @ivar wait: seconds to wait before the client sees the refusal.
    @ivar temporary: a transient problem (a directory down), not a wrong
        password: IMAP says C{[UNAVAILABLE]}, SMTP 454, POP3 C{[SYS/TEMP]}.
    @ivar close: close the connection after the refusal.
    @ivar unknown: the router does not know the account at all (rather
        than knowing it and refusing the password): a chain of routers asks
        the next one.
    @ivar reason: for a recipient (SMTP MX, C{credentials} L{None}), why it
        is refused: C{"unknown-user"} (a domain the proxy serves, but no such
        account: SMTP C{550 5.1.1}) or C{"not-local"} (a domain the proxy
        does not serve: C{550 5.7.1}, it never relays); C{""} otherwise.
        Login front ends treat every reason as a failed login.
    """

    message: str = "Authentication failed."
    wait: float = 0.0
    temporary: bool = False
    close: bool = False
    unknown: bool = False
    reason: RejectionReason = ""
