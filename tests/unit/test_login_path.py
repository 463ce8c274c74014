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
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from mailproxy._session import FrontendProtocol
from mailproxy.model import Rejection, Route
from mailproxy.settings import Limits
from mailproxy.testing import FakeRouter, MemoryConnector, TLSStringTransport, makeBackend, makeFrontend

GREETING = b"* OK [CAPABILITY IMAP4rev1 SASL-IR ID ENABLE IDLE LITERAL+ AUTH=PLAIN] Dovecot ready.\r\n"
LOGGED_IN = b"P1 OK ID\r\nP2 OK [CAPABILITY IMAP4rev1 ID] Logged in\r\n"


def _notingResets(
    callLater: Callable[..., IDelayedCall], moved: list[IDelayedCall]
) -> Callable[..., IDelayedCall]:
    """
    C{Clock.callLater}, but the calls it makes note in C{moved} each time
    they are moved sooner, where a reactor would look them up in its heap
    (the clock itself only sorts its calls when it advances).
    """

    def noting(clock: Clock, *args: Any, **kwargs: Any) -> IDelayedCall:
        call = callLater(clock, *args, **kwargs)
        call.resetter = moved.append  # type: ignore[attr-defined]
        return call

    return noting


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

    def test_pop3LoginFiresTwoDeferreds(self) -> None:
        """
        The same for a POP3 login (USER and PASS): two Deferreds fired,
        each once.
        """
        connector = MemoryConnector()
        frontend, client, _ = makeFrontend("pop3", FakeRouter({"alice": Route(makeBackend("old"))}), connector)

        def login() -> None:
            frontend.dataReceived(b"USER alice\r\nPASS secret\r\n")
            connector.protocols[-1].dataReceived(b"+OK [XCLIENT] Dovecot ready.\r\n")
            connector.protocols[-1].dataReceived(b"+OK\r\nCAPA\r\nUSER\r\nSASL PLAIN\r\n.\r\n")
            connector.protocols[-1].dataReceived(b"+OK Updated\r\n+OK Logged in.\r\n")

        calls = deferredCalls(login)
        self.assertIsNotNone(frontend.relay)
        self.assertTrue(client.value().endswith(b"+OK Logged in.\r\n"))
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

        clock.callLater = noting  # type: ignore[method-assign, assignment]
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

    def test_shorterIdleTimeoutNotMovedSooner(self) -> None:
        """
        An idle timeout shorter than what is left of the pre-authentication
        timeout gets a timed call of its own; the pre-authentication call
        is cancelled, not moved sooner: moving a call sooner makes Twisted's
        reactor look it up in its list of every timed call (one or two per
        session), at every login. The idle timeout still ends the session
        at its time.
        """
        moved: list[IDelayedCall] = []
        self.patch(Clock, "callLater", _notingResets(Clock.callLater, moved))
        _, client, clock, _ = self.loggedIn(Limits(preauthTimeout=120, idleTimeout=30))
        self.assertEqual(moved, [])
        self.assertEqual([call.getTime() for call in clock.getDelayedCalls()], [30])
        client.clear()
        clock.advance(30)
        self.assertEqual(client.value(), b"* BYE Idle timeout.\r\n")

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


class _RaisingRouter:
    """
    A router whose C{route} raises, or answers with what it is given.
    """

    def __init__(self, answer: object = None) -> None:
        self.answer = answer

    def route(self, request: object) -> object:
        if self.answer is None:
            raise RuntimeError("directory down")
        return self.answer


class RouterTroubleTests(SynchronousTestCase):
    """
    A router that fails, at once or later, makes the login fail as
    temporary, logged and counted like any failed login; its time is
    counted too.
    """

    UNAVAILABLE = b"a NO [UNAVAILABLE] Service temporarily unavailable, try again later.\r\n"

    def assertUnavailable(self, frontend: FrontendProtocol, client: TLSStringTransport, error: type[Exception]) -> None:
        """
        The client was refused as temporary; the router's failure was
        logged as C{error}, the login counted as failed without a backend,
        and the router's time observed once.
        """
        self.assertEqual(client.value(), self.UNAVAILABLE)
        self.assertEqual(len(self.flushLoggedErrors(error)), 1)
        stats = frontend.context.stats
        self.assertEqual(dict(stats.logins), {("imap", "", "unavailable"): 1})
        self.assertEqual([histogram.count for histogram in stats.routerLatency.values()], [1])
        self.assertFalse(frontend.loginRunning)

    def test_raisesAtOnce(self) -> None:
        """
        A router whose C{route} raises.
        """
        frontend, client, _ = makeFrontend("imap", _RaisingRouter(), MemoryConnector())
        client.clear()
        frontend.dataReceived(b"a LOGIN alice secret\r\n")
        self.assertUnavailable(frontend, client, RuntimeError)

    def test_wrongAnswerAtOnce(self) -> None:
        """
        A router that answers at once with something else than a route or
        a rejection.
        """
        frontend, client, _ = makeFrontend("imap", _RaisingRouter("old"), MemoryConnector())
        client.clear()
        frontend.dataReceived(b"a LOGIN alice secret\r\n")
        self.assertUnavailable(frontend, client, TypeError)

    def test_failsLater(self) -> None:
        """
        A router whose answer fails after a while.
        """
        router = FakeRouter(manual=True)
        frontend, client, _ = makeFrontend("imap", router, MemoryConnector())
        frontend.dataReceived(b"a LOGIN alice secret\r\n")
        client.clear()
        router.pending[0].errback(RuntimeError("directory down"))
        self.assertUnavailable(frontend, client, RuntimeError)


class AbandonedLoginTests(SynchronousTestCase):
    """
    A client that leaves while its login runs leaves nothing behind.
    """

    def test_leftDuringDelay(self) -> None:
        """
        A client that leaves while its failed login waits out the delay
        gets no reply, and no timed call is left on the clock.
        """
        frontend, client, clock = makeFrontend(
            "imap", FakeRouter(), MemoryConnector(), limits=Limits(failureDelay=2.0)
        )
        client.clear()
        frontend.dataReceived(b"a LOGIN nobody secret\r\n")
        self.assertEqual(len(clock.getDelayedCalls()), 2)
        frontend.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(clock.getDelayedCalls(), [])
        clock.advance(5)
        self.assertEqual(client.value(), b"")

    def test_leftDuringBackendLogin(self) -> None:
        """
        A client that leaves while the backend logs in gets no reply; the
        backend connection is aborted, its timer cancelled, and no failure
        is counted.
        """
        connector = MemoryConnector()
        frontend, client, clock = makeFrontend("imap", FakeRouter({"alice": Route(makeBackend("old"))}), connector)
        frontend.dataReceived(b"a LOGIN alice secret\r\n")
        client.clear()
        frontend.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(connector.transports[-1].disconnecting)
        self.assertEqual(clock.getDelayedCalls(), [])
        self.assertEqual(client.value(), b"")
        self.assertEqual(dict(frontend.context.stats.logins), {})
        self.assertEqual(frontend.context.stats.backendLoginLatency, {})


class LoginBugTests(SynchronousTestCase):
    """
    A bug while a failed login is counted does not leave the session
    waiting.
    """

    def test_failureHandlingFails(self) -> None:
        """
        If counting a refused login raises, the session ends at once with
        its internal-error goodbye, and the error is logged.
        """
        frontend, client, _ = makeFrontend("imap", FakeRouter(), MemoryConnector())

        def broken(*args: object) -> None:
            raise ZeroDivisionError()

        self.patch(frontend.context.stats, "loginFailed", broken)
        client.clear()
        frontend.dataReceived(b"a LOGIN nobody secret\r\n")
        self.assertTrue(client.disconnecting)
        self.assertTrue(client.value().startswith(b"* BYE "), client.value())
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
