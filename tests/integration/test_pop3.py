"""
POP3 through the proxy, end to end: two real Dovecot servers ("old" and
"new"), the proxy as a subprocess, and real clients (C{poplib}, C{curl},
C{fetchmail}, and a bare socket where the exact reply matters).

The servers and their mail are the IMAP tests' scenario (L{MailServers}):
every account exists on both servers with the same password, and each
server's copy holds a different first message (Subject C{"<user> on
<server>"}), so the message a client retrieves shows which server it reached.
On top of the IMAP routes, carol's route holds her password, so that the
proxy can check APOP and CRAM-MD5 digests for her.
"""

from __future__ import annotations

import base64
import getpass
import hashlib
import hmac
import os
import poplib
import socket
import ssl
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

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
    connectFrom,
)
from .servers import Dovecot, fixtureDirectory, refusedPort, requireServer, sharedFixture
from .test_imap import LARGE_MESSAGE_ID, MailServers, firstMessage

#: The IMAP tests' routes, plus a password for carol: the proxy checks her
#: logins itself, which lets her use APOP and CRAM-MD5.
POP3_ROUTES: dict[str, Any] = {
    **ROUTES,
    "accounts": {
        **ROUTES["accounts"],
        "carol@example.org": {"backend": "old", "password": PASSWORDS["carol@example.org"]},
    },
}

AUTH_FAILED = b"-ERR [AUTH] Authentication failed.\r\n"


def startServers() -> MailServers:
    """
    The two Dovecot servers with their mail, also checking that the POP3
    clients the tests drive are installed.
    """
    requireServer("fetchmail", "curl")
    return MailServers.start()


class SourceBoundPOP3_SSL(poplib.POP3_SSL):
    """
    An implicit-TLS C{poplib} client that connects from a chosen local
    address, so the server's log can show whether that address was
    forwarded.
    """

    def __init__(self, host: str, port: int, *, source: str, context: ssl.SSLContext) -> None:
        """
        Connect to C{host}:C{port} from C{source} and read the greeting.
        """
        self._source = source
        super().__init__(host, port, context=context, timeout=TIMEOUT)

    def _create_socket(self, timeout: float | None) -> socket.socket:
        return connectFrom(self._source, self.host, self.port, timeout, self.context)


def authPlain(client: poplib.POP3, user: str, password: str) -> bytes:
    """
    Log C{client} in with C{AUTH PLAIN} and an initial response (C{poplib}
    has no AUTH of its own).
    """
    response = base64.b64encode(b"\0" + user.encode() + b"\0" + password.encode()).decode("ascii")
    return client._shortcmd("AUTH PLAIN " + response)  # type: ignore[attr-defined]


def userPass(client: poplib.POP3, user: str, password: str) -> bytes:
    """
    Log C{client} in with USER and PASS.
    """
    client.user(user)
    return client.pass_(password)


def retrieve(client: poplib.POP3, which: int = 1) -> bytes:
    """
    Message C{which} of the logged-in C{client}'s maildrop, with CRLF line
    ends as stored.
    """
    response, lines, _ = client.retr(which)
    if not response.startswith(b"+OK"):
        raise AssertionError(f"RETR {which}: {response!r}")
    return b"".join(line + b"\r\n" for line in lines)


def quitPOP3(client: poplib.POP3) -> None:
    """
    Say QUIT if the connection still works; close it in any case. Doing so
    twice is harmless.
    """
    if client.sock is None:
        return
    try:
        client.quit()
    except (poplib.error_proto, OSError):
        client.close()


class LineClient(common.LineClient):
    """
    A bare POP3 client that sends lines and returns reply lines as bytes,
    for tests that assert the exact reply.
    """

    def readLine(self) -> bytes:
        """
        The next reply line, CRLF included.

        @raise EOFError: the server closed the connection.
        """
        return self._nextLine() + b"\r\n"

    def command(self, line: bytes) -> bytes:
        """
        Send C{line}; return the one-line reply.
        """
        self.connection.sendall(line + b"\r\n")
        return self.readLine()

    def multiline(self, line: bytes) -> list[bytes]:
        """
        Send C{line}; return a multi-line reply's lines up to the C{.}, or
        the C{-ERR} line.
        """
        lines = [self.command(line)]
        if lines[0].startswith(b"+OK"):
            while lines[-1] != b".\r\n":
                lines.append(self.readLine())
        return lines

    def startTLS(self, context: ssl.SSLContext) -> None:
        """
        Start TLS on the connection (after C{+OK} to STLS).
        """
        self._wrapTLS(context)


class POP3FixtureMixin(ServerLogMixin):
    """
    Tests against the proxy and the two servers, both shared by a test
    class's tests (the servers by the whole module).

    A test class says how the proxy reaches the servers by overriding
    L{backendOptions}.
    """

    servers: MailServers
    running: RunningProxy

    # Provided by SynchronousTestCase.
    addCleanup: Callable[..., None]
    fail: Callable[..., Any]
    assertEqual: Callable[..., None]

    def backendOptions(self, server: Dovecot) -> dict[str, object]:
        """
        The settings of the C{[backend.NAME]} table for C{server}: by default
        plaintext, forwarding the client's address as the server advertises
        (XCLIENT for Dovecot).
        """
        return {"ports": {"pop3": server.pop3}, "tls": "none", "forward": "auto"}

    def setUp(self) -> None:
        """
        Get the running servers and this class's running proxy, starting
        them if this is the first test to need them.
        """
        self.servers = sharedFixture("mail servers", __name__, startServers)
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
                "master_separator": "*",
                "connect_timeout": 5,
            }
            for server in (self.servers.old, self.servers.new)
        }
        backends["dead"] = {"host": "127.0.0.1", "ports": {"pop3": refusedPort()}, "connect_timeout": 5}
        # APOP and CRAM-MD5 are offered where TLS is optional or implicit.
        digest = {"implicit": {"digest_auth": True}, "starttls": {"digest_auth": True}}
        running = RunningProxy(
            fixtureDirectory(type(self).__name__), "pop3", backends, POP3_ROUTES, self.servers.ca, digest
        )
        running.start()
        return running

    # Clients

    def connectImplicit(self, source: str | None = None) -> poplib.POP3_SSL:
        """
        A C{poplib} client on the proxy's implicit-TLS listener, closed after
        the test.
        """
        client: poplib.POP3_SSL
        if source is None:
            client = poplib.POP3_SSL("127.0.0.1", self.running.implicit, context=self.context, timeout=TIMEOUT)
        else:
            client = SourceBoundPOP3_SSL("127.0.0.1", self.running.implicit, source=source, context=self.context)
        self.addCleanup(quitPOP3, client)
        return client

    def connectStartTLS(self, port: int | None = None) -> poplib.POP3:
        """
        A C{poplib} client on the proxy's STARTTLS listener (or C{port})
        after a successful STLS, closed after the test.
        """
        client = poplib.POP3("127.0.0.1", port or self.running.startTLS, timeout=TIMEOUT)
        self.addCleanup(quitPOP3, client)
        client.stls(self.context)
        return client

    def connectDirect(self, server: Dovecot) -> poplib.POP3:
        """
        A C{poplib} client straight to C{server}'s POP3 port.
        """
        client = poplib.POP3("127.0.0.1", server.pop3, timeout=TIMEOUT)
        self.addCleanup(quitPOP3, client)
        return client

    def connectLines(self, port: int | None = None) -> LineClient:
        """
        A L{LineClient} on the proxy's implicit-TLS listener (or, in
        plaintext, on C{port}), its greeting read, closed after the test.
        """
        if port is None:
            client = LineClient.connect(self.running.implicit, self.context)
        else:
            client = LineClient.connect(port)
        self.addCleanup(client.close)
        greeting = client.readLine()
        if not greeting.startswith(b"+OK"):
            self.fail(f"greeting: {greeting!r}")
        return client

    def directMessage(self, user: str, which: int = 1) -> bytes:
        """
        Message C{which} of C{user}'s maildrop on the server L{HOMES} routes
        them to, retrieved straight from that server.
        """
        client = self.connectDirect(self.servers.byName(HOMES[user]))
        userPass(client, user, PASSWORDS[user])
        message = retrieve(client, which)
        quitPOP3(client)
        return message

    def assertRoutedLogins(self, connect: Callable[[], poplib.POP3], login: Callable[[poplib.POP3, str, str], Any]) -> None:
        """
        Log in as each routed account on a new connection from C{connect()}
        with C{login(client, user, password)}; each retrieves the first
        message of its routed server, the same octets a direct client gets.
        """
        for user, home in HOMES.items():
            client = connect()
            response = login(client, user, PASSWORDS[user])
            self.assertEqual(response[:3], b"+OK")
            message = retrieve(client)
            self.assertEqual(message, firstMessage(user, home))
            self.assertEqual(message, self.directMessage(user))
            quitPOP3(client)

    # Servers' logs

    def assertClientAddressForwarded(self, user: str = "alice@example.org") -> str:
        """
        A login from 127.0.0.2 through the proxy is logged by the routed
        server's pop3-login with C{rip=127.0.0.2}, not the proxy's address.

        @return: the server's log line.
        """
        server = self.servers.byName(HOMES[user])
        mark = self.logMark(server)
        client = self.connectImplicit(source=CLIENT_ADDRESS)
        userPass(client, user, PASSWORDS[user])
        self.assertEqual(retrieve(client), firstMessage(user, server.name))
        quitPOP3(client)
        return self.waitForLogLine(server, mark, "pop3-login:", f"Login: user=<{user}>,", f"rip={CLIENT_ADDRESS},")


class RoutingTestsMixin(POP3FixtureMixin):
    """
    Tests that hold for every way of reaching the servers.
    """

    def test_implicitTLSUserPass(self) -> None:
        """
        Over implicit TLS, USER/PASS logs alice and carol in on old and bob
        on new, and each retrieves the message a direct client gets there.
        """
        self.assertRoutedLogins(self.connectImplicit, userPass)

    def test_clientAddressForwarded(self) -> None:
        """
        The server logs the client's address (127.0.0.2), not the proxy's.
        """
        self.assertClientAddressForwarded()


class PlainBackendTests(RoutingTestsMixin, SynchronousTestCase):
    """
    The proxy in front of servers it reaches in plaintext, forwarding the
    client's address with XCLIENT (C{forward = "auto"}, offered by Dovecot's
    greeting to trusted peers): the whole client experience.
    """

    def test_xclientSession(self) -> None:
        """
        The address arrives by XCLIENT, which also hands over the proxy's
        session id: the server logs the proxy's id as its own.
        """
        line = self.assertClientAddressForwarded("bob@example.org")
        session = line.split("session=<", 1)[1].split(">", 1)[0]
        deadline = time.monotonic() + 10
        while f"session {session} end: pop3 from {CLIENT_ADDRESS}:" not in self.running.proxy.logText():
            if time.monotonic() > deadline:
                self.fail(f"the proxy did not log session {session}:\n{self.running.proxy.logText()[-3000:]}")
            time.sleep(0.05)

    def test_xclientAfterLoginRefused(self) -> None:
        """
        XCLIENT after login gets the proxy's C{-ERR}, in order among the
        server's replies; the server never sees it and keeps the client's
        address for the session.
        """
        mark = self.logMark(self.servers.old)
        client = LineClient.connect(self.running.implicit, self.context, source=CLIENT_ADDRESS)
        self.addCleanup(client.close)
        self.assertTrue(client.readLine().startswith(b"+OK"))
        self.assertTrue(client.command(b"USER alice@example.org").startswith(b"+OK"))
        self.assertTrue(client.command(b"PASS " + PASSWORDS["alice@example.org"].encode()).startswith(b"+OK"))
        client.connection.sendall(b"LIST\r\nXCLIENT ADDR=6.6.6.6 LOGIN=bob@example.org\r\nXOIP 6.6.6.6\r\nSTAT\r\n")
        listing = [client.readLine()]
        while listing[-1] != b".\r\n":
            listing.append(client.readLine())
        self.assertTrue(listing[0].startswith(b"+OK"))
        self.assertEqual(client.readLine(), b"-ERR Insufficient authorization.\r\n")
        self.assertEqual(client.readLine(), b"-ERR Insufficient authorization.\r\n")
        self.assertTrue(client.readLine().startswith(b"+OK "))
        self.assertTrue(client.command(b"QUIT").startswith(b"+OK"))
        end = self.waitForLogLine(self.servers.old, mark, "pop3(alice@example.org)", "Disconnected: Logged out")
        self.assertIn(f" rip={CLIENT_ADDRESS}: ", end)
        self.assertNotIn("6.6.6.6", self.servers.old.logText()[mark:])

    def test_startTLSUserPass(self) -> None:
        """
        After STLS, USER/PASS logs each account in on its routed server.
        """
        self.assertRoutedLogins(self.connectStartTLS, userPass)

    def test_startTLSAuthPlain(self) -> None:
        """
        After STLS, AUTH PLAIN logs each account in on its routed server.
        """
        self.assertRoutedLogins(self.connectStartTLS, authPlain)

    def test_implicitTLSAuthPlain(self) -> None:
        """
        Over implicit TLS, AUTH PLAIN logs each account in on its routed
        server.
        """
        self.assertRoutedLogins(self.connectImplicit, authPlain)

    def test_apop(self) -> None:
        """
        APOP works for accounts whose route holds the password: carol (the
        proxy logs in with her stored password) and dave (the proxy logs in
        with the master user); both see their routed server's mailbox.
        """
        client = self.connectImplicit()
        self.assertEqual(client.apop("carol@example.org", PASSWORDS["carol@example.org"])[:3], b"+OK")
        self.assertEqual(retrieve(client), firstMessage("carol@example.org", "old"))
        quitPOP3(client)
        mark = self.logMark(self.servers.new)
        client = self.connectStartTLS()
        self.assertEqual(client.apop("dave@example.org", DAVE_ROUTE_PASSWORD)[:3], b"+OK")
        self.assertEqual(retrieve(client), firstMessage("dave@example.org", "new"))
        self.waitForLogLine(self.servers.new, mark, "pop3-login:", "Login: user=<dave@example.org>,", "auth=<proxy>")

    def test_apopRefused(self) -> None:
        """
        APOP with a wrong password, or for an account whose route cannot
        check a digest (alice: located only), gets the generic failure.
        """
        client = self.connectImplicit()
        self.assertRaises(poplib.error_proto, client.apop, "carol@example.org", "wrong")
        self.assertRaises(poplib.error_proto, client.apop, "alice@example.org", PASSWORDS["alice@example.org"])
        self.assertEqual(client.user("alice@example.org")[:3], b"+OK")

    def test_cramMD5(self) -> None:
        """
        AUTH CRAM-MD5 logs carol in: the proxy checks her digest and logs in
        to old with her stored password.
        """
        client = self.connectLines()
        reply = client.command(b"AUTH CRAM-MD5")
        self.assertTrue(reply.startswith(b"+ "), reply)
        challenge = base64.b64decode(reply[2:])
        digest = hmac.new(PASSWORDS["carol@example.org"].encode(), challenge, hashlib.md5).hexdigest()
        self.assertTrue(client.command(base64.b64encode(f"carol@example.org {digest}".encode())).startswith(b"+OK"))
        lines = client.multiline(b"RETR 1")
        self.assertIn(b"Subject: carol@example.org on old\r\n", lines)

    def test_authLogin(self) -> None:
        """
        AUTH LOGIN (with continuation lines for both the user and the
        password) logs bob in on new.
        """
        client = self.connectLines()
        self.assertEqual(client.command(b"AUTH LOGIN"), b"+ " + base64.b64encode(b"Username:") + b"\r\n")
        self.assertEqual(
            client.command(base64.b64encode(b"bob@example.org")), b"+ " + base64.b64encode(b"Password:") + b"\r\n"
        )
        self.assertTrue(client.command(base64.b64encode(PASSWORDS["bob@example.org"].encode())).startswith(b"+OK"))
        self.assertIn(b"Subject: bob@example.org on new\r\n", client.multiline(b"RETR 1"))

    def test_pipelinedLogin(self) -> None:
        """
        USER, PASS and STAT sent in one write are answered in order, the
        STAT by the routed server.
        """
        client = self.connectLines()
        password = PASSWORDS["alice@example.org"].encode()
        client.connection.sendall(b"USER alice@example.org\r\nPASS " + password + b"\r\nSTAT\r\n")
        self.assertEqual(client.readLine(), b"+OK\r\n")
        self.assertTrue(client.readLine().startswith(b"+OK"))
        self.assertTrue(client.readLine().startswith(b"+OK 1 "))

    def test_largeMessage(self) -> None:
        """
        A message of over 10 MB retrieved through the proxy is byte for byte
        what a direct client gets.
        """
        user = "carol@example.org"
        direct = self.directMessage(user, 2)
        self.assertIn(f"Message-ID: {LARGE_MESSAGE_ID}".encode(), direct)
        self.assertGreater(len(direct), 10 * 1024 * 1024)
        client = self.connectImplicit()
        userPass(client, user, PASSWORDS[user])
        proxied = retrieve(client, 2)
        self.assertEqual(len(proxied), len(direct))
        self.assertTrue(proxied == direct, "the message retrieved through the proxy differs")

    def test_curlImplicitTLS(self) -> None:
        """
        C{curl pop3s://} retrieves alice's first message from old through
        the proxy, the same octets as straight from old.
        """
        user = "alice@example.org"
        proxied = self.curl(f"pop3s://127.0.0.1:{self.running.implicit}/1", user, "--login-options", "AUTH=PLAIN")
        direct = self.curl(f"pop3s://127.0.0.1:{self.servers.old.pop3s}/1", user)
        self.assertEqual(proxied, direct)
        self.assertIn(b"Subject: alice@example.org on old\r\n", proxied)

    def test_curlStartTLS(self) -> None:
        """
        C{curl pop3://} requiring STLS retrieves bob's first message from
        new through both STARTTLS listeners.
        """
        user = "bob@example.org"
        direct = self.curl(f"pop3://127.0.0.1:{self.servers.new.pop3}/1", user, "--ssl-reqd")
        self.assertIn(b"Subject: bob@example.org on new\r\n", direct)
        for port in (self.running.startTLS, self.running.startTLSRequired):
            proxied = self.curl(f"pop3://127.0.0.1:{port}/1", user, "--ssl-reqd", "--login-options", "AUTH=PLAIN")
            self.assertEqual(proxied, direct)

    def test_curlChoosesCramMD5(self) -> None:
        """
        Left to choose, curl takes CRAM-MD5 (the strongest mechanism the
        proxy offers) and gets in for carol, whose route holds her password.
        """
        proxied = self.curl(f"pop3s://127.0.0.1:{self.running.implicit}/1", "carol@example.org", "--verbose")
        self.assertIn(b"Subject: carol@example.org on old\r\n", proxied)
        self.assertIn(b"AUTH CRAM-MD5", self.lastCurlStderr)

    def test_fetchmail(self) -> None:
        """
        fetchmail (over implicit TLS, and with STLS) retrieves the same
        messages through the proxy as straight from the routed server.
        """
        for user, home in (("alice@example.org", "old"), ("bob@example.org", "new")):
            server = self.servers.byName(home)
            direct = self.fetchmail(server.pop3s, user, implicit=True)
            self.assertIn(f"Subject: {user} on {home}".encode(), direct)
            self.assertEqual(self.fetchmail(self.running.implicit, user, implicit=True), direct)
            self.assertEqual(self.fetchmail(self.running.startTLS, user, implicit=False), direct)
            self.assertIn(b"POP3> STLS", self.lastFetchmailOutput)

    def test_wrongPassword(self) -> None:
        """
        A wrong password gets the generic C{[AUTH]} failure; the client may
        try again on the same connection and get in.
        """
        client = self.connectLines()
        self.assertEqual(client.command(b"USER alice@example.org"), b"+OK\r\n")
        self.assertEqual(client.command(b"PASS wrong"), AUTH_FAILED)
        client.command(b"USER alice@example.org")
        self.assertTrue(client.command(b"PASS " + PASSWORDS["alice@example.org"].encode()).startswith(b"+OK"))
        self.assertTrue(client.command(b"STAT").startswith(b"+OK"))

    def test_unknownUser(self) -> None:
        """
        An account no route matches gets the same reply as a wrong password.
        """
        client = self.connectLines()
        client.command(b"USER eve@example.net")
        self.assertEqual(client.command(b"PASS whatever"), AUTH_FAILED)

    def test_deadBackend(self) -> None:
        """
        A login routed to a server that refuses connections gets a prompt
        C{[SYS/TEMP]} failure, and the connection stays usable.
        """
        client = self.connectLines()
        client.command(b"USER zed@example.org")
        started = time.monotonic()
        reply = client.command(b"PASS whatever")
        self.assertLess(time.monotonic() - started, 10)
        self.assertTrue(reply.startswith(b"-ERR [SYS/TEMP] "), reply)
        self.assertEqual(client.command(b"NOOP"), b"+OK\r\n")

    def test_startTLSRequired(self) -> None:
        """
        Before TLS, the STARTTLS-required listener advertises STLS but no
        USER or SASL, and refuses USER with C{[AUTH]}; after STLS the same
        client logs in.
        """
        client = self.connectLines(port=self.running.startTLSRequired)
        capabilities = client.multiline(b"CAPA")
        self.assertIn(b"STLS\r\n", capabilities)
        self.assertNotIn(b"USER\r\n", capabilities)
        self.assertFalse([line for line in capabilities if line.startswith(b"SASL")], capabilities)
        self.assertTrue(client.command(b"USER alice@example.org").startswith(b"-ERR [AUTH] "))
        self.assertTrue(client.command(b"STLS").startswith(b"+OK"))
        client.startTLS(self.context)
        capabilities = client.multiline(b"CAPA")
        self.assertIn(b"USER\r\n", capabilities)
        self.assertNotIn(b"STLS\r\n", capabilities)
        client.command(b"USER alice@example.org")
        self.assertTrue(client.command(b"PASS " + PASSWORDS["alice@example.org"].encode()).startswith(b"+OK"))

    # Helpers

    def curl(self, url: str, user: str, *options: str) -> bytes:
        """
        Retrieve C{url} with C{curl}, trusting the test CA, logging in as
        C{user}.

        @return: what curl wrote to standard output.
        """
        result = subprocess.run(
            [
                "curl", "--silent", "--show-error", "--max-time", str(int(TIMEOUT)),
                "--cacert", self.servers.ca.caPath, "--user", f"{user}:{PASSWORDS[user]}",
                *options, url,
            ],
            stdin=subprocess.DEVNULL,
            capture_output=True,
        )
        self.lastCurlStderr = result.stderr
        if result.returncode != 0:
            self.fail(
                f"curl {url} failed ({result.returncode}): {result.stderr.decode(errors='replace')}"
                f"\nproxy log:\n{self.running.proxy.logText()[-3000:]}"
            )
        return result.stdout

    def fetchmail(self, port: int, user: str, implicit: bool) -> bytes:
        """
        Run fetchmail once (no daemon) against 127.0.0.1:C{port} for C{user}
        with USER/PASS, verifying the server's certificate against the test
        CA; it keeps the messages on the server and delivers them with
        C{cat}.

        @param implicit: TLS from the first byte, or else STLS (required).
        @return: every message delivered, concatenated.
        """
        home = Path(self.mktemp()).resolve()  # type: ignore[attr-defined]
        home.mkdir(parents=True)
        delivered = home / "delivered"
        tls = "ssl" if implicit else 'sslproto "tls1.2+"'
        rc = home / "fetchmailrc"
        rc.write_text(
            "set invisible\n"
            f"poll localhost protocol pop3 port {port} auth password timeout {int(TIMEOUT)}\n"
            f'  user "{user}" there with password "{PASSWORDS[user]}" is "{getpass.getuser()}" here\n'
            f'  {tls} sslcertck sslcertfile "{self.servers.ca.caPath}"\n'
            f'  keep fetchall mda "cat >> {delivered}"\n'
        )
        rc.chmod(0o600)
        result = subprocess.run(
            ["fetchmail", "--nosyslog", "--fetchmailrc", str(rc), "--idfile", str(home / "ids"),
             "--pidfile", str(home / "pid"), "--verbose"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            env={**os.environ, "FETCHMAILHOME": str(home)},
            timeout=TIMEOUT * 2,
        )
        self.lastFetchmailOutput = result.stdout + result.stderr
        if result.returncode != 0 or not delivered.exists():
            self.fail(
                f"fetchmail on port {port} failed ({result.returncode}):\n"
                f"{(result.stdout + result.stderr).decode(errors='replace')[-4000:]}"
                f"\nproxy log:\n{self.running.proxy.logText()[-2000:]}"
            )
        return delivered.read_bytes()


class STLSBackendTests(RoutingTestsMixin, SynchronousTestCase):
    """
    The proxy reaching the servers with STLS, verifying their certificates
    against the test CA; XCLIENT follows the handshake.
    """

    def backendOptions(self, server: Dovecot) -> dict[str, object]:
        """
        STLS on the plain POP3 port, verifying C{localhost}.
        """
        return {
            "ports": {"pop3": server.pop3},
            "tls": "starttls",
            "ca_file": self.servers.ca.caPath,
            "server_name": "localhost",
            "forward": "auto",
        }

    def test_backendLoginOverTLS(self) -> None:
        """
        The server logs the proxy's login as made over TLS.
        """
        mark = self.logMark(self.servers.new)
        client = self.connectImplicit()
        userPass(client, "bob@example.org", PASSWORDS["bob@example.org"])
        self.assertEqual(retrieve(client), firstMessage("bob@example.org", "new"))
        self.waitForLogLine(self.servers.new, mark, "pop3-login:", "Login: user=<bob@example.org>,", " TLS,")


class ImplicitTLSBackendTests(RoutingTestsMixin, SynchronousTestCase):
    """
    The proxy reaching the servers' POP3S port, verifying their certificates,
    and forwarding by XCLIENT (C{forward = "xclient"}, not left to the
    greeting).
    """

    def backendOptions(self, server: Dovecot) -> dict[str, object]:
        """
        Implicit TLS on the POP3S port, verifying C{localhost}.
        """
        return {
            "ports": {"pop3": server.pop3s},
            "tls": "implicit",
            "ca_file": self.servers.ca.caPath,
            "server_name": "localhost",
            "forward": "xclient",
        }


class ProxyProtocolBackendTests(RoutingTestsMixin, SynchronousTestCase):
    """
    The proxy reaching the servers' PROXY-protocol POP3 listener, telling
    them the client's address in a PROXY v2 header (whose ALPN, C{pop3},
    Dovecot checks against its service).
    """

    def backendOptions(self, server: Dovecot) -> dict[str, object]:
        """
        The listener that requires a PROXY header, in plaintext.
        """
        return {"ports": {"pop3": server.pop3Proxy}, "tls": "none", "forward": "proxy-v2"}
