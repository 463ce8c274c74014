"""
What the integration tests of several protocols share: the accounts of the
Dovecot scenario, the proxy's configuration written as TOML, bare line
clients, and waiting for a server's log line.
"""

from __future__ import annotations

import json
import socket
import ssl
import time
from typing import TYPE_CHECKING, Any, Mapping

from twisted.trial.unittest import SynchronousTestCase

from .servers import Dovecot, Proxy, TestCA

#: Seconds any single client operation may take before the test fails.
TIMEOUT = 30.0

#: The source address test clients bind where the forwarded address matters:
#: the proxy itself connects to the servers from 127.0.0.1.
CLIENT_ADDRESS = "127.0.0.2"

# The accounts of the Dovecot scenario (IMAP, POP3, ManageSieve).

#: Accounts on both servers. dave's server password is not the one his
#: route checks: he can only get in through the master user.
PASSWORDS = {
    "alice@example.org": "alice secret",
    "bob@example.org": "bob-secret",
    "carol@example.org": "carol-secret",
    "dave@example.org": "dave-server-secret",
}
DAVE_ROUTE_PASSWORD = "dave-proxy-secret"
MASTER_USER = ("proxy", "master-secret")

#: The static route table, as TOML data; "dead" is a backend nobody serves.
ROUTES: dict[str, Any] = {
    "domains": {"example.org": "old"},
    "accounts": {
        "alice@example.org": "old",
        "bob@example.org": "new",
        "dave@example.org": {
            "backend": "new",
            "password": DAVE_ROUTE_PASSWORD,
            "master": True,
        },
        "zed@example.org": "dead",
    },
}

#: Where each account is routed to by L{ROUTES}.
HOMES = {
    "alice@example.org": "old",
    "bob@example.org": "new",
    "carol@example.org": "old",
}

if TYPE_CHECKING:
    MixinBase = SynchronousTestCase
else:
    MixinBase = object


# The proxy's configuration

def tomlValue(value: object) -> str:
    """
    C{value} (a string, number, boolean, list or mapping) in TOML syntax.
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        # A JSON string of printable ASCII is a TOML basic string.
        return json.dumps(value)
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{tomlValue(k)} = {tomlValue(v)}" for k, v in value.items()) + " }"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(tomlValue(item) for item in value) + "]"
    raise TypeError(f"no TOML for {value!r}")


def tomlTable(name: str, values: Mapping[str, object]) -> str:
    """
    A TOML table C{[name]} holding C{values}.
    """
    lines = [f"[{name}]"] + [f"{tomlValue(k)} = {tomlValue(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


def listenerTable(protocol: str, port: int, tls: str, **options: object) -> str:
    """
    A C{[[listener]]} table for C{protocol} on 127.0.0.1:C{port}, with more
    keys from C{options}.
    """
    values = {"protocol": protocol, "endpoint": f"tcp:{port}:interface=127.0.0.1", "tls": tls, **options}
    return "[[listener]]\n" + "".join(f"{key} = {tomlValue(value)}\n" for key, value in values.items())


def staticProxyConfig(
    certificate: str, key: str, listeners: list[str], backends: Mapping[str, Mapping[str, object]]
) -> str:
    """
    The configuration of a proxy under test: short failure delays, the
    static router reading C{routes.toml} beside the configuration.

    @param certificate: the proxy's certificate file, and C{key} its key.
    @param listeners: L{listenerTable}s.
    @param backends: each backend's table by name.
    """
    return (
        tomlTable("proxy", {"hostname": "proxy.example.org"})
        + tomlTable("limits", {"failure_delay": 0.1, "backend_timeout": 10})
        + tomlTable("tls", {"certificate": certificate, "key": key})
        + "".join(listeners)
        # Relative paths: they resolve against the configuration's directory.
        + tomlTable("router", {"type": "static", "path": "routes.toml"})
        + "".join(tomlTable(f"backend.{name}", values) for name, values in backends.items())
    )


def routesText(routes: Mapping[str, Any]) -> str:
    """
    The route table file for C{routes} (TOML data like L{ROUTES}).
    """
    text = ""
    if "default" in routes:
        text += f"default = {tomlValue(routes['default'])}\n"
    for table in ("domains", "accounts"):
        if table in routes:
            text += "\n" + tomlTable(table, routes[table])
    return text


class RunningProxy:
    """
    The proxy under test in the Dovecot scenario: a listener of one
    protocol for each TLS mode (implicit TLS, STARTTLS, STARTTLS required),
    the static router reading C{routes.toml}, and the master user's
    password file.

    @ivar implicit: the implicit-TLS listener's port, as C{startTLS} and
        C{startTLSRequired} are the others'.
    @ivar routesPath: the route table.
    """

    def __init__(
        self,
        directory: str,
        protocol: str,
        backends: Mapping[str, Mapping[str, object]],
        routes: Mapping[str, Any],
        ca: TestCA,
        listenerOptions: Mapping[str, Mapping[str, object]] = {},
        certificateName: str = "proxy",
    ) -> None:
        """
        Write the configuration, the route table and the master password
        file into C{directory}; C{ca} signs the proxy's certificate.

        @param listenerOptions: more keys for a listener's table, by its TLS
            mode.
        """
        certificate, key = ca.issue(certificateName)
        # Port 0: the proxy logs the ports the kernel chose (see start).
        listeners = [
            listenerTable(protocol, 0, mode, **listenerOptions.get(mode, {}))
            for mode in ("implicit", "starttls", "starttls-required")
        ]
        self.proxy = Proxy(directory, staticProxyConfig(certificate, key, listeners, backends))
        self.routesPath = self.proxy.directory / "routes.toml"
        self.routesPath.write_text(routesText(routes))
        (self.proxy.directory / "master.pw").write_text(MASTER_USER[1] + "\n")

    def start(self) -> None:
        """
        Start the proxy and learn its listeners' ports: L{implicit},
        L{startTLS} and L{startTLSRequired}.
        """
        self.proxy.start()
        self.implicit, self.startTLS, self.startTLSRequired = self.proxy.ports

    def stop(self) -> None:
        """
        Stop the proxy.
        """
        self.proxy.stop()


# Clients

def connectFrom(source: str, host: str, port: int, timeout: float | None, context: ssl.SSLContext) -> ssl.SSLSocket:
    """
    An implicit-TLS connection to C{host}:C{port} from the local address
    C{source}: what a standard-library client's C{_create_socket} returns
    when the server's log must show whether that address was forwarded.
    """
    connection = socket.create_connection((host, port), timeout, source_address=(source, 0))
    return context.wrap_socket(connection, server_hostname=host)


class LineClient:
    """
    A bare client of a line protocol, for tests that assert exact replies;
    a protocol's subclass adds how its replies and commands look.

    @cvar serverName: the name TLS verifies the server's certificate for.
    """

    serverName = "127.0.0.1"

    def __init__(self, connection: socket.socket) -> None:
        """
        Use C{connection}, already connected.
        """
        self.connection = connection
        self.connection.settimeout(TIMEOUT)
        self._buffer = b""

    @classmethod
    def connect(cls, port: int, context: ssl.SSLContext | None = None, source: str | None = None) -> Any:
        """
        Connect to 127.0.0.1:C{port} (from C{source} if given), with
        implicit TLS if C{context} is given.
        """
        connection = socket.create_connection(
            ("127.0.0.1", port), TIMEOUT, source_address=(source, 0) if source else None
        )
        if context is not None:
            connection = context.wrap_socket(connection, server_hostname=cls.serverName)
        return cls(connection)

    def _fill(self) -> None:
        """
        Read more of what the server sent.

        @raise EOFError: the server closed the connection.
        """
        data = self.connection.recv(65536)
        if not data:
            raise EOFError(f"connection closed; unterminated: {self._buffer!r}")
        self._buffer += data

    def _nextLine(self) -> bytes:
        """
        The next line the server sent, without its CRLF.

        @raise socket.timeout: nothing complete arrived in time.
        @raise EOFError: the server closed the connection.
        """
        while b"\r\n" not in self._buffer:
            self._fill()
        line, self._buffer = self._buffer.split(b"\r\n", 1)
        return line

    def _wrapTLS(self, context: ssl.SSLContext) -> None:
        """
        Start TLS on the connection, after the server's go-ahead; nothing
        it sent in clear may be left unread.
        """
        assert self._buffer == b"", f"plaintext after STARTTLS: {self._buffer!r}"
        self.connection = context.wrap_socket(self.connection, server_hostname=self.serverName)

    def close(self) -> None:
        """
        Close the connection.
        """
        self.connection.close()


# Servers' logs

class ServerLogMixin(MixinBase):
    """
    Waiting for a line in a server's log (a L{Dovecot}'s).
    """

    def logMark(self, server: Dovecot) -> int:
        """
        Where C{server}'s log ends now: pass it to L{waitForLogLine}.
        """
        return len(server.logText())

    def waitForLogLine(self, server: Dovecot, mark: int, *fragments: str) -> str:
        """
        Wait until a line containing every one of C{fragments} appears in
        C{server}'s log after C{mark}, and return it.
        """
        deadline = time.monotonic() + 10
        while True:
            added = server.logText()[mark:]
            for line in added.splitlines():
                if all(fragment in line for fragment in fragments):
                    return line
            if time.monotonic() > deadline:
                self.fail(f"no line with {fragments} in {server.name}'s log; it added:\n{added}")
            time.sleep(0.05)
