"""
What an idle relayed session holds: nothing of its login (the attempt, the
client's credentials, the SASL exchange, the backend's dialogue), and no
more Python memory per session than a bound.
"""

from __future__ import annotations

import gc
import sys
import tracemalloc
import types
from typing import Any

from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mailproxy import _tcp
from mailproxy._backend import BackendProtocol, LoginJob
from mailproxy._lines import SegmentBuffer
from mailproxy._login import LoginAttempt
from mailproxy._sasl import ServerExchange
from mailproxy._session import FrontendProtocol, ProxyContext
from mailproxy.config import Limits, Listener
from mailproxy.imap._parser import CommandParser
from mailproxy.model import Credentials, Route
from mailproxy.tap import listenerFactory
from mailproxy.testing import FakeRouter, MemoryConnector, TLSStringTransport, makeBackend, makeFrontend

from .test_login_garbage import OneShotFactory, ScriptedBackend

GREETING = b"* OK [CAPABILITY IMAP4rev1 SASL-IR ID AUTH=PLAIN LITERAL+ IDLE] Dovecot ready.\r\n"
LOGGED_IN = b'* ID ("name" "Dovecot")\r\nP1 OK ID completed.\r\nP2 OK [CAPABILITY IMAP4rev1 IDLE MOVE] Logged in\r\n'
PASSWORD = b"s3cret-password"

#: Python octets (as tracemalloc counts them) an idle IMAP session may hold
#: on in-memory transports: the front end, the relay, the backend protocol,
#: their timers and transports. About 3.8 KB now; 4.4 KB while a relayed
#: session kept its command parser and pre-authentication timer, 7.8 KB
#: while it kept its login attempt, its backend's dialogue state, a table
#: of bound methods and an instance dictionary too large for CPython to
#: share.
IDLE_SESSION_BOUND = 4200


class _Router:
    """
    Routes every login to one backend, keeping nothing of the request.
    """

    def __init__(self) -> None:
        self.answer = Route(makeBackend("old"))

    def route(self, request: object) -> Route:
        return self.answer


def _relayed(frontend: FrontendProtocol, connector: MemoryConnector) -> None:
    """
    Log C{frontend}'s client in (IMAP LOGIN), let the backend accept, and
    leave the session in IDLE, its transports emptied.
    """
    frontend.dataReceived(b"a LOGIN alice " + PASSWORD + b"\r\n")
    backend = connector.protocols[-1]
    backend.dataReceived(GREETING)
    backend.dataReceived(LOGGED_IN)
    frontend.dataReceived(b"i SELECT INBOX\r\nd IDLE\r\n")
    backend.dataReceived(b"* 0 EXISTS\r\ni OK [READ-WRITE] Select completed.\r\n+ idling\r\n")
    assert frontend.relay is not None
    frontend.transport.clear()  # type: ignore[attr-defined]
    connector.transports[-1].clear()


def _another(context: ProxyContext, like: FrontendProtocol, port: int) -> FrontendProtocol:
    """
    One more connected session of C{like}'s listener.
    """
    frontend = type(like)(context, like.listener)
    frontend.makeConnection(
        TLSStringTransport(
            hostAddress=IPv4Address("TCP", "192.0.2.1", 143), peerAddress=IPv4Address("TCP", "192.0.2.10", port)
        )
    )
    return frontend


def _reachable(root: object, stop: set[int]) -> list[object]:
    """
    Every object C{root} refers to, directly or not, not through the
    objects in C{stop} (by id), modules, classes and functions.
    """
    shared = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.CodeType)
    seen: dict[int, object] = {}
    todo = [root]
    while todo:
        item = todo.pop()
        if id(item) in seen or id(item) in stop or isinstance(item, shared):
            continue
        seen[id(item)] = item
        todo.extend(gc.get_referents(item))
    return list(seen.values())


class IdleSessionTests(SynchronousTestCase):
    """
    A session relaying an idle client holds only what the relay needs.
    """

    def setUp(self) -> None:
        self.connector = MemoryConnector()
        # Every session comes from one address.
        limits = Limits(connectionsPerAddress=0)
        self.frontend, self.client, self.clock = makeFrontend("imap", _Router(), self.connector, limits=limits)

    def test_loginStateReleased(self) -> None:
        """
        After the hand-over, nothing reachable from the session (its
        protocols, transports, relay and timers) is the login attempt, the
        SASL exchange, a login job or credentials, nor the password; the
        backend protocol forgot the server's capabilities.
        """
        _relayed(self.frontend, self.connector)
        context = self.frontend.context
        stop = {id(context), id(self.clock), id(self.frontend.listener), id(self.connector)}
        found = _reachable(self.frontend, stop)
        loginState = [type(item).__name__ for item in found if isinstance(item, (LoginAttempt, ServerExchange))]
        # The backend keeps its job, without secrets.
        withPassword = [
            type(item).__name__
            for item in found
            if isinstance(item, (LoginJob, Credentials)) and item.password is not None
        ]
        self.assertEqual((loginState, withPassword), ([], []))
        self.assertNotIn(PASSWORD, [item for item in found if isinstance(item, bytes)])
        self.assertIsNone(self.connector.protocols[-1].capabilities)  # type: ignore[attr-defined]

    def test_parserReleased(self) -> None:
        """
        After the hand-over the session no longer holds its command
        parser nor the parser's buffers: the relay reads the client.
        """
        _relayed(self.frontend, self.connector)
        context = self.frontend.context
        stop = {id(context), id(self.clock), id(self.frontend.listener), id(self.connector)}
        found = _reachable(self.frontend, stop)
        self.assertEqual([type(item).__name__ for item in found if isinstance(item, (CommandParser, SegmentBuffer))], [])

    def test_preauthTimerReleased(self) -> None:
        """
        After the hand-over the session's pre-authentication timer (and
        the bound method it would call) is gone: nothing reachable from
        the session is a timer that calls C{_preauthExpired}.
        """
        _relayed(self.frontend, self.connector)
        context = self.frontend.context
        stop = {id(context), id(self.clock), id(self.frontend.listener), id(self.connector)}
        found = _reachable(self.frontend, stop)
        preauth = [
            item
            for item in found
            if isinstance(item, types.MethodType) and item.__func__.__name__ == "_preauthExpired"
        ]
        self.assertEqual(preauth, [])

    def test_idleSessionBytes(self) -> None:
        """
        Fifty more idle relayed sessions take at most L{IDLE_SESSION_BOUND}
        octets of Python memory each.
        """
        _relayed(self.frontend, self.connector)
        context = self.frontend.context
        count = 50
        sessions: list[Any] = []
        gc.collect()
        tracemalloc.start()
        self.addCleanup(tracemalloc.stop)
        before = tracemalloc.get_traced_memory()[0]
        for index in range(count):
            frontend = _another(context, self.frontend, 50001 + index)
            _relayed(frontend, self.connector)
            sessions.append(frontend)
        gc.collect()
        perSession = (tracemalloc.get_traced_memory()[0] - before) / count
        self.assertEqual(len(context.sessions), count + 1)
        self.assertLessEqual(perSession, IDLE_SESSION_BOUND)


class _IdleBackend(ScriptedBackend):
    """
    The scripted IMAP backend, which also answers IDLE.
    """

    def __init__(self) -> None:
        super().__init__("imap")
        self.answers = {**self.answers, b"IDLE": b"+ idling\r\n"}


class _IdlingClient(Protocol):
    """
    Logs in, then idles; L{idling} fires once the backend's continuation
    arrives through the proxy.
    """

    def __init__(self) -> None:
        self.received = b""
        self.sent = 0
        self.idling: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self.sent == 0 and b"\r\n" in self.received:
            self.sent = 1
            self.transport.write(b"a LOGIN alice secret\r\n")  # type: ignore[union-attr]
        elif self.sent == 1 and b"a OK" in self.received:
            self.sent = 2
            self.transport.write(b"d IDLE\r\n")  # type: ignore[union-attr]
        elif self.sent == 2 and b"+ idling" in self.received:
            self.sent = 3
            self.idling.callback(None)


class LoopbackIdleSessionTests(TestCase):
    """
    What an idle session relayed over real loopback connections holds.
    """

    @inlineCallbacks
    def test_backendAttributesCompact(self) -> Any:
        """
        The backend protocol of an idle session keeps its attributes in
        CPython's compact form: its instance dictionary is not a
        full-size one of its own (about 1.5 KiB per idle session, as it
        was with every attribute of the base, the subclass and Twisted in
        one dictionary).
        """
        backendPort = reactor.listenTCP(0, Factory.forProtocol(_IdleBackend), interface="127.0.0.1")
        self.addCleanup(backendPort.stopListening)
        backend = makeBackend("b", host="127.0.0.1", ports={"imap": backendPort.getHost().port}, forward="none")
        context = ProxyContext(
            reactor=reactor, router=FakeRouter(default=Route(backend)), limits=Limits(failureDelay=0), hostname="proxy.test"
        )
        listener = Listener(protocol="imap", endpoint="tcp:0", tls="none")
        port = _tcp.listenAtOnce(reactor.listenTCP(0, listenerFactory(context, listener), interface="127.0.0.1"))
        self.addCleanup(port.stopListening)
        # The first session's attributes shape the later ones' storage.
        connectors = []
        clients = [_IdlingClient() for _ in range(5)]
        for client in clients:
            connectors.append(_tcp.connectAtOnce(reactor, "127.0.0.1", port.getHost().port, OneShotFactory(client), 5))
            self.addCleanup(connectors[-1].disconnect)
        for client in clients:
            yield client.idling
        sizes = []
        for session in context.sessions:
            assert session.relay is not None
            protocol = session.relay._backend.protocol  # type: ignore[attr-defined]
            self.assertIsInstance(protocol, BackendProtocol)
            # A dictionary made now from compact storage shares its keys
            # and is small; one that already existed has a table of its own.
            sizes.append(sys.getsizeof(protocol.__dict__))
        self.assertLess(max(sizes), 1000)
        for connector in connectors:
            connector.disconnect()
        while context.sessions:
            yield deferLater(reactor, 0.01)
