"""
Tests for L{mailproxy.routers.chain} and for building composed routers
(chains, caches, nested tables) from a configuration file.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mailproxy.config import Config, ConfigError, parseConfig
from mailproxy.model import Backend, Credentials, Rejection, Route, RouteRequest
from mailproxy.routers import buildRouter
from mailproxy.routers.cache import CachingRouter
from mailproxy.routers.chain import ChainRouter
from mailproxy.routers.http import HTTPRouter
from mailproxy.routers.static import StaticRouter
from mailproxy.testing import FakeRouter

from .routerhelpers import CLIENT, result

OLD = Backend(name="old", host="10.0.0.1", ports={"imap": 143})
NEW = Backend(name="new", host="10.0.0.2", ports={"imap": 143})


def login(user: str = "alice@example.org", password: bytes = b"secret") -> RouteRequest:
    """
    A plain IMAP login request.
    """
    return RouteRequest(protocol="imap", credentials=Credentials("LOGIN", user, password=password), client=CLIENT)


class Raising:
    """
    A router that fails with an exception.
    """

    def route(self, request: RouteRequest) -> Deferred[Any]:
        return fail(RuntimeError("broken"))


class ChainTests(SynchronousTestCase):
    """
    Tests for L{ChainRouter}.
    """

    def test_firstKnowerDecides(self) -> None:
        """
        A router that does not know the account passes to the next; the
        route says which router gave it.
        """
        first = FakeRouter(default=Rejection(unknown=True))
        second = FakeRouter(default=Route(backend=NEW, rule="ldap x"))
        third = FakeRouter(default=Route(backend=OLD))
        route = result(ChainRouter([first, second, third]).route(login()))
        self.assertEqual(route, Route(backend=NEW, rule="routers[1]: ldap x"))
        self.assertEqual((len(first.requests), len(second.requests), len(third.requests)), (1, 1, 0))

    def test_wrongPasswordStops(self) -> None:
        """
        A router that knows the account and refuses the password ends the
        chain: the next router is never asked with that password.
        """
        second = FakeRouter(default=Route(backend=NEW))
        answer = result(ChainRouter([FakeRouter(default=Rejection()), second]).route(login()))
        self.assertEqual(answer, Rejection())
        self.assertEqual(second.requests, [])

    def test_temporaryStops(self) -> None:
        """
        A temporary failure ends the chain too.
        """
        second = FakeRouter(default=Route(backend=NEW))
        down = Rejection("down", temporary=True)
        self.assertEqual(result(ChainRouter([FakeRouter(default=down), second]).route(login())), down)
        self.assertEqual(second.requests, [])

    def test_exceptionStops(self) -> None:
        """
        A router that raises fails the chain (the session treats that as
        temporary).
        """
        second = FakeRouter(default=Route(backend=NEW))
        d = ChainRouter([Raising(), second]).route(login())
        self.assertRaises(RuntimeError, result, d)
        self.assertEqual(second.requests, [])

    def test_nobodyKnows(self) -> None:
        """
        When every router passes, the last refusal is the answer.
        """
        last = Rejection("No such user", unknown=True)
        chain = ChainRouter([FakeRouter(default=Rejection(unknown=True)), FakeRouter(default=last)])
        self.assertEqual(result(chain.route(login())), last)

    def test_asynchronous(self) -> None:
        """
        Routers answering later are waited for, in order.
        """
        first, second = FakeRouter(manual=True), FakeRouter(manual=True)
        d = ChainRouter([first, second]).route(login())
        self.assertEqual(len(second.pending), 0)
        first.pending[0].callback(Rejection(unknown=True))
        second.pending[0].callback(Route(backend=OLD))
        self.assertEqual(result(d).backend, OLD)

    def test_empty(self) -> None:
        """
        A chain needs a router.
        """
        self.assertRaises(ValueError, ChainRouter, [])

    def test_lifecycle(self) -> None:
        """
        Reloading and watching are passed to the routers that have them.
        """
        calls: list[str] = []
        from zope.interface import alsoProvides

        from mailproxy.interfaces import IReloadable

        first = FakeRouter()
        alsoProvides(first, IReloadable)
        first.reload = lambda: calls.append("reload")  # type: ignore[attr-defined]
        first.startWatching = lambda: calls.append("start")  # type: ignore[attr-defined]
        first.stopWatching = lambda: calls.append("stop")  # type: ignore[attr-defined]
        chain = ChainRouter([first, FakeRouter()])
        chain.startWatching()
        chain.reload()
        chain.stopWatching()
        self.assertEqual(calls, ["start", "reload", "stop"])


class ComposedBuildTests(SynchronousTestCase):
    """
    Building chains and caches from the configuration file.
    """

    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.path = os.path.join(self.directory, "mailproxy.toml")
        with open(os.path.join(self.directory, "moved.toml"), "w") as f:
            f.write('[accounts]\n"bob@example.org" = "new"\n')

    def config(self, router: str) -> Config:
        """
        A configuration with backends C{old} and C{new} and C{router}.
        """
        return parseConfig(
            '[[listener]]\nprotocol = "imap"\nendpoint = "tcp:0"\ntls = "none"\n'
            + router
            + '[backend.old]\nhost = "10.0.0.1"\nports = { imap = 143 }\n'
            + '[backend.new]\nhost = "10.0.0.2"\nports = { imap = 143 }\n',
            self.path,
        )

    def test_chainOfStaticAndHTTP(self) -> None:
        """
        A chain's C{[[router.routers]]} tables are built in order, each with
        its own options (relative paths resolved against the configuration's
        directory) and its own C{cache}.
        """
        router = buildRouter(
            self.config(
                '[router]\ntype = "chain"\n'
                '[[router.routers]]\ntype = "static"\npath = "moved.toml"\n'
                '[[router.routers]]\ntype = "http"\nurl = "http://127.0.0.1:9/auth"\n'
                "[router.routers.cache]\nttl = 30\n"
                "[router.cache]\nttl = 5\n"
            ),
            Clock(),
        )
        assert isinstance(router, CachingRouter)
        self.assertEqual(router.ttl, 5.0)
        chain = router.router
        assert isinstance(chain, ChainRouter)
        static, cached = chain.routers
        assert isinstance(static, StaticRouter)
        self.assertEqual(static.path, os.path.join(self.directory, "moved.toml"))
        assert isinstance(cached, CachingRouter)
        self.assertEqual(cached.ttl, 30.0)
        self.assertIsInstance(cached.router, HTTPRouter)

    def test_chainRoutesMovedFirst(self) -> None:
        """
        The built chain asks the route table first; an account it does not
        list goes to the next router.
        """
        router = buildRouter(
            self.config(
                '[router]\ntype = "chain"\n'
                '[[router.routers]]\ntype = "static"\npath = "moved.toml"\n'
                f'[[router.routers]]\ntype = "python:{__name__}.EverythingOld"\n'
            ),
            Clock(),
        )
        self.assertEqual(result(router.route(login("bob@example.org"))).backend.name, "new")
        route = result(router.route(login("carol@example.org")))
        self.assertEqual((route.backend.name, route.rule), ("old", "routers[1]: everything"))

    def test_cacheOnStatic(self) -> None:
        """
        C{[router.cache]} wraps even the static router, whose own options
        stay as they were.
        """
        router = buildRouter(
            self.config('[router]\ntype = "static"\npath = "moved.toml"\nwatch_interval = 3\n[router.cache]\nttl = 1\n'),
            Clock(),
        )
        assert isinstance(router, CachingRouter)
        assert isinstance(router.router, StaticRouter)
        self.assertEqual(router.router.watchInterval, 3.0)

    def assertBuildError(self, router: str, key: str, fragment: str) -> None:
        """
        Building fails naming C{key}.
        """
        message = str(self.assertRaises(ConfigError, buildRouter, self.config(router), Clock()))
        self.assertTrue(message.startswith(f"{self.path}: {key}: "), message)
        self.assertIn(fragment, message)

    def test_errorsNameNestedKeys(self) -> None:
        """
        Errors inside a chain name the router's place in it.
        """
        self.assertBuildError('[router]\ntype = "chain"\n', "router.routers", "at least one")
        self.assertBuildError(
            '[router]\ntype = "chain"\n[[router.routers]]\ntype = "static"\npath = "moved.toml"\n[[router.routers]]\ntype = "nope"\n',
            "router.routers[1].type",
            "must be one of static, http, ldap, sql, chain",
        )
        self.assertBuildError(
            '[router]\ntype = "chain"\n[[router.routers]]\ntype = "static"\npath = "missing.toml"\n',
            "router.routers[0].path",
            "cannot read",
        )
        self.assertBuildError(
            '[router]\ntype = "chain"\n[[router.routers]]\ntype = "python:no_such_module.X"\n',
            "router.routers[0].type",
            "cannot import",
        )
        self.assertBuildError(
            '[router]\ntype = "chain"\n[[router.routers]]\ntype = "static"\npath = "moved.toml"\n[router.routers.cache]\nttl = "x"\n',
            "router.routers[0].cache.ttl",
            "must be a number",
        )
        self.assertBuildError('[router]\ntype = "static"\npath = "moved.toml"\ncache = 3\n', "router.cache", "must be a table")

    def test_pythonRouterInChain(self) -> None:
        """
        A Python router in a chain gets its options, with C{*_file} paths
        resolved against the configuration's directory.
        """
        router = buildRouter(
            self.config(
                '[router]\ntype = "chain"\n'
                f'[[router.routers]]\ntype = "python:{__name__}.EverythingOld"\nsecret_file = "x.secret"\n'
            ),
            Clock(),
        )
        assert isinstance(router, ChainRouter)
        self.assertEqual(router.routers[0].options, {"secret_file": os.path.join(self.directory, "x.secret")})


class EverythingOld:
    """
    A Python router for the tests: everything goes to C{old}.
    """

    def __init__(self, backends: dict[str, Backend], reactor: Any, **options: Any) -> None:
        self.backend = backends["old"]
        self.options = options

    def route(self, request: RouteRequest) -> Route:
        return Route(backend=self.backend, rule="everything")
