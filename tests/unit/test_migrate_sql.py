"""
Moving accounts with the SQL router as the route store: its L{IRouteStore}
methods against a real SQLite file, the move through L{Mover} with
in-memory sessions, and the management endpoint in front of it.
"""

from __future__ import annotations

import os
import sqlite3
from typing import Any

from twisted.internet.defer import Deferred, TimeoutError, fail
from twisted.trial.unittest import SynchronousTestCase

from mailproxy._migrate import MOVED, LoginHold, MoveError, Mover, RouteChange
from mailproxy.admin import AdminResource, TokenGuard
from mailproxy.config import ConfigError, Table
from mailproxy.interfaces import IRouteStore, RouteStoreError
from mailproxy.routers._backends import BackendDefaults, BackendResolver
from mailproxy.routers.cache import CachingRouter
from mailproxy.routers.sql import (
    RouteStatements,
    SQLDatabase,
    SQLRouter,
    _pymysqlConnect,
    _sqliteConnect,
    buildSQLRouter,
    translateQuery,
)
from mailproxy.testing import makeBackend

from .opsfixtures import ProxyHarness
from .test_admin import AdminTestsMixin, FakeHealth, Proxy, TOKEN
from .test_router_sql import InlineRunner

BACKENDS = {name: makeBackend(name) for name in ("old", "new")}

QUERY = "SELECT backend FROM accounts WHERE address = lower(:user)"
ROUTES = "SELECT address AS account, backend FROM accounts"
SET = "UPDATE accounts SET backend = :backend WHERE address = lower(:user)"
DELETE = "DELETE FROM accounts WHERE address = lower(:user)"
SET_DOMAIN = "UPDATE accounts SET backend = :backend WHERE address LIKE '%@' || lower(:domain)"

ROWS = [
    ("alice@example.org", "old"),
    ("bob@example.org", "old"),
    ("carol@example.net", "old"),
    ("dave@example.net", "new"),
    ("nobody@example.net", None),
]


def makeDatabase(testCase: SynchronousTestCase) -> str:
    """
    A new SQLite file with the accounts table of L{ROWS}; its path.
    """
    path = os.path.abspath(testCase.mktemp())
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE accounts (address TEXT PRIMARY KEY, backend TEXT)")
        db.executemany("INSERT INTO accounts VALUES (?, ?)", ROWS)
    db.close()
    return path


def makeRouter(
    testCase: SynchronousTestCase, path: str, *, domain: bool = True, delete: bool = True, runner: Any = None
) -> SQLRouter:
    """
    An SQL router with a route store on the SQLite file C{path}, running
    its statements inline.
    """
    database = SQLDatabase(_sqliteConnect(sqlite3, path, 5.0, writable=True), sqlite3, translateQuery(QUERY, "named")[0])
    testCase.addCleanup(database.close)
    statements = RouteStatements(
        routes=ROUTES,
        setRoute=SET,
        deleteRoute=DELETE if delete else None,
        setDomainRoute=SET_DOMAIN if domain else None,
    )
    return SQLRouter(
        database,
        BackendResolver(BACKENDS, BackendDefaults()),
        runner=runner or InlineRunner(),
        statements=statements,
    )


def rows(path: str) -> dict[str, str | None]:
    """
    The accounts table now.
    """
    with sqlite3.connect(path) as db:
        found = dict(db.execute("SELECT address, backend FROM accounts"))
    db.close()
    return found


class StoreTests(SynchronousTestCase):
    """
    L{SQLRouter} as an L{IRouteStore}.
    """

    def setUp(self) -> None:
        self.path = makeDatabase(self)
        self.router = makeRouter(self, self.path)

    def fails(self, d: Deferred[Any]) -> str:
        """
        The message of the L{RouteStoreError} C{d} failed with.
        """
        return str(self.failureResultOf(d, RouteStoreError).value)

    def test_provides(self) -> None:
        """
        With statements the router is a route store; without, it is not.
        """
        self.assertTrue(IRouteStore.providedBy(self.router))
        database = SQLDatabase(lambda: None, sqlite3, QUERY)
        plain = SQLRouter(database, BackendResolver(BACKENDS, BackendDefaults()), runner=InlineRunner())
        self.assertFalse(IRouteStore.providedBy(plain))
        self.assertIn("no routes_query", self.fails(plain.routes()))

    def test_routes(self) -> None:
        """
        C{routes()} lists C{routes_query}'s rows; a row with a NULL is left
        out.
        """
        self.assertEqual(
            self.successResultOf(self.router.routes()),
            {
                "alice@example.org": "old",
                "bob@example.org": "old",
                "carol@example.net": "old",
                "dave@example.net": "new",
            },
        )

    def test_routesColumns(self) -> None:
        """
        A C{routes_query} without the C{account} column fails, saying so.
        """
        self.router.statements = RouteStatements(routes="SELECT address, backend FROM accounts", setRoute=SET)
        self.assertIn("no column named account", self.fails(self.router.routes()))

    def test_setRoute(self) -> None:
        """
        C{setRoute} updates the account's row, whatever the case of the
        key; the next login goes to the new backend.
        """
        self.assertIsNone(self.successResultOf(self.router.setRoute("Alice@Example.org", "new")))
        self.assertEqual(rows(self.path)["alice@example.org"], "new")
        self.assertEqual(self.successResultOf(self.router.explainRoute("alice@example.org")), ("sql", "new"))

    def test_setRouteUnknownAccount(self) -> None:
        """
        An account without a row is refused (the statement changed
        nothing).
        """
        self.assertEqual(
            self.fails(self.router.setRoute("zed@example.org", "new")),
            "SQL: set_route changed no row for 'zed@example.org' (not in the database?); nothing was changed",
        )

    def test_setRoutesAllOrNothing(self) -> None:
        """
        Several changes are one transaction: one that changes nothing
        undoes the others.
        """
        before = rows(self.path)
        message = self.fails(self.router.setRoutes({"alice@example.org": "new", "zed@example.org": "new"}))
        self.assertIn("'zed@example.org'", message)
        self.assertEqual(rows(self.path), before)
        self.successResultOf(self.router.setRoutes({"alice@example.org": "new", "bob@example.org": "new"}))
        self.assertEqual((rows(self.path)["alice@example.org"], rows(self.path)["bob@example.org"]), ("new", "new"))

    def test_unknownBackend(self) -> None:
        """
        Only configured backends can be set.
        """
        self.assertEqual(
            self.fails(self.router.setRoute("alice@example.org", "10.0.0.9:143")),
            "unknown backend '10.0.0.9:143'; configured backends: new, old",
        )

    def test_domain(self) -> None:
        """
        A domain key runs C{set_domain_route}: every account of the domain
        moves, those of other domains stay.
        """
        self.successResultOf(self.router.setRoute("@example.net", "new"))
        self.assertEqual(
            rows(self.path),
            {
                "alice@example.org": "old",
                "bob@example.org": "old",
                "carol@example.net": "new",
                "dave@example.net": "new",
                "nobody@example.net": "new",
            },
        )
        self.assertIn("set_domain_route changed no row for '@example.com'", self.fails(self.router.setRoute("@example.com", "new")))

    def test_domainNotConfigured(self) -> None:
        """
        Without C{set_domain_route}, a domain is refused with why.
        """
        router = makeRouter(self, self.path, domain=False)
        self.assertEqual(
            self.fails(router.setRoute("@example.net", "new")),
            "SQL: cannot route the domain 'example.net': set_domain_route is not configured",
        )
        self.assertEqual(self.fails(router.setRoute("@", "new")), "not a domain: '@'")

    def test_default(self) -> None:
        """
        The default is the query's business: it cannot be set or removed.
        """
        self.assertIn("default route", self.fails(self.router.setRoute("*", "new")))
        self.assertIn("only accounts", self.fails(self.router.deleteRoute("*")))

    def test_deleteRoute(self) -> None:
        """
        C{deleteRoute} runs C{delete_route}; a missing row, a domain, or no
        such statement is refused.
        """
        self.successResultOf(self.router.deleteRoute("bob@example.org"))
        self.assertNotIn("bob@example.org", rows(self.path))
        self.assertIn("delete_route changed no row", self.fails(self.router.deleteRoute("bob@example.org")))
        self.assertIn("only accounts", self.fails(self.router.deleteRoute("@example.org")))
        self.assertEqual(
            self.fails(makeRouter(self, self.path, delete=False).deleteRoute("alice@example.org")),
            "SQL: delete_route is not configured",
        )

    def test_databaseFails(self) -> None:
        """
        A database that fails (here: read-only) refuses the change, saying
        why, and changes nothing.
        """
        database = SQLDatabase(_sqliteConnect(sqlite3, self.path, 5.0), sqlite3, QUERY)
        self.addCleanup(database.close)
        self.router.database = database
        message = self.fails(self.router.setRoute("alice@example.org", "new"))
        self.assertTrue(message.startswith("SQL: the change failed: OperationalError: "), message)
        self.assertIn("readonly", message)
        self.assertEqual(rows(self.path)["alice@example.org"], "old")
        # The next change on a writable connection works: nothing was left
        # half done.
        self.router.database = makeRouter(self, self.path).database
        self.successResultOf(self.router.setRoute("alice@example.org", "new"))

    def test_timeout(self) -> None:
        """
        A change that does not finish in time is reported as maybe done.
        """

        class SlowRunner:
            def run(self, timeout: float, f: Any, *args: Any) -> Deferred[Any]:
                return fail(TimeoutError())

        router = makeRouter(self, self.path, runner=SlowRunner())
        self.assertIn("did not finish within 5 s; it may still take effect", self.fails(router.setRoute("a@b", "new")))

    def test_explain(self) -> None:
        """
        C{explainRoute} runs the login query without a password: the row's
        backend, nothing for no row, a refusal for several.
        """
        self.assertEqual(self.successResultOf(self.router.explainRoute("dave@example.net")), ("sql", "new"))
        self.assertIsNone(self.successResultOf(self.router.explainRoute("zed@example.net")))
        router = makeRouter(self, self.path)
        router.database = SQLDatabase(
            lambda: sqlite3.connect(self.path), sqlite3, "SELECT backend FROM accounts WHERE address LIKE '%' || :domain"
        )
        self.addCleanup(router.database.close)
        self.assertEqual(
            self.successResultOf(router.explainRoute("x@example.net")), ("sql: more than one row (logins are refused)", None)
        )


class MoveTests(SynchronousTestCase):
    """
    L{Mover.move} with the SQL router behind a route cache.
    """

    def setUp(self) -> None:
        self.path = makeDatabase(self)
        self.store = makeRouter(self, self.path)
        self.proxy = ProxyHarness(self.store, gate=LoginHold())
        self.proxy.context.router = CachingRouter(self.store, reactor=self.proxy.clock, ttl=300)
        self.mover = Mover(self.proxy.context, BACKENDS, self.proxy.clock)

    def test_moveAccounts(self) -> None:
        """
        The accounts' rows are updated, their sessions dropped, and their
        next logins (not answered from the cache) reach the new backend;
        other sessions go on.
        """
        alice, aliceClient, _ = self.proxy.login("alice@example.org")
        bob, bobClient, _ = self.proxy.login("bob@example.org")
        result = self.successResultOf(self.mover.move("new", ["alice@example.org"]))
        self.assertEqual(result.changes, (RouteChange("alice@example.org", "old", "new"),))
        self.assertEqual(result.sessions, (alice.client.sessionId,))
        self.assertEqual(rows(self.path)["alice@example.org"], "new")
        self.assertEqual(aliceClient.value(), b"* BYE " + MOVED.encode() + b"\r\n")
        self.assertEqual(bobClient.value(), b"")
        again, _, _ = self.proxy.login("alice@example.org")
        self.assertEqual(again.backendName, "new")

    def test_dryRun(self) -> None:
        """
        A dry run reads the rows and changes none.
        """
        alice, aliceClient, _ = self.proxy.login("alice@example.org")
        result = self.successResultOf(self.mover.move("new", ["alice@example.org"], dryRun=True))
        self.assertEqual((result.changes, result.sessions), ((RouteChange("alice@example.org", "old", "new"),), (alice.client.sessionId,)))
        self.assertEqual(rows(self.path)["alice@example.org"], "old")
        self.assertEqual(aliceClient.value(), b"")

    def test_unknownAccountRefused(self) -> None:
        """
        A move that names an account the database does not have is refused
        as a whole: the other account's row stays, no session is dropped.
        """
        alice, aliceClient, _ = self.proxy.login("alice@example.org")
        failure = self.failureResultOf(self.mover.move("new", ["alice@example.org", "zed@example.org"]), MoveError)
        self.assertIn("'zed@example.org'", str(failure.value))
        self.assertEqual(rows(self.path)["alice@example.org"], "old")
        self.assertEqual(aliceClient.value(), b"")

    def test_domain(self) -> None:
        """
        A domain move updates every account of the domain and drops all of
        their sessions on another backend, those of accounts with rows of
        their own too.
        """
        carol, carolClient, _ = self.proxy.login("carol@example.net")
        dave, daveClient, _ = self.proxy.login("dave@example.net")
        alice, aliceClient, _ = self.proxy.login("alice@example.org")
        result = self.successResultOf(self.mover.move("new", domain="example.net"))
        self.assertEqual(result.changes, (RouteChange("@example.net", None, "new"),))
        self.assertEqual(result.sessions, (carol.client.sessionId,))
        self.assertEqual(rows(self.path)["carol@example.net"], "new")
        self.assertEqual(carolClient.value(), b"* BYE " + MOVED.encode() + b"\r\n")
        self.assertEqual((daveClient.value(), aliceClient.value()), (b"", b""))
        again, _, _ = self.proxy.login("carol@example.net")
        self.assertEqual(again.backendName, "new")

    def test_bulkInOneTransaction(self) -> None:
        """
        A move of many accounts reads the routes once and changes them in
        one transaction, each in one call to the router's threads (never in
        the reactor's); a domain move with C{includeAccounts} reports no
        account kept, since the domain's statement changes them all.
        """
        with sqlite3.connect(self.path) as db:
            db.executemany("INSERT INTO accounts VALUES (?, 'old')", [(f"user{i}@example.com",) for i in range(500)])
        db.close()
        calls: list[str] = []
        inline = InlineRunner()

        class Runner:
            def run(self, timeout: float, f: Any, *args: Any) -> Deferred[Any]:
                calls.append(f.__name__)
                return inline.run(timeout, f, *args)

        self.store._runner = Runner()
        result = self.successResultOf(
            self.mover.move("new", [f"user{i}@example.com" for i in range(500)], domain="example.net", includeAccounts=True)
        )
        self.assertEqual(calls, ["entries", "change"])
        self.assertEqual(len(result.changes), 501)
        self.assertEqual(result.kept, ())
        self.assertEqual({backend for address, backend in rows(self.path).items() if address.startswith("user")}, {"new"})

    def test_rollback(self) -> None:
        """
        Moving back restores the row and drops the sessions on the new
        backend.
        """
        self.successResultOf(self.mover.move("new", ["alice@example.org"]))
        alice, aliceClient, _ = self.proxy.login("alice@example.org")
        result = self.successResultOf(self.mover.move("old", ["alice@example.org"]))
        self.assertEqual(result.changes, (RouteChange("alice@example.org", "new", "old"),))
        self.assertEqual(result.sessions, (alice.client.sessionId,))
        self.assertEqual(rows(self.path), dict(ROWS))


class AdminTests(AdminTestsMixin, SynchronousTestCase):
    """
    The management endpoint with the SQL router as its route store.
    """

    def setUp(self) -> None:
        self.path = makeDatabase(self)
        self.harness = ProxyHarness(makeRouter(self, self.path), gate=LoginHold())
        self.harness.context.routerName = "sql"
        self.clock = self.harness.clock
        self.proxy = Proxy(self.harness)
        self.health = FakeHealth(self.clock, lambda: BACKENDS, {})
        self.guard = TokenGuard(TOKEN, self.clock)
        from treq.testing import StubTreq

        self.resource = AdminResource(self.proxy, self.guard, self.health)
        self.http = StubTreq(self.resource)

    def test_move(self) -> None:
        """
        C{POST /move} updates the row and drops the session.
        """
        _, aliceClient, _ = self.harness.login("alice@example.org")
        status, body = self.request("POST", "/move", {"backend": "new", "accounts": ["alice@example.org"]})
        self.assertEqual((status, body["changes"], body["sessions"]), (200, [{"key": "alice@example.org", "from": "old", "to": "new"}], 1))
        self.assertEqual(rows(self.path)["alice@example.org"], "new")
        self.assertEqual(aliceClient.value(), b"* BYE " + MOVED.encode() + b"\r\n")

    def test_moveRefused(self) -> None:
        """
        A move the database refuses is a 409 with the reason.
        """
        status, body = self.request("POST", "/move", {"backend": "new", "accounts": ["zed@example.org"]})
        self.assertEqual(status, 409)
        self.assertIn("set_route changed no row for 'zed@example.org'", body["error"])

    def test_routes(self) -> None:
        """
        C{GET}, C{PUT} and C{DELETE} on the routes read and change rows.
        """
        status, body = self.request("GET", "/routes")
        self.assertEqual((status, body["routes"]["bob@example.org"]), (200, "old"))
        self.assertEqual(self.request("PUT", "/routes/bob@example.org", {"backend": "new"})[0], 200)
        self.assertEqual(rows(self.path)["bob@example.org"], "new")
        self.assertEqual(self.request("DELETE", "/routes/bob@example.org")[0], 200)
        self.assertNotIn("bob@example.org", rows(self.path))
        self.assertEqual(self.request("PUT", "/routes/*", {"backend": "new"})[0], 409)

    def test_explain(self) -> None:
        """
        C{GET /explain} asks the database, without a login.
        """
        status, body = self.request("GET", "/explain?account=dave@example.net")
        self.assertEqual(
            (status, body["router"], body["rule"], body["backend"], body["explained"]), (200, "sql", "sql", "new", True)
        )


class BuildTests(SynchronousTestCase):
    """
    The route store's options in C{[router]}.
    """

    def build(self, **options: Any) -> SQLRouter:
        """
        Build an sqlite3 router from C{options} as C{[router]} of
        C{/etc/mp.toml}.
        """
        options = {"driver": "sqlite3", "database": "a.sqlite", "query": QUERY, **options}
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        open(os.path.join(directory, "a.sqlite"), "wb").close()
        return buildSQLRouter(Table("/etc/mp.toml", ("router",), options, directory), BACKENDS, None)

    def assertFails(self, key: str, fragment: str, **options: Any) -> None:
        """
        Building from C{options} fails naming C{key}.
        """
        error = self.assertRaises(ConfigError, self.build, **options)
        self.assertTrue(str(error).startswith(f"/etc/mp.toml: router.{key}: "), str(error))
        self.assertIn(fragment, str(error))

    def test_store(self) -> None:
        """
        With C{routes_query} and C{set_route} the router is a route store;
        the optional statements are kept.
        """
        router = self.build(routes_query=ROUTES, set_route=SET, set_domain_route=SET_DOMAIN)
        self.assertTrue(IRouteStore.providedBy(router))
        self.assertEqual(router.statements, RouteStatements(routes=ROUTES, setRoute=SET, setDomainRoute=SET_DOMAIN))
        self.assertFalse(IRouteStore.providedBy(self.build()))

    def test_pyformat(self) -> None:
        """
        For psycopg and PyMySQL the statements' parameters are translated
        too.
        """
        from mailproxy.routers.sql import _routeStatements

        options = Table("/etc/mp.toml", ("router",), {"routes_query": ROUTES, "set_route": SET}, "/etc")
        statements = _routeStatements(options, "pyformat")
        assert statements is not None
        self.assertEqual(
            statements.setRoute, "UPDATE accounts SET backend = %(backend)s WHERE address = lower(%(user)s)"
        )

    def test_errors(self) -> None:
        """
        Wrong or missing statements name their key.
        """
        self.assertFails("routes_query", "required with set_route", set_route=SET)
        self.assertFails("set_route", "required with routes_query", routes_query=ROUTES)
        self.assertFails("set_route", "required with routes_query, delete_route", routes_query=ROUTES, delete_route=DELETE)
        self.assertFails("routes_query", "takes none", routes_query=ROUTES + " WHERE address = :user", set_route=SET)
        self.assertFails(
            "set_route", "must use :backend", routes_query=ROUTES, set_route="UPDATE accounts SET backend = 'x' WHERE address = :user"
        )
        self.assertFails(
            "set_route",
            "must name the account with :user, or with :local and :domain",
            routes_query=ROUTES,
            set_route="UPDATE accounts SET backend = :backend WHERE address LIKE '%@' || :domain",
        )
        self.assertFails(
            "delete_route", "must name the account", routes_query=ROUTES, set_route=SET, delete_route="DELETE FROM accounts"
        )
        self.assertFails(
            "set_domain_route", "must use :domain", routes_query=ROUTES, set_route=SET, set_domain_route=SET.replace(":user", "'x'")
        )
        self.assertFails(
            "set_domain_route", "unknown parameter :user; use :domain, :backend", routes_query=ROUTES, set_route=SET, set_domain_route=SET
        )

    def test_sqliteWritable(self) -> None:
        """
        The SQLite file is opened read-write only for a route store, and
        never created.
        """
        path = makeDatabase(self)
        readOnly = _sqliteConnect(sqlite3, path, 5.0)()
        self.addCleanup(readOnly.close)
        self.assertRaises(sqlite3.OperationalError, readOnly.execute, SET.replace(":backend", "'new'"), {"user": "a"})
        writable = _sqliteConnect(sqlite3, path, 5.0, writable=True)()
        self.addCleanup(writable.close)
        writable.execute(SET, {"backend": "new", "user": "alice@example.org"})
        missing = os.path.abspath(self.mktemp())
        self.assertRaises(sqlite3.OperationalError, _sqliteConnect(sqlite3, missing, 5.0, writable=True))
        self.assertFalse(os.path.exists(missing))

    def test_mysqlFoundRows(self) -> None:
        """
        PyMySQL connections count matched rows, so setting a route to what
        it is changes "a row".
        """
        calls: list[dict[str, Any]] = []

        class FakePyMySQL:
            @staticmethod
            def connect(**arguments: Any) -> object:
                calls.append(arguments)
                return object()

        _pymysqlConnect(FakePyMySQL, {"host": "db"}, None, 5.0)()
        self.assertEqual(calls[0]["client_flag"] & 2, 2)


class ExampleTests(SynchronousTestCase):
    """
    The statements of C{examples/sql-router.toml} do what its comments say
    on the table of C{examples/accounts.sql}.
    """

    def test_example(self) -> None:
        """
        Setting an account updates its row; a domain moves every account;
        the login query then routes by the new rows.
        """
        import tomllib

        examples = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, os.pardir, "examples")
        with open(os.path.join(examples, "sql-router.toml"), "rb") as f:
            options = tomllib.load(f)["router"]
        path = os.path.abspath(self.mktemp())
        with open(os.path.join(examples, "accounts.sql")) as f, sqlite3.connect(path) as db:
            db.executescript(f.read())
        db.close()
        from mailproxy.routers.sql import _routeStatements

        statements = _routeStatements(Table("sql-router.toml", ("router",), options, examples), "named")
        assert statements is not None
        database = SQLDatabase(
            _sqliteConnect(sqlite3, path, 5.0, writable=True), sqlite3, translateQuery(options["query"], "named")[0]
        )
        self.addCleanup(database.close)
        router = SQLRouter(
            database, BackendResolver(BACKENDS, BackendDefaults()), runner=InlineRunner(), statements=statements
        )
        self.assertEqual(
            self.successResultOf(router.routes()),
            {"alice@example.org": "old", "bob@example.org": "new", "carol@example.org": "new"},
        )
        self.successResultOf(router.setRoute("Alice@example.org", "new"))
        self.assertEqual(self.successResultOf(router.explainRoute("alice@example.org")), ("sql", "new"))
        self.successResultOf(router.setRoute("@example.org", "old"))
        self.assertEqual(set(self.successResultOf(router.routes()).values()), {"old"})
