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
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mailproxy._session import FrontendProtocol
from mailproxy.model import Rejection, Route
from mailproxy.settings import Limits
from mailproxy.testing import FakeRouter, MemoryConnector, TLSStringTransport, makeBackend, makeFrontend

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


class TimedCallTests(SynchronousTestCase):
    """
    A session's timed calls follow one another: the pre-authentication
    timeout's call goes on as the relay's idle timeout.
    """

    def loggedIn(self, limits: Limits) -> tuple[FrontendProtocol, TLSStringTransport, Clock, list[str]]:
        """
        A plain IMAP session logged in with C{limits}, on a clock that
        notes the function of every timed call made.

        @return: the session, its client transport, the clock and the
            functions' names.
        """
        clock = Clock()
        made: list[str] = []
        callLater = clock.callLater

        def noting(seconds: float, f: Callable[..., object], *args: object, **kwargs: object) -> IDelayedCall:
            made.append(getattr(f, "__qualname__", repr(f)))
            return callLater(seconds, f, *args, **kwargs)

        clock.callLater = noting  # type: ignore[method-assign]
        connector = MemoryConnector()
        router = FakeRouter({"alice": Route(makeBackend("old"))})
        frontend, client, _ = makeFrontend("imap", router, connector, clock=clock, limits=limits)
        frontend.dataReceived(b"a LOGIN alice secret\r\n")
        connector.protocols[-1].dataReceived(GREETING)
        connector.protocols[-1].dataReceived(LOGGED_IN)
        self.assertIsNotNone(frontend.relay)
        return frontend, client, clock, made

    def test_twoTimedCallsToHandOver(self) -> None:
        """
        From the client's connection to the hand-over, a login makes two
        timed calls: the pre-authentication timeout's, which then times
        the relay's idleness, and the backend login's. (Before, the relay
        made a third for its idle timeout.) The idle timeout still ends a
        silent session, at its own time.
        """
        _, client, clock, made = self.loggedIn(Limits(preauthTimeout=120, idleTimeout=1800))
        self.assertEqual(made, ["Timer._expire", "BackendProtocol._timedOut"])
        self.assertEqual([call.getTime() for call in clock.getDelayedCalls()], [1800])
        clock.advance(1799)
        self.assertFalse(client.disconnecting)
        client.clear()
        clock.advance(1)
        self.assertEqual(client.value(), b"* BYE Idle timeout.\r\n")
        self.assertTrue(client.disconnecting)

    def test_noIdleTimeout(self) -> None:
        """
        Without an idle timeout, a relayed session keeps no timed call: the
        pre-authentication timeout's is cancelled at the hand-over, and
        its time passes without a goodbye.
        """
        _, client, clock, _ = self.loggedIn(Limits(preauthTimeout=120, idleTimeout=0))
        self.assertEqual(clock.getDelayedCalls(), [])
        client.clear()
        clock.advance(500)
        self.assertEqual(client.value(), b"")
        self.assertFalse(client.disconnecting)


class LoginStateTests(SynchronousTestCase):
    """
    What a session says of its login while and after it runs.
    """

    def test_refusedAtOnceIsOver(self) -> None:
        """
        A login the router refuses as temporary, answered at once (no
        failed-login delay), is over once answered: the management
        endpoint shows the session as pre-auth, not logging in. (Before,
        it still showed C{"login"}.)
        """
        router = FakeRouter({"alice": Rejection(temporary=True)})
        frontend, client, _ = makeFrontend("imap", router, MemoryConnector())
        client.clear()
        frontend.dataReceived(b"a LOGIN alice secret\r\n")
        self.assertEqual(client.value(), b"a NO [UNAVAILABLE] Authentication failed.\r\n")
        self.assertFalse(frontend.loginRunning)
        self.assertEqual(frontend.describe()["state"], "pre-auth")

    def test_runningWhileRouting(self) -> None:
        """
        While the router has not answered, the session shows as logging in;
        once the login is answered, as relaying.
        """
        router = FakeRouter(manual=True)
        connector = MemoryConnector()
        frontend, client, _ = makeFrontend("imap", router, connector)
        frontend.dataReceived(b"a LOGIN alice secret\r\n")
        self.assertEqual(frontend.describe()["state"], "login")
        router.pending[0].callback(Route(makeBackend("old")))
        self.assertEqual(frontend.describe()["state"], "login")
        connector.protocols[-1].dataReceived(GREETING)
        connector.protocols[-1].dataReceived(LOGGED_IN)
        self.assertEqual(frontend.describe()["state"], "relay")
