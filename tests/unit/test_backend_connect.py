"""
Connecting a backend login (L{mailproxy._backend.connectBackend}) and the
job it carries, with a fake reactor whose connector behaves like Twisted's.
"""

from __future__ import annotations

import gc
import socket
from types import FunctionType, ModuleType
from typing import Any

import attrs
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, inlineCallbacks
from twisted.internet.error import UserError
from twisted.internet.task import Clock, deferLater
from twisted.python.failure import Failure
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mailproxy import _backend
from mailproxy._backend import BackendFailure, BackendProtocol, LoginJob, connectBackend
from mailproxy.model import ClientInfo, Credentials, Route
from mailproxy._outcomes import FailureKind
from mailproxy._sasl import plainResponse
from mailproxy.http._backend import HTTPBackend
from mailproxy.imap._backend import IMAPBackendLogin
from mailproxy.pop3._backend import POP3BackendLogin
from mailproxy.sieve._backend import SieveBackendLogin
from mailproxy.smtp._backend import SMTPBackend, SMTPBackendLogin
from mailproxy.testing import FakeRouter, TLSStringTransport, makeBackend, makeFrontend


class PendingConnector:
    """
    A TCP connection attempt still under way; stopping it reports the
    failure to the factory at once, as L{twisted.internet.base.BaseConnector}
    does, and so does its transport's C{failIfNotConnected}.
    """

    def __init__(self, factory) -> None:
        self.factory = factory
        self.state = "connecting"
        self.transport = self

    def stopConnecting(self) -> None:
        self.failIfNotConnected(UserError())

    def failIfNotConnected(self, error: Exception) -> None:
        if self.state == "connecting":
            self.state = "disconnected"
            self.factory.clientConnectionFailed(self, Failure(error))


class SlowReactor(Clock):
    """
    A clock whose C{connectTCP} never completes by itself.
    """

    def __init__(self) -> None:
        super().__init__()
        self.connectors: list[PendingConnector] = []

    def connectTCP(self, host, port, factory, timeout=30, bindAddress=None) -> PendingConnector:
        connector = PendingConnector(factory)
        self.connectors.append(connector)
        return connector


def makeJob(**kwargs) -> LoginJob:
    """
    A login job for alice on a backend named by address.
    """
    client = ClientInfo(sessionId="s", address="192.0.2.10", port=50000, localAddress="192.0.2.1", localPort=143)
    kwargs.setdefault("password", b"Sup3rSecretPw")
    kwargs.setdefault("route", Route(makeBackend("old")))
    kwargs.setdefault("protocol", "imap")
    kwargs.setdefault("credentials", Credentials("LOGIN", "alice", password=b"Sup3rSecretPw"))
    return LoginJob(client=client, user="alice", **kwargs)


class ConnectBackendTests(SynchronousTestCase):
    """
    L{connectBackend} while the TCP connection is being made.
    """

    def test_cancelWhileConnecting(self) -> None:
        """
        Giving up on a login while its connection is under way (the client
        left) stops the attempt and fails the result with
        L{CancelledError}, not as if the backend were down.
        """
        reactor = SlowReactor()
        protocol = BackendProtocol(makeJob(), reactor, 30)
        d = connectBackend(reactor, protocol)
        d.cancel()
        self.assertEqual(reactor.connectors[0].state, "disconnected")
        self.failureResultOf(d, CancelledError)

    def test_clientLeavesWhileConnecting(self) -> None:
        """
        When the client's connection ends while the backend connection is
        under way, the front end does not go on with commands it had
        buffered: no second login is routed.
        """
        reactor = SlowReactor()
        router = FakeRouter({"alice": Route(makeBackend("old"))})
        frontend, client, clock = makeFrontend("imap", router)
        frontend.context.backendConnector = lambda _, protocol: connectBackend(reactor, protocol)
        frontend.dataReceived(b"a LOGIN alice secret\r\nb LOGIN alice secret\r\n")
        self.assertEqual(len(router.requests), 1)
        frontend.connectionLost(None)
        self.assertEqual(len(router.requests), 1)
        self.assertEqual(len(reactor.connectors), 1)


class ConnectTimerTests(TestCase):
    """
    One timed call per backend login times both the connection attempt
    (the backend's C{connect_timeout}) and the dialogue after it
    (C{backend_timeout}).
    """

    def test_connectTimedOut(self) -> None:
        """
        A connection not made within the backend's C{connect_timeout}
        fails the login as a timed-out connection.
        """
        clock = SlowReactor()
        job = makeJob(route=Route(makeBackend("old", connectTimeout=4.0)))
        d = connectBackend(clock, BackendProtocol(job, clock, 30))
        clock.advance(3.9)
        self.assertNoResult(d)
        clock.advance(0.1)
        failure = self.failureResultOf(d, BackendFailure)
        self.assertEqual(str(failure.value), "unavailable: cannot connect to old: User timeout caused connection failure.")
        self.assertEqual(clock.connectors[0].state, "disconnected")
        self.assertEqual(clock.getDelayedCalls(), [])

    @inlineCallbacks
    def test_oneTimedCall(self) -> Any:
        """
        Connecting a backend over loopback and starting its dialogue makes
        one timed call: set to the connection timeout, then moved to the
        dialogue's.
        """
        listening = socket.socket()
        self.addCleanup(listening.close)
        listening.bind(("127.0.0.1", 0))
        listening.listen(1)
        timed: list[float] = []
        callLater = reactor.callLater

        def counting(seconds: float, f: Any, *args: Any, **kwargs: Any) -> Any:
            # The login's own; not the reactor's callLater(0) for the
            # connect, nor this test's polling.
            if getattr(f, "__name__", "") in ("_timedOut", "failIfNotConnected"):
                timed.append(seconds)
            return callLater(seconds, f, *args, **kwargs)

        self.patch(reactor, "callLater", counting)
        backend = makeBackend("old", host="127.0.0.1", ports={"imap": listening.getsockname()[1]}, connectTimeout=4.0)
        protocol = BackendProtocol(makeJob(route=Route(backend)), reactor, 30)
        connectBackend(reactor, protocol)
        for _ in range(500):
            if protocol.stopConnecting is None:
                break
            yield deferLater(reactor, 0.01)
        self.assertIsNone(protocol.stopConnecting)
        self.assertEqual(timed, [4.0])
        timer = protocol._timer
        assert timer is not None
        self.assertTrue(29 < timer.getTime() - reactor.seconds() <= 30)
        protocol.abandon()
        yield protocol.result.addErrback(lambda _: None)


class LoginJobTests(SynchronousTestCase):
    """
    L{LoginJob} keeps its secrets.
    """

    def test_reprHidesPasswords(self) -> None:
        """
        Neither the backend password nor the master password appears in a
        job's C{repr}.
        """
        job = makeJob(masterUser="proxy", masterPassword=b"MasterSecretPw")
        self.assertNotIn("Sup3rSecretPw", repr(job))
        self.assertNotIn("MasterSecretPw", repr(job))


def holds(root: object, secret: bytes) -> bool:
    """
    Whether C{secret} (or a PLAIN response carrying it) can be reached from
    C{root}: through attributes, containers, bound methods and closures,
    not through classes, modules or a function's globals.
    """
    forms = (secret, plainResponse(b"", b"alice", secret))
    seen: set[int] = set()
    todo = [root]
    while todo:
        obj = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, bytes):
            if any(form in obj for form in forms):
                return True
        elif isinstance(obj, FunctionType):
            todo.extend(cell.cell_contents for cell in obj.__closure__ or ())
            todo.extend(obj.__defaults__ or ())
        elif not isinstance(obj, (type, ModuleType)):
            todo.extend(gc.get_referents(obj))
    return False


class ForgottenSecretsTests(SynchronousTestCase):
    """
    A backend connection outlives its login by the whole relayed session;
    once the dialogue is over it keeps no password: not the backend's, not
    the master user's, not the client's, not the route's.
    """

    def setUp(self) -> None:
        self.clock = Clock()

    def job(self, **kwargs) -> LoginJob:
        route = Route(makeBackend("old", forward="none"), password=b"Sup3rSecretPw")
        return makeJob(route=route, **kwargs)

    def connect(self, protocol: BackendProtocol) -> TLSStringTransport:
        transport = TLSStringTransport()
        protocol.makeConnection(transport)
        self.addCleanup(protocol._cancelTimer)
        return transport

    def assertForgotten(self, protocol: BackendProtocol, transport: TLSStringTransport) -> None:
        transport.clear()
        self.assertFalse(holds(protocol, b"Sup3rSecretPw"))
        self.assertFalse(holds(protocol, b"MasterSecretPw"))

    def test_imapLoggedIn(self) -> None:
        """
        After an IMAP login with the user's password, nothing reachable from
        the connection holds that password.
        """
        protocol = IMAPBackendLogin(self.job(), self.clock, 30)
        transport = self.connect(protocol)
        protocol.dataReceived(b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN] ready\r\n")
        self.assertIn(b"AUTHENTICATE PLAIN", transport.value())
        protocol.dataReceived(b"P1 OK [CAPABILITY IMAP4rev1] Logged in\r\n")
        self.assertIs(self.successResultOf(protocol.result), protocol)
        self.assertForgotten(protocol, transport)

    def test_imapMasterUserLoggedIn(self) -> None:
        """
        After a master user's IMAP login, the connection holds neither the
        master password nor the user's.
        """
        job = self.job(password=None, masterUser="proxy", masterPassword=b"MasterSecretPw")
        protocol = IMAPBackendLogin(job, self.clock, 30)
        transport = self.connect(protocol)
        protocol.dataReceived(b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN] ready\r\n")
        protocol.dataReceived(b"P1 OK [CAPABILITY IMAP4rev1] Logged in\r\n")
        self.successResultOf(protocol.result)
        self.assertForgotten(protocol, transport)

    def test_imapRefused(self) -> None:
        """
        A refused login forgets the passwords too.
        """
        protocol = IMAPBackendLogin(self.job(), self.clock, 30)
        transport = self.connect(protocol)
        protocol.dataReceived(b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN] ready\r\n")
        protocol.dataReceived(b"P1 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n")
        self.failureResultOf(protocol.result)
        self.assertForgotten(protocol, transport)

    def test_smtpLoggedIn(self) -> None:
        """
        After a submission login, the connection holds no password, although
        the front end's C{learn} callback was made with the job in hand.
        """
        job = self.job(protocol="smtp")
        learnt: list[str] = []
        protocol = SMTPBackendLogin(
            job, self.clock, 30, hostname="proxy.test", learn=lambda extensions: learnt.append(job.backend.name)
        )
        transport = self.connect(protocol)
        protocol.dataReceived(b"220 old ESMTP\r\n")
        protocol.dataReceived(b"250-old\r\n250 AUTH PLAIN\r\n")
        self.assertIn(b"AUTH PLAIN ", transport.value())
        protocol.dataReceived(b"235 2.7.0 Authentication successful\r\n")
        self.successResultOf(protocol.result)
        self.assertEqual(learnt, ["old"])
        self.assertForgotten(protocol, transport)


class WithoutSecretsTests(SynchronousTestCase):
    """
    L{LoginJob.withoutSecrets}: what a relayed session keeps of its login.
    """

    def test_everythingButSecrets(self) -> None:
        """
        The copy keeps every field of the job and of its credentials but
        the secrets (a field added to either later is kept too, or this
        fails), and costs no attrs.evolve when the route holds no password
        (one look-up of every field by name, at every login).
        """
        evolved: list[object] = []
        realEvolve = _backend.evolve
        self.patch(_backend, "evolve", lambda inst, **changes: (evolved.append(inst), realEvolve(inst, **changes))[1])
        credentials = Credentials(
            "CRAM-MD5", "alice", password=b"pw", authzid="bob", challenge=b"<1@x>", response=b"abc", token=b"tok"
        )
        job = makeJob(
            credentials=credentials, masterUser="proxy", masterPassword=b"mpw", clientID=(("name", "x"),), portName="mx"
        )
        copy = job.withoutSecrets()
        self.assertEqual(evolved, [])
        secrets = {"password", "masterPassword", "response", "token"}
        for name in (f.name for f in attrs.fields(LoginJob)):
            if name == "credentials":
                continue
            self.assertEqual(getattr(copy, name), None if name in secrets else getattr(job, name), name)
        assert copy.credentials is not None
        for name in (f.name for f in attrs.fields(Credentials)):
            expected = None if name in secrets else getattr(credentials, name)
            self.assertEqual(getattr(copy.credentials, name), expected, name)
        routed = makeJob(route=Route(makeBackend("old"), password=b"pw")).withoutSecrets()
        self.assertIsNone(routed.route.password)
        self.assertEqual(routed.route.backend.name, "old")


class BackendStartTLSTests(SynchronousTestCase):
    """
    STARTTLS towards a backend, the same in every protocol: octets behind
    the server's "go on" came in clear, so TLS is not even started and the
    login fails as temporary; a refusal fails it too, before any
    credential.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.route = Route(makeBackend("old", tls="starttls", forward="none"))

    def start(self, protocol: BackendProtocol, greeting: bytes, ask: bytes) -> TLSStringTransport:
        transport = TLSStringTransport()
        protocol.makeConnection(transport)
        self.addCleanup(protocol._cancelTimer)
        protocol.dataReceived(greeting)
        self.assertEqual(transport.value(), ask)
        transport.clear()
        return transport

    def assertFailed(self, protocol: BackendProtocol, transport: TLSStringTransport, detail: str) -> None:
        failure = self.failureResultOf(protocol.result, BackendFailure).value
        self.assertEqual((failure.kind, failure.detail), ("unavailable", detail))
        self.assertIsNone(transport.tlsOptions)
        self.assertEqual(transport.value(), b"")

    def test_imapInjection(self) -> None:
        """
        IMAP: a line behind the tagged OK to STARTTLS.
        """
        protocol = IMAPBackendLogin(makeJob(route=self.route), self.clock, 30)
        transport = self.start(protocol, b"* OK [CAPABILITY IMAP4rev1 STARTTLS] ready\r\n", b"P1 STARTTLS\r\n")
        protocol.dataReceived(b"P1 OK Begin TLS\r\n* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] hi\r\n")
        self.assertFailed(protocol, transport, "backend sent data after its STARTTLS reply")

    def test_pop3Injection(self) -> None:
        """
        POP3: a line behind the C{+OK} to STLS.
        """
        protocol = POP3BackendLogin(makeJob(route=self.route, protocol="pop3"), self.clock, 30)
        transport = self.start(protocol, b"+OK ready\r\n", b"STLS\r\n")
        protocol.dataReceived(b"+OK Begin TLS\r\n+OK\r\n")
        self.assertFailed(protocol, transport, "backend sent data after its STLS reply")

    def test_sieveInjection(self) -> None:
        """
        ManageSieve: a line behind the OK to STARTTLS.
        """
        protocol = SieveBackendLogin(makeJob(route=self.route, protocol="sieve"), self.clock, 30)
        transport = self.start(protocol, b'"SASL" "PLAIN"\r\n"STARTTLS"\r\nOK "ready"\r\n', b"STARTTLS\r\n")
        protocol.dataReceived(b'OK "go"\r\n"SASL" "PLAIN"\r\n')
        self.assertFailed(protocol, transport, "backend sent data after its STARTTLS reply")

    def test_smtpInjection(self) -> None:
        """
        SMTP: a reply behind the 220 to STARTTLS.
        """
        protocol = SMTPBackendLogin(makeJob(route=self.route, protocol="smtp"), self.clock, 30, hostname="proxy.test")
        transport = self.start(protocol, b"220 old ESMTP\r\n", b"EHLO proxy.test\r\n")
        protocol.dataReceived(b"250-old\r\n250 STARTTLS\r\n")
        self.assertEqual(transport.value(), b"STARTTLS\r\n")
        transport.clear()
        protocol.dataReceived(b"220 go ahead\r\n250 AUTH PLAIN\r\n")
        self.assertFailed(protocol, transport, "backend sent data after its STARTTLS reply")

    def test_pop3Refused(self) -> None:
        """
        A refused STLS fails the login, with the server's reply in the log
        detail.
        """
        protocol = POP3BackendLogin(makeJob(route=self.route, protocol="pop3"), self.clock, 30)
        transport = self.start(protocol, b"+OK ready\r\n", b"STLS\r\n")
        protocol.dataReceived(b"-ERR no TLS here\r\n")
        self.assertFailed(protocol, transport, "backend refused STLS: -ERR no TLS here")

    def test_notOffered(self) -> None:
        """
        A server whose capabilities lack STARTTLS is not asked.
        """
        protocol = IMAPBackendLogin(makeJob(route=self.route), self.clock, 30)
        transport = TLSStringTransport()
        protocol.makeConnection(transport)
        self.addCleanup(protocol._cancelTimer)
        protocol.dataReceived(b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] ready\r\n")
        self.assertFailed(protocol, transport, "backend does not offer STARTTLS")


class PortTLSTests(SynchronousTestCase):
    """
    A backend's C{port_tls} overrides its C{tls} for one port: one store
    reached with STARTTLS on IMAP and in plain on its MX port.
    """

    def setUp(self) -> None:
        self.backend = makeBackend(
            "store", ports={"imap": 143, "mx": 25}, tls="starttls", portTLS={"mx": "none"}, forward="none"
        )
        self.clock = Clock()

    def connect(self, protocol: BackendProtocol) -> TLSStringTransport:
        transport = TLSStringTransport()
        protocol.makeConnection(transport)
        self.addCleanup(protocol._cancelTimer)
        return transport

    def test_imapStartTLS(self) -> None:
        """
        The IMAP login to the store starts with STARTTLS and writes no
        credentials before the handshake.
        """
        protocol = IMAPBackendLogin(makeJob(route=Route(self.backend)), self.clock, 30)
        transport = self.connect(protocol)
        protocol.dataReceived(b"* OK [CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED] ready\r\n")
        self.assertEqual(transport.value(), b"P1 STARTTLS\r\n")
        protocol.dataReceived(b"P1 OK Begin TLS negotiation now.\r\n")
        self.assertIsNotNone(transport.tlsOptions)

    def test_mxPlain(self) -> None:
        """
        An MX session to the same store stays plain: after EHLO, although
        the server offers STARTTLS, the proxy sends no STARTTLS and starts
        no TLS.
        """
        job = makeJob(route=Route(self.backend), protocol="smtp", portName="mx", credentials=None)
        protocol = SMTPBackend(job, self.clock, 30, hostname="proxy.test", purpose="relay")
        transport = self.connect(protocol)
        protocol.dataReceived(b"220 store.test ESMTP\r\n")
        self.assertEqual(transport.value(), b"EHLO proxy.test\r\n")
        transport.clear()
        protocol.dataReceived(b"250-store.test\r\n250-STARTTLS\r\n250 8BITMIME\r\n")
        self.assertNotIn(b"STARTTLS", transport.value())
        self.assertIsNone(transport.tlsOptions)

    def test_mxStartTLSWithoutOverride(self) -> None:
        """
        Without the override the MX session to a C{tls = "starttls"} store
        does use STARTTLS (what the override changes).
        """
        backend = makeBackend("store", ports={"imap": 143, "mx": 25}, tls="starttls", forward="none")
        job = makeJob(route=Route(backend), protocol="smtp", portName="mx", credentials=None)
        protocol = SMTPBackend(job, self.clock, 30, hostname="proxy.test", purpose="relay")
        transport = self.connect(protocol)
        protocol.dataReceived(b"220 store.test ESMTP\r\n")
        transport.clear()
        protocol.dataReceived(b"250-store.test\r\n250-STARTTLS\r\n250 8BITMIME\r\n")
        self.assertEqual(transport.value(), b"STARTTLS\r\n")

    def test_httpNeverStartTLS(self) -> None:
        """
        HTTP has no STARTTLS: a backend whose http port a router's answer
        says to reach with C{starttls} fails the login as unavailable and
        is sent nothing, the request with its credentials least of all.
        """
        backend = makeBackend("store", ports={"http": 8080}, tls="starttls", forward="none")
        job = makeJob(route=Route(backend), protocol="http")
        protocol = HTTPBackend(job, self.clock, 30)
        transport = self.connect(protocol)
        failure = self.failureResultOf(protocol.result, BackendFailure).value
        self.assertEqual(failure.kind, FailureKind.UNAVAILABLE)
        self.assertIn("HTTP has no STARTTLS", failure.detail)
        self.assertEqual(transport.value(), b"")
        self.assertIsNone(transport.tlsOptions)
        plain = HTTPBackend(makeJob(route=Route(attrs.evolve(backend, tls="none")), protocol="http"), self.clock, 30)
        self.connect(plain)
        self.assertIs(self.successResultOf(plain.result), plain)

    def test_mxQuitReplyIgnored(self) -> None:
        """
        The backend's reply to the proxy's QUIT at the end of an MX session
        (which arrives before the close, the TLS close waiting for the
        server's close_notify) is no "reply nobody asked for": nothing is
        logged and the connection is not aborted.
        """
        job = makeJob(route=Route(self.backend), protocol="smtp", portName="mx", credentials=None)
        protocol = SMTPBackend(job, self.clock, 30, hostname="proxy.test", purpose="relay")
        transport = self.connect(protocol)
        protocol.dataReceived(b"220 store.test ESMTP\r\n")
        protocol.dataReceived(b"250-store.test\r\n250 8BITMIME\r\n")
        self.successResultOf(protocol.result)
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        protocol.quit()
        self.assertTrue(transport.value().endswith(b"QUIT\r\n"))
        protocol.dataReceived(b"221 2.0.0 Bye\r\n")
        self.assertEqual([formatEvent(event) for event in events], [])
        self.assertFalse(transport.disconnected)  # not aborted (StringTransport sets it then)
