"""
Backends that routers name by address instead of by configured name.

A directory or an auth server often says where an account lives as a host
(C{mailHost: imap3.example.org}) or an address and port (nginx's
C{Auth-Server}/C{Auth-Port}).  L{BackendResolver} turns such an answer into a
L{Backend}: the configured backend of that name, or the configured backend at
that host and port (with all its settings), or else an ad-hoc backend made
from the router's C{backend_defaults}.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from typing import get_args

from attrs import field, frozen

from mailproxy.config import Table, noteRead, parsePortTLS, readNameAndSecret
from mailproxy.model import Backend, BackendTLS, Forwarding, RouteRequest
from mailproxy.protocols import BACKEND_PROTOCOLS, protocolForPort, standardPorts

__all__ = [
    "STANDARD_PORTS",
    "BackendDefaults",
    "BackendResolver",
    "UnusableBackend",
    "lookedUp",
    "parseBackendDefaults",
    "splitHostPort",
]

STANDARD_PORTS: dict[str, int] = dict(standardPorts())
"""
The port of each C{ports} key on an ad-hoc backend named without one, from
the protocol registry: the plain (or STARTTLS) ports, submission for SMTP
logins and 25 for SMTP sessions without login (C{mx}).
"""

BACKEND_TLS_MODES: tuple[str, ...] = get_args(BackendTLS)
FORWARDING_MODES: tuple[str, ...] = get_args(Forwarding)

_HOSTNAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?\Z")


class UnusableBackend(Exception):
    """
    A router's answer names no usable backend; the text says why (it never
    holds a secret).
    """


def splitHostPort(text: str) -> tuple[str, int | None]:
    """
    Split C{host}, C{host:port}, C{[v6]:port} or a bare IPv6 literal.

    @return: the host (IPv6 without brackets) and the port or L{None}.
    @raise ValueError: if it is no host name or address, or the port is not
        1-65535.
    """
    text = text.strip()
    port: str | None = None
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f"not a host or host:port: {text!r}")
        port = rest[1:] if rest else None
        ipaddress.IPv6Address(host)
    elif text.count(":") > 1:
        host = text
        ipaddress.IPv6Address(host)
    else:
        host, colon, after = text.partition(":")
        port = after if colon else None
        if not _isAddress(host) and not _HOSTNAME.match(host):
            raise ValueError(f"not a host name or address: {host!r}")
    if port is None:
        return host, None
    return host, parsePort(port)


def parsePort(text: str) -> int:
    """
    A TCP port written in decimal digits only.

    @raise ValueError: anything else, or outside 1-65535.
    """
    if not text.isascii() or not text.isdigit() or not 1 <= int(text) <= 65535:
        raise ValueError(f"not a port number: {text!r}")
    return int(text)


def _isAddress(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


@frozen
class BackendDefaults:
    """
    The settings of ad-hoc backends (see the module docstring).

    @ivar ports: the port per protocol when the answer gives none.
    """

    ports: dict[str, int] = field(factory=lambda: dict(STANDARD_PORTS), hash=False)
    tls: BackendTLS = "none"
    portTLS: dict[str, BackendTLS] = field(factory=dict, hash=False)
    verify: bool = True
    caFile: str | None = None
    forward: Forwarding = "auto"
    masterUser: str | None = None
    masterPassword: bytes | None = field(default=None, repr=False)
    masterSeparator: str = "*"
    connectTimeout: float = 10.0


def parseBackendDefaults(table: Table | None) -> BackendDefaults:
    """
    Validate a router's C{backend_defaults} table.

    Its keys are those of a C{[backend.NAME]} table except C{host} and
    C{server_name} (the answer gives the host), and C{ports} is optional.

    @raise mailproxy.config.ConfigError: naming the key that is wrong.
    """
    if table is None:
        return BackendDefaults()
    table.allow(
        "ports",
        "tls",
        "verify",
        "ca_file",
        "forward",
        "master_user",
        "master_password_file",
        "master_separator",
        "connect_timeout",
        "port_tls",
    )
    ports = dict(STANDARD_PORTS)
    portsTable = table.table("ports")
    if portsTable is not None:
        portsTable.allow(*BACKEND_PROTOCOLS)
        for protocol in portsTable.data:
            ports[protocol] = portsTable.integer(protocol, None, 1, 65535)
    noteRead(table, "ports", ports)
    masterUser, masterPassword = readNameAndSecret(table, "master_user", "master_password_file")
    return BackendDefaults(
        ports=ports,
        tls=table.string("tls", "none", BACKEND_TLS_MODES),
        portTLS=parsePortTLS(table, BACKEND_PROTOCOLS),
        verify=table.boolean("verify", True),
        caFile=table.path("ca_file", None),
        forward=table.string("forward", "auto", FORWARDING_MODES),
        masterUser=masterUser,
        masterPassword=masterPassword,
        masterSeparator=table.string("master_separator", "*"),
        connectTimeout=table.number("connect_timeout", 10.0, positive=True),
    )


def lookedUp(request: RouteRequest) -> str:
    """
    The name a router looks up for C{request}: the login's user name, or
    for a recipient lookup (SMTP MX) the recipient's address.
    """
    if request.lookup == "recipient":
        return request.rcptTo or ""
    return request.credentials.user if request.credentials is not None else ""


def _portNames(name: str) -> tuple[str, ...]:
    """
    The C{ports} keys one address serves for the key C{name}, C{name}
    first: those of its protocol (an SMTP backend named by address takes
    both submission logins and MX sessions there).
    """
    try:
        protocol = protocolForPort(name)
    except KeyError:
        return (name,)
    return (name,) + tuple(other for other in protocol.ports if other != name)


class BackendResolver:
    """
    Finds the L{Backend} a router's answer means.

    Ad-hoc backends are made once per distinct address and settings and then
    reused, so that per-backend caches (TLS client options) stay small.
    """

    _MAX_ADHOC = 4096

    def __init__(self, backends: Mapping[str, Backend], defaults: BackendDefaults) -> None:
        """
        @param backends: the configured backends, by name.
        @param defaults: the settings of ad-hoc backends.
        """
        self.backends = dict(backends)
        self.defaults = defaults
        self._adhoc: dict[tuple[object, ...], Backend] = {}

    def named(self, name: str, protocol: str) -> Backend:
        """
        The configured backend C{name}, which must serve C{protocol} (a
        C{ports} key: L{mailproxy.model.RouteRequest.port}).

        @raise UnusableBackend: there is none, or it lacks that protocol.
        """
        backend = self.backends.get(name)
        if backend is None:
            raise UnusableBackend(f"no configured backend is named {name!r}")
        if protocol not in backend.ports:
            raise UnusableBackend(f"backend {name!r} has no {protocol} port")
        return backend

    def at(
        self,
        host: str,
        port: int | None,
        protocol: str,
        *,
        tls: BackendTLS | None = None,
        forward: Forwarding | None = None,
    ) -> Backend:
        """
        The backend at C{host} (and C{port}) for C{protocol}.

        Without explicit C{tls} or C{forward}, a configured backend with the
        same host (compared without case) and the same port for C{protocol}
        is used, settings and all.  Otherwise an ad-hoc backend named
        C{"host:port"} with the defaults, C{tls} and C{forward} applied.

        @param port: L{None} for the default port of C{protocol}.
        @raise UnusableBackend: no port is known for C{protocol}.
        """
        names = _portNames(protocol)
        if port is None:
            ports = {name: self.defaults.ports[name] for name in names if name in self.defaults.ports}
            if protocol not in ports:
                raise UnusableBackend(f"no {protocol} port for {host!r} in backend_defaults.ports")
        else:
            ports = {name: port for name in names}
        if tls is None and forward is None:
            for backend in self.backends.values():
                if backend.host.lower() == host.lower() and backend.ports.get(protocol) == ports[protocol]:
                    return backend
        defaults = self.defaults
        port = ports[protocol]
        key = (host.lower(), port, protocol, tls, forward)
        adhoc = self._adhoc.get(key)
        if adhoc is None:
            if len(self._adhoc) >= self._MAX_ADHOC:
                self._adhoc.clear()
            name = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            adhoc = Backend(
                name=name,
                host=host,
                ports=ports,
                tls=tls or defaults.tls,
                # A router that says how to reach this port has said it all.
                portTLS=defaults.portTLS if tls is None else {},
                verify=defaults.verify,
                caFile=defaults.caFile,
                forward=forward or defaults.forward,
                masterUser=defaults.masterUser,
                masterPassword=defaults.masterPassword,
                masterSeparator=defaults.masterSeparator,
                connectTimeout=defaults.connectTimeout,
            )
            self._adhoc[key] = adhoc
        return adhoc

    def resolve(self, value: str, protocol: str) -> Backend:
        """
        The backend a directory value means: a configured backend's name, or
        C{host[:port]}.

        @param protocol: the C{ports} key (L{mailproxy.model.RouteRequest.port}).
        @raise UnusableBackend: it is neither, or lacks C{protocol}.
        """
        value = value.strip()
        if value in self.backends:
            return self.named(value, protocol)
        try:
            host, port = splitHostPort(value)
        except ValueError as e:
            raise UnusableBackend(f"{value!r} is neither a configured backend nor host[:port] ({e})") from None
        return self.at(host, port, protocol)
