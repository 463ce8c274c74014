"""
Tests for L{mailproxy._session.FrontendProtocol.drop}: ending a session from
outside (an operator, a move, shutdown) in every protocol.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from mailproxy.model import Route
from mailproxy.testing import FakeRouter, MemoryConnector, makeBackend, makeFrontend

from .opsfixtures import GREETING, LOGGED_IN

#: An operator's reason with line breaks, control and format characters, a
#: lone surrogate (JSON allows one), and far too long.
NASTY = "Moved\r\n* OK [ALERT] injected\x00\x07 \u202e\udc80" + "x" * 300

#: What is left of it on the client's line: one line of at most 200 octets.
CLEAN = ("Moved * OK [ALERT] injected " + "x" * 300)[:200]


class DropReasonTests(SynchronousTestCase):
    """
    The reason given to C{drop} reaches the client as one safe line of
    bounded length, in every protocol's goodbye.
    """

    def dropped(self, protocol: str, reason: str, **listenerOptions: object) -> bytes:
        """
        Open a session of C{protocol}, drop it with C{reason}, and return
        what the client got.
        """
        frontend, client, _ = makeFrontend(protocol, FakeRouter(), MemoryConnector(), **listenerOptions)
        client.clear()
        frontend.drop(reason)
        self.assertTrue(client.disconnecting)
        return client.value()

    def test_imap(self) -> None:
        """
        IMAP: C{* BYE} with the cleaned reason.
        """
        self.assertEqual(self.dropped("imap", NASTY), b"* BYE " + CLEAN.encode() + b"\r\n")

    def test_pop3(self) -> None:
        """
        POP3: C{-ERR} with the cleaned reason.
        """
        self.assertEqual(self.dropped("pop3", NASTY), b"-ERR " + CLEAN.encode() + b"\r\n")

    def test_smtp(self) -> None:
        """
        SMTP: C{421} with the cleaned reason.
        """
        self.assertEqual(
            self.dropped("smtp", NASTY, mode="submission"), b"421 4.7.0 proxy.test " + CLEAN.encode() + b"\r\n"
        )

    def test_sieve(self) -> None:
        """
        ManageSieve: C{BYE} with the cleaned reason as a quoted string.
        """
        self.assertEqual(self.dropped("sieve", NASTY), b'BYE "' + CLEAN.encode() + b'"\r\n')

    def test_nothingLeft(self) -> None:
        """
        A reason with nothing printable gives a plain goodbye, never an
        empty one.
        """
        self.assertEqual(self.dropped("imap", "\r\n\x00"), b"* BYE Disconnected.\r\n")

    def test_nonASCII(self) -> None:
        """
        Printable non-ASCII text stays in ManageSieve's goodbye (UTF-8);
        the bound counts octets and never cuts a character in two. IMAP,
        POP3 and SMTP texts are 7-bit: accents lose their marks, what has
        no ASCII form becomes C{?}.
        """
        self.assertEqual(self.dropped("sieve", "Déménagé"), 'BYE "Déménagé"\r\n'.encode())
        self.assertEqual(self.dropped("sieve", "x" + "é" * 200), b'BYE "x' + "é".encode() * 99 + b'"\r\n')
        self.assertEqual(self.dropped("imap", "Déménagé \u65e5"), b"* BYE Demenage ?\r\n")
        self.assertEqual(self.dropped("pop3", "Déménagé"), b"-ERR Demenage\r\n")
        self.assertEqual(self.dropped("smtp", "Déménagé", mode="submission"), b"421 4.7.0 proxy.test Demenage\r\n")
        # Folding may lengthen a text (U+FDFA is 18 letters): still bounded.
        self.assertLessEqual(len(self.dropped("pop3", "\ufdfa" * 66)), len(b"-ERR ") + 200 + 2)

    def test_relaying(self) -> None:
        """
        A session that is relaying gets the cleaned reason too.
        """
        backend = makeBackend("old")
        connector = MemoryConnector()
        frontend, client, _ = makeFrontend("imap", FakeRouter({"alice": Route(backend)}), connector)
        frontend.dataReceived(b"a LOGIN alice secret\r\n")
        connector.protocols[-1].dataReceived(GREETING)
        connector.protocols[-1].dataReceived(LOGGED_IN)
        self.assertIsNotNone(frontend.relay)
        client.clear()
        frontend.drop(NASTY)
        self.assertEqual(client.value(), b"* BYE " + CLEAN.encode() + b"\r\n")


class DropDuringLoginTests(SynchronousTestCase):
    """
    Dropping a session whose login is in flight cancels the login, at every
    stage, so it cannot finish on the old backend and relay after the
    goodbye; the session is closing from then on.
    """

    def setUp(self) -> None:
        self.backend = makeBackend("old")
        self.router = FakeRouter({"alice": Route(self.backend)})
        self.connector = MemoryConnector()

    def start(self, protocol: str = "imap", login: bytes = b"a LOGIN alice secret\r\n", **options: object) -> None:
        """
        Open a session of C{protocol} and send C{login}.
        """
        self.frontend, self.client, self.clock = makeFrontend(protocol, self.router, self.connector, **options)
        self.frontend.dataReceived(login)

    def assertDropped(self, goodbye: bytes) -> None:
        """
        Drop the session now: the client gets C{goodbye} and nothing after
        it, even once the clock has run out every timer.
        """
        self.client.clear()
        self.frontend.drop("Moved.")
        self.assertEqual(self.client.value(), goodbye)
        self.assertTrue(self.client.disconnecting)
        self.assertIsNone(self.frontend._pending)
        self.frontend.dataReceived(b"b NOOP\r\n")
        self.clock.advance(3600)
        self.assertEqual(self.client.value(), goodbye)
        self.assertIsNone(self.frontend.relay)

    def test_whileRouting(self) -> None:
        """
        A login waiting for the router is cancelled: no reply to it follows
        the goodbye, no backend is connected when the router answers late,
        and it does not count as a failed login.
        """
        self.router.manual = True
        self.start()
        self.assertDropped(b"* BYE Moved.\r\n")
        self.assertEqual(self.frontend.failures, 0)
        self.assertEqual(dict(self.frontend.context.stats.logins), {})
        self.assertEqual(self.frontend.result, "dropped: Moved.")
        self.assertEqual(self.connector.protocols, [])

    def test_whileRoutingOtherProtocols(self) -> None:
        """
        The same in POP3, ManageSieve and SMTP: the goodbye is the last
        word.
        """
        from base64 import b64encode

        plain = b64encode(b"\x00alice\x00secret")
        for protocol, login, goodbye, options in [
            ("pop3", b"USER alice\r\nPASS secret\r\n", b"-ERR Moved.\r\n", {}),
            ("sieve", b'AUTHENTICATE "PLAIN" "' + plain + b'"\r\n', b'BYE "Moved."\r\n', {}),
            ("smtp", b"EHLO c.example\r\nAUTH PLAIN " + plain + b"\r\n", b"421 4.7.0 proxy.test Moved.\r\n", {"mode": "submission"}),
        ]:
            self.router = FakeRouter(manual=True)
            self.start(protocol, login, **options)
            self.assertDropped(goodbye)

    def test_whileHeld(self) -> None:
        """
        A login held by a move's gate is cancelled; releasing the hold later
        does not revive it.
        """
        from mailproxy._migrate import LoginHold

        self.start(login=b"")
        gate = LoginHold()
        self.frontend.context.gate = gate
        release = gate.hold(["alice"], [])
        self.frontend.dataReceived(b"a LOGIN alice secret\r\n")
        self.assertDropped(b"* BYE Moved.\r\n")
        release()
        self.assertEqual(self.router.requests, [])
        self.assertEqual(self.connector.protocols, [])

    def test_whileConnecting(self) -> None:
        """
        A login whose backend connection is under way is cancelled.
        """
        connecting = []

        def connector(reactor: object, protocol: object) -> object:
            # The connection never completes.
            connecting.append(protocol)
            return protocol.result  # type: ignore[attr-defined]

        self.connector = connector  # type: ignore[assignment]
        self.start()
        self.assertEqual(len(connecting), 1)
        self.assertDropped(b"* BYE Moved.\r\n")

    def test_whileLoggingIn(self) -> None:
        """
        A login the backend is answering is cancelled; the backend's late
        OK changes nothing.
        """
        self.start()
        self.connector.protocols[-1].dataReceived(GREETING)
        self.assertDropped(b"* BYE Moved.\r\n")
        self.assertTrue(self.connector.transports[-1].disconnecting)
        self.connector.protocols[-1].dataReceived(LOGGED_IN)
        self.assertEqual(self.client.value(), b"* BYE Moved.\r\n")
        self.assertIsNone(self.frontend.relay)

    def test_whileDelayingFailure(self) -> None:
        """
        A failed login waiting out its delay is cancelled: its NO never
        follows the goodbye.
        """
        from mailproxy.config import Limits

        self.start(login=b"", limits=Limits(failureDelay=5.0))
        self.client.clear()
        self.frontend.dataReceived(b"a LOGIN nobody secret\r\n")
        self.assertEqual(self.client.value(), b"")
        self.assertDropped(b"* BYE Moved.\r\n")

    def test_clientGoneWhileRouting(self) -> None:
        """
        A client that goes away while the router decides abandons the login
        the same way: no router failure is logged, no failed login counted.
        """
        self.router.manual = True
        self.start()
        self.frontend.connectionLost(None)
        self.assertEqual(self.frontend.failures, 0)
        self.assertEqual(dict(self.frontend.context.stats.logins), {})
        self.router.pending[0].callback(Route(self.backend))
        self.assertEqual(self.connector.protocols, [])
