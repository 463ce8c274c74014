"""
The contract between the session core and the protocols
(L{mailproxy._contract}): the front ends implement it, the core's outcomes
read as before in the logs, and the registry tells its observers of logins
and ends.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyClass, verifyObject

from mailproxy._contract import ILoginFrontend, ISessionObserver
from mailproxy._outcomes import EndReason
from mailproxy._session import Session, Timer
from mailproxy.imap._frontend import IMAPFrontend
from mailproxy.model import Route
from mailproxy.pop3._frontend import POP3Frontend
from mailproxy.testing import FakeRouter, MemoryConnector, makeBackend, makeFrontend

from .opsfixtures import GREETING, LOGGED_IN


class FrontendContractTests(SynchronousTestCase):
    """
    Each converted front end declares and implements the protocol side of
    the contract.
    """

    def test_classes(self) -> None:
        """
        The IMAP and POP3 front ends implement L{ILoginFrontend}.
        """
        for frontendClass in (IMAPFrontend, POP3Frontend):
            self.assertTrue(verifyClass(ILoginFrontend, frontendClass), frontendClass)

    def test_objects(self) -> None:
        """
        A connected front end has the contract's attributes too: its
        protocol name and the input the core clears at STARTTLS and hands
        to the backend at hand-over.
        """
        for protocol in ("imap", "pop3"):
            frontend, _, _ = makeFrontend(protocol, FakeRouter())
            self.assertTrue(verifyObject(ILoginFrontend, frontend), protocol)
            self.assertEqual(frontend.protocolName, protocol)


class EndReasonWordsTests(SynchronousTestCase):
    """
    L{EndReason.words} gives the session-end line's C{reason=} words.
    """

    def test_words(self) -> None:
        """
        A reason alone is its value; a detail follows a colon; a shutdown
        is logged as a drop; an MX count comes first.
        """
        self.assertEqual(EndReason.PREAUTH_TIMEOUT.words(), "pre-auth timeout")
        self.assertEqual(EndReason.PROTOCOL_ERROR.words("line too long"), "protocol error: line too long")
        self.assertEqual(EndReason.LOGIN_FAILED.words("auth"), "login failed: auth")
        self.assertEqual(EndReason.SHUTDOWN.words("Server shutting down."), "dropped: Server shutting down.")
        self.assertEqual(EndReason.MESSAGES_ACCEPTED.words("2"), "2 message(s) accepted")


class TimerTests(SynchronousTestCase):
    """
    L{Timer}, every session's one timer helper.
    """

    def test_expiresOnce(self) -> None:
        """
        A started timer calls its function once, when it expires; then it
        is no longer running.
        """
        clock, calls = Clock(), []
        timer = Timer(clock, lambda: calls.append(clock.seconds()))
        timer.start(5)
        self.assertTrue(timer.running)
        clock.advance(4)
        self.assertEqual(calls, [])
        clock.advance(1)
        self.assertEqual(calls, [5])
        self.assertFalse(timer.running)
        clock.advance(10)
        self.assertEqual(calls, [5])

    def test_restartAndStop(self) -> None:
        """
        Starting again replaces the deadline; a stopped timer never fires.
        """
        clock, calls = Clock(), []
        timer = Timer(clock, lambda: calls.append(clock.seconds()))
        timer.start(5)
        clock.advance(3)
        timer.start(5)
        clock.advance(3)
        self.assertEqual(calls, [])
        clock.advance(2)
        self.assertEqual(calls, [8])
        timer.start(1)
        timer.stop()
        clock.advance(5)
        self.assertEqual(calls, [8])
        self.assertEqual(clock.getDelayedCalls(), [])


@implementer(ISessionObserver)
class RecordingObserver:
    """
    Records what a registry tells it, with what the session knew then.
    """

    def __init__(self) -> None:
        self.events: list[tuple[str, str | None, str | None]] = []

    def sessionLoggedIn(self, session: Session) -> None:
        self.events.append(("in", session.user, session.backendName))

    def sessionEnded(self, session: Session) -> None:
        self.events.append(("end", session.user, session.backendName))


class RegistryObserverTests(SynchronousTestCase):
    """
    L{mailproxy._session.SessionRegistry.observe}: an observer hears of each
    hand-over (with the account and the backend) and each end.
    """

    def test_loginAndEnd(self) -> None:
        """
        The observer hears of the login once the session relays, and of
        its end once it closed; a session that never logged in only ends.
        """
        observer = RecordingObserver()
        connector = MemoryConnector()
        router = FakeRouter({"alice": Route(makeBackend("old"))})
        frontend, _, _ = makeFrontend("imap", router, connector)
        verifyObject(ISessionObserver, observer)
        frontend.context.sessions.observe(observer)
        frontend.dataReceived(b"a LOGIN alice secret\r\n")
        backend = connector.protocols[0]
        backend.dataReceived(GREETING)
        self.assertEqual(observer.events, [])
        backend.dataReceived(LOGGED_IN)
        self.assertIsNotNone(frontend.relay)
        self.assertEqual(observer.events, [("in", "alice", "old")])
        frontend.connectionLost(None)
        self.assertEqual(observer.events, [("in", "alice", "old"), ("end", "alice", "old")])
        second, _, _ = makeFrontend("pop3", router, connector)
        second.context.sessions.observe(observer)
        second.dataReceived(b"QUIT\r\n")
        second.connectionLost(None)
        self.assertEqual(observer.events[2:], [("end", None, None)])

    def test_stopObserving(self) -> None:
        """
        The function C{observe} returns stops the observing.
        """
        observer = RecordingObserver()
        frontend, _, _ = makeFrontend("pop3", FakeRouter())
        stop = frontend.context.sessions.observe(observer)
        stop()
        frontend.connectionLost(None)
        self.assertEqual(observer.events, [])

    def test_failingObserver(self) -> None:
        """
        An observer that raises is logged; the session still leaves the
        registry and the other observers still hear of it.
        """

        @implementer(ISessionObserver)
        class Broken:
            def sessionLoggedIn(self, session: Session) -> None:
                raise RuntimeError("boom")

            def sessionEnded(self, session: Session) -> None:
                raise RuntimeError("boom")

        observer = RecordingObserver()
        frontend, _, _ = makeFrontend("pop3", FakeRouter())
        registry = frontend.context.sessions
        registry.observe(Broken())
        registry.observe(observer)
        frontend.connectionLost(None)
        self.assertNotIn(frontend, registry)
        self.assertEqual(observer.events, [("end", None, None)])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
