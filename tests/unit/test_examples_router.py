"""
Tests for the example router C{examples/myrouter.py} and the example route
table C{examples/routes.toml}: they are what users copy, so they must work.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from zope.interface.verify import verifyObject

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mailproxy.config import ConfigError, parseConfig
from mailproxy.interfaces import IRouter
from mailproxy.model import Backend, ClientInfo, Credentials, Rejection, Route, RouteRequest
from mailproxy.routers import buildRouter, callRouter
from mailproxy.routers.static import StaticRouter

EXAMPLES = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, os.pardir, "examples")
EXAMPLES = os.path.normpath(EXAMPLES)

STORE1 = Backend(name="store1", host="127.0.0.1", ports={"imap": 1143})
STORE2 = Backend(name="store2", host="127.0.0.1", ports={"imap": 2143})
ARCHIVE = Backend(name="archive", host="127.0.0.1", ports={"pop3": 110})
BACKENDS = {b.name: b for b in (STORE1, STORE2, ARCHIVE)}

CLIENT = ClientInfo(
    sessionId="s1", address="192.0.2.1", port=50000, localAddress="127.0.0.1", localPort=143
)

# The configuration lines the example's docstring shows, with the test's ports.
CONFIG = """\
[[listener]]
protocol = "imap"
endpoint = "tcp:0"
tls = "none"

[router]
type = "python:myrouter.ShardRouter"
shards = ["store1", "store2"]
pinned = { "ceo@example.org" = "store1" }

[backend.store1]
host = "127.0.0.1"
ports = { imap = 1143 }

[backend.store2]
host = "127.0.0.1"
ports = { imap = 2143 }
"""


def login(user: str, protocol: str = "imap") -> RouteRequest:
    """
    A request for a cleartext login.
    """
    return RouteRequest(
        protocol=protocol,  # type: ignore[arg-type]
        credentials=Credentials(mechanism="LOGIN", user=user, password=b"pw"),
        client=CLIENT,
    )


@contextmanager
def examplesOnPath() -> Iterator[None]:
    """
    Make C{examples/} importable, as C{PYTHONPATH=examples} would.
    """
    sys.path.insert(0, EXAMPLES)
    try:
        yield
    finally:
        sys.path.remove(EXAMPLES)


class ShardRouterTests(SynchronousTestCase):
    """
    Tests for C{myrouter.ShardRouter}.
    """

    def setUp(self) -> None:
        with examplesOnPath():
            import myrouter
        self.addCleanup(sys.modules.pop, "myrouter", None)
        self.ShardRouter = myrouter.ShardRouter
        self.router = self.ShardRouter(backends=BACKENDS, reactor=Clock(), shards=["store1", "store2"])

    def route(self, request: RouteRequest) -> Route | Rejection:
        """
        Ask the router through L{callRouter}, as the proxy does, and return
        its (synchronous) answer.
        """
        return self.successResultOf(callRouter(self.router, request))

    def test_interface(self) -> None:
        """
        The example provides L{IRouter}.
        """
        self.assertTrue(verifyObject(IRouter, self.router))

    def test_fromConfiguration(self) -> None:
        """
        The configuration from the docstring builds the router with its
        options.
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        config = parseConfig(CONFIG, os.path.join(directory, "shard.toml"))
        with examplesOnPath():
            router = buildRouter(config, Clock())
        self.assertEqual(type(router).__name__, "ShardRouter")
        self.assertEqual([b.name for b in router.shards], ["store1", "store2"])  # type: ignore[attr-defined]
        self.assertEqual(router.pinned, {"ceo@example.org": config.backends["store1"]})  # type: ignore[attr-defined]

    def test_unknownShard(self) -> None:
        """
        A shard that is not a configured backend stops the proxy at start with
        a message naming the router.
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        config = parseConfig(
            CONFIG.replace('"store2"]', '"store3"]'), os.path.join(directory, "shard.toml")
        )
        with examplesOnPath():
            error = self.assertRaises(ConfigError, buildRouter, config, Clock())
        self.assertIn("myrouter.ShardRouter refused its options: ValueError: unknown backend 'store3'", str(error))

    def test_coroutineRoute(self) -> None:
        """
        The router's C{route} is a coroutine function, and L{callRouter}
        turns its answer into a fired Deferred.
        """
        answer = self.route(login("alice@example.org"))
        self.assertIsInstance(answer, Route)

    def test_stable(self) -> None:
        """
        An account always lands on the same store, whatever the case of its
        name, and the route only locates: no rewritten login.
        """
        first = self.route(login("alice@example.org"))
        assert isinstance(first, Route)
        for user in ("alice@example.org", "ALICE@example.org", "Alice@Example.Org"):
            self.assertEqual(self.route(login(user)), first)
        self.assertEqual((first.user, first.password, first.authenticated), (None, None, False))
        self.assertEqual(first.rule, f"shard -> {first.backend.name}")

    def test_spread(self) -> None:
        """
        Accounts are spread over all shards, roughly evenly.
        """
        counts = {"store1": 0, "store2": 0}
        for n in range(200):
            route = self.route(login(f"user{n}@example.org"))
            assert isinstance(route, Route)
            counts[route.backend.name] += 1
        self.assertTrue(all(60 < count < 140 for count in counts.values()), counts)

    def test_knownAssignment(self) -> None:
        """
        The hash is SHA-256, not Python's per-process C{hash()}: these names
        land where they always have.
        """
        self.assertEqual(self.router.shardFor("alice@example.org").name, "store1")
        self.assertEqual(self.router.shardFor("bob@example.org").name, "store2")

    def test_pinned(self) -> None:
        """
        A pinned account goes to its store, whatever the hash says.
        """
        other = self.router.shardFor("carol@example.org")
        target = STORE1 if other is STORE2 else STORE2
        router = self.ShardRouter(
            backends=BACKENDS,
            reactor=Clock(),
            shards=["store1", "store2"],
            pinned={"Carol@Example.org": target.name},
        )
        self.router = router
        self.assertEqual(
            self.route(login("carol@example.org")), Route(backend=target, rule=f"pinned -> {target.name}")
        )

    def test_defaultShards(self) -> None:
        """
        Without C{shards}, every backend is a shard, in alphabetical order.
        """
        router = self.ShardRouter(backends=BACKENDS, reactor=Clock())
        self.assertEqual([b.name for b in router.shards], ["archive", "store1", "store2"])

    def test_digestRefused(self) -> None:
        """
        A digest login is refused: a locating router has no password to pass
        on.
        """
        request = RouteRequest(
            protocol="imap",
            credentials=Credentials(mechanism="CRAM-MD5", user="a@b", challenge=b"<c>", response=b"00"),
            client=CLIENT,
        )
        self.assertEqual(self.route(request), Rejection("Authentication failed."))

    def test_noCredentials(self) -> None:
        """
        A request without credentials is refused.
        """
        self.assertEqual(
            self.route(RouteRequest(protocol="imap", credentials=None, client=CLIENT)), Rejection()
        )

    def test_protocolNotServed(self) -> None:
        """
        A store without the protocol gives a temporary refusal.
        """
        self.assertEqual(
            self.route(login("alice@example.org", protocol="pop3")),
            Rejection("Service temporarily unavailable.", temporary=True),
        )


class ExampleRouteTableTests(SynchronousTestCase):
    """
    C{examples/routes.toml} loads and routes as its comments say.
    """

    def setUp(self) -> None:
        self.old = Backend(name="old", host="127.0.0.1", ports={"imap": 143})
        self.new = Backend(name="new", host="127.0.0.1", ports={"imap": 1143})
        self.router = StaticRouter(
            os.path.join(EXAMPLES, "routes.toml"), {"old": self.old, "new": self.new}
        )

    def test_rules(self) -> None:
        """
        Accounts, domains and the default route as the comments describe.
        """
        self.assertEqual(
            [
                self.router.explain(user)
                for user in (
                    "alice@example.org",
                    "Bob@Example.org",
                    "zoe@example.org",
                    "zoe@example.net",
                    "someone@elsewhere.example",
                )
            ],
            [
                "accounts['alice@example.org'] -> new",
                "accounts['bob@example.org'] -> new",
                "domains['example.org'] -> old",
                "domains['example.net'] -> new",
                "default -> old",
            ],
        )

    def test_carol(self) -> None:
        """
        Carol is checked by the proxy and logged in to the backend with her
        backend name and password.
        """
        request = RouteRequest(
            protocol="imap",
            credentials=Credentials(mechanism="PLAIN", user="carol@example.org", password=b"s3cret"),
            client=CLIENT,
        )
        self.assertEqual(
            self.router.route(request),
            Route(
                backend=self.new,
                user="carol",
                password=b"backend-s3cret",
                authenticated=True,
                rule="accounts['carol@example.org'] -> new",
            ),
        )
