"""
The protocols the proxy speaks, as a registry of descriptors: one
L{ProtocolDescriptor} per protocol says everything the rest of the proxy
needs to know of it (the configuration, the listeners, the routers, the
health probes): its name, the backend ports it connects to, its kinds of
listener, which mechanisms it may offer, the TLS ALPN ids it accepts, how
a well server greets, and where its front end and backend login live.

Those last two are lazy references (dotted names resolved on use), so
importing the registry loads no protocol code: the configuration parser,
the session core and the routers read it without loading a front end, and
no protocol module needs to import the registry back.

Adding a protocol is a new package (its front end and backend login) plus
one entry in L{PROTOCOLS}.  The constants below the registry
(L{LISTENER_PROTOCOLS}, L{BACKEND_PROTOCOLS}, ...) are derived from it.
"""

from __future__ import annotations

import functools
import importlib
import re
from collections.abc import Iterator, Mapping
from typing import Any, Literal

from attrs import field, frozen

__all__ = [
    "Lookup",
    "resolve",
    "Mode",
    "ProtocolDescriptor",
    "PROTOCOLS",
    "protocolNamed",
    "protocolForPort",
    "standardPorts",
    "LISTENER_PROTOCOLS",
    "BACKEND_PROTOCOLS",
    "DIGEST_AUTH_PROTOCOLS",
    "OAUTH_PROTOCOLS",
    "LISTENER_MODES",
    "MODE_PORTS",
    "APPLICATION_PROTOCOLS",
]

Lookup = Literal["login", "recipient"]
"""
What a session asks a router: where a C{"login"} goes (the credentials'
account), or where mail for a C{"recipient"} goes (SMTP MX, no login).
"""


@functools.cache
def resolve(reference: str) -> Any:
    """
    The object a dotted name (C{package.module.name}) refers to, importing
    its module; remembered, as sessions ask for their protocol's classes at
    every login.
    """
    module, _, name = reference.rpartition(".")
    return getattr(importlib.import_module(module), name)


@frozen
class Mode:
    """
    One kind of listener of a protocol that has several (SMTP: message
    submission, which takes logins, and MX, which receives mail).

    @ivar name: the listener's C{mode} value.
    @ivar port: the key of a backend's C{ports} its sessions connect to.
    @ivar lookup: what its sessions ask the router, where it is not what
        the protocol's ask (L{ProtocolDescriptor.lookup}).
    @ivar frontend: the dotted name of its front end, where it is not the
        protocol's (L{ProtocolDescriptor.frontend}).
    """

    name: str
    port: str
    lookup: Lookup | None = None
    frontend: str | None = None


@frozen
class ProbeStep:
    """
    One exchange of a health probe on its way to STARTTLS.

    @ivar send: what the probe sends (C{{hostname}} replaced by the
        proxy's name), or nothing: the step reads what the server sends on
        its own (the rest of a greeting).
    @ivar last: matches the line that ends the server's answer.
    @ivar yes: matches that line when the answer is a yes.
    """

    send: bytes
    last: re.Pattern[bytes]
    yes: re.Pattern[bytes]


@frozen
class ProtocolDescriptor:
    """
    What the proxy knows of one protocol (as nginx's C{ngx_mail_protocol_t}
    or Dovecot's C{login_binary}).

    @ivar name: its C{protocol} in a C{[[listener]]}, in
        L{mailproxy.model.RouteRequest.protocol} and towards routers
        (nginx's C{Auth-Protocol}).
    @ivar ports: the keys of a backend's C{ports} its sessions connect to,
        each with its standard port (where a router names a backend by host
        alone); the first, its own (L{ownPort}), is named as the protocol,
        others are its modes'.  The keys of one protocol may share an
        address: a host named for one of them serves the others there too.
    @ivar frontend: the dotted name of its front end: called with the
        L{mailproxy._session.ProxyContext} and the
        L{mailproxy.settings.Listener}, it returns the protocol of one
        connection.  A mode may name another (L{Mode.frontend}).
    @ivar backendLogin: the dotted name of its backend login dialogue (a
        L{mailproxy._backend.BackendProtocol}).
    @ivar applicationProtocols: the TLS ALPN protocol ids its listeners
        accept: a client that offers ALPN without one of them (a browser
        sent to a mail port, say) is refused during the handshake.
    @ivar greeting: how a well server's first line starts (any one of
        these); the health probes read it on each of L{ports}.
    @ivar probe: what a health probe sends once connected, before it reads
        that line: nothing for mail protocols, whose servers speak first;
        a request for one whose servers only answer (HTTP).
    @ivar startTLS: the exchanges a health probe has after that line on a
        port reached with STARTTLS, up to the server's go-ahead; then it
        makes the TLS handshake, the certificate checked as for a login.
        Empty for a protocol without STARTTLS.
    @ivar lookup: what its sessions ask the router: C{"login"}, or
        C{"recipient"} for a protocol that receives mail (a mode may say
        otherwise).
    @ivar modes: its kinds of listener, each with its required C{mode}
        value; empty for a protocol of one kind.
    @ivar digestAuth: its front end can offer digest mechanisms (CRAM-MD5,
        and APOP on POP3) when a listener sets C{digest_auth = true}.
    @ivar oauth: its front end can offer OAuth mechanisms (OAUTHBEARER,
        XOAUTH2) when a listener sets C{oauth = true}.
    """

    name: str
    ports: Mapping[str, int] = field(hash=False)
    frontend: str
    backendLogin: str
    applicationProtocols: tuple[bytes, ...]
    greeting: tuple[bytes, ...]
    probe: bytes = b""
    startTLS: tuple[ProbeStep, ...] = ()
    lookup: Lookup = "login"
    modes: tuple[Mode, ...] = ()
    digestAuth: bool = False
    oauth: bool = False

    @property
    def ownPort(self) -> str:
        """
        Its own C{ports} key, named as it: the one its listeners without
        a mode connect to.
        """
        return next(iter(self.ports))

    def mode(self, name: str | None) -> Mode | None:
        """
        Its mode called C{name}, or L{None} (no such mode, or C{name} is
        L{None}).
        """
        for mode in self.modes:
            if mode.name == name:
                return mode
        return None

    def portFor(self, mode: str | None = None) -> str:
        """
        The C{ports} key the sessions of a listener in C{mode} connect to.
        """
        found = self.mode(mode)
        return found.port if found is not None else self.ownPort

    def lookupFor(self, mode: str | None = None) -> Lookup:
        """
        What the sessions of a listener in C{mode} ask the router.
        """
        found = self.mode(mode)
        return found.lookup if found is not None and found.lookup is not None else self.lookup

    def portForLookup(self, lookup: Lookup) -> str:
        """
        The C{ports} key a session asking C{lookup} connects to: that of
        the first mode that asks it, else its own.
        """
        for mode in self.modes:
            if self.lookupFor(mode.name) == lookup:
                return mode.port
        return self.ownPort

    def frontendFactory(self, mode: str | None = None) -> Any:
        """
        The front end of a listener in C{mode} (imported now): called with
        the proxy's context and the listener.
        """
        found = self.mode(mode)
        if found is not None and found.frontend is not None:
            return resolve(found.frontend)
        return resolve(self.frontend)

    def backendLoginFactory(self) -> Any:
        """
        The backend login dialogue's class (imported now).
        """
        return resolve(self.backendLogin)

    def greets(self, line: bytes) -> bool:
        """
        Whether C{line}, a server's first, is how a well server of this
        protocol greets.
        """
        return line.startswith(self.greeting)


#: The last line of an SMTP reply (no "-" after its code); of a
#: ManageSieve answer (its status).
_SMTP_LAST = re.compile(rb"\d{3}(?: |$)")
_SIEVE_LAST = re.compile(rb"(?i:OK|NO|BYE)")

PROTOCOLS: tuple[ProtocolDescriptor, ...] = (
    ProtocolDescriptor(
        name="imap",
        ports={"imap": 143},
        frontend="mailproxy.imap._frontend.IMAPFrontend",
        backendLogin="mailproxy.imap._backend.IMAPBackendLogin",
        applicationProtocols=(b"imap",),
        greeting=(b"* OK", b"* PREAUTH"),
        startTLS=(ProbeStep(b"P STARTTLS\r\n", re.compile(rb"P "), re.compile(rb"P OK")),),
        digestAuth=True,
        oauth=True,
    ),
    ProtocolDescriptor(
        name="pop3",
        ports={"pop3": 110},
        frontend="mailproxy.pop3._frontend.POP3Frontend",
        backendLogin="mailproxy.pop3._backend.POP3BackendLogin",
        applicationProtocols=(b"pop3",),
        greeting=(b"+OK",),
        startTLS=(ProbeStep(b"STLS\r\n", re.compile(rb""), re.compile(rb"\+OK")),),
        digestAuth=True,
        oauth=True,
    ),
    ProtocolDescriptor(
        name="smtp",
        # 587 for submission logins, 25 for inbound mail (MX).
        ports={"smtp": 587, "mx": 25},
        frontend="mailproxy.smtp.SubmissionFrontend",
        backendLogin="mailproxy.smtp._backend.SMTPBackendLogin",
        # IANA has registered no ALPN id for SMTP; "smtp" is what a client
        # that sends one anyway is most likely to send.
        applicationProtocols=(b"smtp",),
        greeting=(b"220",),
        startTLS=(
            # The rest of the greeting (it may have several lines), EHLO,
            # then STARTTLS.
            ProbeStep(b"", _SMTP_LAST, re.compile(rb"220")),
            ProbeStep(b"EHLO {hostname}\r\n", _SMTP_LAST, re.compile(rb"250")),
            ProbeStep(b"STARTTLS\r\n", _SMTP_LAST, re.compile(rb"220")),
        ),
        modes=(
            Mode("submission", port="smtp"),
            Mode("mx", port="mx", lookup="recipient", frontend="mailproxy.smtp.MXFrontend"),
        ),
        digestAuth=True,
        oauth=True,
    ),
    ProtocolDescriptor(
        name="sieve",
        ports={"sieve": 4190},
        frontend="mailproxy.sieve._frontend.SieveFrontend",
        backendLogin="mailproxy.sieve._backend.SieveBackendLogin",
        applicationProtocols=(b"managesieve",),
        # ManageSieve greets with its capabilities, each a quoted string.
        greeting=(b'"',),
        # The capabilities, up to their OK; then STARTTLS.
        startTLS=(
            ProbeStep(b"", _SIEVE_LAST, re.compile(rb"(?i:OK)")),
            ProbeStep(b"STARTTLS\r\n", _SIEVE_LAST, re.compile(rb"(?i:OK)")),
        ),
        oauth=True,
    ),
    ProtocolDescriptor(
        name="http",
        ports={"http": 80},
        frontend="mailproxy.http.HTTPFrontend",
        backendLogin="mailproxy.http._backend.HTTPBackend",
        applicationProtocols=(b"http/1.1",),
        # Any status line: a server that answers is up (even "OPTIONS *"
        # refused with 405 or 501).
        greeting=(b"HTTP/1.",),
        probe=b"OPTIONS * HTTP/1.1\r\nHost: mailproxy\r\nConnection: close\r\n\r\n",
    ),
)
"""
Every protocol, one entry each.  The order is the one messages list them
in (L{BACKEND_PROTOCOLS}); listener protocols are listed alphabetically.
"""

_BY_NAME: dict[str, ProtocolDescriptor] = {protocol.name: protocol for protocol in PROTOCOLS}
_BY_PORT: dict[str, ProtocolDescriptor] = {port: protocol for protocol in PROTOCOLS for port in protocol.ports}


def protocolNamed(name: str) -> ProtocolDescriptor:
    """
    The protocol called C{name}.

    @raise KeyError: there is none.
    """
    return _BY_NAME[name]


def protocolForPort(port: str) -> ProtocolDescriptor:
    """
    The protocol whose sessions connect to the backend C{ports} key
    C{port} (C{"mx"}: SMTP).

    @raise KeyError: no protocol connects there.
    """
    return _BY_PORT[port]


def standardPorts() -> Iterator[tuple[str, int]]:
    """
    Every backend C{ports} key with its standard port number.
    """
    for protocol in PROTOCOLS:
        yield from protocol.ports.items()


LISTENER_PROTOCOLS: tuple[str, ...] = tuple(sorted(_BY_NAME))
"""
The protocols a C{[[listener]]} can speak (the front ends that exist).
"""

DIGEST_AUTH_PROTOCOLS: tuple[str, ...] = tuple(protocol.name for protocol in PROTOCOLS if protocol.digestAuth)
"""
The listener protocols whose front ends offer digest mechanisms when a
listener sets C{digest_auth = true}.
"""

OAUTH_PROTOCOLS: tuple[str, ...] = tuple(protocol.name for protocol in PROTOCOLS if protocol.oauth)
"""
The listener protocols whose front ends offer OAUTHBEARER and XOAUTH2 when
a listener sets C{oauth = true}.
"""

BACKEND_PROTOCOLS: tuple[str, ...] = tuple(
    dict.fromkeys(
        [protocol.ownPort for protocol in PROTOCOLS]
        + [mode.port for protocol in PROTOCOLS for mode in protocol.modes]
        + [port for protocol in PROTOCOLS for port in protocol.ports]
    )
)
"""
The keys a backend's C{ports} table may name: each protocol's own, then
those of the listener modes (C{mx}: where inbound mail from an
C{smtp} listener in C{mx} mode goes; C{smtp}: submission).
"""

LISTENER_MODES: dict[str, tuple[str, ...]] = {
    protocol.name: tuple(mode.name for mode in protocol.modes) for protocol in PROTOCOLS if protocol.modes
}
"""
The listener protocols that come in kinds, with the values of their
required C{mode} key.
"""

MODE_PORTS: dict[tuple[str, str], str] = {
    (protocol.name, mode.name): mode.port
    for protocol in PROTOCOLS
    for mode in protocol.modes
    if mode.port != protocol.name
}
"""
The backend C{ports} key a listener mode connects to, where it is not the
listener's protocol.
"""

APPLICATION_PROTOCOLS: dict[str, tuple[bytes, ...]] = {
    protocol.name: protocol.applicationProtocols for protocol in PROTOCOLS
}
"""
The TLS ALPN protocol ids each listener protocol accepts (see
L{ProtocolDescriptor.applicationProtocols}).
"""
