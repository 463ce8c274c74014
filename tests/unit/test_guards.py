"""
The POP3 and ManageSieve guards with a fake relay: how they count the
backend's replies (so that their refusals keep their place) and frame the
client's commands.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from mailproxy.pop3._guard import POP3Guard
from mailproxy.sieve._guard import SieveGuard

from .test_smtp_guard import FakeLink

POP3_REFUSED = b"-ERR Insufficient authorization.\r\n"
SIEVE_REFUSED = b'NO "Insufficient authorization."\r\n'


class GuardTestsMixin:
    """
    A guard attached to a L{FakeLink}.
    """

    link: FakeLink

    def attach(self, guard: POP3Guard | SieveGuard) -> None:
        self.guard = guard
        self.link = FakeLink()
        guard.attach(self.link)

    def backend(self, *pieces: bytes) -> None:
        for piece in pieces:
            self.link.toClient += piece
            self.guard.fromBackend(piece)


class POP3GuardTests(GuardTestsMixin, SynchronousTestCase):
    """
    L{POP3Guard}.
    """

    def setUp(self) -> None:
        self.attach(POP3Guard())

    def test_bodyEndAcrossReads(self) -> None:
        """
        A multi-line body whose last line arrives split over reads, and a
        dot-stuffed line inside it, is counted once, at its end.
        """
        self.guard.fromClient(b"RETR 1\r\nXCLIENT ADDR=1.2.3.4\r\n")
        self.backend(b"+OK 9 octets\r\n..\r\n-ERR\r\n\r", b"\n.", b"\r")
        self.assertTrue(self.link.held)
        self.backend(b"\n")
        self.assertFalse(self.link.held)
        self.assertTrue(self.link.toClient.endswith(b"\r\n.\r\n" + POP3_REFUSED))

    def test_singleLineReplies(self) -> None:
        """
        LIST and UIDL with an argument, STAT and errors are one line; a
        C{-ERR} to RETR has no body; LIST without argument has one.
        """
        self.guard.fromClient(b"LIST 1\r\nUIDL 1\r\nSTAT\r\nRETR 9\r\nLIST\r\nXCLIENT ADDR=1.2.3.4\r\n")
        self.backend(b"+OK 1 5\r\n+OK 1 a\r\n+OK 1 5\r\n-ERR no such message\r\n+OK\r\n1 5\r\n")
        self.assertTrue(self.link.held)
        self.backend(b".\r\n")
        self.assertEqual(self.link.toClient[-len(POP3_REFUSED) :], POP3_REFUSED)


class SieveGuardTests(GuardTestsMixin, SynchronousTestCase):
    """
    L{SieveGuard}.
    """

    def setUp(self) -> None:
        self.attach(SieveGuard())

    def test_responsesCounted(self) -> None:
        """
        Data lines (quoted strings) do not end a response; OK, NO and BYE
        lines do, with or without a code or text, and a literal in a NO
        line is skipped.
        """
        self.guard.fromClient(b"LISTSCRIPTS\r\nHAVESPACE \"a\" 1\r\nNOOP\r\nXCLIENT ADDR=1.2.3.4\r\n")
        self.backend(b'"OK" ACTIVE\r\n"NO"\r\nOK\r\n', b"NO (QUOTA) {6}\r\nOK\r\nNO\r\n")
        self.assertTrue(self.link.held)
        self.backend(b'OK (TAG "x") "Done."\r\n')
        self.assertFalse(self.link.held)
        self.assertTrue(self.link.toClient.endswith(SIEVE_REFUSED))

    def test_literalsFramed(self) -> None:
        """
        A command's literals, synchronizing or not, belong to it: the
        command after them is read as one.
        """
        self.guard.fromClient(b'PUTSCRIPT "a" {4}\r\nkeep\r\nCHECKSCRIPT {3+}\r\nx;\n\r\nXCLIENT ADDR=1.2.3.4\r\n')
        self.assertEqual(self.link.toBackend, b'PUTSCRIPT "a" {4}\r\nkeep\r\nCHECKSCRIPT {3+}\r\nx;\n\r\n')
        self.assertEqual(self.guard.outstanding, 2)
