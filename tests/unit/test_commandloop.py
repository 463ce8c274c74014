"""
What every command-loop front end shares (L{mailproxy._commandloop}).
"""

from __future__ import annotations

from twisted.internet.defer import CancelledError
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from mailproxy.model import Route
from mailproxy.testing import FakeRouter, makeBackend, makeFrontend


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
