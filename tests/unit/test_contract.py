"""
The contract between the session core and the protocols
(L{mailproxy._contract}): the front ends implement it, the core's outcomes
read as before in the logs, and the registry tells its observers of logins
and ends.
"""

from __future__ import annotations

import sys
from base64 import b64encode
from typing import Any, cast

from twisted.internet.address import IPv4Address
from twisted.internet.defer import succeed
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyClass, verifyObject

from mailproxy._commandloop import CommandFrontend, LoopState
from mailproxy._contract import ILoginFrontend, ISessionObserver
from mailproxy._login import LoginFailed
from mailproxy._outcomes import EndReason, SASLRefusal, StartTLSRefusal
from mailproxy._session import ProxyContext, Session, Timer, newSessionId
from mailproxy.imap._frontend import IMAPFrontend
from mailproxy.model import Credentials, Route
from mailproxy.pop3._frontend import POP3Frontend
from mailproxy.settings import Limits, Listener
from mailproxy.testing import FakeRouter, MemoryConnector, TLSStringTransport, makeBackend, makeFrontend

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
        for frontendClass in (IMAPFrontend, POP3Frontend, ToyFrontend):
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


class SessionIdTests(SynchronousTestCase):
    """
    L{newSessionId}, the id every session's log lines and forwarded
    identity carry.
    """

    def test_base32Letters(self) -> None:
        """
        An id is 16 characters of lower-case base32, random (over many
        ids every one of the 32 characters turns up, and no id repeats),
        and made without running Python code: no pure-Python encoder on
        every session.
        """
        calls: list[str] = []

        def profile(frame: object, event: str, arg: object) -> None:
            if event == "call":
                calls.append(getattr(frame, "f_code").co_name)

        ids = []
        sys.setprofile(profile)
        try:
            for _ in range(200):
                ids.append(newSessionId())
        finally:
            sys.setprofile(None)
        self.assertEqual(calls, ["newSessionId"] * len(ids))
        for each in ids:
            self.assertRegex(each, "^[a-z2-7]{16}$")
        self.assertEqual(len(set(ids)), len(ids))
        self.assertEqual(set("".join(ids)), set("abcdefghijklmnopqrstuvwxyz234567"))


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
    L{mailproxy._registry.SessionRegistry.observe}: an observer hears of each
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


class _Lines:
    """
    The toy protocol's input: CRLF-terminated lines.
    """

    def __init__(self) -> None:
        self.buffer = b""

    def feed(self, data: bytes) -> None:
        self.buffer += data

    def clear(self) -> None:
        self.buffer = b""

    def takeRemaining(self) -> bytes:
        remaining, self.buffer = self.buffer, b""
        return remaining

    def unfinished(self) -> bool:
        return bool(self.buffer)

    def nextLine(self) -> bytes | None:
        line, found, rest = self.buffer.partition(b"\r\n")
        if not found:
            return None
        self.buffer = rest
        return line


class _LoggedIn:
    """
    Stands for a backend login that succeeded: what the hand-over uses.
    """

    leftover = b""

    def __init__(self, job: Any) -> None:
        self.job = job
        self.transport = StringTransport()

    def handedOver(self) -> None:
        """
        Nothing of the dialogue to forget.
        """


@implementer(ILoginFrontend)
class ToyFrontend(CommandFrontend):
    """
    The smallest protocol on the contract: C{STARTTLS}, C{AUTH mechanism
    [initial]} and C{LOGIN user password}; every answer names the core's
    outcome, so a test reads the decisions off the wire.
    """

    protocolName = "imap"

    def __init__(self, context: ProxyContext, listener: Listener) -> None:
        super().__init__(context, listener)
        self.input = _Lines()
        self.forgotten = 0

    def greet(self) -> None:
        self.sendLine(b"HELLO")

    def sayGoodbye(self, reason: EndReason, text: str) -> None:
        self.sendLine(b"BYE " + reason.name.encode() + b" " + text.encode())

    def readCommand(self) -> bool:
        line = self.input.nextLine()
        if line is None:
            return False
        words = line.split(b" ")
        if words[0] == b"STARTTLS":
            self.startTLSCommand(line, hasArguments=len(words) > 1)
        elif words[0] == b"AUTH":
            self.authenticate(line, words[1].decode(), words[2] if len(words) > 2 else None)
        elif words[0] == b"LOGIN":
            self.loginWith(line, Credentials("LOGIN", words[1].decode(), password=words[2]))
        else:
            self.sendLine(b"BAD")
            self.countBadCommand()
        return True

    def readSASLResponse(self) -> bool:
        line = self.input.nextLine()
        if line is None:
            return False
        self.saslResponse(line)
        return True

    def answerStartTLS(self, command: bytes, refusal: StartTLSRefusal | None) -> None:
        self.sendLine(b"TLS " + (refusal.name.encode() if refusal else b"GO"))

    def forgetBeforeTLS(self) -> None:
        self.forgotten += 1

    def saslMechanisms(self) -> list[str]:
        return ["PLAIN", "CRAM-MD5"]

    def saslChallenge(self, command: bytes, data: bytes) -> None:
        self.sendLine(b"CHALLENGE " + data)

    def answerSASLRefusal(self, command: bytes, refusal: SASLRefusal, mechanism: str) -> None:
        self.sendLine(b"SASL " + refusal.name.encode() + b" " + mechanism.encode())

    def answerLogin(self, command: bytes, backend: Any) -> None:
        self.sendLine(b"WELCOME " + command)

    def answerLoginFailure(self, command: bytes, failure: LoginFailed) -> None:
        self.sendLine(b"FAILED " + failure.kind.name.encode() + b" " + command)

    def makeBackendLogin(self, job: Any) -> Any:
        return _LoggedIn(job)


class CoreDecisionTests(SynchronousTestCase):
    """
    What the core decides for any protocol, seen through L{ToyFrontend}:
    the protocol only reads its syntax and names the outcome it is given.
    """

    def connect(self, tls: str = "none", answers: dict | None = None, **limits: Any) -> tuple[ToyFrontend, TLSStringTransport]:
        """
        A connected toy front end whose router knows C{answers} (by default
        alice, at backend "old").
        """
        if answers is None:
            answers = {"alice": Route(makeBackend("old"))}
        context = ProxyContext(
            reactor=Clock(),
            router=FakeRouter(answers),
            limits=Limits(failureDelay=0, **limits),
            hostname="proxy.test",
            serverTLS=cast(IOpenSSLServerConnectionCreator, object()),
            backendConnector=lambda clock, backend: succeed(backend),
        )
        frontend = ToyFrontend(context, Listener(protocol="imap", endpoint="tcp:0", tls=tls))
        transport = TLSStringTransport(peerAddress=IPv4Address("TCP", "192.0.2.10", 50000))
        frontend.makeConnection(transport)
        transport.clear()
        return frontend, transport

    def test_startTLSRefusals(self) -> None:
        """
        STARTTLS with arguments, without STARTTLS on the listener, or with
        TLS up, is refused for that reason, in that order of checks.
        """
        frontend, client = self.connect()
        frontend.dataReceived(b"STARTTLS now\r\nSTARTTLS\r\n")
        self.assertEqual(client.value(), b"TLS ARGUMENTS\r\nTLS UNAVAILABLE\r\n")
        frontend, client = self.connect(tls="implicit")
        frontend.dataReceived(b"STARTTLS\r\n")
        self.assertEqual(client.value(), b"TLS ACTIVE\r\n")
        self.assertEqual(frontend.forgotten, 0)

    def test_startTLS(self) -> None:
        """
        An accepted STARTTLS drops what was pipelined behind it, lets the
        protocol forget what it learned, and starts TLS.
        """
        frontend, client = self.connect(tls="starttls")
        frontend.dataReceived(b"STARTTLS\r\nLOGIN alice injected\r\n")
        self.assertEqual(client.value(), b"TLS GO\r\n")
        self.assertEqual(frontend.input.buffer, b"")
        self.assertEqual(frontend.forgotten, 1)
        self.assertTrue(frontend.tlsActive)
        self.assertIsNotNone(client.tlsOptions)

    def test_saslRefusals(self) -> None:
        """
        An unknown mechanism, credentials before TLS where TLS comes first,
        bad base64, an initial response to CRAM-MD5, a cancelled exchange
        and an authorization identity are refused, each for its reason.
        """
        frontend, client = self.connect(tls="starttls-required")
        frontend.dataReceived(b"AUTH GSSAPI\r\nAUTH plain\r\n")
        self.assertEqual(client.value(), b"SASL UNSUPPORTED GSSAPI\r\nSASL PRIVACY_REQUIRED PLAIN\r\n")
        frontend, client = self.connect()
        frontend.dataReceived(b"AUTH PLAIN !!\r\nAUTH CRAM-MD5 " + b64encode(b"x") + b"\r\nAUTH PLAIN\r\n*\r\n")
        frontend.dataReceived(b"AUTH PLAIN " + b64encode(b"bob\0alice\0secret") + b"\r\n")
        self.assertEqual(
            client.value(),
            b"SASL BAD_BASE64 PLAIN\r\nSASL NO_INITIAL_RESPONSE CRAM-MD5\r\nCHALLENGE \r\n"
            b"SASL ABORTED PLAIN\r\nSASL AUTHORIZATION PLAIN\r\n",
        )

    def test_saslLogin(self) -> None:
        """
        A SASL exchange that ends with credentials logs in; the protocol
        welcomes the client and the session relays what followed.
        """
        frontend, client = self.connect()
        frontend.dataReceived(b"AUTH PLAIN\r\n")
        self.assertEqual(client.value(), b"CHALLENGE \r\n")
        frontend.dataReceived(b64encode(b"\0alice\0secret") + b"\r\nSELECT\r\n")
        self.assertTrue(client.value().endswith(b"WELCOME AUTH PLAIN\r\n"))
        self.assertIsNotNone(frontend.relay)
        self.assertEqual(frontend.user, "alice")
        self.assertEqual(frontend.result, "logged in")

    def test_loginFailures(self) -> None:
        """
        A failed login is answered with its kind and the loop reads on;
        the failure that reaches the limit ends the session with the
        core's goodbye, and the session-end line says the failure.
        """
        frontend, client = self.connect(loginFailures=2)
        frontend.dataReceived(b"LOGIN bob x\r\nLOGIN bob y\r\nLOGIN alice z\r\n")
        self.assertEqual(
            client.value(),
            b"FAILED AUTH LOGIN bob x\r\nFAILED AUTH LOGIN bob y\r\n"
            b"BYE LOGIN_FAILED Too many invalid authentication attempts.\r\n",
        )
        self.assertTrue(client.disconnecting)
        self.assertEqual(frontend.result, "login failed: auth")
        self.assertEqual(frontend.state, LoopState.CLOSED)

    def test_badCommands(self) -> None:
        """
        Invalid commands up to the limit end the session with the core's
        reason and goodbye.
        """
        frontend, client = self.connect()
        frontend.dataReceived(b"NONSENSE\r\n" * 12)
        self.assertEqual(client.value(), b"BAD\r\n" * 10 + b"BYE BAD_COMMANDS Too many invalid commands.\r\n")
        self.assertEqual(frontend.result, "too many invalid commands")
