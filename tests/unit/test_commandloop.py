"""
What every command-loop front end shares (L{mailproxy._commandloop}).
"""

from __future__ import annotations

from base64 import b64encode
from typing import Any, cast

from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from mailproxy._session import CLOSE_GRACE
from mailproxy.config import Limits
from mailproxy.model import Rejection, Route
from mailproxy.testing import FakeRouter, MemoryConnector, SocketBufferTransport, makeBackend, makeFrontend


class LoginHandlingFailedTests(SynchronousTestCase):
    """
    A bug while answering a login ends the session with the protocol's
    goodbye; a cancelled login (the session already ended) is quiet.
    """

    def frontend(self, protocol: str):
        frontend, client, _ = makeFrontend(protocol, FakeRouter({"a": Route(makeBackend())}))
        client.clear()
        return frontend, client

    def test_goodbyes(self) -> None:
        """
        IMAP says C{* BYE}, POP3 C{-ERR [SYS/TEMP]}, ManageSieve C{BYE}, and
        the connection closes; the error is logged.
        """
        expected = {
            "imap": b"* BYE Internal error.\r\n",
            "pop3": b"-ERR [SYS/TEMP] Internal error.\r\n",
            "sieve": b'BYE "Internal error."\r\n',
        }
        for protocol, goodbye in expected.items():
            frontend, client = self.frontend(protocol)
            frontend.loginHandlingFailed(Failure(RuntimeError("boom")))
            self.assertEqual(client.value(), goodbye, protocol)
            self.assertTrue(client.disconnecting, protocol)
            self.assertEqual(frontend.result, "internal error")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 3)

    def test_cancelledIsQuiet(self) -> None:
        """
        A cancelled login writes nothing and keeps the connection.
        """
        frontend, client = self.frontend("imap")
        frontend.loginHandlingFailed(Failure(CancelledError()))
        self.assertEqual(client.value(), b"")
        self.assertFalse(client.disconnecting)


#: Replies written after the buffer is full: the rest of the command being
#: answered, at most one reply (the longest pre-login one is far shorter).
MAX_REPLY = 1024

#: Pipelined commands per flood: their replies are many times the buffer.
FLOOD = 10000


def alternate(first: bytes, second: bytes) -> list[bytes]:
    """
    C{FLOOD} commands, C{first} and C{second} by turns; C{%d} in either is
    the command's number.
    """
    return [(first if n % 2 else second).replace(b"%d", b"%d" % n) for n in range(FLOOD)]


#: For each kind of front end: the listener's options, and commands a client
#: may pipeline before login whose replies tell them apart.
FLOODS = {
    "imap": ({}, alternate(b"a%d CAPABILITY\r\n", b"a%d NOOP\r\n")),
    "pop3": ({}, alternate(b"CAPA\r\n", b"NOOP\r\n")),
    "sieve": ({}, alternate(b"CAPABILITY\r\n", b'NOOP "t%d"\r\n')),
    "submission": ({"mode": "submission"}, alternate(b"HELP\r\n", b"NOOP\r\n")),
    "mx": ({"mode": "mx"}, alternate(b"HELP\r\n", b"NOOP\r\n")),
}


class UnreadRepliesTests(SynchronousTestCase):
    """
    A client that pipelines commands and never reads the replies cannot
    make them pile up: once the transport's buffer is full, the command loop
    stops answering and reading pauses; when the client reads, the loop goes
    on where it stopped and every command is answered, in order.
    """

    def oneByOne(self, kind: str) -> bytes:
        """
        The replies to the flood of C{kind} for a client that reads each.
        """
        options, commands = FLOODS[kind]
        frontend, client, _ = makeFrontend(kind if kind in ("imap", "pop3", "sieve") else "smtp", FakeRouter(), **options)
        replies = []
        for command in commands:
            client.clear()
            frontend.dataReceived(command)
            replies.append(client.value())
        return b"".join(replies)

    def flood(self, kind: str) -> tuple[Any, SocketBufferTransport]:
        """
        A front end of C{kind} that got its flood in one piece, on a
        transport whose client has read only the greeting.
        """
        options, commands = FLOODS[kind]
        frontend, client, _ = makeFrontend(
            kind if kind in ("imap", "pop3", "sieve") else "smtp",
            FakeRouter(),
            transportClass=SocketBufferTransport,
            **options,
        )
        client.read()
        frontend.dataReceived(b"".join(commands))
        return frontend, cast(SocketBufferTransport, client)

    def assertFloodBounded(self, kind: str) -> None:
        """
        The flood of C{kind} never has more than the buffer and one reply
        waiting, pauses reading, and is answered in full and in order as
        the client reads.
        """
        expected = self.oneByOne(kind)
        self.assertGreater(len(expected), 2 * SocketBufferTransport.bufferSize)
        frontend, client = self.flood(kind)
        self.assertLessEqual(client.unread(), client.bufferSize + MAX_REPLY)
        self.assertEqual(client.producerState, "paused")
        replies = []
        while client.unread():
            self.assertLessEqual(client.unread(), client.bufferSize + MAX_REPLY)
            replies.append(client.read())
        self.assertEqual(b"".join(replies), expected)
        self.assertGreater(len(replies), 2)
        self.assertEqual(client.producerState, "producing")
        self.assertFalse(client.disconnecting)

    def test_imap(self) -> None:
        """
        IMAP: pipelined CAPABILITY and NOOP.
        """
        self.assertFloodBounded("imap")

    def test_pop3(self) -> None:
        """
        POP3: pipelined CAPA and NOOP.
        """
        self.assertFloodBounded("pop3")

    def test_sieve(self) -> None:
        """
        ManageSieve: pipelined CAPABILITY and tagged NOOP.
        """
        self.assertFloodBounded("sieve")

    def test_submission(self) -> None:
        """
        SMTP submission: pipelined HELP and NOOP.
        """
        self.assertFloodBounded("submission")

    def test_mx(self) -> None:
        """
        SMTP MX: pipelined HELP and NOOP.
        """
        self.assertFloodBounded("mx")

    def test_handOverAfterFlood(self) -> None:
        """
        A login pipelined behind a flood is answered once the client has
        read the replies before it; then the relay's producers replace the
        pre-login one, and what followed the login reaches the backend.
        """
        connector = MemoryConnector()
        frontend, client, _ = makeFrontend(
            "imap",
            FakeRouter({"alice": Route(makeBackend())}),
            connector,
            transportClass=SocketBufferTransport,
        )
        buffered = cast(SocketBufferTransport, client)
        buffered.read()
        commands = FLOODS["imap"][1]
        frontend.dataReceived(b"".join(commands) + b"b LOGIN alice secret\r\nc SELECT INBOX\r\n")
        self.assertEqual(connector.protocols, [])
        while buffered.unread():
            buffered.read()
        backend, server = connector.protocols[0], connector.transports[0]
        backend.dataReceived(b"* OK [CAPABILITY IMAP4rev1 SASL-IR ID AUTH=PLAIN] Dovecot ready.\r\n")
        server.clear()
        backend.dataReceived(b"P1 OK\r\nP2 OK [CAPABILITY IMAP4rev1] Logged in\r\n")
        self.assertEqual(buffered.read(), b"* CAPABILITY IMAP4rev1\r\nb OK [CAPABILITY IMAP4rev1] Logged in\r\n")
        self.assertEqual(server.value(), b"c SELECT INBOX\r\n")
        self.assertIs(client.producer, server)
        self.assertEqual(client.producerState, "producing")

    def test_loginAndUnreadRepliesPauseTogether(self) -> None:
        """
        Reading resumes only once neither a login nor unread replies hold
        it: replies read during a login do not resume it, nor does the end
        of a login while replies wait.
        """
        router = FakeRouter(manual=True)
        frontend, client, _ = makeFrontend(
            "imap", router, transportClass=SocketBufferTransport, limits=Limits(failureDelay=0)
        )
        buffered = cast(SocketBufferTransport, client)
        buffered.read()
        frontend.dataReceived(b"a LOGIN nobody secret\r\n")
        # Input during the login stops reading.
        frontend.dataReceived(b"b NOOP\r\n")
        self.assertEqual(client.producerState, "paused")
        # The transport's buffer fills and drains while the router thinks.
        buffered.producer.pauseProducing()
        buffered.producer.resumeProducing()
        self.assertEqual(client.producerState, "paused")
        # It fills again; the login ends meanwhile.
        buffered.producer.pauseProducing()
        buffered.producerPaused = True
        router.pending[0].callback(Rejection())
        self.assertEqual(client.producerState, "paused")
        self.assertEqual(buffered.read(), b"a NO [AUTHENTICATIONFAILED] Authentication failed.\r\n")
        self.assertEqual(client.producerState, "producing")

    def test_closeAfterFlood(self) -> None:
        """
        A goodbye pipelined behind a flood comes after every other reply,
        and the connection closes with no producer left registered (TLS
        sends its close alert only then).
        """
        frontend, client = self.flood("pop3")
        frontend.dataReceived(b"QUIT\r\n")
        replies = b""
        while client.unread():
            replies += client.read()
        self.assertTrue(replies.endswith(b"\r\n.\r\n+OK Logging out.\r\n"))
        self.assertTrue(client.disconnecting)
        self.assertIsNone(client.producer)


#: For each kind of front end: its listener's options and what a client
#: sends that makes the proxy close the connection.
CLOSES = {
    "IMAP LOGOUT": ("imap", {}, b"a LOGOUT\r\n"),
    "IMAP line too long": ("imap", {}, b"a NOOP " + b"x" * 70000),
    "IMAP bad commands": ("imap", {}, b"a BOGUS\r\n" * 10),
    "IMAP failed logins": ("imap", {}, b"a LOGIN x y\r\n" * 3),
    "POP3 QUIT": ("pop3", {}, b"QUIT\r\n"),
    "POP3 bad commands": ("pop3", {}, b"BOGUS\r\n" * 3),
    "POP3 failed logins": ("pop3", {}, b"USER x\r\nPASS y\r\n" * 3),
    "ManageSieve LOGOUT": ("sieve", {}, b"LOGOUT\r\n"),
    "ManageSieve line too long": ("sieve", {}, b"NOOP " + b"x" * 70000),
    "ManageSieve bad commands": ("sieve", {}, b"BOGUS\r\n" * 10),
    "submission QUIT": ("smtp", {"mode": "submission"}, b"QUIT\r\n"),
    "submission errors": ("smtp", {"mode": "submission"}, b"BOGUS\r\n" * 20),
    "submission failed logins": (
        "smtp",
        {"mode": "submission"},
        b"EHLO c\r\n" + (b"AUTH PLAIN " + b64encode(b"\0x\0y") + b"\r\n") * 3,
    ),
    "MX QUIT": ("smtp", {"mode": "mx"}, b"QUIT\r\n"),
    "MX errors": ("smtp", {"mode": "mx"}, b"BOGUS\r\n" * 20),
}


class LoginPauseTests(SynchronousTestCase):
    """
    Reading from the client stops during a login only once the client
    sends something meanwhile: a client that waits for its login reply
    costs no pause and resume.
    """

    def counted(self, client: Any) -> list[str]:
        """
        Record the pause and resume calls on the client's transport.
        """
        calls: list[str] = []
        for name in ("pauseProducing", "resumeProducing"):
            method = getattr(client, name)
            setattr(client, name, lambda method=method, name=name: (calls.append(name), method())[1])
        return calls

    def test_quietClient(self) -> None:
        """
        A login answered while the client sends nothing else never pauses
        reading.
        """
        router = FakeRouter(manual=True)
        frontend, client, _ = makeFrontend("imap", router, limits=Limits(failureDelay=0))
        calls = self.counted(client)
        frontend.dataReceived(b"a LOGIN nobody secret\r\n")
        router.pending[0].callback(Rejection())
        self.assertIn(b"a NO [AUTHENTICATIONFAILED]", client.value())
        self.assertEqual(calls, [])

    def test_inputDuringLogin(self) -> None:
        """
        Input during a login pauses reading; it is answered after the login
        reply, and reading resumes then.
        """
        router = FakeRouter(manual=True)
        frontend, client, _ = makeFrontend("imap", router, limits=Limits(failureDelay=0))
        calls = self.counted(client)
        client.clear()
        frontend.dataReceived(b"a LOGIN nobody secret\r\n")
        frontend.dataReceived(b"b NOOP\r\n")
        self.assertEqual((calls, client.producerState, client.value()), (["pauseProducing"], "paused", b""))
        router.pending[0].callback(Rejection())
        self.assertEqual(client.producerState, "producing")
        self.assertEqual(calls, ["pauseProducing", "resumeProducing"])
        replies = client.value().split(b"\r\n")
        self.assertTrue(replies[0].startswith(b"a NO [AUTHENTICATIONFAILED]"), replies)
        self.assertTrue(replies[1].startswith(b"b OK"), replies)


class CloseGraceTests(SynchronousTestCase):
    """
    Every close the proxy starts before login ends the connection within
    L{CLOSE_GRACE} seconds: a TLS client that keeps writing never answers
    the close alert, so the connection is aborted then.
    """

    def assertClosedWithinGrace(self, frontend: Any, client: Any, clock: Any, name: str) -> None:
        self.assertTrue(client.disconnecting, name)
        # The client writes on; the proxy reads none of it.
        client.clear()
        frontend.dataReceived(b"a NOOP\r\n")
        self.assertEqual(client.value(), b"", name)
        self.assertFalse(client.disconnected, name)
        clock.advance(CLOSE_GRACE)
        self.assertTrue(client.disconnected, name)

    def test_lastWords(self) -> None:
        """
        After every goodbye of every protocol (LOGOUT or QUIT, a line too
        long, too many bad commands, too many failed logins), on an
        implicit TLS listener.
        """
        for name, (protocol, options, data) in CLOSES.items():
            frontend, client, clock = makeFrontend(protocol, FakeRouter(), tls="implicit", limits=Limits(failureDelay=0), **options)
            frontend.dataReceived(data)
            clock.advance(0)
            self.assertClosedWithinGrace(frontend, client, clock, name)

    def test_tooManyConnections(self) -> None:
        """
        A connection refused for the per-address limit.
        """
        for protocol in ("imap", "pop3", "sieve", "smtp"):
            first, _, clock = makeFrontend(protocol, FakeRouter(), tls="implicit", limits=Limits(connectionsPerAddress=1))
            second = type(first)(first.context, first.listener)
            client = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.10", 50001))
            second.makeConnection(client)
            self.assertClosedWithinGrace(second, client, clock, protocol)

    def test_mxIdle(self) -> None:
        """
        An MX session closed for client silence.
        """
        limits = Limits()
        frontend, client, clock = makeFrontend("smtp", FakeRouter(), tls="implicit", mode="mx", limits=limits)
        clock.advance(limits.preauthTimeout)
        self.assertClosedWithinGrace(frontend, client, clock, "MX idle")

    def test_preauthTimeout(self) -> None:
        """
        A session closed by the pre-auth timeout.
        """
        limits = Limits()
        frontend, client, clock = makeFrontend("imap", FakeRouter(), tls="implicit", limits=limits)
        clock.advance(limits.preauthTimeout)
        self.assertClosedWithinGrace(frontend, client, clock, "pre-auth timeout")
