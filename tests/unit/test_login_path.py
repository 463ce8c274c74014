"""
What a plain login costs in Twisted's machinery: the Deferreds it fires and
the timed calls it makes, counted over in-memory transports.
"""

from __future__ import annotations

import sys
from collections import Counter
from types import FrameType
from typing import Any, Callable

from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from mailproxy.model import Route
from mailproxy.testing import FakeRouter, MemoryConnector, makeBackend, makeFrontend

GREETING = b"* OK [CAPABILITY IMAP4rev1 SASL-IR ID ENABLE IDLE LITERAL+ AUTH=PLAIN] Dovecot ready.\r\n"
LOGGED_IN = b"P1 OK ID\r\nP2 OK [CAPABILITY IMAP4rev1 ID] Logged in\r\n"


def deferredCalls(run: Callable[[], object]) -> Counter[str]:
    """
    The functions of L{twisted.internet.defer} that C{run} calls, and how
    often.
    """
    calls: Counter[str] = Counter()

    def profile(frame: FrameType, event: str, arg: Any) -> None:
        if event == "call" and frame.f_code.co_filename == defer.__file__:
            calls[frame.f_code.co_name] += 1

    sys.setprofile(profile)
    try:
        run()
    finally:
        sys.setprofile(None)
    return calls


class DeferredChainTests(SynchronousTestCase):
    """
    A login's steps follow one another as plain calls: only the backend's
    outcome and the session's come through Deferreds.
    """

    def test_imapLoginFiresTwoDeferreds(self) -> None:
        """
        A plain IMAP login with a router that answers at once, from the
        client's LOGIN to the hand-over, fires two Deferreds (the backend
        login's result and the attempt's outcome), each running its
        callbacks once, and makes no more calls into Twisted's Deferred
        code than that takes. (Before, the router's answer, its timing,
        the backend's timing and the failure handling were a chain of
        callbacks: 8 runs of callbacks and 27 calls.)
        """
        connector = MemoryConnector()
        frontend, client, _ = makeFrontend("imap", FakeRouter({"alice": Route(makeBackend("old"))}), connector)

        def login() -> None:
            frontend.dataReceived(b"a LOGIN alice secret\r\n")
            connector.protocols[-1].dataReceived(GREETING)
            connector.protocols[-1].dataReceived(LOGGED_IN)

        calls = deferredCalls(login)
        self.assertIsNotNone(frontend.relay)
        self.assertTrue(client.value().endswith(b"a OK [CAPABILITY IMAP4rev1 ID] Logged in\r\n"))
        self.assertEqual(calls["_runCallbacks"], 2)
        self.assertLessEqual(sum(calls.values()), 13)
