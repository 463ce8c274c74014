"""
What an idle relayed session holds: nothing of its login (the attempt, the
client's credentials, the SASL exchange, the backend's dialogue), and no
more Python memory per session than a bound.
"""

from __future__ import annotations

import gc
import tracemalloc
import types
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.trial.unittest import SynchronousTestCase

from mailproxy._backend import LoginJob
from mailproxy._login import LoginAttempt
from mailproxy._sasl import ServerExchange
from mailproxy._session import FrontendProtocol, ProxyContext
from mailproxy.config import Limits
from mailproxy.model import Credentials, Route
from mailproxy.testing import MemoryConnector, TLSStringTransport, makeBackend, makeFrontend

GREETING = b"* OK [CAPABILITY IMAP4rev1 SASL-IR ID AUTH=PLAIN LITERAL+ IDLE] Dovecot ready.\r\n"
LOGGED_IN = b'* ID ("name" "Dovecot")\r\nP1 OK ID completed.\r\nP2 OK [CAPABILITY IMAP4rev1 IDLE MOVE] Logged in\r\n'
PASSWORD = b"s3cret-password"

#: Python octets (as tracemalloc counts them) an idle IMAP session may hold
#: on in-memory transports: the front end, the relay, the backend protocol,
#: their timers and transports. About 4.6 KB now; 7.8 KB while a session
#: kept its login attempt, its backend's dialogue state, a table of bound
#: methods and an instance dictionary too large for CPython to share.
IDLE_SESSION_BOUND = 6000


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
