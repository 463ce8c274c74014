"""
IMAP through the proxy, end to end: two real Dovecot servers ("old" and
"new"), the proxy as a subprocess, and real clients (C{imaplib}, C{curl}, and
a bare socket where the exact reply matters).

Every account exists on both servers with the same password, and each
server's copy of an account holds a different first message (Subject
C{"<user> on <server>"}), so which server a login reached is visible in the
mailbox the client sees.
"""

from __future__ import annotations

import base64
import imaplib
import os
import random
import re
import socket
import ssl
import subprocess
import time
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
    connectFrom,
    routesText,
)
from .servers import (
    Dovecot,
    TestCA,
    fixtureDirectory,
    freePort,
    refusedPort,
    requireServer,
    sharedFixture,
)
from ..unit.test_relay_sockets import BlockingTLS

LARGE_MESSAGE_ID = "<large@example.org>"


def firstMessage(user: str, server: str) -> bytes:
    """
    The message that is UID 1 in C{user}'s INBOX on C{server}.
    """
    return (
        f"From: postmaster@example.org\r\n"
        f"To: {user}\r\n"
        f"Subject: {user} on {server}\r\n"
        f"Message-ID: <{user.replace('@', '.')}.{server}@example.org>\r\n"
        f"\r\n"
        f"This copy of {user}'s mailbox lives on {server}.\r\n"
    ).encode("ascii")


def largeMessage(size: int = 10 * 1024 * 1024) -> bytes:
    """
    A message of more than C{size} octets: random bytes in base64 lines.
    """
    header = (
        "From: postmaster@example.org\r\n"
        "To: carol@example.org\r\n"
        "Subject: large message\r\n"
        f"Message-ID: {LARGE_MESSAGE_ID}\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: application/octet-stream\r\n"
        "Content-Transfer-Encoding: base64\r\n"
        "\r\n"
    ).encode("ascii")
    content = random.Random(2026).randbytes(size * 3 // 4 + 1)
    return header + base64.encodebytes(content).replace(b"\n", b"\r\n")


def writeAtomically(path: Path, text: str) -> None:
    """
    Replace the file at C{path} the way operators' tools do: write a new
    file beside it, then rename it over the old one.
    """
    temporary = path.with_name(path.name + ".new")
    temporary.write_text(text)
    os.replace(temporary, path)


class MailServers:
    """
    The scenario's two Dovecot servers, their certificate authority and
    their mail.

    @ivar largeMessage: a message of over 10 MB in carol's INBOX on old.
    """

    def __init__(self, directory: str) -> None:
        """
        Make the CA and configure (not start) the servers in C{directory}.
        """
        self.ca = TestCA(os.path.join(directory, "ca"))
        self.old = Dovecot(
            os.path.join(directory, "old"), "old", PASSWORDS, ca=self.ca, masterUser=MASTER_USER
        )
        self.new = Dovecot(
            os.path.join(directory, "new"), "new", PASSWORDS, ca=self.ca, masterUser=MASTER_USER
        )
        self.largeMessage = largeMessage()

    @classmethod
    def start(cls) -> MailServers:
        """
        Start both servers and fill the mailboxes.
        """
        requireServer("dovecot", "doveadm", "openssl", "curl")
        servers = cls(fixtureDirectory("dovecot"))
        try:
            for dovecot in (servers.old, servers.new):
                dovecot.start()
                for user in PASSWORDS:
                    dovecot.deliver(user, firstMessage(user, dovecot.name))
            servers.old.deliver("carol@example.org", servers.largeMessage)
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


class SourceBoundIMAP4_SSL(imaplib.IMAP4_SSL):
    """
    An implicit-TLS C{imaplib} client that connects from a chosen local
    address, so the server's log can show whether that address was
    forwarded.
    """

    def __init__(self, host: str, port: int, *, source: str, ssl_context: ssl.SSLContext) -> None:
        """
        Connect to C{host}:C{port} from C{source} and read the greeting.
        """
        self._source = source
        super().__init__(host, port, ssl_context=ssl_context, timeout=TIMEOUT)

    def _create_socket(self, timeout: float | None) -> socket.socket:
        return connectFrom(self._source, self.host, self.port, timeout, self.ssl_context)


class LineClient(common.LineClient):
    """
    A bare IMAP client that sends command lines and returns reply lines as
    bytes, for tests that assert the exact reply (it does not read literals).
    """

    def readLine(self) -> bytes:
        """
        The next reply line, CRLF included.

        @raise socket.timeout: nothing complete arrived in time.
        @raise EOFError: the server closed the connection.
        """
        return self._nextLine() + b"\r\n"

    def send(self, line: bytes) -> None:
        """
        Send C{line} and CRLF.
        """
        self.connection.sendall(line + b"\r\n")

    def command(self, tag: bytes, command: bytes) -> list[bytes]:
        """
        Send a tagged command; return the reply lines up to and including
        the tagged one.
        """
        self.send(tag + b" " + command)
        lines = [self.readLine()]
        while not lines[-1].startswith(tag + b" "):
            lines.append(self.readLine())
        return lines

    def startTLS(self, context: ssl.SSLContext) -> None:
        """
        Start TLS on the connection (after a tagged OK to STARTTLS).
        """
        self._wrapTLS(context)


def closeIMAP(client: imaplib.IMAP4) -> None:
    """
    Log out if the connection still works; close it in any case. Doing so
    twice is harmless.
    """
    if client.state == "LOGOUT":
        return
    try:
        client.logout()
    except (imaplib.IMAP4.error, OSError):
        try:
            client.shutdown()
        except OSError:
            pass


class ProxyFixtureMixin(ServerLogMixin):
    """
    Tests against the proxy and the two servers, both shared by a test
    class's tests (the servers by the whole module).

    A test class says how the proxy reaches the servers by overriding
    L{backendOptions}, and may change the route table in L{routes}.

    @cvar routes: the route table, as TOML data.
    """

    servers: MailServers
    running: RunningProxy
    routes: Mapping[str, Any] = ROUTES

    def backendOptions(self, server: Dovecot) -> dict[str, object]:
        """
        The settings of the C{[backend.NAME]} table for C{server}: by
        default plaintext, forwarding the client's address as the server
        advertises (IMAP ID for Dovecot).
        """
        return {"ports": {"imap": server.imap}, "tls": "none", "forward": "auto"}

    def implicitListenerOptions(self) -> dict[str, object]:
        """
        More keys for the implicit-TLS listener's table.
        """
        return {}

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
        self.servers = sharedFixture("mail servers", __name__, MailServers.start)
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
        # A backend nobody serves: connections to it are refused.
        backends["dead"] = {
            "host": "127.0.0.1",
            "ports": {"imap": refusedPort()},
            "tls": "none",
            "connect_timeout": 5,
        }
        backends.update(self.extraBackends())
        running = RunningProxy(
            fixtureDirectory(type(self).__name__),
            "imap",
            backends,
            self.routes,
            self.servers.ca,
            {"implicit": self.implicitListenerOptions()},
        )
        running.start()
        return running

    def connectImplicit(self, source: str | None = None) -> imaplib.IMAP4_SSL:
        """
        An C{imaplib} client on the proxy's implicit-TLS listener, closed
        after the test.
        """
        client: imaplib.IMAP4_SSL
        if source is None:
            client = imaplib.IMAP4_SSL(
                "127.0.0.1", self.running.implicit, ssl_context=self.context, timeout=TIMEOUT
            )
        else:
            client = SourceBoundIMAP4_SSL(
                "127.0.0.1", self.running.implicit, source=source, ssl_context=self.context
            )
        self.addCleanup(closeIMAP, client)
        return client

    def connectStartTLS(self) -> imaplib.IMAP4:
        """
        An C{imaplib} client on the proxy's STARTTLS listener after a
        successful STARTTLS, closed after the test.
        """
        client = imaplib.IMAP4("127.0.0.1", self.running.startTLS, timeout=TIMEOUT)
        self.addCleanup(closeIMAP, client)
        client.starttls(ssl_context=self.context)
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
        self.assertTrue(client.readLine().startswith(b"* OK"))
        return client

    def firstSubject(self, client: imaplib.IMAP4) -> str:
        """
        The Subject of UID 1 in the logged-in C{client}'s INBOX.
        """
        status, _ = client.select("INBOX", readonly=True)
        self.assertEqual(status, "OK")
        status, data = client.uid("FETCH", "1", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        self.assertEqual(status, "OK")
        header = next(item[1] for item in data if isinstance(item, tuple))
        return header.decode("ascii").strip().removeprefix("Subject: ")

    def curl(self, url: str, user: str, *options: str) -> bytes:
        """
        Fetch C{url} with C{curl}, trusting the test CA and logging in as
        C{user} with SASL PLAIN.

        @return: what curl wrote to standard output.
        """
        result = subprocess.run(
            [
                "curl", "--silent", "--show-error", "--max-time", str(int(TIMEOUT)),
                "--cacert", self.servers.ca.caPath,
                "--user", f"{user}:{PASSWORDS[user]}", "--login-options", "AUTH=PLAIN",
                *options, url,
            ],
            stdin=subprocess.DEVNULL,
            capture_output=True,
        )
        if result.returncode != 0:
            self.fail(
                f"curl {url} failed ({result.returncode}): {result.stderr.decode(errors='replace')}"
                f"\nproxy log:\n{self.running.proxy.logText()[-3000:]}"
            )
        return result.stdout



class RoutingTestsMixin(ProxyFixtureMixin):
    """
    Tests that hold for every way of reaching the servers: logins land on
    the routed server, large messages and IDLE pass through, and the
    client's address reaches the server.
    """

    def assertRoutedLogins(self, connect: Any, login: Any) -> None:
        """
        Log in as each routed account on a new connection from C{connect()}
        with C{login(client, user, password)}; each sees its routed
        server's mailbox.
        """
        for user, home in HOMES.items():
            client = connect()
            status, _ = login(client, user, PASSWORDS[user])
            self.assertEqual(status, "OK")
            self.assertEqual(self.firstSubject(client), f"{user} on {home}")
            closeIMAP(client)

    def test_implicitTLSLogin(self) -> None:
        """
        Over implicit TLS, LOGIN succeeds for accounts routed by account
        (alice to old, bob to new) and by domain (carol to old), and each
        sees the mailbox on the server the route names.
        """
        self.assertRoutedLogins(
            self.connectImplicit, lambda client, user, password: client.login(user, password)
        )

    def test_implicitTLSAuthenticatePlain(self) -> None:
        """
        Over implicit TLS, AUTHENTICATE PLAIN (without an initial response)
        logs each account in on its routed server.
        """
        self.assertRoutedLogins(self.connectImplicit, authenticatePlain)

    def test_largeMessage(self) -> None:
        """
        A message of over 10 MB fetched through the proxy is byte for byte
        what the server gives a direct client.
        """
        user = "carol@example.org"

        def fetchLarge(client: imaplib.IMAP4) -> bytes:
            client.login(user, PASSWORDS[user])
            client.select("INBOX", readonly=True)
            status, found = client.uid("SEARCH", "HEADER", "Message-ID", LARGE_MESSAGE_ID)
            self.assertEqual(status, "OK")
            [uid] = found[0].split()
            status, data = client.uid("FETCH", uid.decode("ascii"), "(BODY.PEEK[])")
            self.assertEqual(status, "OK")
            return next(item[1] for item in data if isinstance(item, tuple))

        direct = imaplib.IMAP4("127.0.0.1", self.servers.old.imap, timeout=TIMEOUT)
        self.addCleanup(closeIMAP, direct)
        expected = fetchLarge(direct)
        self.assertGreater(len(expected), 10 * 1024 * 1024)
        self.assertEqual(len(expected), len(self.servers.largeMessage))
        proxied = fetchLarge(self.connectImplicit())
        self.assertEqual(len(proxied), len(expected))
        self.assertTrue(proxied == expected, "the message fetched through the proxy differs")

    def test_idle(self) -> None:
        """
        A client IDLE through the proxy hears C{* n EXISTS} when a message
        is delivered to its mailbox on the server.
        """
        user = "bob@example.org"
        client = self.connectLines()
        login = f'LOGIN {user} "{PASSWORDS[user]}"'.encode()
        self.assertTrue(client.command(b"a", login)[-1].startswith(b"a OK"))
        selected = client.command(b"b", b"SELECT INBOX")
        self.assertTrue(selected[-1].startswith(b"b OK"), selected)
        [exists] = [
            int(match.group(1))
            for line in selected
            if (match := re.match(rb"\* (\d+) EXISTS", line))
        ]
        client.send(b"c IDLE")
        self.assertTrue(client.readLine().startswith(b"+ "))
        self.servers.byName(HOMES[user]).deliver(user, firstMessage(user, "idle"))
        expected = f"* {exists + 1} EXISTS\r\n".encode()
        seen = []
        while expected not in seen:
            seen.append(client.readLine())
        client.send(b"DONE")
        line = client.readLine()
        while not line.startswith(b"c "):
            line = client.readLine()
        self.assertTrue(line.startswith(b"c OK"), line)

    def test_halfCloseAfterLogout(self) -> None:
        """
        A client that sends LOGOUT and at once half-closes its connection
        (C{shutdown(SHUT_WR)}) still reads the server's C{* BYE} and tagged
        C{OK}, then the end of the connection; three times.
        """
        user = "alice@example.org"
        for _ in range(3):
            client = self.connectLines(self.running.startTLS)
            login = client.command(b"a", f'LOGIN {user} "{PASSWORDS[user]}"'.encode())
            self.assertTrue(login[-1].startswith(b"a OK"), login)
            client.send(b"b LOGOUT")
            client.connection.shutdown(socket.SHUT_WR)
            reply = [client.readLine(), client.readLine()]
            self.assertTrue(reply[0].startswith(b"* BYE "), reply)
            self.assertTrue(reply[1].startswith(b"b OK "), reply)
            self.assertRaises(EOFError, client.readLine)

    def test_closeNotifyAfterLogout(self) -> None:
        """
        A TLS client that sends LOGOUT and at once its close_notify and a
        FIN (it sends nothing more, but reads on) gets the server's C{* BYE}
        and tagged C{OK}, then the proxy's close_notify; three times.
        """
        user = "alice@example.org"
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", self.running.implicit), TIMEOUT) as sock:
                tls = BlockingTLS(sock, self.context, serverSide=False, serverName=LineClient.serverName)
                tls.handshake()
                received = b""
                while not received.endswith(b"\r\n"):
                    received += tls.read()
                self.assertTrue(received.startswith(b"* OK"), received)
                tls.write(f'a LOGIN {user} "{PASSWORDS[user]}"\r\n'.encode())
                received = b""
                while b"a OK" not in received:
                    chunk = tls.read()
                    self.assertTrue(chunk, received)
                    received += chunk
                tls.write(b"b LOGOUT\r\n")
                tls.closeNotify()
                sock.shutdown(socket.SHUT_WR)
                lines = tls.readAll().split(b"\r\n")
                self.assertEqual(len(lines), 3, lines)
                self.assertTrue(lines[0].startswith(b"* BYE "), lines)
                self.assertTrue(lines[1].startswith(b"b OK "), lines)
                self.assertEqual(lines[2], b"")

    def test_clientAddressForwarded(self) -> None:
        """
        The server logs the client's address (127.0.0.2), not the proxy's,
        for a login through the proxy.
        """
        mark = self.logMark(self.servers.old)
        client = self.connectImplicit(source=CLIENT_ADDRESS)
        client.login("alice@example.org", PASSWORDS["alice@example.org"])
        self.assertEqual(self.firstSubject(client), "alice@example.org on old")
        self.waitForLogLine(
            self.servers.old, mark, "Login: user=<alice@example.org>", f"rip={CLIENT_ADDRESS},"
        )


    def test_idAfterLoginIgnored(self) -> None:
        """
        An ID with C{x-originating-ip} sent after login reaches Dovecot's
        imap process (the proxy relays it: only imap-login honours these
        fields, and only from trusted peers), which logs it and keeps the
        client's real address for the session.
        """
        mark = self.logMark(self.servers.old)
        client = LineClient.connect(self.running.implicit, self.context, source=CLIENT_ADDRESS)
        self.addCleanup(client.close)
        self.assertTrue(client.readLine().startswith(b"* OK"))
        login = f'LOGIN alice@example.org "{PASSWORDS["alice@example.org"]}"'.encode()
        self.assertTrue(client.command(b"a", login)[-1].startswith(b"a OK"))
        spoof = b'ID ("x-originating-ip" "6.6.6.6" "x-originating-port" "666")'
        self.assertTrue(client.command(b"b", spoof)[-1].startswith(b"b OK"))
        self.assertTrue(client.command(b"c", b"LOGOUT")[-1].startswith(b"c OK"))
        sent = self.waitForLogLine(self.servers.old, mark, "imap(alice@example.org)", "ID sent: x-originating-ip=6.6.6.6")
        self.assertIn(f" rip={CLIENT_ADDRESS}: ", sent)
        # The same session's end (others of alice's may end meanwhile): its
        # prefix names the process and the session, e.g. <3833><os3zrh...>.
        session = sent[sent.index("imap(alice@example.org)") :].split(" ", 1)[0]
        end = self.waitForLogLine(self.servers.old, mark, session, "Disconnected: Logged out")
        self.assertIn(f" rip={CLIENT_ADDRESS}: ", end)


def capabilities(reply: list[bytes]) -> list[bytes]:
    """
    The capability names in the C{* CAPABILITY} line of a CAPABILITY reply.
    """
    [names] = [line.split()[2:] for line in reply if line.startswith(b"* CAPABILITY ")]
    return names


def authenticatePlain(client: imaplib.IMAP4, user: str, password: str) -> tuple[str, Any]:
    """
    Log C{client} in with AUTHENTICATE PLAIN.
    """
    response = b"\0" + user.encode() + b"\0" + password.encode()
    return client.authenticate("PLAIN", lambda challenge: response)


class PlainBackendTests(RoutingTestsMixin, SynchronousTestCase):
    """
    The proxy in front of servers it reaches in plaintext, forwarding the
    client's address with IMAP ID (C{forward = "auto"}): the whole client
    experience.
    """

    def test_startTLSLogin(self) -> None:
        """
        After STARTTLS, LOGIN logs each account in on its routed server.
        """
        self.assertRoutedLogins(
            self.connectStartTLS, lambda client, user, password: client.login(user, password)
        )

    def test_startTLSAuthenticatePlain(self) -> None:
        """
        After STARTTLS, AUTHENTICATE PLAIN logs each account in on its
        routed server.
        """
        self.assertRoutedLogins(self.connectStartTLS, authenticatePlain)

    def test_longPreauthID(self) -> None:
        """
        A 30 KB ID before login (as imaptest's C{id} test sends) is answered
        by Dovecot directly and, with the default limits, by the proxy too;
        the client then logs in.
        """
        value = b"v" * 1000
        command = b"ID (" + b" ".join(b'"k%d" "%s"' % (i, value) for i in range(30)) + b")"
        self.assertGreater(len(command), 30000)
        direct = self.connectLines(self.servers.old.imap)
        self.assertEqual(direct.command(b"a", command)[-1], b"a OK ID completed.\r\n")
        client = self.connectLines()
        reply = client.command(b"a", command)
        self.assertEqual(reply, [b'* ID ("name" "mailproxy")\r\n', b"a OK ID completed.\r\n"])
        user = "alice@example.org"
        login = client.command(b"b", b'LOGIN "%s" "%s"' % (user.encode(), PASSWORDS[user].encode()))
        self.assertTrue(login[-1].startswith(b"b OK "), login)

    def test_curlImplicitTLS(self) -> None:
        """
        curl fetches alice's first message over implicit TLS from old, where
        she is routed.
        """
        message = self.curl(
            f"imaps://127.0.0.1:{self.running.implicit}/INBOX;UID=1", "alice@example.org"
        )
        self.assertEqual(message, firstMessage("alice@example.org", "old"))

    def test_curlStartTLS(self) -> None:
        """
        curl, requiring STARTTLS, fetches bob's first message from new.
        """
        message = self.curl(
            f"imap://127.0.0.1:{self.running.startTLS}/INBOX;UID=1", "bob@example.org", "--ssl-reqd"
        )
        self.assertEqual(message, firstMessage("bob@example.org", "new"))

    def test_curlStartTLSRequired(self) -> None:
        """
        curl, requiring STARTTLS, fetches carol's first message from old
        through the listener that refuses logins before TLS.
        """
        message = self.curl(
            f"imap://127.0.0.1:{self.running.startTLSRequired}/INBOX;UID=1",
            "carol@example.org",
            "--ssl-reqd",
        )
        self.assertEqual(message, firstMessage("carol@example.org", "old"))

    def test_wrongPassword(self) -> None:
        """
        A wrong password gets the generic failure, and the client may try
        again on the same connection and get in.
        """
        client = self.connectLines()
        self.assertEqual(
            client.command(b"a", b"LOGIN alice@example.org wrong"),
            [b"a NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"],
        )
        self.assertTrue(
            client.command(b"b", b'LOGIN alice@example.org "alice secret"')[-1].startswith(b"b OK")
        )
        self.assertTrue(client.command(b"c", b"SELECT INBOX")[-1].startswith(b"c OK"))
        self.assertIn(
            b"* SEARCH 1\r\n",
            client.command(b"d", b'UID SEARCH SUBJECT "alice@example.org on old"'),
        )

    def test_unknownUser(self) -> None:
        """
        An account no route matches (a domain not in the table, and no
        default) gets the same generic failure as a wrong password.
        """
        client = self.connectLines()
        self.assertEqual(
            client.command(b"a", b"LOGIN eve@example.net whatever"),
            [b"a NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"],
        )

    def test_deadBackend(self) -> None:
        """
        A login routed to a server that refuses connections gets a prompt
        C{NO [UNAVAILABLE]}, and the connection stays usable.
        """
        client = self.connectLines()
        started = time.monotonic()
        reply = client.command(b"a", b"LOGIN zed@example.org whatever")
        self.assertLess(time.monotonic() - started, 10)
        self.assertEqual(len(reply), 1, reply)
        self.assertTrue(reply[0].startswith(b"a NO [UNAVAILABLE] "), reply)
        self.assertTrue(client.command(b"b", b"NOOP")[-1].startswith(b"b OK"))

    def test_startTLSRequired(self) -> None:
        """
        Before TLS, the STARTTLS-required listener advertises STARTTLS and
        LOGINDISABLED and no AUTH= mechanism, and answers LOGIN with
        C{NO [PRIVACYREQUIRED]}; after STARTTLS the same client logs in.
        """
        client = self.connectLines(port=self.running.startTLSRequired)
        capability = client.command(b"a", b"CAPABILITY")
        self.assertTrue(capability[-1].startswith(b"a OK"), capability)
        advertised = capabilities(capability)
        self.assertIn(b"STARTTLS", advertised)
        self.assertIn(b"LOGINDISABLED", advertised)
        self.assertEqual([name for name in advertised if name.upper().startswith(b"AUTH=")], [])
        reply = client.command(b"b", b'LOGIN alice@example.org "alice secret"')
        self.assertEqual(len(reply), 1, reply)
        self.assertTrue(reply[0].startswith(b"b NO [PRIVACYREQUIRED]"), reply)
        self.assertTrue(client.command(b"c", b"STARTTLS")[-1].startswith(b"c OK"))
        client.startTLS(self.context)
        capability = client.command(b"d", b"CAPABILITY")
        advertised = capabilities(capability)
        self.assertNotIn(b"STARTTLS", advertised)
        self.assertNotIn(b"LOGINDISABLED", advertised)
        self.assertTrue(
            client.command(b"e", b'LOGIN alice@example.org "alice secret"')[-1].startswith(b"e OK")
        )

    def test_masterUser(self) -> None:
        """
        For a route with C{master = true}, the proxy checks the client's
        password itself and logs in as the user with the master user
        (C{dave@example.org*proxy}): the server logs dave's login by the
        master user, and the client sees dave's mailbox.
        """
        user = "dave@example.org"
        mark = self.logMark(self.servers.new)
        client = self.connectImplicit(source=CLIENT_ADDRESS)
        client.login(user, DAVE_ROUTE_PASSWORD)
        self.assertEqual(self.firstSubject(client), f"{user} on new")
        self.waitForLogLine(self.servers.new, mark, f"Master user logging in as {user}")
        self.waitForLogLine(
            self.servers.new,
            mark,
            f"Login: user=<{user}>",
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
        STARTTLS on the plain IMAP port, verifying C{localhost} against the
        test CA.
        """
        return {
            "ports": {"imap": server.imap},
            "tls": "starttls",
            "verify": True,
            "ca_file": self.servers.ca.caPath,
            "server_name": "localhost",
            "forward": "auto",
        }

    def implicitListenerOptions(self) -> dict[str, object]:
        """
        More keys for the implicit-TLS listener's table.
        """
        return {}

    def extraBackends(self) -> dict[str, dict[str, object]]:
        """
        The backend "untrusted": old, but verified against a CA that did not
        sign its certificate.
        """
        untrusted = TestCA(fixtureDirectory("untrusted-ca"))
        return {
            "untrusted": {
                "host": "127.0.0.1",
                "ports": {"imap": self.servers.old.imap},
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
        client = self.connectImplicit()
        client.login("bob@example.org", PASSWORDS["bob@example.org"])
        self.assertEqual(self.firstSubject(client), "bob@example.org on new")
        self.waitForLogLine(self.servers.new, mark, "Login: user=<bob@example.org>", " TLS,")

    def test_backendCertificateVerified(self) -> None:
        """
        A server whose certificate the configured CA did not sign is not
        logged in to: the client gets C{NO [UNAVAILABLE]}.
        """
        client = self.connectLines()
        reply = client.command(b"a", b"LOGIN trent@example.org whatever")
        self.assertEqual(len(reply), 1, reply)
        self.assertTrue(reply[0].startswith(b"a NO [UNAVAILABLE] "), reply)


class ProxyProtocolBackendTests(RoutingTestsMixin, SynchronousTestCase):
    """
    The proxy reaching the servers' PROXY-protocol listener, telling them
    the client's address in a PROXY v2 header.
    """

    def backendOptions(self, server: Dovecot) -> dict[str, object]:
        """
        The listener that requires a PROXY header, in plaintext.
        """
        return {"ports": {"imap": server.imapProxy}, "tls": "none", "forward": "proxy-v2"}


class RouteChangeTests(ProxyFixtureMixin, SynchronousTestCase):
    """
    Changing the route table while the proxy runs.
    """

    def bobsServer(self) -> str:
        """
        The subject of bob's first message as seen by a new login.
        """
        client = self.connectImplicit()
        client.login("bob@example.org", PASSWORDS["bob@example.org"])
        subject = self.firstSubject(client)
        closeIMAP(client)
        return subject

    def test_routeChange(self) -> None:
        """
        After the route file moves bob from new to old, the next login
        lands on old without a restart, and a session opened before the
        change stays connected to new.
        """
        pid = self.running.proxy.pid
        established = self.connectImplicit()
        established.login("bob@example.org", PASSWORDS["bob@example.org"])
        self.assertEqual(self.firstSubject(established), "bob@example.org on new")

        moved = {**ROUTES, "accounts": {**ROUTES["accounts"], "bob@example.org": "old"}}
        writeAtomically(self.running.routesPath, routesText(moved))
        deadline = time.monotonic() + 15
        while (subject := self.bobsServer()) != "bob@example.org on old":
            self.assertEqual(subject, "bob@example.org on new")
            if time.monotonic() > deadline:
                self.fail("the proxy did not pick up the changed route in 15 s")
            time.sleep(0.2)

        self.assertTrue(self.running.proxy.running())
        self.assertEqual(self.running.proxy.pid, pid)
        self.assertEqual(established.noop()[0], "OK")
        self.assertEqual(self.firstSubject(established), "bob@example.org on new")


class HAProxy:
    """
    Debian's haproxy in TCP mode, sending a PROXY v2 header to one server.
    """

    def __init__(self, directory: str, target: int) -> None:
        """
        Configure (not start) a balancer on a free port in front of
        127.0.0.1:C{target}.
        """
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.target = target
        self.configPath = self.directory / "haproxy.cfg"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """
        Start it in the foreground and wait for its port. haproxy must be
        told its port: a free one is chosen, and chosen again if another
        process took it before haproxy could bind it.
        """
        for attempt in range(3):
            self.port = freePort()
            self.configPath.write_text(
                "global\n    maxconn 200\n"
                "defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 60s\n    timeout server 60s\n"
                f"frontend clients\n    bind 127.0.0.1:{self.port}\n    default_backend proxies\n"
                f"backend proxies\n    server mailproxy 127.0.0.1:{self.target} send-proxy-v2\n"
            )
            try:
                self._run()
                return
            except RuntimeError as error:
                if attempt == 2 or "Address already in use" not in str(error):
                    raise

    def _run(self) -> None:
        """
        Run haproxy and wait for its port.

        @raise RuntimeError: it exited or did not listen; the message is
            its log.
        """
        log = open(self.directory / "haproxy.log", "wb")
        self.process = subprocess.Popen(
            ["haproxy", "-db", "-f", str(self.configPath)], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        log.close()
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), 1).close()
                return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError((self.directory / "haproxy.log").read_text())
                time.sleep(0.05)

    def stop(self) -> None:
        """
        Stop it by its pid.
        """
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


class LoadBalancerTests(ProxyFixtureMixin, SynchronousTestCase):
    """
    The proxy behind a TCP load balancer (haproxy) that sends a PROXY v2
    header before the TLS ClientHello.
    """

    def implicitListenerOptions(self) -> dict[str, object]:
        """
        The implicit-TLS listener takes PROXY headers from 127.0.0.1 only.
        """
        return {"proxy_protocol": True, "proxy_trusted": ["127.0.0.1/32"]}

    def setUp(self) -> None:
        """
        Start haproxy in front of the proxy's implicit-TLS listener.
        """
        super().setUp()
        requireServer("haproxy")
        self.balancer = HAProxy(os.path.join(fixtureDirectory(type(self).__name__), "haproxy"), self.running.implicit)
        self.balancer.start()
        self.addCleanup(self.balancer.stop)

    def test_clientAddressThroughBalancer(self) -> None:
        """
        A client at 127.0.0.2 logs in through haproxy; the proxy takes the
        address from the PROXY header and Dovecot logs it.
        """
        mark = self.logMark(self.servers.old)
        client = SourceBoundIMAP4_SSL("127.0.0.1", self.balancer.port, source=CLIENT_ADDRESS, ssl_context=self.context)
        self.addCleanup(closeIMAP, client)
        client.login("alice@example.org", PASSWORDS["alice@example.org"])
        self.assertEqual(self.firstSubject(client), "alice@example.org on old")
        self.waitForLogLine(self.servers.old, mark, "Login: user=<alice@example.org>", f"rip={CLIENT_ADDRESS},")

    def test_untrustedSenderRefused(self) -> None:
        """
        A connection to the listener from an address that is not a trusted
        balancer is closed without a greeting or a TLS handshake.
        """
        # The proxy's reset may come before the connect call returns.
        try:
            connection = socket.create_connection(
                ("127.0.0.1", self.running.implicit), TIMEOUT, source_address=("127.0.0.3", 0)
            )
            self.addCleanup(connection.close)
            received = connection.recv(100)
        except ConnectionResetError:
            received = b""
        self.assertEqual(received, b"")
