"""
The submission guard after login: what a logged-in client may not say to
its backend, and that everything else passes untouched and in order.
"""

from __future__ import annotations

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from mailproxy._guard import IRelayLink
from mailproxy._outcomes import EndReason
from mailproxy._relay import HALF_CLOSED_IDLE, Relay
from mailproxy.smtp._base import DATA_END_TIMEOUT
from mailproxy.smtp._guard import GUARDED_LINE, SMTPGuard

from . import test_relay_sockets
from .test_smtp_submission import GREETING, POSTFIX_EHLO, SubmissionTestsMixin, plain

REFUSED = b"550 5.7.0 Error: insufficient authorization\r\n"


@implementer(IRelayLink)
class FakeLink:
    """
    A relay as the guard sees it: records what reaches each side.
    """

    def __init__(self) -> None:
        self.toBackend = b""
        self.toClient = b""
        self.held = False
        self.closed: str | None = None

    def forward(self, data: bytes) -> None:
        self.toBackend += data

    def answer(self, data: bytes) -> None:
        self.toClient += data

    def holdClient(self) -> None:
        self.held = True

    def releaseClient(self) -> None:
        self.held = False

    def close(self, reason: EndReason, detail: str = "") -> None:
        # What the session-end log will say.
        self.closed = reason.words(detail)


class SMTPGuardTests(SynchronousTestCase):
    """
    L{SMTPGuard} with a fake relay.
    """

    def setUp(self) -> None:
        self.guard = SMTPGuard()
        self.link = FakeLink()
        self.guard.attach(self.link)

    def client(self, data: bytes) -> None:
        self.guard.fromClient(data)

    def backend(self, data: bytes) -> None:
        # The relay passes the backend's octets on before the guard sees them.
        self.link.toClient += data
        self.guard.fromBackend(data)

    def test_identityCommandsRefused(self) -> None:
        """
        XCLIENT and XFORWARD, however spelt, never reach the backend; the
        client gets C{550 5.7.0}. AUTH, STARTTLS, TURN and ATRN get their
        own refusals.
        """
        self.client(
            b"XCLIENT ADDR=6.6.6.6 LOGIN=bob\r\n xclient\tLOGIN=bob\r\nXFORWARD ADDR=6.6.6.6\r\n"
            b"XCLIENT\0 LOGIN=bob\r\nAUTH PLAIN AGJvYgBzZWNyZXQ=\r\nSTARTTLS\r\nTURN\r\nATRN example.org\r\n"
        )
        self.assertEqual(self.link.toBackend, b"")
        self.assertEqual(
            self.link.toClient,
            REFUSED * 4
            + b"503 5.5.1 Error: already authenticated\r\n"
            + b"502 5.5.1 Error: command not implemented\r\n" * 3,
        )

    def test_postfixWhiteSpace(self) -> None:
        """
        Postfix's tokenizer takes vertical tab, form feed and CR for white
        space, before the command word and after it: XCLIENT and XFORWARD
        spaced that way are refused like any other.
        """
        self.client(
            b"XCLIENT\x0bLOGIN=bob\r\nXCLIENT\x0cLOGIN=bob\r\n\x0cXCLIENT LOGIN=bob\r\n"
            b" \x0bXCLIENT LOGIN=bob\r\n\rXCLIENT LOGIN=bob\r\nXFORWARD\x0cADDR=6.6.6.6\r\n"
        )
        self.assertEqual(self.link.toBackend, b"")
        self.assertEqual(self.link.toClient, REFUSED * 6)

    def test_otherCommandsForwarded(self) -> None:
        """
        Every other command goes to the backend as it came, in one write.
        """
        commands = b"EHLO client.example\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nXCLIENTX\r\nRSET\n"
        self.client(commands)
        self.assertEqual(self.link.toBackend, commands)
        self.assertEqual(self.link.toClient, b"")
        self.assertFalse(self.link.held)

    def test_refusalInOrder(self) -> None:
        """
        A refused command pipelined behind others is answered only after the
        backend answered them (a multi-line reply, split across reads,
        counts once); input behind it waits meanwhile.
        """
        self.client(b"EHLO c.example\r\nMAIL FROM:<a@example.org>\r\nXCLIENT LOGIN=bob\r\nRSET\r\n")
        self.assertEqual(self.link.toBackend, b"EHLO c.example\r\nMAIL FROM:<a@example.org>\r\n")
        self.assertTrue(self.link.held)
        self.backend(b"250-old.test\r\n250-PIPE")
        self.backend(b"LINING\r\n250 8BITMIME\r\n")
        self.assertEqual(self.link.toClient, b"250-old.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n")
        self.backend(b"250 2.1.0 Ok\r\n")
        self.assertEqual(self.link.toClient[-len(REFUSED) - 14 :], b"250 2.1.0 Ok\r\n" + REFUSED)
        self.assertFalse(self.link.held)
        self.assertEqual(self.link.toBackend, b"EHLO c.example\r\nMAIL FROM:<a@example.org>\r\nRSET\r\n")

    def test_refusedDataThenXCLIENT(self) -> None:
        """
        DATA and XCLIENT in one packet: XCLIENT waits for the backend's
        reply to DATA; a refusal (no C{354}) makes it a command, refused.
        """
        self.client(b"DATA\r\nXCLIENT ADDR=6.6.6.6 LOGIN=bob\r\n")
        self.assertEqual(self.link.toBackend, b"DATA\r\n")
        self.assertTrue(self.link.held)
        self.backend(b"554 5.5.1 Error: no valid recipients\r\n")
        self.assertEqual(self.link.toBackend, b"DATA\r\n")
        self.assertEqual(self.link.toClient, b"554 5.5.1 Error: no valid recipients\r\n" + REFUSED)

    def test_messageContentUntouched(self) -> None:
        """
        After the backend's C{354}, the message streams as it comes, lines
        that look like commands and dot-stuffed lines included; after the
        final dot, commands are read again.
        """
        self.client(b"DATA\r\nXCLIENT LOGIN=bob\r\n")
        self.backend(b"354 End data with <CR><LF>.<CR><LF>\r\n")
        self.assertEqual(self.link.toBackend, b"DATA\r\nXCLIENT LOGIN=bob\r\n")
        self.assertFalse(self.link.held)
        self.client(b"..\r\n.XCLIENT x\r\n\r")
        self.client(b"\n.")
        self.client(b"\r\nXCLIENT LOGIN=bob\r\nQUIT\r\n")
        self.assertEqual(
            self.link.toBackend, b"DATA\r\nXCLIENT LOGIN=bob\r\n..\r\n.XCLIENT x\r\n\r\n.\r\n"
        )
        self.assertTrue(self.link.held)
        self.backend(b"250 2.0.0 Ok: queued\r\n")
        self.assertEqual(self.link.toClient[-len(REFUSED) :], REFUSED)
        self.assertEqual(self.link.toBackend[-6:], b"QUIT\r\n")

    def test_contentStreams(self) -> None:
        """
        Message content is forwarded chunk by chunk, never collected: the
        guard keeps nothing of it.
        """
        self.client(b"DATA\r\n")
        self.backend(b"354 go ahead\r\n")
        chunk = b"x" * 60000 + b"\r\n"
        for _ in range(20):
            self.client(chunk)
            self.assertEqual(self.guard._buffer, b"")
        self.assertEqual(len(self.link.toBackend), 6 + 20 * len(chunk))

    def test_bareLineFeedEndsSession(self) -> None:
        """
        A bare LF in message content (C{LF . LF} ends data for some
        backends) ends the session with C{554 5.6.0}; the chunk holding it
        never reaches the backend.
        """
        self.client(b"DATA\r\n")
        self.backend(b"354 go ahead\r\n")
        self.client(b"Subject: x\r\n\r\n")
        self.client(b"Hi.\n.\nXCLIENT LOGIN=bob\r\n")
        self.assertEqual(self.link.toBackend, b"DATA\r\nSubject: x\r\n\r\n")
        self.assertEqual(
            self.link.toClient,
            b"354 go ahead\r\n554 5.6.0 Message refused: bare CR or LF in message data; end lines with CRLF\r\n",
        )
        self.assertEqual(self.link.closed, "protocol error: bare CR or LF in message data")
        self.client(b"XCLIENT LOGIN=bob\r\n")
        self.assertEqual(self.link.toBackend, b"DATA\r\nSubject: x\r\n\r\n")

    def test_bdatChunkNotParsed(self) -> None:
        """
        The octets of a BDAT chunk are content whatever they look like;
        the command after the chunk is read as one.
        """
        chunk = b"XCLIENT LOGIN=bob\r\n"
        self.client(b"BDAT %d LAST\r\n" % (len(chunk),) + chunk[:5])
        self.client(chunk[5:] + b"XCLIENT LOGIN=bob\r\n")
        self.assertEqual(self.link.toBackend, b"BDAT 19 LAST\r\n" + chunk)
        self.backend(b"250 2.0.0 Ok: queued\r\n")
        self.assertEqual(self.link.toClient, b"250 2.0.0 Ok: queued\r\n" + REFUSED)

    def test_bdatWithoutChunking(self) -> None:
        """
        To a backend that did not offer CHUNKING, BDAT is an unknown
        command and what follows it is read as commands, as that backend
        reads it: an XCLIENT there is refused, not forwarded as content.
        """
        self.guard = SMTPGuard(chunking=False)
        self.link = FakeLink()
        self.guard.attach(self.link)
        self.client(b"BDAT 34 LAST\r\nXCLIENT ADDR=6.6.6.6 LOGIN=bob\r\n")
        self.assertEqual(self.link.toBackend, b"BDAT 34 LAST\r\n")
        self.backend(b"502 5.5.2 Error: command not recognized\r\n")
        self.assertEqual(self.link.toBackend, b"BDAT 34 LAST\r\n")
        self.assertEqual(self.link.toClient, b"502 5.5.2 Error: command not recognized\r\n" + REFUSED)

    def test_badBDAT(self) -> None:
        """
        BDAT without a size the proxy can read is refused: the backend
        could count the chunk differently.
        """
        self.client(b"BDAT 12x\r\nBDAT\r\nXCLIENT LOGIN=bob\r\n")
        self.assertEqual(self.link.toBackend, b"")
        self.assertEqual(self.link.toClient, b"501 5.5.4 Syntax: BDAT size [LAST]\r\n" * 2 + REFUSED)

    def test_lineTooLong(self) -> None:
        """
        A command line over the limit is dropped as it comes (the guard
        never holds more than a line) and answered with C{500 5.5.2}; the
        next command is read as usual.
        """
        self.client(b"MAIL FROM:<" + b"a" * (GUARDED_LINE - 20))
        self.client(b"a" * GUARDED_LINE)
        self.assertLessEqual(len(self.guard._buffer), GUARDED_LINE)
        self.client(b"a" * GUARDED_LINE + b">\r\nXCLIENT LOGIN=bob\r\n")
        self.client(b"NOOP" + b" " * GUARDED_LINE + b"\r\nNOOP\r\n")
        self.assertEqual(self.link.toBackend, b"NOOP\r\n")
        self.assertEqual(self.link.toClient, b"500 5.5.2 Error: line too long\r\n" + REFUSED + b"500 5.5.2 Error: line too long\r\n")

    def test_drainedAfterHeldCommands(self) -> None:
        """
        A client that stops sending while the guard holds its commands (a
        refusal waits for replies) is reported drained only once they have
        been answered or forwarded; an unfinished line never reaches the
        backend.
        """
        drained = []
        self.client(b"NOOP\r\nXCLIENT LOGIN=bob\r\nQUIT\r\nXCLIENT LOG")
        self.guard.whenDrained(lambda: drained.append(self.link.toBackend))
        self.assertEqual(drained, [])
        self.backend(b"250 2.0.0 Ok\r\n")
        self.assertEqual(drained, [b"NOOP\r\nQUIT\r\n"])
        self.assertEqual(self.link.toClient, b"250 2.0.0 Ok\r\n" + REFUSED)

    def test_drainedAtOnce(self) -> None:
        """
        With nothing held, a client that stops sending is drained at once.
        """
        drained = []
        self.client(b"NOOP\r\n")
        self.guard.whenDrained(lambda: drained.append(True))
        self.assertEqual(drained, [True])

    def test_unsolicitedReply(self) -> None:
        """
        A reply nobody asked for (a timeout notice) does not make the guard
        answer a later refusal before the reply it belongs after.
        """
        self.backend(b"421 4.4.2 old.test Error: timeout exceeded\r\n")
        self.client(b"NOOP\r\nXCLIENT LOGIN=bob\r\n")
        self.assertTrue(self.link.held)
        self.backend(b"250 2.0.0 Ok\r\n")
        self.assertEqual(self.link.toClient[-len(REFUSED) :], REFUSED)


class SubmissionGuardTests(SubmissionTestsMixin, SynchronousTestCase):
    """
    The guard in a submission session, over in-memory transports.
    """

    def loggedIn(self, pipelined: bytes = b"") -> None:
        self.build()
        self.ehlo()
        self.send(b"AUTH PLAIN " + plain(b"alice", b"secret") + b"\r\n" + pipelined)
        for reply in (GREETING, POSTFIX_EHLO, GREETING, POSTFIX_EHLO):
            self.backendSays(reply)
        self.backendSays(b"235 2.7.0 Ok\r\n")

    def test_xclientBehindAuth(self) -> None:
        """
        XCLIENT pipelined behind AUTH never reaches the backend; the client
        gets C{235}, then C{550 5.7.0}, then the backend's reply to the
        next command.
        """
        self.loggedIn(b"XCLIENT ADDR=6.6.6.6 LOGIN=bob\r\nMAIL FROM:<alice@example.org>\r\n")
        backend = self.connector.transports[-1]
        self.assertEqual(backend.value(), b"MAIL FROM:<alice@example.org>\r\n")
        self.assertEqual(self.client.value(), b"235 2.7.0 Authentication successful\r\n" + REFUSED)
        self.backendSays(b"250 2.1.0 Ok\r\n")
        self.assertEqual(self.client.value()[-14:], b"250 2.1.0 Ok\r\n")

    def test_holdPausesClient(self) -> None:
        """
        While a refusal waits for the backend's replies, reading from the
        client pauses; it resumes once the refusal is written.
        """
        self.loggedIn()
        self.send(b"NOOP\r\nXCLIENT LOGIN=bob\r\n")
        self.assertEqual(self.client.producerState, "paused")
        self.backendSays(b"250 2.0.0 Ok\r\n")
        self.assertEqual(self.client.producerState, "producing")
        self.assertEqual(self.client.value(), b"250 2.0.0 Ok\r\n" + REFUSED)

    def test_clientNotReadingPausesIt(self) -> None:
        """
        A client whose own send buffer is full (it does not read the
        proxy's answers) is not read either, nor is the backend, until the
        buffer drains: refusals cannot pile up without bound.
        """
        self.loggedIn()
        backend = self.connector.transports[-1]
        self.client.producer.pauseProducing()
        self.assertEqual((self.client.producerState, backend.producerState), ("paused", "paused"))
        self.client.producer.resumeProducing()
        self.assertEqual((self.client.producerState, backend.producerState), ("producing", "producing"))

    def test_halfCloseAfterHeldCommands(self) -> None:
        """
        The client half-closes right after a refused command and a QUIT:
        the backend gets the QUIT first and the half-close after, once the
        refusal had its turn.
        """
        self.loggedIn()
        backend = self.connector.transports[-1]
        events = []
        backend.loseWriteConnection = lambda: events.append(backend.value())  # type: ignore[attr-defined]
        self.send(b"NOOP\r\nXCLIENT LOGIN=bob\r\nQUIT\r\n")
        self.frontend.readConnectionLost()
        self.assertEqual((backend.value(), events), (b"NOOP\r\n", []))
        # What the backend receives after its reply (backendSays clears).
        self.assertEqual(self.backendSays(b"250 2.0.0 Ok\r\n"), b"QUIT\r\n")
        self.assertEqual(events, [b"QUIT\r\n"])
        self.assertEqual(self.client.value(), b"250 2.0.0 Ok\r\n" + REFUSED)

    def test_halfClosedSilentBackend(self) -> None:
        """
        After the client's half-close, a backend that neither answers nor
        closes loses the session after HALF_CLOSED_IDLE seconds, not after
        the whole idle timeout.
        """
        self.loggedIn()
        backend = self.connector.transports[-1]
        backend.loseWriteConnection = lambda: None  # type: ignore[attr-defined]
        self.frontend.readConnectionLost()
        self.clock.advance(HALF_CLOSED_IDLE - 1)
        self.assertFalse(backend.disconnecting)
        self.clock.advance(1)
        self.assertTrue(backend.disconnecting)
        relay = self.frontend.relay
        assert relay is not None
        self.assertEqual(relay.endReason, "idle timeout")

    def test_shutdownAwaitsMessageReply(self) -> None:
        """
        A session dropped at shutdown after the message's final dot, while
        the backend's reply is awaited, passes that reply on before the
        goodbye (cut, the client would send the message again).
        """
        self.loggedIn()
        self.send(b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n")
        self.backendSays(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n")
        self.send(b"Subject: x\r\n\r\nbody\r\n.\r\n")
        self.client.clear()
        self.frontend.drop("Server shutting down.", EndReason.SHUTDOWN)
        self.assertEqual(self.client.value(), b"")
        self.assertEqual(self.frontend.finishing, DATA_END_TIMEOUT)
        self.backendSays(b"250 2.0.0 Ok: queued as X\r\n")
        self.assertEqual(
            self.client.value(), b"250 2.0.0 Ok: queued as X\r\n421 4.3.2 proxy.test Server shutting down.\r\n"
        )
        self.assertEqual(self.frontend.finishing, 0)

    def test_shutdownAwaitsLastChunkReply(self) -> None:
        """
        The same after the last BDAT chunk.
        """
        self.loggedIn()
        self.send(b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@example.org>\r\nBDAT 3 LAST\r\nxyz")
        self.backendSays(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n")
        self.client.clear()
        self.frontend.drop("Server shutting down.", EndReason.SHUTDOWN)
        self.assertEqual(self.client.value(), b"")
        self.backendSays(b"250 2.0.0 Ok: 3 bytes queued as X\r\n")
        self.assertEqual(
            self.client.value(), b"250 2.0.0 Ok: 3 bytes queued as X\r\n421 4.3.2 proxy.test Server shutting down.\r\n"
        )

    def test_shutdownDuringLastChunkUpload(self) -> None:
        """
        A session dropped while its last chunk is still coming in owes the
        client no message's reply yet: it closes at once (its message,
        unfinished at the backend, is discarded, and the client sends it
        again: no duplicate).
        """
        self.loggedIn()
        self.send(b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@example.org>\r\nBDAT 1000 LAST\r\nxyz")
        self.backendSays(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n")
        self.client.clear()
        self.frontend.drop("Server shutting down.", EndReason.SHUTDOWN)
        self.assertEqual(self.frontend.finishing, 0)
        self.assertEqual(self.client.value(), b"421 4.3.2 proxy.test Server shutting down.\r\n")

    def test_shutdownWaitBounded(self) -> None:
        """
        A backend that never answers the message's end holds the session
        for the data-reply timeout at most.
        """
        self.loggedIn()
        self.send(b"BDAT 3 LAST\r\nxyz")
        self.client.clear()
        self.frontend.drop("Server shutting down.", EndReason.SHUTDOWN)
        self.clock.advance(DATA_END_TIMEOUT - 1)
        self.assertEqual(self.client.value(), b"")
        self.clock.advance(1)
        self.assertEqual(self.client.value(), b"421 4.3.2 proxy.test Server shutting down.\r\n")

    def test_clientGoneWhileWaiting(self) -> None:
        """
        A client that leaves while its drop waits for the reply leaves no
        bound behind.
        """
        self.loggedIn()
        self.send(b"BDAT 3 LAST\r\nxyz")
        self.frontend.drop("Server shutting down.", EndReason.SHUTDOWN)
        calls = len(self.clock.getDelayedCalls())
        self.frontend.connectionLost(None)
        self.assertEqual(self.frontend.finishing, 0)
        self.assertLess(len(self.clock.getDelayedCalls()), calls)

    def test_shutdownWithoutMessageCuts(self) -> None:
        """
        Without a message's end awaiting its reply, the goodbye is at once.
        """
        self.loggedIn()
        self.send(b"MAIL FROM:<alice@example.org>\r\n")
        self.client.clear()
        self.frontend.drop("Server shutting down.", EndReason.SHUTDOWN)
        self.assertEqual(self.frontend.finishing, 0)
        self.assertEqual(self.client.value(), b"421 4.3.2 proxy.test Server shutting down.\r\n")

    def test_bytesCounted(self) -> None:
        """
        The session's counters hold what the client sent, refused commands
        included, and what the backend sent.
        """
        self.loggedIn()
        self.send(b"XCLIENT LOGIN=bob\r\nNOOP\r\n")
        self.backendSays(b"250 2.0.0 Ok\r\n")
        relay = self.frontend.relay
        assert relay is not None
        self.assertEqual((relay.bytesFromClient, relay.bytesFromBackend), (25, 14))


class GuardedSocketTests(TestCase):
    """
    A guarded relay of two plain TCP connections is not spliced: the guard
    sees the client's commands.
    """

    leg = test_relay_sockets.SplicedRelayTests.leg

    @inlineCallbacks
    def test_guardedNotSpliced(self) -> None:
        """
        XCLIENT sent over a plain leg is answered by the guard and never
        reaches the backend's socket; other commands do.
        """
        self.client, self.clientInner = yield self.leg()
        self.backend, self.backendInner = yield self.leg()
        ended: list[Relay] = []
        relay = Relay(
            self.clientInner.transport, self.backendInner.transport, reactor, 60, ended.append, guard=SMTPGuard()
        )
        self.clientInner.dataReceived = relay.fromClient
        self.backendInner.dataReceived = relay.fromBackend
        # As a session's protocols do: the relay learns of the closes (and
        # calls off its abort of the backend's connection).
        self.clientInner.connectionLost = lambda reason=None: (relay.clientLost(), test_relay_sockets.Inner.connectionLost(self.clientInner))
        self.backendInner.connectionLost = lambda reason=None: (relay.backendLost(), test_relay_sockets.Inner.connectionLost(self.backendInner))
        relay.start()
        self.assertIsNone(relay._splicer)
        self.client.transport.write(b"XCLIENT LOGIN=bob\r\nNOOP\r\n")
        while not self.backend.received or not self.client.received:
            yield deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(bytes(self.backend.received), b"NOOP\r\n")
        self.assertEqual(bytes(self.client.received), REFUSED)
        relay.stop()
        yield self.clientInner.lost
        yield self.backendInner.lost
