"""
ManageSieve through the proxy, end to end: two real Dovecot servers ("old"
and "new", Pigeonhole's managesieve), the proxy as a subprocess, and real
clients: C{sieve-connect}, and a small socket client where the exact reply
or the client's source address matters.

Every account exists on both servers with the same password; which server
a script landed on is checked on the servers themselves (C{doveadm sieve
list} and a direct GETSCRIPT), so a login that reached the wrong server
cannot pass.
"""

from __future__ import annotations

import os
import ssl
import subprocess
import time
from base64 import b64encode
from pathlib import Path
from typing import Any, Mapping

from twisted.trial.unittest import SynchronousTestCase

from . import common
from .common import (
    CLIENT_ADDRESS,
    DAVE_ROUTE_PASSWORD,
    HOMES,
    MASTER_USER,
    PASSWORDS,
    ROUTES,
    TIMEOUT,
    RunningProxy,
    ServerLogMixin,
)
from .servers import (
    Dovecot,
    TestCA,
    fixtureDirectory,
    refusedPort,
    requireServer,
    sharedFixture,
)


class SieveServers:
    """
    The scenario's two Dovecot servers and their certificate authority.
    """

    def __init__(self, directory: str) -> None:
        """
        Make the CA and configure (not start) the servers in C{directory}.
        """
        self.ca = TestCA(os.path.join(directory, "ca"))
        self.old = Dovecot(os.path.join(directory, "old"), "old", PASSWORDS, ca=self.ca, masterUser=MASTER_USER)
        self.new = Dovecot(os.path.join(directory, "new"), "new", PASSWORDS, ca=self.ca, masterUser=MASTER_USER)

    @classmethod
    def start(cls) -> SieveServers:
        """
        Start both servers.
        """
        requireServer("dovecot", "doveadm", "openssl")
        servers = cls(fixtureDirectory("dovecot-sieve"))
        try:
            servers.old.start()
            servers.new.start()
        except BaseException:
            servers.stop()
            raise
        return servers

    def byName(self, name: str) -> Dovecot:
        """
        The server called C{name} (C{"old"} or C{"new"}).
        """
        return {"old": self.old, "new": self.new}[name]

    def stop(self) -> None:
        """
        Stop both servers.
        """
        self.old.stop()
        self.new.stop()


class SieveClient(common.LineClient):
    """
    A bare ManageSieve client: sends command lines and returns response
    lines as bytes, reading literals the server sends.
    """

    def readLine(self) -> bytes:
        """
        The next response line, CRLF excluded, with the octets of any
        literal it announces (C{{n}} at its end) appended.
        """
        line = self._nextLine()
        if line.endswith(b"}") and b"{" in line:
            size = int(line[line.rindex(b"{") + 1 : -1].rstrip(b"+"))
            while len(self._buffer) < size:
                self._fill()
            line += b"\r\n" + self._buffer[:size]
            self._buffer = self._buffer[size:]
            line += self.readLine()
        return line

    def readResponse(self) -> list[bytes]:
        """
        The lines of one response, up to and including its OK, NO or BYE.
        """
        lines = [self.readLine()]
        while not lines[-1].split(b" ", 1)[0].upper() in (b"OK", b"NO", b"BYE"):
            lines.append(self.readLine())
        return lines

    def command(self, line: bytes) -> list[bytes]:
        """
        Send a command; return its response lines.
        """
        self.connection.sendall(line + b"\r\n")
        return self.readResponse()

    def startTLS(self, context: ssl.SSLContext) -> list[bytes]:
        """
        STARTTLS, the handshake, and the capability list the server sends
        after it.
        """
        reply = self.command(b"STARTTLS")
        assert reply[-1].startswith(b"OK"), reply
        self._wrapTLS(context)
        return self.readResponse()

    def authenticatePlain(self, user: str, password: str) -> list[bytes]:
        """
        AUTHENTICATE "PLAIN" with an initial response.
        """
        response = b64encode(b"\x00" + user.encode() + b"\x00" + password.encode())
        return self.command(b'AUTHENTICATE "PLAIN" "' + response + b'"')


def capabilityNames(lines: list[bytes]) -> dict[bytes, bytes | None]:
    """
    The capabilities in a capability response: upper-cased name to value.
    """
    names: dict[bytes, bytes | None] = {}
    for line in lines:
        if not line.startswith(b'"'):
            continue
        parts = line.split(b'" "', 1)
        name = parts[0].strip(b'"').upper()
        names[name] = parts[1].rstrip(b'"') if len(parts) == 2 else None
    return names


class ProxyFixtureMixin(ServerLogMixin):
    """
    Tests against the proxy and the two servers, both shared by a test
    class's tests (the servers by the whole module).

    A test class says how the proxy reaches the servers by overriding
    L{backendOptions}.
    """

    servers: SieveServers
    running: RunningProxy
    routes: Mapping[str, Any] = ROUTES

    def backendOptions(self, server: Dovecot) -> dict[str, object]:
        """
        The settings of the C{[backend.NAME]} table for C{server}: by
        default plaintext, forwarding the client's address as the server
        advertises (XCLIENT for a trusted proxy).
        """
        return {"ports": {"sieve": server.sieve}, "tls": "none", "forward": "auto"}

    def extraBackends(self) -> dict[str, dict[str, object]]:
        """
        More backends this class's proxy configuration needs.
        """
        return {}

    def setUp(self) -> None:
        """
        Get the running servers and this class's running proxy, starting
        them if this is the first test to need them.
        """
        self.servers = sharedFixture("mail servers", __name__, SieveServers.start)
        self.running = sharedFixture("proxy", type(self).__qualname__, self._startProxy)
        self.context = ssl.create_default_context(cafile=self.servers.ca.caPath)

    def _startProxy(self) -> RunningProxy:
        """
        Configure and start the proxy for this test class.
        """
        backends: dict[str, dict[str, object]] = {
            server.name: {
                "host": "127.0.0.1",
                **self.backendOptions(server),
                "master_user": MASTER_USER[0],
                "master_password_file": "master.pw",
                "connect_timeout": 5,
            }
            for server in (self.servers.old, self.servers.new)
        }
        backends["dead"] = {"host": "127.0.0.1", "ports": {"sieve": refusedPort()}, "connect_timeout": 5}
        backends.update(self.extraBackends())
        running = RunningProxy(
            fixtureDirectory(type(self).__name__), "sieve", backends, self.routes, self.servers.ca,
            certificateName="proxy-sieve",
        )
        running.start()
        return running

    def connect(self, port: int | None = None, source: str | None = None) -> SieveClient:
        """
        A L{SieveClient} on the proxy's STARTTLS-required listener (or on
        C{port}) in plaintext, its greeting read, closed after the test.
        """
        client = SieveClient.connect(port or self.running.startTLSRequired, source=source)
        self.addCleanup(client.close)
        greeting = client.readResponse()
        self.assertTrue(greeting[-1].startswith(b"OK "), greeting)
        return client

    def connectSecure(self, source: str | None = None) -> SieveClient:
        """
        A L{SieveClient} after STARTTLS on the STARTTLS-required listener.
        """
        client = self.connect(source=source)
        capabilities = client.startTLS(self.context)
        self.assertTrue(capabilities[-1].startswith(b"OK "), capabilities)
        return client

    def sieveConnect(self, user: str, password: str, *arguments: str) -> str:
        """
        Run C{sieve-connect} against the STARTTLS-required listener,
        verifying the proxy's certificate against the test CA and refusing
        cleartext authentication without TLS.

        @return: its standard output.
        """
        requireServer("sieve-connect")
        result = subprocess.run(
            [
                "sieve-connect", "--nosrv", "--server", "127.0.0.1",
                "--port", str(self.running.startTLSRequired),
                "--tlscafile", self.servers.ca.caPath, "--noclearauth",
                "--user", user, "--passwordfd", "0", *arguments,
            ],
            input=(password + "\n").encode(),
            capture_output=True,
            timeout=TIMEOUT,
        )
        if result.returncode != 0:
            self.fail(
                f"sieve-connect {' '.join(arguments)} failed ({result.returncode}): "
                f"{result.stderr.decode(errors='replace')}"
                f"\nproxy log:\n{self.running.proxy.logText()[-3000:]}"
            )
        return result.stdout.decode("utf-8", "replace")

    def directScript(self, server: Dovecot, user: str, name: str) -> bytes | None:
        """
        The script C{name} of C{user}, read with GETSCRIPT straight from
        C{server} (not through the proxy), or L{None} if it has none.
        """
        client = SieveClient.connect(server.sieve)
        try:
            client.readResponse()
            reply = client.authenticatePlain(user, PASSWORDS[user])
            self.assertTrue(reply[-1].startswith(b"OK"), reply)
            reply = client.command(b'GETSCRIPT "' + name.encode() + b'"')
            client.command(b"LOGOUT")
        finally:
            client.close()
        if not reply[-1].startswith(b"OK"):
            return None
        literal = reply[0]
        return literal[literal.index(b"\r\n") + 2 :]



class RoutingTestsMixin(ProxyFixtureMixin):
    """
    Tests that hold for every way of reaching the servers: sieve-connect
    manages scripts on the routed server, and the client's address reaches
    it.
    """

    def test_sieveConnectManagesScripts(self) -> None:
        """
        sieve-connect uploads, lists, activates and downloads a script
        through the proxy (STARTTLS, certificate verified); the script is
        stored, and active, on the account's routed server only.
        """
        directory = Path(self.mktemp())
        directory.mkdir()
        for user, home in HOMES.items():
            name = f"{type(self).__name__}-{user.split('@')[0]}"
            script = (
                f'require "fileinto";\r\n# {user} via {type(self).__name__}\r\n'
                f'if header :contains "subject" "{name}" {{ fileinto "INBOX"; }}\r\n'
            ).encode()
            local = directory / f"{name}.sieve"
            local.write_bytes(script)
            password = PASSWORDS[user]
            self.sieveConnect(user, password, "--localsieve", str(local), "--remotesieve", name, "--upload")
            self.assertIn(f'"{name}"', self.sieveConnect(user, password, "--list"))
            self.sieveConnect(user, password, "--remotesieve", name, "--activate")
            self.assertIn(f'"{name}" ACTIVE', self.sieveConnect(user, password, "--list"))
            downloaded = directory / f"{name}.downloaded"
            self.sieveConnect(
                user, password, "--remotesieve", name, "--localsieve", str(downloaded), "--download"
            )
            self.assertEqual(downloaded.read_bytes(), script)

            routed = self.servers.byName(home)
            other = self.servers.byName("new" if home == "old" else "old")
            self.assertIn(f"{name} ACTIVE", routed.doveadm("sieve", "list", "-u", user).decode())
            self.assertNotIn(name, other.doveadm("sieve", "list", "-u", user).decode())
            self.assertEqual(self.directScript(routed, user, name), script)
            self.assertIsNone(self.directScript(other, user, name))

    def test_clientAddressForwarded(self) -> None:
        """
        The server logs the client's address (127.0.0.2), not the proxy's,
        for a ManageSieve login through the proxy.
        """
        mark = self.logMark(self.servers.old)
        client = self.connectSecure(source=CLIENT_ADDRESS)
        reply = client.authenticatePlain("alice@example.org", PASSWORDS["alice@example.org"])
        self.assertTrue(reply[-1].startswith(b"OK"), reply)
        self.assertTrue(client.command(b"LISTSCRIPTS")[-1].startswith(b"OK"))
        self.waitForLogLine(
            self.servers.old,
            mark,
            "managesieve-login: Info: Login: user=<alice@example.org>",
            f"rip={CLIENT_ADDRESS},",
        )


class PlainBackendTests(RoutingTestsMixin, SynchronousTestCase):
    """
    The proxy in front of servers it reaches in plaintext, forwarding the
    client's address with XCLIENT (C{forward = "auto"}): the whole client
    experience.
    """

    def test_xclientAfterLoginRefused(self) -> None:
        """
        XCLIENT after login gets the proxy's C{NO}; the server never sees
        it and keeps the client's address for the session.
        """
        mark = self.logMark(self.servers.old)
        client = self.connectSecure(source=CLIENT_ADDRESS)
        reply = client.authenticatePlain("alice@example.org", PASSWORDS["alice@example.org"])
        self.assertTrue(reply[-1].startswith(b"OK"), reply)
        self.assertEqual(client.command(b"XCLIENT ADDR=6.6.6.6 PORT=666"), [b'NO "Insufficient authorization."'])
        self.assertTrue(client.command(b"LISTSCRIPTS")[-1].startswith(b"OK"))
        self.assertTrue(client.command(b"LOGOUT")[-1].startswith(b"OK"))
        end = self.waitForLogLine(self.servers.old, mark, "managesieve(alice@example.org)", "Disconnected")
        self.assertIn(f" rip={CLIENT_ADDRESS}: ", end)
        self.assertNotIn("6.6.6.6", self.servers.old.logText()[mark:])

    def test_sieveConnectLoginMechanism(self) -> None:
        """
        sieve-connect logs in with SASL LOGIN as well: carol, routed to old
        by her domain, is logged in there.
        """
        mark = self.logMark(self.servers.old)
        self.sieveConnect("carol@example.org", PASSWORDS["carol@example.org"], "--authmech", "LOGIN", "--list")
        self.waitForLogLine(self.servers.old, mark, "managesieve-login: Info: Login: user=<carol@example.org>")

    def test_startTLSRequired(self) -> None:
        """
        Before TLS the proxy offers STARTTLS and an empty SASL list and
        answers AUTHENTICATE with NO (ENCRYPT-NEEDED); after STARTTLS it
        re-sends its capabilities unasked, now with the mechanisms and
        without STARTTLS, and the login succeeds.
        """
        client = SieveClient.connect(self.running.startTLSRequired)
        self.addCleanup(client.close)
        greeting = capabilityNames(client.readResponse())
        self.assertEqual(greeting[b"SASL"], b"")
        self.assertIn(b"STARTTLS", greeting)
        self.assertEqual(greeting[b"VERSION"], b"1.0")
        self.assertEqual(greeting[b"IMPLEMENTATION"], b"mailproxy")
        reply = client.authenticatePlain("alice@example.org", PASSWORDS["alice@example.org"])
        self.assertEqual(
            reply,
            [b'NO (ENCRYPT-NEEDED) "Plaintext authentication disallowed on non-secure (SSL/TLS) connections."'],
        )
        after = client.startTLS(self.context)
        self.assertEqual(after[-1], b'OK "TLS negotiation successful."')
        capabilities = capabilityNames(after)
        self.assertEqual(capabilities[b"SASL"], b"PLAIN LOGIN")
        self.assertNotIn(b"STARTTLS", capabilities)
        reply = client.authenticatePlain("alice@example.org", PASSWORDS["alice@example.org"])
        self.assertEqual(reply, [b'OK "Logged in."'])

    def test_backendCapabilitiesAfterLogin(self) -> None:
        """
        After login, CAPABILITY is answered by the backend: the client sees
        its implementation and SIEVE extensions.
        """
        client = self.connectSecure()
        self.assertEqual(capabilityNames(client.command(b"CAPABILITY"))[b"IMPLEMENTATION"], b"mailproxy")
        client.authenticatePlain("bob@example.org", PASSWORDS["bob@example.org"])
        capabilities = capabilityNames(client.command(b"CAPABILITY"))
        self.assertIn(b"Pigeonhole", capabilities[b"IMPLEMENTATION"] or b"")
        self.assertIn(b"MAXREDIRECTS", capabilities)
        self.assertIn(b"fileinto", (capabilities[b"SIEVE"] or b"").split())

    def test_implicitTLS(self) -> None:
        """
        On the implicit-TLS listener the greeting offers no STARTTLS and a
        login works at once.
        """
        client = SieveClient.connect(self.running.implicit, self.context)
        self.addCleanup(client.close)
        greeting = capabilityNames(client.readResponse())
        self.assertNotIn(b"STARTTLS", greeting)
        self.assertEqual(greeting[b"SASL"], b"PLAIN LOGIN")
        reply = client.authenticatePlain("bob@example.org", PASSWORDS["bob@example.org"])
        self.assertEqual(reply, [b'OK "Logged in."'])
        self.assertTrue(client.command(b"LISTSCRIPTS")[-1].startswith(b'OK "Listscripts completed."'))

    def test_wrongPassword(self) -> None:
        """
        A wrong password gets the generic failure, and the client may try
        again on the same connection and get in.
        """
        client = self.connectSecure()
        self.assertEqual(
            client.authenticatePlain("alice@example.org", "wrong"), [b'NO "Authentication failed."']
        )
        self.assertEqual(
            client.authenticatePlain("alice@example.org", PASSWORDS["alice@example.org"]), [b'OK "Logged in."']
        )

    def test_unknownUser(self) -> None:
        """
        An account no route matches gets the same generic failure as a
        wrong password.
        """
        client = self.connectSecure()
        self.assertEqual(client.authenticatePlain("eve@example.net", "whatever"), [b'NO "Authentication failed."'])

    def test_deadBackend(self) -> None:
        """
        A login routed to a server that refuses connections gets a prompt
        C{NO (TRYLATER)}, and the connection stays usable.
        """
        client = self.connectSecure()
        started = time.monotonic()
        reply = client.authenticatePlain("zed@example.org", "whatever")
        self.assertLess(time.monotonic() - started, 10)
        self.assertEqual(reply, [b'NO (TRYLATER) "Service temporarily unavailable, try again later."'])
        self.assertEqual(client.command(b"NOOP"), [b'OK "NOOP completed."'])

    def test_masterUser(self) -> None:
        """
        For a route with C{master = true}, the proxy checks the client's
        password itself and logs in with the master user: the server logs
        dave's login by the master user.
        """
        user = "dave@example.org"
        mark = self.logMark(self.servers.new)
        client = self.connectSecure(source=CLIENT_ADDRESS)
        self.assertEqual(client.authenticatePlain(user, DAVE_ROUTE_PASSWORD), [b'OK "Logged in."'])
        self.assertTrue(client.command(b"LISTSCRIPTS")[-1].startswith(b"OK"))
        self.waitForLogLine(
            self.servers.new,
            mark,
            f"managesieve-login: Info: Login: user=<{user}>",
            f"rip={CLIENT_ADDRESS},",
            "auth=<proxy>",
        )


class StartTLSBackendTests(RoutingTestsMixin, SynchronousTestCase):
    """
    The proxy reaching the servers with STARTTLS, verifying their
    certificates against the test CA.
    """

    routes = {**ROUTES, "accounts": {**ROUTES["accounts"], "trent@example.org": "untrusted"}}

    def backendOptions(self, server: Dovecot) -> dict[str, object]:
        """
        STARTTLS on the ManageSieve port, verifying C{localhost} against
        the test CA.
        """
        return {
            "ports": {"sieve": server.sieve},
            "tls": "starttls",
            "ca_file": self.servers.ca.caPath,
            "server_name": "localhost",
            "forward": "auto",
        }

    def extraBackends(self) -> dict[str, dict[str, object]]:
        """
        The backend "untrusted": old, but verified against a CA that did not
        sign its certificate.
        """
        untrusted = TestCA(fixtureDirectory("untrusted-ca"))
        return {
            "untrusted": {
                "host": "127.0.0.1",
                "ports": {"sieve": self.servers.old.sieve},
                "tls": "starttls",
                "ca_file": untrusted.caPath,
                "server_name": "localhost",
                "connect_timeout": 5,
            }
        }

    def test_backendLoginOverTLS(self) -> None:
        """
        The server logs the proxy's login as made over TLS.
        """
        mark = self.logMark(self.servers.new)
        client = self.connectSecure()
        self.assertEqual(
            client.authenticatePlain("bob@example.org", PASSWORDS["bob@example.org"]), [b'OK "Logged in."']
        )
        self.waitForLogLine(self.servers.new, mark, "managesieve-login: Info: Login: user=<bob@example.org>", " TLS,")

    def test_backendCertificateVerified(self) -> None:
        """
        A server whose certificate the configured CA did not sign is not
        logged in to: the client gets C{NO (TRYLATER)}.
        """
        client = self.connectSecure()
        self.assertEqual(
            client.authenticatePlain("trent@example.org", "whatever"),
            [b'NO (TRYLATER) "Service temporarily unavailable, try again later."'],
        )


class ProxyProtocolBackendTests(RoutingTestsMixin, SynchronousTestCase):
    """
    The proxy reaching the servers' ManageSieve listener that requires a
    PROXY header, telling them the client's address in a PROXY v2 header
    (no XCLIENT: one forwarding mechanism per listener).
    """

    def backendOptions(self, server: Dovecot) -> dict[str, object]:
        """
        The listener that requires a PROXY header, in plaintext.
        """
        return {"ports": {"sieve": server.sieveProxy}, "tls": "none", "forward": "proxy-v2"}

