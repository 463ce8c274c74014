"""
Tests for L{mailproxy.routers.sql}: parameter translation, and the router
against a real SQLite database in a temporary file.
"""

from __future__ import annotations

import os
import sqlite3
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mailproxy.config import ConfigError, Table
from mailproxy.model import Backend, Credentials, Rejection, Route, RouteRequest
from mailproxy.routers._backends import BackendDefaults, BackendResolver
from mailproxy.routers.sql import (
    SQLDatabase,
    SQLRouter,
    _pymysqlArguments,
    buildSQLRouter,
    translateQuery,
)

from .routerhelpers import CLIENT, result

OLD = Backend(name="old", host="10.0.0.1", ports={"imap": 143, "pop3": 110})
NEW = Backend(name="new", host="10.0.0.2", ports={"imap": 143, "pop3": 110})
BACKENDS = {"old": OLD, "new": NEW}
UNAVAILABLE = Rejection("Service temporarily unavailable, try again later.", temporary=True)


def login(user: str = "alice@example.org", password: bytes = b"secret", protocol: str = "imap") -> RouteRequest:
    """
    A plain login request.
    """
    return RouteRequest(protocol=protocol, credentials=Credentials("LOGIN", user, password=password), client=CLIENT)  # type: ignore[arg-type]


def apop(user: str, secret: bytes) -> RouteRequest:
    """
    A POP3 APOP login proving knowledge of C{secret}.
    """
    import hashlib

    challenge = b"<1.2@mail.example.org>"
    response = hashlib.md5(challenge + secret).hexdigest().encode()
    return RouteRequest(
        protocol="pop3",
        credentials=Credentials("APOP", user, challenge=challenge, response=response),
        client=CLIENT,
    )


class InlineRunner:
    """
    Runs the blocking call at once, in the test's thread.
    """

    def run(self, timeout: float, f: Any, *args: Any) -> Deferred[Any]:
        return maybeDeferred(f, *args)


class TranslateTests(SynchronousTestCase):
    """
    Tests for L{translateQuery}.
    """

    def test_named(self) -> None:
        """
        For sqlite3 the C{:name} parameters stay, and their names are
        listed in order.
        """
        query = "SELECT backend FROM a WHERE local = :local AND domain = :domain OR address = :user"
        self.assertEqual(translateQuery(query, "named"), (query, ("local", "domain", "user")))

    def test_pyformat(self) -> None:
        """
        For psycopg and PyMySQL they become C{%(name)s}, and every other
        C{%} is doubled, in literals too.
        """
        self.assertEqual(
            translateQuery("SELECT backend FROM a WHERE address LIKE '%@x' AND user = :user AND n % 2 = 0", "pyformat"),
            ("SELECT backend FROM a WHERE address LIKE '%%@x' AND user = %(user)s AND n %% 2 = 0", ("user",)),
        )

    def test_leftAlone(self) -> None:
        """
        Quoted strings (with doubled quotes), quoted identifiers, comments
        and C{::} casts are not parameters.
        """
        query = (
            "SELECT \"b:x\" AS backend, 'it''s :user' -- :domain\n"
            "/* :local */ FROM `t:u` WHERE a = :user::text"
        )
        translated, names = translateQuery(query, "pyformat")
        self.assertEqual(names, ("user",))
        self.assertEqual(
            translated,
            "SELECT \"b:x\" AS backend, 'it''s :user' -- :domain\n/* :local */ FROM `t:u` WHERE a = %(user)s::text",
        )

    def test_errors(self) -> None:
        """
        Unknown parameters and unterminated quotes or comments are refused.
        """
        self.assertRaises(ValueError, translateQuery, "SELECT :password", "named")
        self.assertRaises(ValueError, translateQuery, "SELECT 'x", "named")
        self.assertRaises(ValueError, translateQuery, "SELECT /* x", "named")
        self.assertRaises(ValueError, translateQuery, "SELECT 1", "qmark")

    def test_mysqlURL(self) -> None:
        """
        PyMySQL's arguments come from a C{mysql://} URL without password.
        """
        self.assertEqual(
            _pymysqlArguments("mysql://mp@db.internal:3307/mail"),
            {"host": "db.internal", "port": 3307, "user": "mp", "database": "mail"},
        )
        self.assertRaises(ValueError, _pymysqlArguments, "mysql://mp:pw@db/mail")
        self.assertRaises(ValueError, _pymysqlArguments, "host=db")


class SQLiteRouterTests(SynchronousTestCase):
    """
    L{SQLRouter} with a real SQLite file.
    """

    QUERY = "SELECT backend, password, login_user FROM accounts WHERE address = :user"

    def setUp(self) -> None:
        self.path = os.path.abspath(self.mktemp())
        with sqlite3.connect(self.path) as db:
            db.execute("CREATE TABLE accounts (address TEXT, backend TEXT, password TEXT, login_user TEXT)")
            db.executemany(
                "INSERT INTO accounts VALUES (?, ?, ?, ?)",
                [
                    ("alice@example.org", "old", None, None),
                    ("bob@example.org", "new", "bob-secret", "bob"),
                    ("carol@example.org", "10.0.0.9:1143", None, None),
                    ("twice@example.org", "old", None, None),
                    ("twice@example.org", "new", None, None),
                    ("nowhere@example.org", "not a host!", None, None),
                    ("null@example.org", None, None, None),
                    ("it's@example.org", "new", None, None),
                ],
            )
        self.logged: list[dict[str, Any]] = []
        from twisted.logger import globalLogPublisher

        globalLogPublisher.addObserver(self.logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logged.append)

    def router(self, query: str = QUERY) -> SQLRouter:
        """
        A router on the test database, running queries inline.
        """
        translated, _ = translateQuery(query, "named")
        uri = f"file:{self.path}?mode=ro"
        database = SQLDatabase(lambda: sqlite3.connect(uri, uri=True), sqlite3, translated)
        self.addCleanup(database.close)
        return SQLRouter(database, BackendResolver(BACKENDS, BackendDefaults()), runner=InlineRunner())

    def logText(self) -> str:
        from twisted.logger import formatEvent

        return "\n".join(formatEvent(event) for event in self.logged)

    def test_locate(self) -> None:
        """
        A row with a NULL password locates: the backend checks the password.
        """
        route = result(self.router().route(login()))
        self.assertEqual(route, Route(backend=OLD, rule="sql -> old"))

    def test_authenticate(self) -> None:
        """
        A row with a password authenticates; C{login_user} rewrites the
        login; a wrong password is refused.
        """
        route = result(self.router().route(login("bob@example.org", b"bob-secret")))
        self.assertEqual(route, Route(backend=NEW, user="bob", authenticated=True, rule="sql -> new"))
        self.assertEqual(result(self.router().route(login("bob@example.org", b"nope"))), Rejection())

    def test_digest(self) -> None:
        """
        APOP works against a stored password, which the backend then gets;
        without a stored password it is refused.
        """
        route = result(self.router().route(apop("bob@example.org", b"bob-secret")))
        self.assertEqual((route.password, route.authenticated), (b"bob-secret", True))
        self.assertEqual(result(self.router().route(apop("bob@example.org", b"wrong"))), Rejection())
        self.assertEqual(result(self.router().route(apop("alice@example.org", b"x"))), Rejection())

    def test_unknown(self) -> None:
        """
        No row: the account is unknown here.
        """
        self.assertEqual(result(self.router().route(login("zed@example.org"))), Rejection(unknown=True))

    def test_nameNotUTF8(self) -> None:
        """
        A login name that is not UTF-8 (its octets kept as surrogates) has
        no row, as in the other routers: a failed login, not a database
        outage.
        """
        self.assertEqual(result(self.router().route(login("\udcff\udcfe@example.org"))), Rejection(unknown=True))
        self.assertNotIn("lookup failed", self.logText())

    def test_ambiguous(self) -> None:
        """
        Two rows are refused and logged.
        """
        self.assertEqual(result(self.router().route(login("twice@example.org"))), Rejection())
        self.assertIn('more than one row for "twice@example.org"', self.logText())

    def test_hostPort(self) -> None:
        """
        A C{host:port} backend value makes an ad-hoc backend.
        """
        route = result(self.router().route(login("carol@example.org")))
        self.assertEqual((route.backend.name, route.backend.ports), ("10.0.0.9:1143", {"imap": 1143}))

    def test_badBackend(self) -> None:
        """
        A backend value that is no backend, a NULL one, or a backend without
        the protocol, is a temporary failure, logged.
        """
        self.assertEqual(result(self.router().route(login("nowhere@example.org"))), UNAVAILABLE)
        self.assertEqual(result(self.router().route(login("null@example.org"))), UNAVAILABLE)
        self.assertEqual(result(self.router().route(login("bob@example.org", b"bob-secret", "sieve"))), UNAVAILABLE)
        self.assertIn("backend 'new' has no sieve port", self.logText())

    def test_injection(self) -> None:
        """
        The user name is a parameter, never SQL.
        """
        self.assertEqual(result(self.router().route(login("x' OR '1'='1"))), Rejection(unknown=True))
        self.assertEqual(result(self.router().route(login("it's@example.org"))).backend, NEW)

    def test_localAndDomain(self) -> None:
        """
        C{:local} and C{:domain} are the parts around the last C{@}.
        """
        router = self.router("SELECT backend FROM accounts WHERE address = :local || '@' || :domain")
        self.assertEqual(result(router.route(login("bob@example.org"))).backend, NEW)

    def test_withoutPasswordColumn(self) -> None:
        """
        A query without a password column only locates.
        """
        router = self.router("SELECT backend FROM accounts WHERE address = :user")
        route = result(router.route(login("bob@example.org", b"anything")))
        self.assertEqual((route.backend, route.authenticated), (NEW, False))

    def test_noBackendColumn(self) -> None:
        """
        A query without a backend column fails (temporarily), saying so.
        """
        router = self.router("SELECT password FROM accounts WHERE address = :user")
        self.assertEqual(result(router.route(login())), UNAVAILABLE)
        self.assertIn("no column named backend", self.logText())

    def test_missingDatabase(self) -> None:
        """
        A database file that is not there fails each lookup (and is not
        created).
        """
        os.unlink(self.path)
        self.assertEqual(result(self.router().route(login())), UNAVAILABLE)
        self.assertFalse(os.path.exists(self.path))

    def test_reconnect(self) -> None:
        """
        A broken connection is replaced and the query tried once more.
        """
        connections: list[Any] = []

        class Broken:
            def cursor(self) -> Any:
                raise sqlite3.OperationalError("connection lost")

            def close(self) -> None:
                pass

        def connect() -> Any:
            connection = Broken() if not connections else sqlite3.connect(self.path)
            connections.append(connection)
            return connection

        database = SQLDatabase(connect, sqlite3, translateQuery(self.QUERY, "named")[0])
        router = SQLRouter(database, BackendResolver(BACKENDS, BackendDefaults()), runner=InlineRunner())
        self.assertEqual(result(router.route(login())).backend, OLD)
        self.assertEqual(len(connections), 2)
        database.close()

    def test_smtpRecipient(self) -> None:
        """
        Without credentials (SMTP MX), the recipient is looked up.
        """
        request = RouteRequest(protocol="imap", credentials=None, client=CLIENT, rcptTo="alice@example.org")
        self.assertEqual(result(self.router().route(request)).backend, OLD)


class BuildTests(SynchronousTestCase):
    """
    Tests for L{buildSQLRouter}.
    """

    def build(self, **options: Any) -> SQLRouter:
        """
        Build from C{options} as C{[router]} of C{/etc/mp.toml}, its
        relative paths resolved in a directory where the SQLite database
        named by C{database} exists (empty).
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        if "database" in options:
            open(os.path.join(directory, options["database"]), "wb").close()
        return buildSQLRouter(Table("/etc/mp.toml", ("router",), options, directory), BACKENDS, Clock())

    def test_missingDatabase(self) -> None:
        """
        An SQLite database that does not exist is refused (the proxy opens
        it, never creates it: every login would fail), after the other
        options are checked.
        """
        options = {"driver": "sqlite3", "database": "absent.sqlite", "query": "SELECT backend FROM a WHERE x = :user"}
        error = self.assertRaises(
            ConfigError, buildSQLRouter, Table("/etc/mp.toml", ("router",), options, "/nonexistent"), BACKENDS, Clock()
        )
        self.assertEqual(
            str(error),
            "/etc/mp.toml: router.database: '/nonexistent/absent.sqlite' does not exist; the proxy never creates it, "
            "so every login would fail",
        )
        options["query"] = "SELECT :pw"
        error = self.assertRaises(
            ConfigError, buildSQLRouter, Table("/etc/mp.toml", ("router",), options, "/nonexistent"), BACKENDS, Clock()
        )
        self.assertIn("router.query: unknown parameter :pw", str(error))

    def assertFails(self, key: str, fragment: str, **options: Any) -> None:
        """
        Building from C{options} fails naming C{key}.
        """
        error = self.assertRaises(ConfigError, self.build, **options)
        self.assertTrue(str(error).startswith(f"/etc/mp.toml: {key}: "), str(error))
        self.assertIn(fragment, str(error))

    def test_sqlite(self) -> None:
        """
        sqlite3 takes C{database}, resolved against the configuration's
        directory, and keeps C{:name} parameters.
        """
        router = self.build(driver="sqlite3", database="accounts.sqlite", query="SELECT backend FROM a WHERE x = :user")
        self.assertEqual(router.database.query, "SELECT backend FROM a WHERE x = :user")

    def test_errors(self) -> None:
        """
        Wrong options name their key.
        """
        query = "SELECT backend FROM a WHERE x = :user"
        self.assertFails("router.driver", "must be one of sqlite3, psycopg, pymysql", driver="oracle", query=query)
        self.assertFails("router.query", "unknown parameter :pw", driver="sqlite3", database="a", query="SELECT :pw")
        self.assertFails("router.dsn", "not used by sqlite3", driver="sqlite3", database="a", dsn="x", query=query)
        self.assertFails("router.database", "required", driver="sqlite3", query=query)
        self.assertFails("router.pool_size", "at least 1", driver="sqlite3", database="a", query=query, pool_size=0)

    def test_missingDriver(self) -> None:
        """
        A driver that is not installed is named with how to install it.
        """
        import importlib.util

        for driver, extra in (("psycopg", "mailproxy[postgres]"), ("pymysql", "mailproxy[mysql]")):
            if importlib.util.find_spec(driver) is not None:
                continue
            self.assertFails("router.driver", extra, driver=driver, dsn="x", query="SELECT backend")
