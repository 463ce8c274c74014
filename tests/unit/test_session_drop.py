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
        Printable non-ASCII text stays; the bound counts octets and never
        cuts a character in two.
        """
        self.assertEqual(self.dropped("imap", "Déménagé"), "* BYE Déménagé\r\n".encode())
        self.assertEqual(self.dropped("imap", "x" + "é" * 200), b"* BYE x" + "é".encode() * 99 + b"\r\n")

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
