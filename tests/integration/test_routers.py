"""
The routers end to end: real OpenLDAP (C{slapd}), the example nginx-style
auth server (C{examples/auth_server.py}), SQLite, two real Dovecot servers,
the proxy as a subprocess, and Debian's nginx mail proxy for comparison.

Every account exists on both Dovecot servers with the same password, and
each server's copy of an account holds one message whose subject names the
server (C{"alice@example.org on old"}), so the mailbox a client sees shows
where its login was routed.  The routers authenticate: a wrong password is
refused by the proxy, and the servers' logs prove that no login reached
them.
"""

from __future__ import annotations

import base64
import hashlib
import imaplib
import json
import os
import re
import signal
import smtplib
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from twisted.trial.unittest import SynchronousTestCase

from .common import TIMEOUT, listenerTable
from .nginx import NginxMailProxy
from .postfix import Postfix, dovecotSASLConfig
from .servers import (
    Dovecot,
    Proxy,
    TestCA,
    _dieWithParent,
    _stopProcess,
    fixtureDirectory,
    openDescriptors,
    requireServer,
    sharedFixture,
)
from .slapd import SERVICE_DN, Account, Slapd

_REPOSITORY = Path(__file__).resolve().parent.parent.parent
AUTH_SERVER = _REPOSITORY / "examples" / "auth_server.py"
AUTH_SECRET = "integration-shared-secret-0123456789"

#: Accounts on both mail servers (the password is the same everywhere).
PASSWORDS = {
    "alice@example.org": "alice secret",
    "bob@example.org": "bob-secret",
    "carol@example.org": "carol-secret",
    "erin@example.org": "erin-secret",
}

#: Where each router sends each account.
HOMES = {"alice@example.org": "old", "bob@example.org": "new", "carol@example.org": "new", "erin@example.org": "old"}

if TYPE_CHECKING:
    _MixinBase = SynchronousTestCase
else:
    _MixinBase = object


def firstMessage(user: str, server: str) -> bytes:
    """
    The message in C{user}'s INBOX on C{server}.
    """
    return (
        f"From: postmaster@example.org\r\nTo: {user}\r\nSubject: {user} on {server}\r\n"
        f"Message-ID: <{user.replace('@', '.')}.{server}.routers@example.org>\r\n\r\n"
        f"Routed to {server}.\r\n"
    ).encode("ascii")


class MailServers:
    """
    Two mail servers, C{old} and C{new}, each a Dovecot (IMAP, POP3) and a
    Postfix (submission with SASL through that Dovecot, and MX delivering
    to it), with every account on both.
    """

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.ca = TestCA(os.path.join(directory, "ca"))
        self.old = Dovecot(
            os.path.join(directory, "old"), "rold", PASSWORDS, ca=self.ca, masterUser=None, extraConfig=dovecotSASLConfig()
        )
        self.new = Dovecot(
            os.path.join(directory, "new"), "rnew", PASSWORDS, ca=self.ca, masterUser=None, extraConfig=dovecotSASLConfig()
        )
        self.postfixes: dict[str, Postfix] = {}

    @classmethod
    def start(cls) -> MailServers:
        """
        Start both servers and fill the mailboxes.
        """
        requireServer("dovecot", "doveadm", "openssl", "postfix", "postconf")
        servers = cls(fixtureDirectory("routers-dovecot"))
        try:
            for name, dovecot in (("old", servers.old), ("new", servers.new)):
                dovecot.start()
                for user in PASSWORDS:
                    dovecot.deliver(user, firstMessage(user, name))
                postfix = Postfix(
                    os.path.join(servers.directory, f"postfix-{name}"),
                    f"r{name}",
                    domains=["example.org"],
                    mailboxes=list(PASSWORDS),
                    lmtpPort=dovecot.lmtp,
                    saslPath=os.path.join(os.path.realpath(dovecot.directory / "runtime"), "run", "postfix-auth"),
                    ca=servers.ca,
                )
                servers.postfixes[name] = postfix
                postfix.start()
        except BaseException:
            servers.stop()
            raise
        return servers

    def stop(self) -> None:
        """
        Stop them all.
        """
        for postfix in self.postfixes.values():
            postfix.stop()
        self.old.stop()
        self.new.stop()

    def byName(self, name: str) -> Dovecot:
        """
        The Dovecot called C{name}.
        """
        return {"old": self.old, "new": self.new}[name]

    def logs(self) -> str:
        """
        Every server's log.
        """
        return self.old.logText() + self.new.logText() + "".join(p.logText() for p in self.postfixes.values())


def mailServers() -> MailServers:
    """
    The module's mail servers, started on first use.
    """
    return sharedFixture("routers-mail", "routers", MailServers.start)


def directory() -> Slapd:
    """
    The module's directory (for the LDAP and chain routers), started on
    first use: alice and erin live on C{old}, bob on C{new} (by backend
    name), carol on a host the proxy has no backend for (C{localhost},
    reached with C{backend_defaults}).
    """

    def start() -> Slapd:
        slapd = Slapd(fixtureDirectory("routers-slapd"), _directoryAccounts())
        slapd.start()
        return slapd

    return sharedFixture("routers-slapd", "routers", start)


def _directoryAccounts() -> dict[str, Account]:
    hosts = {"old": "old", "new": "new"}
    accounts = {
        user: Account(mail=user, uid=user.partition("@")[0], password=password, mailHost=hosts[HOMES[user]])
        for user, password in PASSWORDS.items()
    }
    accounts["carol@example.org"] = Account("carol@example.org", "carol", PASSWORDS["carol@example.org"], "localhost")
    return accounts


class AuthServer:
    """
    C{examples/auth_server.py} as a subprocess, with a users file that
    routes to the test's mail servers and a record of every question.
    """

    def __init__(self, directory: str, servers: MailServers, tls: tuple[str, str] | None = None) -> None:
        """
        @param tls: a certificate chain and key: serve HTTPS.
        """
        self.tls = tls
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.usersPath = self.directory / "users.toml"
        self.recordPath = self.directory / "questions.jsonl"
        self.logPath = self.directory / "auth.log"
        byName = {"old": servers.old, "new": servers.new}
        lines = [
            "[auth]",
            'header = "X-Auth-Key"',
            f'secret = "{AUTH_SECRET}"',
            "wait = 1",
            "[defaults]",
            'server = "127.0.0.1"',
        ]
        for user, password in PASSWORDS.items():
            home = byName[HOMES[user]]
            postfix = servers.postfixes[HOMES[user]]
            lines += [
                f'[users."{user}"]',
                f'password = "{password}"',
                f"ports = {{ imap = {home.imap}, pop3 = {home.pop3}, smtp = {postfix.submission}, mx = {postfix.mx} }}",
            ]
        self.usersPath.write_text("\n".join(lines) + "\n")
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """
        The auth URL, nginx style (no scheme; C{https://} for TLS).
        """
        if self.tls is not None:
            return f"https://localhost:{self.port}/auth"
        return f"127.0.0.1:{self.port}/auth"

    def start(self) -> None:
        """
        Start the server on a port the kernel chooses and wait until it
        says which.
        """
        listen = "tcp:0:interface=127.0.0.1"
        if self.tls is not None:
            listen = f"ssl:0:interface=127.0.0.1:certKey={self.tls[0]}:privateKey={self.tls[1]}"
        logged = self.logPath.stat().st_size if self.logPath.exists() else 0
        with open(self.logPath, "ab") as log:
            self._process = subprocess.Popen(
                [
                    sys.executable,
                    str(AUTH_SERVER),
                    "--listen",
                    listen,
                    "--users",
                    str(self.usersPath),
                    "--record",
                    str(self.recordPath),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_dieWithParent,
            )
        deadline = time.monotonic() + 20
        while True:
            with open(self.logPath, "rb") as log:
                log.seek(logged)
                match = re.search(rb"auth server listening on \S+:(\d+)", log.read())
            if match is not None:
                self.port = int(match.group(1))
                return
            if self._process.poll() is not None or time.monotonic() > deadline:
                _stopProcess(self._process)
                raise RuntimeError(f"the example auth server did not listen; {self.logPath}:\n{self.logPath.read_text()}")
            time.sleep(0.05)

    def stop(self) -> None:
        """
        Stop it.
        """
        if self._process is not None:
            _stopProcess(self._process)
            self._process = None

    def questions(self) -> list[dict[str, Any]]:
        """
        Every question recorded so far.
        """
        try:
            text = self.recordPath.read_text()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines() if line]


def authServer() -> AuthServer:
    """
    The module's auth server, started on first use.
    """
    servers = mailServers()

    def start() -> AuthServer:
        server = AuthServer(fixtureDirectory("routers-auth"), servers)
        server.start()
        return server

    return sharedFixture("routers-auth", "routers", start)


class RoutingProxy:
    """
    The proxy with one router, plain IMAP and POP3 listeners, and the
    backends C{old} and C{new}.
    """

    def __init__(
        self, directory: str, servers: MailServers, router: str, files: Mapping[str, str] = {}, digest: bool = False
    ) -> None:
        """
        @param router: the C{[router]} part of the configuration, TOML.
        @param files: more files for the configuration's directory.
        @param digest: offer the digest mechanisms (C{digest_auth}) on the
            IMAP (CRAM-MD5) and POP3 (APOP, CRAM-MD5) listeners.
        """
        backends = "".join(
            f'[backend.{name}]\nhost = "127.0.0.1"\n'
            f"ports = {{ imap = {server.imap}, pop3 = {server.pop3}, "
            f"smtp = {servers.postfixes[name].submission}, mx = {servers.postfixes[name].mx} }}\n"
            f'tls = "none"\nforward = "none"\n'
            for name, server in (("old", servers.old), ("new", servers.new))
        )
        config = (
            '[proxy]\nhostname = "proxy.example.org"\n'
            "[limits]\nfailure_delay = 0.0\nbackend_timeout = 10\n"
            # Port 0: the proxy logs the ports the kernel chose (see start).
            + listenerTable("imap", 0, "none", **({"digest_auth": True} if digest else {}))
            + listenerTable("pop3", 0, "none", **({"digest_auth": True} if digest else {}))
            + listenerTable("smtp", 0, "none", mode="submission")
            + listenerTable("smtp", 0, "none", mode="mx")
            + router
            + backends
            + '[log]\nformat = "json"\npath = "events.jsonl"\n'
        )
        self.proxy = Proxy(directory, config)
        for name, text in files.items():
            (self.proxy.directory / name).write_text(text)

    def start(self) -> None:
        """
        Start it and wait for its listeners.
        """
        self.proxy.start()
        self.imap, self.pop3, self.submission, self.mx = self.proxy.ports

    def stop(self) -> None:
        """
        Stop it.
        """
        self.proxy.stop()


def _connect(port: int) -> tuple[socket.socket, Any]:
    connection = socket.create_connection(("127.0.0.1", port), TIMEOUT)
    connection.settimeout(TIMEOUT)
    return connection, connection.makefile("rb")


def imapLogin(port: int, user: str, password: str) -> tuple[str, str]:
    """
    Log in over IMAP; return C{("OK", subject of message 1)} or the
    refusal, C{("NO", text)} (or C{("BYE", text)} if the server closed).
    """
    connection, reader = _connect(port)
    try:
        greeting = reader.readline()
        if not greeting.startswith(b"* OK"):
            return "BYE", greeting.decode("utf-8", "replace").strip()

        def command(tag: bytes, line: bytes) -> list[bytes]:
            connection.sendall(tag + b" " + line + b"\r\n")
            lines = []
            while True:
                reply = reader.readline()
                if not reply:
                    raise EOFError(b"".join(lines))
                lines.append(reply)
                if reply.startswith(tag + b" "):
                    return lines

        quoted = '"' + password.replace("\\", "\\\\").replace('"', '\\"') + '"'
        lines = command(b"a", f'LOGIN "{user}" {quoted}'.encode())
        final = lines[-1].decode("utf-8", "replace").strip()
        if not final.startswith("a OK"):
            return "NO", final[len("a NO ") :] if final.startswith("a NO ") else final
        command(b"s", b"SELECT INBOX")
        fetched = b"".join(command(b"b", b"FETCH 1 (BODY.PEEK[HEADER.FIELDS (SUBJECT)])"))
        match = re.search(rb"Subject: ([^\r\n]*)", fetched)
        command(b"c", b"LOGOUT")
        return "OK", match.group(1).decode() if match else "?"
    finally:
        reader.close()
        connection.close()


def imapFailedLogin(port: int, user: bytes, password: bytes, sasl: bool = False) -> bytes:
    """
    Try to log in over IMAP with C{user} (any octets: with LOGIN it is sent
    as a literal, with C{sasl} in AUTHENTICATE LOGIN), then LOGOUT; return
    the login's tagged reply.
    """
    connection, reader = _connect(port)
    try:
        if not reader.readline().startswith(b"* OK"):
            raise AssertionError("no IMAP greeting")

        def expect(prefix: bytes) -> bytes:
            while True:
                line = reader.readline()
                if not line or line.startswith(prefix):
                    return line

        if sasl:
            connection.sendall(b"a AUTHENTICATE LOGIN " + base64.b64encode(user) + b"\r\n")
        else:
            connection.sendall(b"a LOGIN {%d}\r\n" % (len(user),))
            if not expect(b"+").startswith(b"+"):
                raise AssertionError("the proxy refused the literal")
            connection.sendall(user + b" ")
        if sasl:
            expect(b"+")
            connection.sendall(base64.b64encode(password) + b"\r\n")
        else:
            connection.sendall(b'"' + password + b'"\r\n')
        reply = expect(b"a ")
        connection.sendall(b"z LOGOUT\r\n")
        expect(b"z ")
        return reply
    finally:
        reader.close()
        connection.close()


def imapCramMD5Login(port: int, user: str, password: str) -> tuple[str, str]:
    """
    Log in over IMAP with Python's C{imaplib} and C{AUTHENTICATE CRAM-MD5};
    return like L{imapLogin}.
    """
    with imaplib.IMAP4("127.0.0.1", port, timeout=TIMEOUT) as client:
        try:
            client.login_cram_md5(user, password)
        except imaplib.IMAP4.error as e:
            text = e.args[0]
            return "NO", text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text)
        client.select("INBOX")
        _, data = client.fetch("1", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        fetched = b"".join(part[1] if isinstance(part, tuple) else part for part in data)
        match = re.search(rb"Subject: ([^\r\n]*)", fetched)
        return "OK", match.group(1).decode() if match else "?"


def pop3Login(port: int, user: str, password: str) -> tuple[str, str]:
    """
    Log in over POP3 with USER/PASS; return C{("OK", subject of message
    1)} or C{("NO", text)}.
    """
    connection, reader = _connect(port)
    try:
        greeting = reader.readline()
        if not greeting.startswith(b"+OK"):
            return "BYE", greeting.decode("utf-8", "replace").strip()

        def command(line: str) -> str:
            connection.sendall(line.encode("utf-8") + b"\r\n")
            return reader.readline().decode("utf-8", "replace").strip()

        reply = command(f"USER {user}")
        if reply.startswith("+OK"):
            reply = command(f"PASS {password}")
        if not reply.startswith("+OK"):
            return "NO", reply[len("-ERR ") :] if reply.startswith("-ERR ") else reply
        connection.sendall(b"TOP 1 0\r\n")
        subject = "?"
        while True:
            line = reader.readline()
            if not line or line == b".\r\n":
                break
            if line.startswith(b"Subject: "):
                subject = line[len(b"Subject: ") :].decode().strip()
        command("QUIT")
        return "OK", subject
    finally:
        reader.close()
        connection.close()


def apopLogin(port: int, user: str, password: str) -> tuple[str, str]:
    """
    Log in over POP3 with APOP (the digest of the greeting's timestamp and
    the password); return like L{pop3Login}.
    """
    connection, reader = _connect(port)
    try:
        greeting = reader.readline().decode("utf-8", "replace").strip()
        match = re.search(r"<[^>]*>", greeting)
        if not greeting.startswith("+OK") or match is None:
            return "BYE", greeting
        digest = hashlib.md5((match.group() + password).encode("utf-8")).hexdigest()
        connection.sendall(f"APOP {user} {digest}\r\n".encode("utf-8"))
        reply = reader.readline().decode("utf-8", "replace").strip()
        if not reply.startswith("+OK"):
            return "NO", reply[len("-ERR ") :] if reply.startswith("-ERR ") else reply
        connection.sendall(b"TOP 1 0\r\n")
        subject = "?"
        while True:
            line = reader.readline()
            if not line or line == b".\r\n":
                break
            if line.startswith(b"Subject: "):
                subject = line[len(b"Subject: ") :].decode().strip()
        connection.sendall(b"QUIT\r\n")
        reader.readline()
        return "OK", subject
    finally:
        reader.close()
        connection.close()


def submissionLogin(port: int, user: str, password: str) -> tuple[str, str]:
    """
    Log in with SMTP AUTH on a submission port and send the user a message
    (Postfix logs the login's user name with the message); return
    C{("OK", "")} or C{("NO", "<code> <text>")}.
    """
    with smtplib.SMTP("127.0.0.1", port, timeout=TIMEOUT) as client:
        client.ehlo("client.example.net")
        try:
            client.login(user, password)
        except smtplib.SMTPAuthenticationError as e:
            return "NO", f"{e.smtp_code} {e.smtp_error.decode('utf-8', 'replace')}"
        client.sendmail(user, [user], f"From: {user}\r\nTo: {user}\r\nSubject: note to self\r\n\r\nHi.\r\n")
        return "OK", ""


def withoutCode(text: str) -> str:
    """
    A refusal's text without a leading response code (C{[AUTH]}, ...).
    """
    return re.sub(r"^\[[^\]]*\]\s*", "", text)


class RouterTestsMixin(_MixinBase):
    """
    What every router must do, end to end; a test class supplies the
    C{[router]} configuration.
    """

    servers: MailServers
    running: RoutingProxy

    def routerConfig(self) -> tuple[str, dict[str, str]]:
        """
        The C{[router]} TOML and any files it needs.
        """
        raise NotImplementedError

    def setUp(self) -> None:
        """
        Get the mail servers and this class's proxy (started by the first
        test that needs them).
        """
        self.servers = mailServers()

        def start() -> RoutingProxy:
            router, files = self.routerConfig()
            running = RoutingProxy(fixtureDirectory(f"proxy-{type(self).__name__}"), self.servers, router, files)
            running.start()
            return running

        self.running = sharedFixture("routers-proxy", type(self), start)

    def assertHome(self, reply: tuple[str, str], user: str) -> None:
        """
        C{reply} is a successful login that reached C{user}'s home.
        """
        self.assertEqual(reply, ("OK", f"{user} on {HOMES[user]}"))

    def test_imapRouted(self) -> None:
        """
        IMAP logins are authenticated and routed: alice to old, bob to new.
        """
        for user in ("alice@example.org", "bob@example.org"):
            self.assertHome(imapLogin(self.running.imap, user, PASSWORDS[user]), user)

    def test_pop3Routed(self) -> None:
        """
        POP3 logins (USER/PASS) are routed the same way, to the servers'
        POP3 ports.
        """
        for user in ("alice@example.org", "bob@example.org"):
            self.assertHome(pop3Login(self.running.pop3, user, PASSWORDS[user]), user)

    def test_wrongPasswordNeverReachesBackend(self) -> None:
        """
        A wrong password is refused by the proxy: neither server's log
        mentions the account afterwards.
        """
        before = len(self.servers.logs())
        reply = imapLogin(self.running.imap, "erin@example.org", "not-erins-password")
        self.assertEqual(reply[0], "NO")
        self.assertTrue(reply[1].startswith("[AUTHENTICATIONFAILED]"), reply)
        reply = pop3Login(self.running.pop3, "erin@example.org", "not-erins-password")
        self.assertEqual(reply[0], "NO")
        self.assertTrue(reply[1].startswith("[AUTH]"), reply)
        self.assertNotIn("erin", self.servers.logs()[before:])
        # The right password still works afterwards (no negative caching
        # of another password).
        self.assertHome(imapLogin(self.running.imap, "erin@example.org", PASSWORDS["erin@example.org"]), "erin@example.org")

    def test_submissionRouted(self) -> None:
        """
        SMTP submission logins are routed too: the home's Postfix (and no
        other) logs the SASL login the proxy made there.
        """
        for user in ("alice@example.org", "bob@example.org"):
            marks = {name: len(postfix.logText()) for name, postfix in self.servers.postfixes.items()}
            self.assertEqual(submissionLogin(self.running.submission, user, PASSWORDS[user]), ("OK", ""))
            home = self.servers.postfixes[HOMES[user]]
            home.waitForLog(rf"sasl_username={re.escape(user)}", start=marks[HOMES[user]])
            other = "new" if HOMES[user] == "old" else "old"
            self.assertNotIn(f"sasl_username={user}", self.servers.postfixes[other].logText()[marks[other]:])

    def test_submissionWrongPassword(self) -> None:
        """
        A wrong submission password is refused by the proxy (535) and never
        reaches a server.
        """
        before = len(self.servers.logs())
        code, text = submissionLogin(self.running.submission, "erin@example.org", "not-erins-password")
        self.assertEqual(code, "NO")
        self.assertTrue(text.startswith("535"), text)
        self.assertNotIn("erin", self.servers.logs()[before:])

    def test_mxRouted(self) -> None:
        """
        Inbound mail (SMTP without login) is routed by recipient: bob's
        message is delivered by new's Postfix into new's Dovecot.
        """
        postfix = self.servers.postfixes["new"]
        mark = len(postfix.logText())
        messageId = f"<mx.{type(self).__name__}.{time.monotonic_ns()}@example.net>"
        message = (
            f"From: someone@example.net\r\nTo: bob@example.org\r\nSubject: inbound\r\n"
            f"Message-ID: {messageId}\r\n\r\nHello.\r\n"
        )
        with smtplib.SMTP("127.0.0.1", self.running.mx, timeout=TIMEOUT) as client:
            client.sendmail("someone@example.net", ["bob@example.org"], message)
        postfix.waitForLog(r"to=<bob@example\.org>.*status=sent", start=mark)

    def test_unknownUser(self) -> None:
        """
        An account no router knows is refused like a wrong password.
        """
        reply = imapLogin(self.running.imap, "zed@example.org", "whatever")
        self.assertEqual(reply[0], "NO")
        self.assertIn("AUTHENTICATIONFAILED", reply[1])

    def test_forgedLogLines(self) -> None:
        """
        Login names made to forge log lines (a line break, then a line
        shaped like a failed login from another address; CR, NUL, ESC) are
        quoted in every line the router and the proxy write: the twistd log
        and the JSON event log keep one printable line per event, and the
        fail2ban filters in examples/ find the real client's address once
        per failed login (the forged names' and a genuine wrong password),
        and no other.
        """
        requireServer("fail2ban-regex")
        proxy = self.running.proxy
        events = proxy.directory / "events.jsonl"
        textMark = proxy.logPath.stat().st_size
        eventMark = events.stat().st_size if events.exists() else 0
        forged = (
            b"[mailproxy.imap._frontend.IMAPFrontend#info] authentication failed: session=forged "
            b'address=6.6.6.%d protocol=imap user="x" attempt=1'
        )
        replies = [
            imapFailedLogin(self.running.imap, b"x@example.org\n" + forged % 6, b"secret"),
            imapFailedLogin(
                self.running.imap, b"y@example.org\r\x00\x1b[2J\n2026-01-01T00:00:00+0000 " + forged % 7, b"secret", sasl=True
            ),
            imapFailedLogin(self.running.imap, b"erin@example.org", b"not-erins-password"),
        ]
        for reply in replies:
            self.assertTrue(reply.startswith(b"a NO "), replies)
        self.assertIn(b"[AUTHENTICATIONFAILED]", replies[-1])
        # The proxy writes its logs as events happen: read until the last
        # failed login's event is there and no line is half written.
        deadline = time.monotonic() + TIMEOUT
        while True:
            with open(proxy.logPath, "rb") as f:
                f.seek(textMark)
                text = f.read().decode("ascii")
            with open(events, "rb") as f:
                f.seek(eventMark)
                jsonText = f.read().decode("ascii")
            complete = text.endswith("\n") and jsonText.endswith("\n")
            if (complete and '"erin@example.org"' in jsonText) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        for line in text.splitlines():
            self.assertRegex(line, r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} \[[^\x00-\x1f\x7f]*$")
        for line in jsonText.splitlines():
            self.assertTrue(line.isprintable(), line)
            json.loads(line)
        failed = [event for event in map(json.loads, jsonText.splitlines()) if event["event"] == "login_failed"]
        self.assertIn("erin@example.org", [event["user"] for event in failed])
        self.assertEqual({event["address"] for event in failed}, {"127.0.0.1"})
        filters = _REPOSITORY / "examples" / "fail2ban" / "filter.d"
        for name, logText in (("mailproxy.conf", text), ("mailproxy-json.conf", jsonText)):
            log = Path(self.mktemp())
            log.write_text(logText)
            result = subprocess.run(
                ["fail2ban-regex", "-v", str(log), str(filters / name)], capture_output=True, text=True
            )
            self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
            self.assertIn(f"Failregex: {len(failed)} total", result.stdout, name)
            self.assertEqual(re.findall(r"^\|\s+(\S+)\s+\w{3} \w{3} ", result.stdout, re.M), ["127.0.0.1"] * len(failed), name)


def _ldapRouter(slapd: Slapd, servers: MailServers, prefix: str = "router", cache: str = "") -> tuple[str, dict[str, str]]:
    table = (
        f"[{prefix}]\n" if not prefix.startswith("[[") else f"{prefix}\n"
    )
    table += (
        ('type = "ldap"\n')
        + f"servers = [{json.dumps(slapd.url)}]\n"
        + f'bind_dn = "{SERVICE_DN}"\n'
        + 'bind_password_file = "ldap.secret"\n'
        + 'base = "ou=people,dc=example,dc=org"\n'
        + 'filter = "(&(objectClass=inetLocalMailRecipient)(mail={user}))"\n'
        + 'backend_attribute = "mailHost"\n'
        + 'auth = "bind"\n'
        + "connect_timeout = 2\ntimeout = 2\n"
    )
    defaults = f"backend_defaults = {{ tls = \"none\", forward = \"none\", ports = {{ imap = {servers.new.imap}, pop3 = {servers.new.pop3} }} }}\n"
    return table + defaults + cache, {"ldap.secret": slapd.servicePassword + "\n"}


class LDAPRouterTests(RouterTestsMixin, SynchronousTestCase):
    """
    The LDAP router against a real OpenLDAP: search as a service account,
    bind as the user, route by C{mailHost}.
    """

    def routerConfig(self) -> tuple[str, dict[str, str]]:
        return _ldapRouter(directory(), self.servers)

    def test_hostWithoutBackend(self) -> None:
        """
        A C{mailHost} that names no configured backend (a host name) is
        reached with C{backend_defaults}.
        """
        self.assertHome(imapLogin(self.running.imap, "carol@example.org", PASSWORDS["carol@example.org"]), "carol@example.org")

    def test_bindsAsUser(self) -> None:
        """
        The password is checked by binding as the user's entry.
        """
        imapLogin(self.running.imap, "bob@example.org", PASSWORDS["bob@example.org"])
        self.assertIn('BIND dn="uid=bob,ou=people,dc=example,dc=org"', directory().logText())

    def test_filterInjection(self) -> None:
        """
        A login name with filter syntax matches nothing (it is escaped).
        """
        reply = imapLogin(self.running.imap, "*)(uid=*", PASSWORDS["alice@example.org"])
        self.assertEqual(reply[0], "NO")


def _connectionsTo(pid: int, port: int) -> list[int]:
    """
    The established TCP connections process C{pid} holds to C{port} on
    127.0.0.1 (socket inodes), as the kernel lists them.
    """
    sockets = {int(target[8:-1]) for target in openDescriptors(pid).values() if target.startswith("socket:[")}
    found = []
    with open(f"/proc/{pid}/net/tcp") as table:
        next(table)
        for line in table:
            fields = line.split()
            remote, state, inode = fields[2], fields[3], int(fields[9])
            if remote == f"0100007F:{port:04X}" and state == "01" and inode in sockets:
                found.append(inode)
    return found


class LDAPReloadTests(SynchronousTestCase):
    """
    Reloads of a proxy with the LDAP router (one thread, behind a cache)
    against the real OpenLDAP: a replaced router lets its thread and its
    connections go.
    """

    def test_reloadsReleaseThreadsAndConnections(self) -> None:
        """
        Eight reloads (SIGHUP), each followed by a login through the new
        router, leave the proxy with as many threads and as many LDAP
        connections as one reload did: each replaced router stopped its
        pool and unbound its connections.
        """
        servers = mailServers()
        slapd = directory()
        router, files = _ldapRouter(slapd, servers, cache="[router.cache]\nttl = 60\n")
        router = router.replace("timeout = 2\n", "timeout = 2\npool_size = 1\n", 1)
        running = RoutingProxy(fixtureDirectory("proxy-ldap-reload"), servers, router, files)
        running.start()
        self.addCleanup(running.stop)
        proxy = running.proxy
        alice = "alice@example.org"

        def reloadAndLogIn() -> tuple[int, int]:
            done = proxy.logText().count("reloaded ")
            os.kill(proxy.pid, signal.SIGHUP)
            deadline = time.monotonic() + TIMEOUT
            while proxy.logText().count("reloaded ") == done:
                self.assertLess(time.monotonic(), deadline, "no reload in the log")
                time.sleep(0.05)
            self.assertEqual(imapLogin(running.imap, alice, PASSWORDS[alice]), ("OK", f"{alice} on {HOMES[alice]}"))
            return len(os.listdir(f"/proc/{proxy.pid}/task")), len(_connectionsTo(proxy.pid, slapd.port))

        first = reloadAndLogIn()
        # The main thread and the router's; a service bind and a user bind.
        self.assertEqual(first, (2, 2))
        for _ in range(8):
            self.assertEqual(reloadAndLogIn(), first)


class HTTPRouterTests(RouterTestsMixin, SynchronousTestCase):
    """
    The HTTP router asking the example nginx-style auth server.
    """

    def routerConfig(self) -> tuple[str, dict[str, str]]:
        auth = authServer()
        return (
            f'[router]\ntype = "http"\nurl = "http://{auth.url}"\ntimeout = 5\n'
            f"headers = {{ X-Auth-Key = {json.dumps(AUTH_SECRET)} }}\n"
            "[router.cache]\nttl = 30\n",
            {},
        )


class HTTPSAuthTests(SynchronousTestCase):
    """
    The HTTP router asking the auth server over HTTPS, verified with
    C{ca_file}.
    """

    def setUp(self) -> None:
        """
        Start an HTTPS auth server (shared by the class).
        """
        self.servers = mailServers()

        def start() -> AuthServer:
            certificate, key = self.servers.ca.issue("auth", names=("localhost",), ips=("127.0.0.1",))
            server = AuthServer(fixtureDirectory("routers-auth-tls"), self.servers, tls=(certificate, key))
            server.start()
            return server

        self.auth = sharedFixture("routers-auth-tls", "tls", start)

    def proxy(self, caFile: str) -> RoutingProxy:
        """
        A proxy whose HTTP router trusts C{caFile}.
        """
        router = (
            f'[router]\ntype = "http"\nurl = "{self.auth.url}"\nca_file = "auth-ca.pem"\ntimeout = 5\n'
            f"headers = {{ X-Auth-Key = {json.dumps(AUTH_SECRET)} }}\n"
        )
        running = RoutingProxy(
            fixtureDirectory("proxy-https"), self.servers, router, {"auth-ca.pem": Path(caFile).read_text()}
        )
        running.start()
        self.addCleanup(running.stop)
        return running

    def test_verified(self) -> None:
        """
        With the CA that signed the auth server's certificate, logins are
        routed.
        """
        running = self.proxy(self.servers.ca.caPath)
        user = "bob@example.org"
        self.assertEqual(imapLogin(running.imap, user, PASSWORDS[user]), ("OK", f"{user} on {HOMES[user]}"))

    def test_unverified(self) -> None:
        """
        With another CA the auth server is not trusted: no question is
        asked (so no password sent) and the login fails as temporary.
        """
        running = self.proxy(TestCA(fixtureDirectory("other-ca")).caPath)
        before = len(self.auth.questions())
        reply = imapLogin(running.imap, "bob@example.org", PASSWORDS["bob@example.org"])
        self.assertEqual(reply[0], "NO")
        self.assertTrue(reply[1].startswith("[UNAVAILABLE]"), reply)
        self.assertEqual(len(self.auth.questions()), before)


class SQLRouterTests(RouterTestsMixin, SynchronousTestCase):
    """
    The SQL router with an SQLite database that holds the passwords.
    """

    def routerConfig(self) -> tuple[str, dict[str, str]]:
        directory = Path(fixtureDirectory("routers-sqlite"))
        path = directory / "accounts.sqlite"
        with sqlite3.connect(path) as db:
            db.execute("CREATE TABLE accounts (address TEXT, backend TEXT, password TEXT)")
            db.executemany(
                "INSERT INTO accounts VALUES (?, ?, ?)",
                [(user, HOMES[user], password) for user, password in PASSWORDS.items()],
            )
        db.close()
        return (
            f'[router]\ntype = "sql"\ndriver = "sqlite3"\ndatabase = {json.dumps(str(path))}\n'
            'query = "SELECT backend, password FROM accounts WHERE address = :user"\n',
            {},
        )


class ChainRouterTests(RouterTestsMixin, SynchronousTestCase):
    """
    A migration table first, the directory second: bob is listed in the
    table (routed there, password checked by the server); everyone else
    falls through to LDAP.
    """

    def routerConfig(self) -> tuple[str, dict[str, str]]:
        table, files = _ldapRouter(directory(), self.servers, prefix="[[router.routers]]", cache="[router.routers.cache]\nttl = 30\n")
        files["moved.toml"] = '[accounts]\n"bob@example.org" = "new"\n'
        return '[router]\ntype = "chain"\n[[router.routers]]\ntype = "static"\npath = "moved.toml"\n' + table, files

    def test_tableFirst(self) -> None:
        """
        bob is routed by the table: the directory never sees his bind.
        """
        before = len(directory().logText())
        self.assertHome(imapLogin(self.running.imap, "bob@example.org", PASSWORDS["bob@example.org"]), "bob@example.org")
        self.assertNotIn("uid=bob", directory().logText()[before:])


class LDAPStartTLSTests(SynchronousTestCase):
    """
    The LDAP router over StartTLS, verifying the directory's certificate.
    """

    def setUp(self) -> None:
        """
        Get the mail servers.
        """
        self.servers = mailServers()

    def start(self, caFile: str) -> RoutingProxy:
        """
        A directory that offers StartTLS (its certificate signed by the mail
        servers' test CA) and a proxy whose router trusts C{caFile}.
        """

        def start() -> Slapd:
            certificate, key = self.servers.ca.issue("slapd", names=("localhost",), ips=("127.0.0.1",))
            slapd = Slapd(fixtureDirectory("routers-slapd-tls"), _directoryAccounts(), tls=(certificate, key))
            slapd.start()
            return slapd

        slapd = sharedFixture("routers-slapd-tls", "tls", start)
        router, files = _ldapRouter(slapd, self.servers)
        router = router.replace('type = "ldap"\n', 'type = "ldap"\nstart_tls = true\nca_file = "ldap-ca.pem"\n')
        files["ldap-ca.pem"] = Path(caFile).read_text()
        running = RoutingProxy(fixtureDirectory("proxy-ldap-tls"), self.servers, router, files)
        running.start()
        self.addCleanup(running.stop)
        return running

    def test_verified(self) -> None:
        """
        With the CA that signed the directory's certificate, logins work.
        """
        running = self.start(self.mailCA())
        user = "alice@example.org"
        self.assertEqual(imapLogin(running.imap, user, PASSWORDS[user]), ("OK", f"{user} on {HOMES[user]}"))

    def test_unverified(self) -> None:
        """
        With another CA, the directory is not trusted: the login fails as
        temporary and the password is never sent to it.
        """
        other = TestCA(fixtureDirectory("other-ca"))
        running = self.start(other.caPath)
        reply = imapLogin(running.imap, "alice@example.org", PASSWORDS["alice@example.org"])
        self.assertEqual(reply[0], "NO")
        self.assertTrue(reply[1].startswith("[UNAVAILABLE]"), reply)
        self.assertIn("certificate verify failed", running.proxy.logText())

    def mailCA(self) -> str:
        """
        The test CA's certificate file.
        """
        return self.servers.ca.caPath


class DirectoryOutageTests(SynchronousTestCase):
    """
    A directory that stops or hangs: temporary errors for unknown answers,
    cached answers for known users.  Uses a directory and proxy of its own.
    """

    def setUp(self) -> None:
        self.servers = mailServers()

        def start() -> Any:
            slapd = Slapd(fixtureDirectory("routers-slapd-outage"), _directoryAccounts())
            slapd.start()
            router, files = _ldapRouter(slapd, self.servers, cache="[router.cache]\nttl = 0.2\nserve_stale = 3600\n")
            router = router.replace("connect_timeout = 2\ntimeout = 2\n", "connect_timeout = 1\ntimeout = 1\n")
            running = RoutingProxy(fixtureDirectory("proxy-outage"), self.servers, router, files)
            try:
                running.start()
            except BaseException:
                slapd.stop()
                raise
            return _Pair(slapd, running)

        pair = sharedFixture("routers-proxy", type(self), start)
        self.slapd, self.running = pair.slapd, pair.running
        self.addCleanup(self.slapd.restart)
        self.addCleanup(self.slapd.resume)

    def test_stoppedDirectory(self) -> None:
        """
        With the directory stopped, a user the cache does not know gets
        IMAP C{NO [UNAVAILABLE]} (POP3 C{-ERR [SYS/TEMP]}, SMTP C{454
        4.7.0}); a user who logged in before keeps working from the cache,
        past its TTL.
        """
        alice = "alice@example.org"
        self.assertHome(imapLogin(self.running.imap, alice, PASSWORDS[alice]), alice)
        self.slapd.stop()
        time.sleep(0.3)  # past the TTL: only serve_stale can answer now
        reply = imapLogin(self.running.imap, "bob@example.org", PASSWORDS["bob@example.org"])
        self.assertEqual(reply[0], "NO")
        self.assertTrue(reply[1].startswith("[UNAVAILABLE]"), reply)
        reply = pop3Login(self.running.pop3, "bob@example.org", PASSWORDS["bob@example.org"])
        self.assertTrue(reply[1].startswith("[SYS/TEMP]"), reply)
        code, text = submissionLogin(self.running.submission, "bob@example.org", PASSWORDS["bob@example.org"])
        self.assertTrue(text.startswith("454 4.7.0"), (code, text))
        self.assertHome(imapLogin(self.running.imap, alice, PASSWORDS[alice]), alice)
        self.assertIn("serving the answer cached", self.running.proxy.logText())

    def test_hungDirectory(self) -> None:
        """
        A directory that accepts connections but never answers gives a
        temporary error after the router's timeouts, never a hang.
        """
        self.slapd.pause()
        reply = imapLogin(self.running.imap, "erin@example.org", PASSWORDS["erin@example.org"])
        self.assertEqual(reply[0], "NO")
        self.assertTrue(reply[1].startswith("[UNAVAILABLE]"), reply)

    def assertHome(self, reply: tuple[str, str], user: str) -> None:
        """
        C{reply} is a successful login that reached C{user}'s home.
        """
        self.assertEqual(reply, ("OK", f"{user} on {HOMES[user]}"))


class _Pair:
    """
    A directory and the proxy that uses it, stopped together.
    """

    def __init__(self, slapd: Slapd, running: RoutingProxy) -> None:
        self.slapd = slapd
        self.running = running

    def stop(self) -> None:
        self.running.stop()
        self.slapd.stop()


class CramMD5TestsMixin(_MixinBase):
    """
    IMAP C{AUTHENTICATE CRAM-MD5} through the proxy with a router that
    holds the passwords: the router checks the digest, the backend gets
    the password; a test class supplies the C{[router]} configuration.
    """

    servers: MailServers
    running: RoutingProxy

    def routerConfig(self) -> tuple[str, dict[str, str]]:
        """
        The C{[router]} TOML and any files it needs.
        """
        raise NotImplementedError

    def setUp(self) -> None:
        """
        Get the mail servers and this class's proxy, with C{digest_auth}.
        """
        self.servers = mailServers()

        def start() -> RoutingProxy:
            router, files = self.routerConfig()
            running = RoutingProxy(fixtureDirectory(f"proxy-{type(self).__name__}"), self.servers, router, files, digest=True)
            running.start()
            return running

        self.running = sharedFixture("routers-proxy", type(self), start)

    def test_imapCramMD5(self) -> None:
        """
        imaplib's CRAM-MD5 logs alice in on old and bob on new; a digest of
        the wrong password is refused by the router (the backend would
        have taken the router's password), with IMAP's
        C{[AUTHENTICATIONFAILED]}.
        """
        for user in ("alice@example.org", "bob@example.org"):
            self.assertEqual(imapCramMD5Login(self.running.imap, user, PASSWORDS[user]), ("OK", f"{user} on {HOMES[user]}"))
        status, text = imapCramMD5Login(self.running.imap, "alice@example.org", "wrong password")
        self.assertEqual(status, "NO")
        self.assertTrue(text.startswith("[AUTHENTICATIONFAILED]"), text)


class StaticCramMD5Tests(CramMD5TestsMixin, SynchronousTestCase):
    """
    CRAM-MD5 with the static router's authenticated accounts.
    """

    def routerConfig(self) -> tuple[str, dict[str, str]]:
        accounts = "".join(
            f'"{user}" = {{ backend = "{HOMES[user]}", password = {json.dumps(password)} }}\n' for user, password in PASSWORDS.items()
        )
        return '[router]\ntype = "static"\npath = "routes.toml"\n', {"routes.toml": "[accounts]\n" + accounts}


class SQLCramMD5Tests(CramMD5TestsMixin, SynchronousTestCase):
    """
    CRAM-MD5 with the SQL router, whose database holds the passwords.
    """

    routerConfig = SQLRouterTests.routerConfig


class LDAPCompareCramMD5Tests(CramMD5TestsMixin, SynchronousTestCase):
    """
    CRAM-MD5 with the LDAP router in C{auth = "compare"}: the proxy reads
    the cleartext C{userPassword} as its service account.
    """

    def routerConfig(self) -> tuple[str, dict[str, str]]:
        table, files = _ldapRouter(directory(), self.servers)
        return table.replace('auth = "bind"\n', 'auth = "compare"\n'), files


class HTTPCramMD5Tests(CramMD5TestsMixin, SynchronousTestCase):
    """
    CRAM-MD5 with the HTTP router: the auth server checks the digest
    (C{Auth-Method: cram-md5}, C{Auth-Salt}) and answers the password.
    """

    routerConfig = HTTPRouterTests.routerConfig


class NginxComparisonTests(SynchronousTestCase):
    """
    The same auth server behind Debian's nginx mail proxy and behind
    mailproxy: both send it the same questions and route and refuse the
    same logins.
    """

    CASES: list[tuple[str, str]] = [
        ("alice@example.org", PASSWORDS["alice@example.org"]),
        ("bob@example.org", PASSWORDS["bob@example.org"]),
        ("alice@example.org", "wrong password"),
        ("zed@example.org", "whatever"),
    ]

    def setUp(self) -> None:
        self.servers = mailServers()
        self.auth = authServer()

        def start() -> _Proxies:
            nginx = NginxMailProxy(fixtureDirectory("routers-nginx"), self.auth.url, {"X-Auth-Key": AUTH_SECRET})
            nginx.start()
            router = (
                f'[router]\ntype = "http"\nurl = "http://{self.auth.url}"\n'
                f"headers = {{ X-Auth-Key = {json.dumps(AUTH_SECRET)} }}\n"
            )
            running = RoutingProxy(fixtureDirectory("proxy-compare"), self.servers, router, digest=True)
            try:
                running.start()
            except BaseException:
                nginx.stop()
                raise
            return _Proxies(nginx, running)

        proxies = sharedFixture("routers-proxy", type(self), start)
        self.nginx, self.running = proxies.nginx, proxies.running

    def compare(
        self,
        login: Callable[[int, str, str], tuple[str, str]],
        nginxPort: int,
        ourPort: int,
        sameValues: bool = True,
    ) -> None:
        """
        Every case gives the same outcome through both proxies, and the
        auth server got the same question from both.

        @param sameValues: compare every header value; if false, all but
            C{Auth-Salt} and C{Auth-Pass} (APOP's timestamp, and so the
            digest, is each session's own).
        """
        for user, password in self.CASES:
            before = len(self.auth.questions())
            theirs = login(nginxPort, user, password)
            middle = len(self.auth.questions())
            ours = login(ourPort, user, password)
            questions = self.auth.questions()
            self.assertEqual((theirs[0], withoutCode(theirs[1])), (ours[0], withoutCode(ours[1])), (user, password))
            self.assertEqual(middle - before, 1, "nginx asked once")
            self.assertEqual(len(questions) - middle, 1, "mailproxy asked once")
            theirQuestion, ourQuestion = questions[middle - 1]["headers"], questions[middle]["headers"]
            if not sameValues:
                # The salt is each session's own, and so is the digest.
                theirQuestion = [(n, v) if n not in ("Auth-Salt", "Auth-Pass") else (n, "") for n, v in theirQuestion]
                ourQuestion = [(n, v) if n not in ("Auth-Salt", "Auth-Pass") else (n, "") for n, v in ourQuestion]
            self.assertEqual(theirQuestion, ourQuestion)

    def test_imap(self) -> None:
        """
        IMAP: the same routes and refusals, the same questions.
        """
        self.compare(imapLogin, self.nginx.imap, self.running.imap)

    def test_pop3(self) -> None:
        """
        POP3: the same routes and refusals, the same questions.
        """
        self.compare(pop3Login, self.nginx.pop3, self.running.pop3)

    def test_imapCramMD5(self) -> None:
        """
        IMAP AUTHENTICATE CRAM-MD5 (imaplib): both send C{Auth-Method:
        cram-md5} with the client's digest in C{Auth-Pass} and the
        challenge in C{Auth-Salt}, in the same place, and log in with the
        C{Auth-Pass} the server answers; a wrong password is refused by
        both.
        """
        self.compare(imapCramMD5Login, self.nginx.imap, self.running.imap, sameValues=False)
        question = self.auth.questions()[-1]["headers"]
        self.assertEqual([name for name, _ in question][:6], ["Host", "Auth-Method", "Auth-User", "Auth-Pass", "Auth-Salt", "Auth-Protocol"])
        self.assertEqual((question[1], question[5]), (["Auth-Method", "cram-md5"], ["Auth-Protocol", "imap"]))

    def test_apop(self) -> None:
        """
        POP3 APOP: both send the digest in C{Auth-Pass} and the timestamp in
        C{Auth-Salt} in the same place, and log in with the C{Auth-Pass}
        the server answers; a wrong digest is refused by both.
        """
        self.compare(apopLogin, self.nginx.pop3, self.running.pop3, sameValues=False)
        question = self.auth.questions()[-1]["headers"]
        self.assertEqual([name for name, _ in question][:6], ["Host", "Auth-Method", "Auth-User", "Auth-Pass", "Auth-Salt", "Auth-Protocol"])
        self.assertEqual(question[1], ["Auth-Method", "apop"])


class _Proxies:
    """
    nginx and mailproxy, stopped together.
    """

    def __init__(self, nginx: NginxMailProxy, running: RoutingProxy) -> None:
        self.nginx = nginx
        self.running = running

    def stop(self) -> None:
        self.running.stop()
        self.nginx.stop()
