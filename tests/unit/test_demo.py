"""
Tests for L{mailproxy.demo}: the demo IMAP servers (L{mailproxy._demoimap})
on the wire, the configuration the demo writes, and the whole demo through
the proxy with real clients (Twisted's IMAP client, Python's imaplib, curl).
"""

from __future__ import annotations

import imaplib
import os
import shlex
import shutil
import socket
import ssl
import stat
import sys
import tomllib
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import ClientCreator
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue
from twisted.mail import imap4
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mailproxy._demoimap import DEMO_PASSWORD, DEMO_USERS, DemoMailbox, DemoStoreFactory
from mailproxy.demo import (
    adminCommands,
    clientCommands,
    defaultDirectory,
    demoConfig,
    demoRoutes,
    instructions,
    mailproxyCommand,
    startDemo,
    writeDemoConfig,
)
from mailproxy.config import loadConfig
from mailproxy.model import ClientInfo, Credentials, Route, RouteRequest
from mailproxy.routers import buildRouter
from mailproxy.tap import ListenError

ALICE_TEXT_ON_OLD = (
    b"Hello Alice,\r\n"
    b"\r\n"
    b"this message lives on the demo server 'old'.\r\n"
    b"\r\n"
    b"routes.toml sends alice@example.org here, so this is\r\n"
    b"what you see through the proxy.\r\n"
    b"\r\n"
    b"-- \r\n"
    b"mailproxy demo\r\n"
)


class StoreSession:
    """
    One IMAP session with a demo server over a L{StringTransport}, with a
    L{Clock} for the server's timers and FETCH scheduling.
    """

    def __init__(self, name: str = "old") -> None:
        self.clock = Clock()
        self.factory = DemoStoreFactory(name, self.clock)
        self.transport = StringTransport()
        self.server = self.factory.buildProtocol(None)
        self.server.makeConnection(self.transport)

    def send(self, data: bytes) -> bytes:
        """
        Send C{data}, let the server finish, and return what it wrote.
        """
        self.transport.clear()
        self.server.dataReceived(data)
        # FETCH output runs on the cooperator (the clock) and the message
        # body is a pull producer, which a StringTransport never pulls.
        for _ in range(50):
            self.clock.advance(0)
            if self.transport.producer is not None and not self.transport.streaming:
                self.transport.producer.resumeProducing()
        return self.transport.value()

    def close(self) -> None:
        """
        Disconnect, which cancels the server's idle timeout.
        """
        self.server.connectionLost(Failure(ConnectionDone()))


class StoreProtocolTests(SynchronousTestCase):
    """
    The demo server's IMAP dialogue, byte for byte.
    """

    def setUp(self) -> None:
        self.session = StoreSession()
        self.addCleanup(self.session.close)

    def test_greeting(self) -> None:
        """
        The greeting names the server and does not advertise ID: the proxy
        must not rely on it.
        """
        self.assertEqual(
            self.session.transport.value(),
            b"* OK [CAPABILITY IMAP4rev1 NAMESPACE IDLE] mailproxy demo server 'old' ready\r\n",
        )

    def test_loginSelectFetch(self) -> None:
        """
        A LOGIN with the demo password succeeds, INBOX holds the welcome
        message, and FETCH sends its text, which names the server.
        """
        self.assertEqual(
            self.session.send(b"a LOGIN alice@example.org demo\r\n"),
            b"a OK LOGIN succeeded\r\n",
        )
        validity = self.session.factory.account("alice@example.org").select("INBOX").uidValidity
        self.assertEqual(
            self.session.send(b"b SELECT INBOX\r\n"),
            b"* 1 EXISTS\r\n"
            b"* 0 RECENT\r\n"
            b"* FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft)\r\n"
            b"* OK [UIDVALIDITY %d]\r\n"
            b"b OK [READ-WRITE] SELECT successful\r\n" % (validity,),
        )
        self.assertEqual(
            self.session.send(b"c UID FETCH 1:* (FLAGS BODY[TEXT])\r\n"),
            b"* 1 FETCH (FLAGS () BODY[TEXT] {%d}\r\n%b UID 1)\r\n"
            b"c OK FETCH completed\r\n" % (len(ALICE_TEXT_ON_OLD), ALICE_TEXT_ON_OLD),
        )

    def test_userNameIgnoresCase(self) -> None:
        """
        The login name matches in any case, as the route table's does.
        """
        self.assertEqual(
            self.session.send(b"a LOGIN Alice@Example.ORG demo\r\n"),
            b"a OK LOGIN succeeded\r\n",
        )

    def test_wrongPassword(self) -> None:
        """
        A wrong password gets NO, and the session stays usable.
        """
        self.assertEqual(
            self.session.send(b"a LOGIN alice@example.org wrong\r\n"),
            b"a NO LOGIN failed\r\n",
        )
        self.assertEqual(
            self.session.send(b"b LOGIN alice@example.org demo\r\n"),
            b"b OK LOGIN succeeded\r\n",
        )

    def test_unknownUser(self) -> None:
        """
        An account the demo does not have gets NO.
        """
        self.assertEqual(
            self.session.send(b"a LOGIN carol@example.org demo\r\n"),
            b"a NO LOGIN failed\r\n",
        )

    def test_noID(self) -> None:
        """
        Twisted's IMAP server answers ID with BAD, which is why the demo
        configuration does not forward the client's identity.
        """
        self.assertEqual(self.session.send(b"a ID NIL\r\n"), b"a BAD Unsupported command\r\n")

    def test_otherServersCopy(self) -> None:
        """
        Each server holds every account; the copy on the server an account is
        not routed to says where the route table first sends it.
        """
        session = StoreSession("new")
        self.addCleanup(session.close)
        session.send(b"a LOGIN alice@example.org demo\r\n")
        session.send(b"b SELECT INBOX\r\n")
        text = session.send(b"c FETCH 1 BODY[TEXT]\r\n")
        self.assertIn(b"this message lives on the demo server 'new'.", text)
        self.assertIn(b"The demo starts with routes.toml sending alice@example.org\r\nto 'old'", text)

    def test_storeAndExpunge(self) -> None:
        """
        Flags can be set and deleted messages expunged.
        """
        self.session.send(b"a LOGIN bob@example.org demo\r\n")
        self.session.send(b"b SELECT INBOX\r\n")
        self.assertEqual(
            self.session.send(b"c STORE 1 +FLAGS (\\Deleted)\r\n"),
            b"* 1 FETCH (FLAGS (\\Deleted))\r\nc OK STORE completed\r\n",
        )
        self.assertEqual(
            self.session.send(b"d EXPUNGE\r\n"),
            b"* 1 EXPUNGE\r\nd OK EXPUNGE completed\r\n",
        )

    def test_timeoutOnInjectedClock(self) -> None:
        """
        The server's idle timeout runs on the injected clock, not on the
        global reactor.
        """
        self.session.clock.advance(self.session.server.timeOut)  # type: ignore[attr-defined]
        self.assertIn(b"* BYE Autologout", self.session.transport.value())
        self.assertTrue(self.session.transport.disconnecting)


class MailboxTests(SynchronousTestCase):
    """
    L{DemoMailbox} on its own.
    """

    def mailbox(self, count: int) -> DemoMailbox:
        """
        A mailbox with C{count} messages, whose UIDs start at 11.
        """
        box = DemoMailbox(uidValidity=7, uidNext=11)
        for n in range(count):
            box.addMessage(b"Subject: %d\r\n\r\nbody %d\r\n" % (n, n))
        return box

    def test_starBySequence(self) -> None:
        """
        C{*} in a sequence set is the last message.
        """
        box = self.mailbox(3)
        found = box.fetch(imap4.parseIdList(b"2:*"), uid=False)
        self.assertEqual([(seq, m.uid) for seq, m in found], [(2, 12), (3, 13)])

    def test_starByUID(self) -> None:
        """
        C{*} in a UID set is the highest UID, so C{n:*} beyond it still
        names the last message (RFC 3501, 6.4.8).
        """
        box = self.mailbox(3)
        found = box.fetch(imap4.parseIdList(b"50:*"), uid=True)
        self.assertEqual([(seq, m.uid) for seq, m in found], [(3, 13)])

    def test_empty(self) -> None:
        """
        An empty mailbox answers any set with nothing.
        """
        self.assertEqual(self.mailbox(0).fetch(imap4.parseIdList(b"1:*"), uid=True), [])

    def test_expungeOrder(self) -> None:
        """
        Expunged sequence numbers come highest first, so each EXPUNGE
        response is right after the ones before it renumbered the rest.
        """
        box = self.mailbox(4)
        box.store(imap4.parseIdList(b"1,3"), ["\\Deleted"], 1, uid=False)
        self.assertEqual(box.expunge(), [3, 1])
        self.assertEqual([m.uid for m in box.messages], [12, 14])
        self.assertEqual(box.getUIDNext(), 15)

    def test_storeModes(self) -> None:
        """
        STORE adds (1), removes (-1) or replaces (0) flags.
        """
        box = self.mailbox(1)
        one = imap4.parseIdList(b"1")
        self.assertEqual(box.store(one, ["\\Seen", "\\Flagged"], 1, uid=False), {1: ["\\Seen", "\\Flagged"]})
        self.assertEqual(box.store(one, ["\\Seen"], -1, uid=False), {1: ["\\Flagged"]})
        self.assertEqual(box.store(one, ["\\Draft"], 0, uid=False), {1: ["\\Draft"]})
        self.assertEqual(box.getUnseenCount(), 1)

    def test_headers(self) -> None:
        """
        Header fields are found in any case, or all but the named ones.
        """
        message = self.mailbox(1).messages[0]
        self.assertEqual(message.getHeaders(False, b"SUBJECT"), {"subject": "0"})
        self.assertEqual(message.getHeaders(True, "subject"), {})
        self.assertEqual(message.getBodyFile().read(), b"body 0\r\n")

    def test_newMessagesNotified(self) -> None:
        """
        A session that selected the mailbox hears of appended messages.
        """
        box = self.mailbox(1)
        heard: list[tuple[Any, Any]] = []

        class Listener:
            def newMessages(self, exists: Any, recent: Any) -> None:
                heard.append((exists, recent))

        box.addListener(Listener())
        box.addMessage(b"Subject: x\r\n\r\n")
        self.assertEqual(heard, [(2, None)])


def request(user: str) -> RouteRequest:
    """
    A LOGIN route request for C{user}.
    """
    return RouteRequest(
        protocol="imap",
        credentials=Credentials("LOGIN", user, DEMO_PASSWORD.encode()),
        client=ClientInfo("s", "127.0.0.1", 40000, "127.0.0.1", 10993),
    )


class ConfigurationTests(SynchronousTestCase):
    """
    The configuration and route table the demo writes.
    """

    def test_routes(self) -> None:
        """
        The written configuration loads, and its router sends each demo user
        to its home server, by the port the demo server listens on.
        """
        from mailproxy._tls import makeSelfSigned

        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        certificate, key = makeSelfSigned(directory)
        path = writeDemoConfig(directory, certificate, key, 10993, 10143, {"old": 4001, "new": 4002})
        config = loadConfig(path)
        self.assertEqual(
            [(l.endpoint, l.tls) for l in config.listeners],
            [
                ("tcp:10993:interface=127.0.0.1", "implicit"),
                ("tcp:10143:interface=127.0.0.1", "starttls-required"),
            ],
        )
        self.assertEqual(config.tls.certificate, certificate)  # type: ignore[union-attr]
        self.assertEqual(config.admin.endpoint, "tcp:19443:interface=127.0.0.1")  # type: ignore[union-attr]
        self.assertEqual(
            {name: (b.port("imap"), b.tls, b.forward) for name, b in config.backends.items()},
            {"old": (4001, "none", "none"), "new": (4002, "none", "none")},
        )
        router = buildRouter(config, Clock())
        for user in DEMO_USERS:
            route = router.route(request(user.address))
            self.assertIsInstance(route, Route)
            self.assertEqual(route.backend.name, user.home)

    def test_relativePaths(self) -> None:
        """
        Files inside the directory are named relative to it, so the directory
        can be copied elsewhere as a starting point.
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        path = writeDemoConfig(
            directory, os.path.join(directory, "c.pem"), "/elsewhere/k.pem", 1, 2, {"old": 3}
        )
        with open(path, "rb") as f:
            data = tomllib.load(f)
        self.assertEqual(data["tls"], {"certificate": "c.pem", "key": "/elsewhere/k.pem"})
        self.assertEqual(data["router"], {"type": "static", "path": "routes.toml"})
        self.assertEqual(data["admin"]["token_file"], "admin.token")

    def test_token(self) -> None:
        """
        Each write makes a new token of 64 hexadecimal digits, in a file
        only its owner can read, whatever mode an older one had.
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        tokenPath = os.path.join(directory, "admin.token")
        tokens = []
        for _ in range(2):
            writeDemoConfig(directory, "c.pem", "k.pem", 1, 2, {})
            self.assertEqual(stat.S_IMODE(os.stat(tokenPath).st_mode), 0o600)
            with open(tokenPath, encoding="ascii") as f:
                tokens.append(f.read())
            os.chmod(tokenPath, 0o644)
        for token in tokens:
            self.assertRegex(token, "^[0-9a-f]{64}\n$")
        self.assertNotEqual(tokens[0], tokens[1])

    def test_quoting(self) -> None:
        """
        File names with quotes, backslashes and control characters survive
        the trip through TOML.
        """
        awkward = 'a "b" \\c\td\x7f.pem'
        data = tomllib.loads(demoConfig(awkward, "k", 1, 2, {}))
        self.assertEqual(data["tls"]["certificate"], awkward)

    def test_routeTable(self) -> None:
        """
        The route table names each demo account and nothing else.
        """
        self.assertEqual(
            tomllib.loads(demoRoutes()),
            {"accounts": {"alice@example.org": "old", "bob@example.org": "new"}},
        )

    def test_mailproxyCommand(self) -> None:
        """
        The printed commands call C{mailproxy} by name when that is the
        script beside the running Python, else by the script's path (a
        virtualenv not on C{$PATH}); without such a script, by name.
        """
        bin = os.path.abspath(self.mktemp())
        os.makedirs(bin)
        python = os.path.join(bin, "python")
        script = os.path.join(bin, "mailproxy")
        self.assertEqual(mailproxyCommand(python, lambda name: None), "mailproxy")
        with open(script, "w") as f:
            f.write("#!/bin/sh\n")
        os.chmod(script, 0o755)
        self.assertEqual(mailproxyCommand(python, lambda name: None), script)
        self.assertEqual(mailproxyCommand(python, lambda name: "/usr/bin/mailproxy"), script)
        self.assertEqual(mailproxyCommand(python, lambda name: script), "mailproxy")

    def test_defaultDirectory(self) -> None:
        """
        The demo's directory is under C{$XDG_STATE_HOME}, or
        C{~/.local/state} without it.
        """
        self.assertEqual(
            defaultDirectory({"XDG_STATE_HOME": "/var/x"}), "/var/x/mailproxy-demo"
        )
        self.assertEqual(
            defaultDirectory({}),
            os.path.join(os.path.expanduser("~"), ".local", "state", "mailproxy-demo"),
        )


class StoreOverTCPTests(TestCase):
    """
    A demo server on a real loopback socket, driven by Twisted's IMAP client.
    """

    @inlineCallbacks
    def test_loginAndFetch(self) -> Any:
        """
        Twisted's IMAP client logs in, selects INBOX and fetches the welcome
        message, which says it lives on this server.
        """
        port = reactor.listenTCP(0, DemoStoreFactory("new", reactor), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        greeted: Deferred[None] = Deferred()

        class Client(imap4.IMAP4Client):
            def serverGreeting(self, capabilities: Any) -> None:
                greeted.callback(None)

        client = yield ClientCreator(reactor, Client).connectTCP(
            "127.0.0.1", port.getHost().port  # type: ignore[attr-defined]
        )
        self.addCleanup(client.transport.loseConnection)
        yield greeted
        yield client.login(b"bob@example.org", DEMO_PASSWORD.encode())
        selected = yield client.select("INBOX")
        self.assertEqual(selected["EXISTS"], 1)
        result = yield client.fetchSpecific("1", headerType="TEXT")
        text = result[1][0][2]
        self.assertIn("this message lives on the demo server 'new'.", text)
        yield client.logout()


def runWithInput(argv: list[str], data: bytes) -> tuple[bytes, bytes, int]:
    """
    Run C{argv} with C{data} on its standard input, waiting at most 20
    seconds.

    @return: its standard output, standard error and exit status.
    """
    import subprocess

    result = subprocess.run(argv, input=data, capture_output=True, timeout=20)
    return result.stdout, result.stderr, result.returncode


def closeQuietly(client: imaplib.IMAP4) -> None:
    """
    Close an IMAP client's socket, whatever state the session is in.
    """
    try:
        client.shutdown()
    except OSError:
        pass


def readInbox(
    port: int, user: str, password: str, cafile: str, starttls: bool = False
) -> bytes:
    """
    Log in through the proxy with Python's imaplib, verifying the demo's
    certificate, and return the text of the first message in INBOX.
    """
    context = ssl.create_default_context(cafile=cafile)
    client: imaplib.IMAP4
    if starttls:
        client = imaplib.IMAP4("127.0.0.1", port, timeout=20)
        client.starttls(context)
    else:
        client = imaplib.IMAP4_SSL("127.0.0.1", port, ssl_context=context, timeout=20)
    try:
        client.login(user, password)
        client.select("INBOX")
        return client.fetch("1", "(BODY[TEXT])")[1][0][1]  # type: ignore[index, return-value]
    finally:
        try:
            client.logout()
        except (imaplib.IMAP4.error, OSError):
            pass


class DemoTests(TestCase):
    """
    The whole demo, through the proxy, with real clients.
    """

    timeout = 60

    @inlineCallbacks
    def setUp(self) -> Any:  # type: ignore[override]
        self.directory = os.path.abspath(self.mktemp())
        self.demo = yield Deferred.fromCoroutine(
            startDemo(reactor, self.directory, imapsPort=0, imapPort=0, adminPort=0)
        )
        self.addCleanup(self.demo.stop)

    def read(self, user: str, password: str = DEMO_PASSWORD, starttls: bool = False) -> Deferred[bytes]:
        """
        L{readInbox} in a thread, through this test's demo.
        """
        port = self.demo.imapPort if starttls else self.demo.imapsPort
        return deferToThread(readInbox, port, user, password, self.demo.certificatePath, starttls)

    @inlineCallbacks
    def test_implicitTLS(self) -> Any:
        """
        Through the implicit TLS listener, alice reads her INBOX on 'old'.
        """
        text = yield self.read("alice@example.org")
        self.assertEqual(text, ALICE_TEXT_ON_OLD)

    @inlineCallbacks
    def test_starttls(self) -> Any:
        """
        Through the STARTTLS listener, bob reads his INBOX on 'new'.
        """
        text = yield self.read("bob@example.org", starttls=True)
        self.assertIn(b"this message lives on the demo server 'new'.", text)

    @inlineCallbacks
    def test_wrongPassword(self) -> Any:
        """
        A wrong password is refused.
        """
        yield self.assertFailure(self.read("alice@example.org", "wrong"), imaplib.IMAP4.error)

    @inlineCallbacks
    def test_unknownAccount(self) -> Any:
        """
        An account the route table does not name is refused, though the
        password is the demo's.
        """
        yield self.assertFailure(self.read("carol@example.org"), imaplib.IMAP4.error)

    @inlineCallbacks
    def test_moveAccount(self) -> Any:
        """
        Editing the route table moves an account while the demo runs: alice's
        next session reads the 'new' server's copy.
        """
        routes = os.path.join(self.directory, "routes.toml")
        with open(routes, encoding="utf-8") as f:
            text = f.read()
        with open(routes + ".tmp", "w", encoding="utf-8") as f:
            f.write(text.replace('"alice@example.org" = "old"', '"alice@example.org" = "new"'))
        os.replace(routes + ".tmp", routes)
        for _ in range(40):
            body = yield self.read("alice@example.org")
            if b"'new'" in body:
                break
            yield deferLater(reactor, 0.25, lambda: None)
        self.assertIn(b"this message lives on the demo server 'new'.", body)

    @inlineCallbacks
    def test_printedCommands(self) -> Any:
        """
        The curl and Python commands the demo prints work as printed and show
        the message from the server the account is routed to.
        """
        printed = instructions(self.demo)
        ran = 0
        for what, user, argv in clientCommands(self.demo):
            self.assertIn(argv[-1] if argv[0] == "curl" else argv[0], printed)
            executable = sys.executable if argv[0] == "python3" else shutil.which(argv[0])
            if executable is None:
                continue
            out, err, code = yield getProcessOutputAndValue(
                executable, argv[1:], env=os.environ
            )
            self.assertEqual(code, 0, f"{what}: {err!r}")
            self.assertIn(
                f"this message lives on the demo server {user.home!r}.".encode(), out, what
            )
            ran += 1
        self.assertGreaterEqual(ran, 1)

    def test_instructions(self) -> None:
        """
        The printout names the ports, the certificate and the configuration.
        """
        printed = instructions(self.demo)
        self.assertIn(f"imaps://127.0.0.1:{self.demo.imapsPort}/INBOX;UID=1", printed)
        self.assertIn(f"imap://127.0.0.1:{self.demo.imapPort}/INBOX;UID=1", printed)
        self.assertIn(self.demo.certificatePath, printed)
        self.assertIn(os.path.join(self.directory, "mailproxy.toml"), printed)
        self.assertIn(
            f"edit {os.path.join(self.directory, 'routes.toml')}\n"
            'to say "alice@example.org" = "new"',
            printed,
        )
        for name, port in self.demo.storePorts.items():
            self.assertIn(f"127.0.0.1:{port}", printed)
        self.assertIn(
            f"management endpoint   127.0.0.1:{self.demo.adminPort}  "
            f"(HTTP, token in {os.path.join(self.directory, 'admin.token')})",
            printed,
        )

    def test_sClientLine(self) -> None:
        """
        The s_client line names the server, so that the certificate's name
        is checked and s_client has a name to report.
        """
        printed = instructions(self.demo)
        self.assertIn(
            f"openssl s_client -quiet -crlf -CAfile {self.demo.certificatePath} "
            f"-servername localhost -connect 127.0.0.1:{self.demo.imapsPort}\n",
            printed,
        )

    @inlineCallbacks
    def test_sClient(self) -> Any:
        """
        The printed s_client line, with the printed commands typed, reads
        alice's INBOX, on the implicit TLS port and with C{-starttls imap}
        on the other, and says nothing on stderr but the verification.
        """
        printed = instructions(self.demo)
        [line] = [l for l in printed.splitlines() if "openssl s_client" in l]
        argv = shlex.split(line)
        typed = b"".join(
            l.strip().encode() + b"\n"
            for l in printed.splitlines()
            if l.strip()[:2] in ("a ", "b ", "c ", "d ")
        )
        self.assertIn(f"(add -starttls imap for port {self.demo.imapPort})", printed)
        starttls = argv[:-1] + [f"127.0.0.1:{self.demo.imapPort}", "-starttls", "imap"]
        for command in (argv, starttls):
            out, err, code = yield deferToThread(runWithInput, command, typed)
            self.assertEqual(code, 0, err)
            self.assertIn(b"this message lives on the demo server 'old'.", out)
            self.assertIn(b"d OK LOGOUT", out)
            self.assertNotIn(b"SSL_get_servername", err)
            self.assertIn(b"verify return:1", err)

    @inlineCallbacks
    def test_adminCommands(self) -> Any:
        """
        The operations commands the demo prints work as printed, against the
        configuration it wrote: explain names alice's rule and backend,
        sessions lists her open session, move moves her and drops it, and
        /metrics answers with the token.
        """
        program = self.wrapper()
        printed = instructions(self.demo, program)
        commands = dict(adminCommands(self.demo, program))
        for line in commands.values():
            self.assertIn(f"\n  {line}\n", printed)
        client = yield deferToThread(self.login, "alice@example.org")
        self.addCleanup(closeQuietly, client)

        out = yield self.shell(commands["explain"])
        self.assertIn("rule:    accounts['alice@example.org']\nbackend: old\n", out)
        out = yield self.shell(commands["sessions"])
        self.assertIn(" imap relay alice@example.org old 127.0.0.1:", out)
        self.assertTrue(out.endswith("\n1 session\n"), out)
        out = yield self.shell(commands["move"])
        self.assertEqual(out, "changed: alice@example.org: old -> new\n1 open session dropped\n")
        out = yield self.shell(commands["explain"])
        self.assertIn("backend: new\n", out)
        out = yield self.shell(commands["metrics"])
        self.assertIn('mailproxy_logins_total{backend="old",protocol="imap",result="ok"} 1.0', out)
        text = yield self.read("alice@example.org")
        self.assertIn(b"this message lives on the demo server 'new'.", text)

    def wrapper(self) -> str:
        """
        A C{mailproxy} command that runs this checkout's code, to stand in
        for the installed one in the printed lines.
        """
        path = os.path.abspath(self.mktemp())
        checkout = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        with open(path, "w", encoding="utf-8") as f:
            f.write(
                "#!/bin/sh\n"
                f"PYTHONPATH={shlex.quote(checkout)} exec {shlex.quote(sys.executable)} -c "
                "'import sys; from mailproxy.cli import main; sys.exit(main(sys.argv[1:]))' \"$@\"\n"
            )
        os.chmod(path, 0o755)
        return path

    @inlineCallbacks
    def shell(self, line: str) -> Any:
        """
        Run a printed line with C{sh}; it must succeed.

        @return: a L{Deferred} that fires with its standard output.
        """
        out, err, code = yield getProcessOutputAndValue("/bin/sh", ["-c", line], env=os.environ)
        self.assertEqual(code, 0, f"{line}: {err!r}")
        return out.decode("utf-8")

    def login(self, user: str) -> imaplib.IMAP4_SSL:
        """
        An IMAP session through the proxy, logged in as C{user}, left open.
        """
        context = ssl.create_default_context(cafile=self.demo.certificatePath)
        client = imaplib.IMAP4_SSL("127.0.0.1", self.demo.imapsPort, ssl_context=context, timeout=20)
        client.login(user, DEMO_PASSWORD)
        return client


class DemoPortTests(TestCase):
    """
    Ports the kernel chooses: the demo and the proxy say which.
    """

    @inlineCallbacks
    def test_chosenPortsLogged(self) -> Any:
        """
        With port 0, each proxy listener logs the address it listens on,
        and the running demo reports the same ports.
        """
        from twisted.logger import formatEvent

        with capturedLogs() as events:
            demo = yield Deferred.fromCoroutine(startDemo(reactor, os.path.abspath(self.mktemp()), 0, 0, 0))
        self.addCleanup(demo.stop)
        lines = [formatEvent(e) for e in events if "listening on" in e.get("log_format", "")]
        self.assertEqual(
            lines,
            [
                f"listener[0] (imap, tls=implicit) listening on 127.0.0.1:{demo.imapsPort}",
                f"listener[1] (imap, tls=starttls-required) listening on 127.0.0.1:{demo.imapPort}",
                f"admin listening on 127.0.0.1:{demo.adminPort}",
            ],
        )
        self.assertNotIn(0, (demo.imapsPort, demo.imapPort, demo.adminPort))

    @inlineCallbacks
    def test_chosenPortsWritten(self) -> Any:
        """
        With port 0, the configuration file is written again with the ports
        the kernel chose, so that the commands that read it reach this
        proxy; the route table and the token stay as the proxy read them.
        """
        directory = os.path.abspath(self.mktemp())
        demo = yield Deferred.fromCoroutine(startDemo(reactor, directory, 0, 0, 0))
        self.addCleanup(demo.stop)
        config = loadConfig(demo.configPath)
        self.assertEqual(
            [l.endpoint for l in config.listeners],
            [f"tcp:{demo.imapsPort}:interface=127.0.0.1", f"tcp:{demo.imapPort}:interface=127.0.0.1"],
        )
        self.assertEqual(config.admin.endpoint, f"tcp:{demo.adminPort}:interface=127.0.0.1")  # type: ignore[union-attr]
        self.assertEqual(
            config.admin.token,  # type: ignore[union-attr]
            demo.service.admin.guard.token,  # type: ignore[attr-defined]
        )


class DemoStartFailureTests(TestCase):
    """
    A demo that cannot start leaves nothing behind.
    """

    @inlineCallbacks
    def startWithPortTaken(self, which: str) -> Any:
        """
        Start the demo with its port C{which} (a L{startDemo} argument) on a
        port that is taken and its other ports chosen by the kernel, which
        must fail with L{ListenError}.

        @return: the events logged meanwhile and the configuration the demo
            wrote.
        """
        taken = reactor.listenTCP(0, DemoStoreFactory("x", reactor), interface="127.0.0.1")
        self.addCleanup(taken.stopListening)
        directory = os.path.abspath(self.mktemp())
        ports = {"imapsPort": 0, "imapPort": 0, "adminPort": 0}
        ports[which] = taken.getHost().port  # type: ignore[attr-defined]
        with capturedLogs() as events:
            yield self.assertFailure(
                Deferred.fromCoroutine(startDemo(reactor, directory, **ports)),
                ListenError,
            )
        return events, loadConfig(os.path.join(directory, "mailproxy.toml"))

    def assertClosed(self, ports: list[int], config: Any) -> None:
        """
        C{ports} and the ports of C{config}'s demo servers can be bound
        again: nothing listens there any more.
        """
        for port in ports + [b.port("imap") for b in config.backends.values()]:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port))

    @inlineCallbacks
    def test_portInUse(self) -> Any:
        """
        If the STARTTLS port is taken, startDemo fails with
        L{ListenError} and closes the listeners it had opened: the
        implicit TLS port and the demo servers.
        """
        events, config = yield self.startWithPortTaken("imapPort")
        # The port the kernel chose for the implicit TLS listener, as logged.
        [imapsPort] = [e["port"] for e in events if e.get("name", "").startswith("listener[0] ")]
        self.assertClosed([imapsPort], config)

    @inlineCallbacks
    def test_adminPortInUse(self) -> Any:
        """
        If the management endpoint's port is taken, startDemo fails with
        L{ListenError} and closes both proxy listeners, which had
        started, and the demo servers.
        """
        events, config = yield self.startWithPortTaken("adminPort")
        ports = [e["port"] for e in events if e.get("name", "").startswith("listener[")]
        self.assertEqual(len(ports), 2)
        self.assertClosed(ports, config)
