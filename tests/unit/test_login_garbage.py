"""
What a whole login, over real loopback connections (a listener of the
proxy, the backend connection, the relay, the logout), leaves for Python's
garbage collector: objects in reference cycles, which reference counting
cannot free and which the collector's passes pay for (with thousands of
sessions between two passes, a pass takes tens of milliseconds, during
which no session is served).

Nothing of the session, its relay (spliced or not, guarded or not) or its
connections may be among them.
"""

from __future__ import annotations

import base64
import gc
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from mailproxy import _relay, _tcp, tap
from mailproxy._session import ProxyContext
from mailproxy.config import Limits, Listener
from mailproxy.settings import HTTPSettings
from mailproxy.model import Route
from mailproxy.tap import listenerFactory
from mailproxy.testing import FakeRouter, makeBackend

#: What the backend answers, by protocol: its greeting, then a reply per
#: command line (by the command's first word, upper case).
ANSWERS = {
    "imap": (
        b"* OK [CAPABILITY IMAP4rev1 SASL-IR ID LITERAL+ AUTH=PLAIN] ready.\r\n",
        {
            b"AUTHENTICATE": b"{tag} OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n",
            b"LOGIN": b"{tag} OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n",
            b"LOGOUT": b"* BYE Logging out\r\n{tag} OK Logout completed.\r\n",
        },
    ),
    "pop3": (
        b"+OK Dovecot ready.\r\n",
        {
            b"CAPA": b"+OK\r\nUSER\r\nPIPELINING\r\n.\r\n",
            b"USER": b"+OK\r\n",
            b"PASS": b"+OK Logged in.\r\n",
            b"QUIT": b"+OK Logging out.\r\n",
        },
    ),
}

#: What the client says, by protocol, and the line after which it has
#: nothing more to wait for but the close.
CLIENT = {
    "imap": (b"a LOGIN alice secret\r\n", b"a OK", b"b LOGOUT\r\n"),
    "pop3": (b"USER alice\r\nPASS secret\r\n", b"+OK Logged in.", b"QUIT\r\n"),
}


class ScriptedBackend(Protocol):
    """
    A backend answering each command line from L{ANSWERS}, closing after
    the logout.
    """

    def __init__(self, protocol: str) -> None:
        self.greeting, self.answers = ANSWERS[protocol]
        self.buffer = b""

    def connectionMade(self) -> None:
        self.transport.write(self.greeting)

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\r\n", 1)
            words = line.split(b" ")
            tagged = self.greeting.startswith(b"*")
            tag, command = (words[0], words[1].upper()) if tagged else (b"", words[0].upper())
            self.transport.write(self.answers[command].replace(b"{tag}", tag))
            if command in (b"LOGOUT", b"QUIT"):
                self.transport.loseConnection()


class LoggingOutClient(Protocol):
    """
    A client that logs in, logs out once logged in, and says when the
    proxy closed the connection.
    """

    def __init__(self, protocol: str) -> None:
        self.login, self.loggedIn, self.logout = CLIENT[protocol]
        self.received = b""
        self.greeted = False
        self.closed: Deferred[bytes] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if not self.greeted and b"\r\n" in self.received:
            self.greeted = True
            self.transport.write(self.login)
        elif self.loggedIn in self.received and self.logout:
            self.transport.write(self.logout)
            self.logout = b""

    def connectionLost(self, reason: object = None) -> None:
        self.closed.callback(self.received)


class OneShotFactory(ClientFactory):
    """
    Hands its one protocol to the connection and keeps no reference to it.
    """

    def __init__(self, protocol: Protocol) -> None:
        self.protocol: Protocol | None = protocol

    def buildProtocol(self, addr: object) -> Protocol | None:
        protocol, self.protocol = self.protocol, None
        return protocol


class HTTPBackend(Protocol):
    """
    A web server answering one request, then closing as the request asked.
    """

    def dataReceived(self, data: bytes) -> None:
        if data.endswith(b"\r\n\r\n"):
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
            self.transport.loseConnection()


class HTTPClient(Protocol):
    """
    A web client sending one request with credentials and C{Connection:
    close}, saying when the proxy closed the connection.
    """

    def __init__(self) -> None:
        self.received = b""
        self.closed: Deferred[bytes] = Deferred()

    def connectionMade(self) -> None:
        credentials = base64.b64encode(b"alice:secret")
        self.transport.write(b"GET / HTTP/1.1\r\nHost: h\r\nAuthorization: Basic " + credentials + b"\r\nConnection: close\r\n\r\n")

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: object = None) -> None:
        self.closed.callback(self.received)


class SMTPServer(Protocol):
    """
    A mail server taking one message and a QUIT.
    """

    def connectionMade(self) -> None:
        self.buffer = b""
        self.data = False
        self.transport.write(b"220 mx.test ESMTP\r\n")

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\r\n", 1)
            if self.data:
                if line == b".":
                    self.data = False
                    self.transport.write(b"250 2.0.0 queued\r\n")
                continue
            command = line.split(b" ")[0].upper()
            if command == b"EHLO":
                self.transport.write(b"250-mx.test\r\n250-AUTH PLAIN\r\n250 PIPELINING\r\n")
            elif command == b"AUTH":
                self.transport.write(b"235 2.7.0 Authentication successful\r\n")
            elif command == b"DATA":
                self.data = True
                self.transport.write(b"354 go on\r\n")
            elif command == b"QUIT":
                self.transport.write(b"221 2.0.0 bye\r\n")
                self.transport.loseConnection()
            else:
                self.transport.write(b"250 2.1.0 ok\r\n")


class SMTPClient(Protocol):
    """
    A sending mail server (or, given a C{login} command, a submitting
    client): EHLO, one message, QUIT, each command once the reply before it
    is complete; says when the proxy closed.
    """

    def __init__(self, login: bytes = b"") -> None:
        self.received = b""
        self.script = [
            b"EHLO client.test\r\n",
            *([login] if login else []),
            b"MAIL FROM:<a@example.net>\r\n",
            b"RCPT TO:<alice@example.org>\r\n",
            b"DATA\r\n",
            b"Subject: hi\r\n\r\nhello\r\n.\r\n",
            b"QUIT\r\n",
        ]
        self.closed: Deferred[bytes] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        # A reply is complete at a line whose code is followed by a space.
        if self.script and self.received.endswith(b"\r\n") and self.received.split(b"\r\n")[-2][3:4] == b" ":
            self.transport.write(self.script.pop(0))

    def connectionLost(self, reason: object = None) -> None:
        self.closed.callback(self.received)


class SieveServer(Protocol):
    """
    A ManageSieve server: its capabilities, then OK to an AUTHENTICATE and
    to a LOGOUT, after which it closes.
    """

    def connectionMade(self) -> None:
        self.buffer = b""
        self.transport.write(b'"IMPLEMENTATION" "test"\r\n"SASL" "PLAIN"\r\n"VERSION" "1.0"\r\nOK "ready"\r\n')

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\r\n", 1)
            if line.upper().startswith(b"LOGOUT"):
                self.transport.write(b'OK "Bye."\r\n')
                self.transport.loseConnection()
            else:
                self.transport.write(b'OK "Logged in."\r\n')


class SieveClient(Protocol):
    """
    A ManageSieve client: AUTHENTICATE PLAIN once greeted, LOGOUT once
    logged in; says when the proxy closed.
    """

    def __init__(self) -> None:
        self.received = b""
        self.state = "greeting"
        self.closed: Deferred[bytes] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self.state == "greeting" and self.received.endswith(b"\r\n") and b"\r\nOK" in self.received:
            self.state = "login"
            credentials = base64.b64encode(b"\0alice\0secret")
            self.transport.write(b'AUTHENTICATE "PLAIN" "' + credentials + b'"\r\n')
        elif self.state == "login" and b'OK "Logged in' in self.received:
            self.state = "logout"
            self.transport.write(b"LOGOUT\r\n")

    def connectionLost(self, reason: object = None) -> None:
        self.closed.callback(self.received)


class LoginGarbageTests(TestCase):
    """
    Logins through a real listener to a real (in-process) backend leave
    none of the relay's splicing objects to the garbage collector.
    """

    def setUp(self) -> None:
        self.addCleanup(gc.set_debug, gc.get_debug())
        self.addCleanup(gc.enable)

    @inlineCallbacks
    def loginGarbage(self, protocol: str, logins: int = 3) -> Any:
        """
        Log in and out C{logins} times through a C{protocol} listener
        (C{"mx"} and C{"submission"} are SMTP listeners of that mode; the
        first login warms up what is made once) and return what the
        garbage collector found of the other logins.
        """
        mode = {"mx": "mx", "submission": "submission"}.get(protocol)
        if mode is not None:
            protocol = "smtp"
        server = {"http": HTTPBackend, "smtp": SMTPServer, "sieve": SieveServer}.get(protocol) or (lambda: ScriptedBackend(protocol))
        backendPort = reactor.listenTCP(0, Factory.forProtocol(server), interface="127.0.0.1")
        self.addCleanup(backendPort.stopListening)
        portName = "mx" if mode == "mx" else protocol
        backend = makeBackend("b", host="127.0.0.1", ports={portName: backendPort.getHost().port}, forward="none")
        context = ProxyContext(
            reactor=reactor, router=FakeRouter(default=Route(backend)), limits=Limits(failureDelay=0), hostname="proxy.test"
        )
        listener = Listener(
            protocol=protocol,
            endpoint="tcp:0",
            tls="none",
            mode=mode,
            http=HTTPSettings(cookieSecret=b"key", defaultBackend="b"),
        )
        port = _tcp.listenAtOnce(reactor.listenTCP(0, listenerFactory(context, listener), interface="127.0.0.1"))
        self.addCleanup(port.stopListening)
        for login in range(logins):
            if login == 1:
                gc.collect()
                gc.disable()
            login = b"AUTH PLAIN " + base64.b64encode(b"\0alice\0secret") + b"\r\n" if mode == "submission" else b""
            client = {"http": HTTPClient, "smtp": lambda: SMTPClient(login), "sieve": SieveClient}.get(
                protocol, lambda: LoggingOutClient(protocol)
            )()
            _tcp.connectAtOnce(reactor, "127.0.0.1", port.getHost().port, OneShotFactory(client), 5)
            received = yield client.closed
            done = {"http": b"\r\n\r\nok", "smtp": b"250 2.0.0 queued\r\n221 ", "sieve": b'OK "Bye."'}.get(protocol) or CLIENT[protocol][1]
            self.assertIn(done, received)
            del client
            # The proxy's side of the close runs in the turns after the client's.
            while context.sessions:
                yield deferLater(reactor, 0.01)
            yield deferLater(reactor, 0.01)
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        garbage = sorted({type(o).__module__ + "." + type(o).__qualname__ for o in gc.garbage})
        del gc.garbage[:]
        return [name for name in garbage if name.startswith(("mailproxy.", "twisted.internet.tcp."))]

    @inlineCallbacks
    def test_imap(self) -> Any:
        """
        An IMAP LOGIN and LOGOUT, relayed by splicing, leave nothing of the
        session, the splicer or the connections to the garbage collector.
        """
        self.patch(_relay, "SPLICE_AFTER", 0)
        self.assertEqual((yield self.loginGarbage("imap")), [])

    @inlineCallbacks
    def test_imapRelayedInPython(self) -> Any:
        """
        The same for a short session relayed in Python (the session's
        timers and the relay's end callback refer back to it).
        """
        self.assertEqual((yield self.loginGarbage("imap")), [])

    @inlineCallbacks
    def test_pop3(self) -> Any:
        """
        The same for a POP3 USER, PASS and QUIT, whose relay has a guard
        (which refers back to the relay).
        """
        self.assertEqual((yield self.loginGarbage("pop3")), [])

    @inlineCallbacks
    def test_http(self) -> Any:
        """
        The same for an HTTP request with Basic credentials, relayed by the
        HTTP front end (its timers refer back to it), and closed as the
        client asked.
        """
        self.assertEqual((yield self.loginGarbage("http")), [])

    @inlineCallbacks
    def test_sieve(self) -> Any:
        """
        The same for a ManageSieve AUTHENTICATE and LOGOUT.
        """
        self.assertEqual((yield self.loginGarbage("sieve")), [])

    @inlineCallbacks
    def test_smtpMX(self) -> Any:
        """
        The same for an MX session that relays one message to the
        recipient's backend (its idle timer refers back to it).
        """
        self.assertEqual((yield self.loginGarbage("mx")), [])

    @inlineCallbacks
    def test_smtpSubmission(self) -> Any:
        """
        The same for a submission session: AUTH, one message relayed
        through the guard, QUIT.
        """
        self.assertEqual((yield self.loginGarbage("submission")), [])


class CollectorTuningTests(TestCase):
    """
    The proxy's processes run the garbage collector's passes less often
    than Python's default, with what exists at start-up left out of them.
    """

    def setUp(self) -> None:
        self.addCleanup(gc.set_threshold, *gc.get_threshold())
        self.addCleanup(gc.unfreeze)

    def test_prepareProcess(self) -> None:
        """
        L{tap.prepareProcess}, which the twistd entry point and every
        worker process run before they serve, sets L{tap.GC_THRESHOLDS}
        (a young generation of 50,000 objects, not 700) and freezes the
        objects that exist by then.
        """
        gc.unfreeze()
        tap.prepareProcess()
        self.assertEqual(gc.get_threshold(), tap.GC_THRESHOLDS)
        self.assertGreaterEqual(gc.get_threshold()[0], 50_000)
        self.assertGreater(gc.get_freeze_count(), 0)
