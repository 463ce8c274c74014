"""
The SQL router: a query says where each account lives.

    [router]
    type = "sql"
    driver = "sqlite3"                 # sqlite3 | psycopg | pymysql
    database = "accounts.sqlite"       # sqlite3: the database file (opened read-only)
    # dsn = "host=db.internal dbname=mail user=mailproxy"   # psycopg: a libpq conninfo or URL
    # dsn = "mysql://mailproxy@db.internal:3306/mail"      # pymysql: a URL
    # password_file = "db.secret"      # psycopg, pymysql: the database password
    query = "SELECT backend, password, login_user FROM accounts WHERE address = :user"

The query names its parameters C{:user} (the login name), C{:local} (before
its last C{@}) and C{:domain} (after it); they are passed as parameters in
the driver's own style, never pasted into the SQL.  The columns of the first
row are read by name:

 - C{backend} (required): a configured backend's name or C{host[:port]};
 - C{password} (optional): if the query has this column and the row's value
   is not NULL, the proxy checks the client's password against it (which
   also makes CRAM-MD5 and APOP possible: the backend then gets this
   password); without it, the backend judges the password;
 - C{login_user} (optional): the login name for the backend, if not NULL.

No row means the account is unknown here (a chain asks its next router);
more than one row is refused as ambiguous.  DB-API drivers block, so queries
run in a bounded pool of threads (C{pool_size}), one connection each,
re-made after any error; a database that does not answer within C{timeout}
gives a temporary failure.

With statements that list and change the routes, the router is also an
L{IRouteStore}, so that accounts can be moved (C{mailproxy move}, the
management endpoint)::

    routes_query = "SELECT address AS account, backend FROM accounts"
    set_route = "UPDATE accounts SET backend = :backend WHERE address = lower(:user)"
    delete_route = "DELETE FROM accounts WHERE address = lower(:user)"          # optional
    set_domain_route = "UPDATE accounts SET backend = :backend WHERE address LIKE '%@' || lower(:domain)"  # optional

C{routes_query} lists the entries by its columns C{account} (an account, or
C{@domain} if the schema has domain rows) and C{backend}.  C{set_route}
routes one account (C{:user}, C{:local}, C{:domain}, C{:backend}) and must
change a row: an account that is not in the database is refused, unless the
statement inserts it.  C{set_domain_route} moves a whole domain (C{:domain},
C{:backend}): every account of it, so a move drops the open sessions of all
of them; without it a domain is refused.  The default (C{*}) lives in the
query, never in a row, and cannot be set.  Several changes are one
transaction: all happen or none.
"""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from attrs import field, frozen
from zope.interface import alsoProvides, implementer

from twisted.internet.defer import Deferred, TimeoutError
from twisted.logger import Logger

from mailproxy._blocking import PerThread, ThreadRunner, closeRunner
from mailproxy._safetext import logQuote
from mailproxy.config import Table, readSecretLine
from mailproxy.interfaces import IRouter, IRouteStore, RouteStoreError
from mailproxy.model import Backend, Rejection, Route, RouteRequest
from mailproxy.routers._backends import BackendResolver, UnusableBackend, lookedUp, parseBackendDefaults

__all__ = [
    "DRIVERS",
    "QUERY_PARAMETERS",
    "translateQuery",
    "ROUTE_STATEMENTS",
    "AccountRow",
    "DatabaseUnavailable",
    "NoRowChanged",
    "RouteStatements",
    "SQLDatabase",
    "SQLRouter",
    "buildSQLRouter",
]

DRIVERS: dict[str, str] = {
    "sqlite3": "Python's own sqlite3",
    "psycopg": "PostgreSQL: pip install 'mailproxy[postgres]' (psycopg 3)",
    "pymysql": "MySQL and MariaDB: pip install 'mailproxy[mysql]' (PyMySQL)",
}
"""
The supported DB-API drivers, and where they come from.
"""

QUERY_PARAMETERS = ("user", "local", "domain")
"""
The named parameters a query may use (C{:user}, C{:local}, C{:domain}).
"""

ROUTE_STATEMENTS: dict[str, tuple[tuple[str, ...], tuple[str, ...], bool]] = {
    "routes_query": ((), (), False),
    "set_route": (QUERY_PARAMETERS + ("backend",), ("backend",), True),
    "delete_route": (QUERY_PARAMETERS, (), True),
    "set_domain_route": (("domain", "backend"), ("domain", "backend"), False),
}
"""
The statements that make the router a route store: for each, the parameters
it may use, those it must use, and whether it must name the account (with
C{:user}, or with both C{:local} and C{:domain}).
"""

_PARAMSTYLES = {"sqlite3": "named", "psycopg": "pyformat", "pymysql": "pyformat"}
_UNAVAILABLE = "Service temporarily unavailable, try again later."
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def translateQuery(
    query: str, paramstyle: str, allowed: tuple[str, ...] = QUERY_PARAMETERS
) -> tuple[str, tuple[str, ...]]:
    """
    Rewrite C{:name} parameters for a driver's C{paramstyle}.

    Quoted strings, quoted identifiers, comments and PostgreSQL's C{::}
    casts are left alone.  For C{pyformat} every other C{%} is doubled, as
    those drivers require when parameters are given.

    @param paramstyle: C{"named"} (sqlite3) or C{"pyformat"} (psycopg,
        PyMySQL).
    @param allowed: the parameter names the query may use.
    @return: the query and the parameter names in order of appearance.
    @raise ValueError: an unknown parameter name, an unterminated quote or
        comment, or an unsupported paramstyle.
    """
    if paramstyle not in ("named", "pyformat"):
        raise ValueError(f"unsupported paramstyle {paramstyle!r}")
    out: list[str] = []
    names: list[str] = []
    percent = "%%" if paramstyle == "pyformat" else "%"
    i, n = 0, len(query)
    while i < n:
        c = query[i]
        if c in "'\"`":
            end = query.find(c, i + 1)
            # A doubled quote inside is an escaped quote: keep scanning.
            while end != -1 and end + 1 < n and query[end + 1] == c:
                end = query.find(c, end + 2)
            if end == -1:
                raise ValueError(f"unterminated {c} quote")
            out.append(query[i : end + 1].replace("%", percent))
            i = end + 1
        elif query.startswith("--", i):
            end = query.find("\n", i)
            end = n if end == -1 else end
            out.append(query[i:end].replace("%", percent))
            i = end
        elif query.startswith("/*", i):
            end = query.find("*/", i + 2)
            if end == -1:
                raise ValueError("unterminated /* comment")
            out.append(query[i : end + 2].replace("%", percent))
            i = end + 2
        elif query.startswith("::", i):
            out.append("::")
            i += 2
        elif c == ":" and (match := _IDENTIFIER.match(query, i + 1)):
            name = match.group()
            if name not in allowed:
                if not allowed:
                    raise ValueError(f"unknown parameter :{name}; this statement takes none")
                raise ValueError(f"unknown parameter :{name}; use {', '.join(':' + p for p in allowed)}")
            names.append(name)
            out.append(f":{name}" if paramstyle == "named" else f"%({name})s")
            i = match.end()
        elif c == "%":
            out.append(percent)
            i += 1
        else:
            out.append(c)
            i += 1
    return "".join(out), tuple(names)


@frozen
class AccountRow:
    """
    The columns that matter of the query's row.

    @ivar hasPassword: the query has a C{password} column at all.
    """

    backend: str | None
    password: bytes | None = field(default=None, repr=False)
    loginUser: str | None = None
    hasPassword: bool = False


class DatabaseUnavailable(Exception):
    """
    The database could not answer; the text says why (without secrets).
    """


class NoRowChanged(Exception):
    """
    A statement of a change matched no row; the whole change was rolled
    back.

    @ivar index: which statement, counted from 0.
    """

    def __init__(self, index: int) -> None:
        super().__init__(f"statement {index} changed no row")
        self.index = index


@frozen
class RouteStatements:
    """
    The statements of an SQL route store, already in the driver's
    paramstyle (see L{ROUTE_STATEMENTS}).

    @ivar routes: lists the entries (columns C{account} and C{backend}).
    @ivar setRoute: routes one account.
    @ivar deleteRoute: removes one account, if configured.
    @ivar setDomainRoute: routes every account of a domain, if configured.
    """

    routes: str
    setRoute: str
    deleteRoute: str | None = None
    setDomainRoute: str | None = None


class SQLDatabase:
    """
    The blocking half: runs the query in pool threads, one connection per
    thread.
    """

    def __init__(self, connect: Callable[[], Any], module: Any, query: str) -> None:
        """
        @param connect: opens a new connection (in the calling thread).
        @param module: the DB-API module (for its C{Error} class).
        @param query: already in the driver's paramstyle.
        """
        self._module = module
        self.query = query
        self._connections: PerThread[Any] = PerThread(connect, self._close)

    def lookup(self, parameters: Mapping[str, str]) -> list[AccountRow]:
        """
        The rows (at most two) the query returns for C{parameters}.

        @raise DatabaseUnavailable: the query failed twice (a fresh
            connection is tried after the first failure).
        """
        for attempt in (1, 2):
            try:
                connection = self._connections.get()
                cursor = connection.cursor()
                try:
                    cursor.execute(self.query, dict(parameters))
                    columns = [str(d[0]).lower() for d in cursor.description or ()]
                    rows = cursor.fetchmany(2)
                finally:
                    cursor.close()
            except self._module.Error as e:
                self._connections.discard()
                if attempt == 2:
                    raise DatabaseUnavailable(f"{type(e).__name__}: {e}") from None
                continue
            if "backend" not in columns:
                raise DatabaseUnavailable(f"the query returns no column named backend (only {', '.join(columns)})")
            return [_row(dict(zip(columns, row)), "password" in columns) for row in rows]
        raise AssertionError("unreachable")

    def entries(self, query: str) -> list[tuple[str, str]]:
        """
        The C{(account, backend)} pairs C{query} lists (rows with a NULL
        in either are left out).

        @raise DatabaseUnavailable: the query failed twice, or lacks one of
            the columns.
        """
        for attempt in (1, 2):
            try:
                connection = self._connections.get()
                cursor = connection.cursor()
                try:
                    cursor.execute(query)
                    columns = [str(d[0]).lower() for d in cursor.description or ()]
                    rows = cursor.fetchall()
                finally:
                    cursor.close()
            except self._module.Error as e:
                self._connections.discard()
                if attempt == 2:
                    raise DatabaseUnavailable(f"{type(e).__name__}: {e}") from None
                continue
            missing = [name for name in ("account", "backend") if name not in columns]
            if missing:
                raise DatabaseUnavailable(
                    f"routes_query returns no column named {' or '.join(missing)} (only {', '.join(columns)})"
                )
            account, backend = columns.index("account"), columns.index("backend")
            return [
                (_text(row[account]) or "", _text(row[backend]) or "")
                for row in rows
                if row[account] is not None and row[backend] is not None
            ]
        raise AssertionError("unreachable")

    def change(self, statements: list[tuple[str, Mapping[str, str]]]) -> None:
        """
        Run C{statements} (each a statement and its parameters) in one
        transaction; each must change at least one row.

        @raise NoRowChanged: one changed nothing; nothing was changed.
        @raise DatabaseUnavailable: the database failed; nothing was
            changed (a fresh connection is tried once if the first cannot
            even begin).
        """
        for attempt in (1, 2):
            try:
                connection = self._connections.get()
                cursor = connection.cursor()
                cursor.execute("BEGIN")
            except self._module.Error as e:
                self._connections.discard()
                if attempt == 2:
                    raise DatabaseUnavailable(f"{type(e).__name__}: {e}") from None
                continue
            break
        try:
            try:
                for index, (statement, parameters) in enumerate(statements):
                    cursor.execute(statement, dict(parameters))
                    # -1: the driver cannot tell; only a sure 0 refuses.
                    if cursor.rowcount == 0:
                        cursor.execute("ROLLBACK")
                        raise NoRowChanged(index)
                cursor.execute("COMMIT")
            except self._module.Error as e:
                try:
                    cursor.execute("ROLLBACK")
                except Exception:
                    pass
                self._connections.discard()
                raise DatabaseUnavailable(f"{type(e).__name__}: {e}") from None
        finally:
            try:
                cursor.close()
            except Exception:
                pass

    def close(self) -> None:
        """
        Close every thread's connection (the pool has stopped).
        """
        self._connections.closeAll()

    @staticmethod
    def _close(connection: Any) -> None:
        try:
            connection.close()
        except Exception:
            pass


def _text(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).decode("utf-8", "surrogateescape")
    return str(value)


def _row(values: Mapping[str, Any], hasPassword: bool) -> AccountRow:
    password = values.get("password")
    if isinstance(password, str):
        password = password.encode("utf-8")
    elif password is not None:
        password = bytes(password)
    return AccountRow(
        backend=_text(values.get("backend")),
        password=password,
        loginUser=_text(values.get("login_user")),
        hasPassword=hasPassword,
    )


def _parameters(user: str) -> dict[str, str]:
    local, at, domain = user.rpartition("@")
    if not at:
        local, domain = user, ""
    return {"user": user, "local": local, "domain": domain}


@implementer(IRouter)
class SQLRouter:
    """
    Routes (and optionally authenticates) logins with an SQL query (see the
    module docstring).

    Given L{RouteStatements}, it also provides L{IRouteStore} (with
    C{setRoutes} for several changes in one transaction); a domain's route
    then covers every account of the domain (C{domainCoversAccounts}).
    Every statement runs in the pool's threads, never in the reactor's.
    """

    log = Logger()

    def __init__(
        self,
        database: Any,
        resolver: BackendResolver,
        *,
        runner: Any,
        timeout: float = 5.0,
        statements: RouteStatements | None = None,
    ) -> None:
        """
        @param database: an L{SQLDatabase} (or a double with its methods).
        @param runner: runs the blocking calls: a L{ThreadRunner} or
            anything with its C{run(timeout, f, *args)}.
        @param timeout: seconds one lookup or change may take.
        @param statements: the route store's statements, or L{None} for a
            router that only reads.
        """
        self.database = database
        self.resolver = resolver
        self.timeout = timeout
        self.statements = statements
        self.domainCoversAccounts = True
        self._runner = runner
        if statements is not None:
            alsoProvides(self, IRouteStore)

    def close(self) -> None:
        """
        This router is no longer used (a reload replaced it): its threads
        stop and its connections close once the lookups under way are done.
        """
        closeRunner(self._runner)

    def route(self, request: RouteRequest) -> Deferred[Route | Rejection]:
        """
        Run the query for C{request} and route by its row.
        """
        return Deferred.fromCoroutine(self._route(request))

    async def _route(self, request: RouteRequest) -> Route | Rejection:
        credentials = request.credentials if request.lookup == "login" else None
        user = lookedUp(request)
        try:
            user.encode("utf-8")
        except UnicodeEncodeError:
            # Octets that are not UTF-8, kept as surrogates: no column
            # holds such a name, and the driver could not send it.
            self.log.info("SQL: no row for {user}", user=logQuote(user))
            return Rejection(unknown=True)
        parameters = _parameters(user)
        try:
            rows = await self._runner.run(self.timeout, self.database.lookup, parameters)
        except Exception as e:
            self.log.error("SQL: lookup failed for {user}: {error}", user=logQuote(user), error=logQuote(f"{type(e).__name__}: {e}"))
            return Rejection(_UNAVAILABLE, temporary=True)
        if not rows:
            self.log.info("SQL: no row for {user}", user=logQuote(user))
            return Rejection(unknown=True)
        if len(rows) > 1:
            self.log.error("SQL: more than one row for {user}; refusing", user=logQuote(user))
            return Rejection()
        row: AccountRow = rows[0]
        password = None
        authenticated = False
        if credentials is not None:
            if row.password is not None:
                if not credentials.check(row.password):
                    self.log.info("SQL: wrong password for {user}", user=logQuote(user))
                    return Rejection()
                authenticated = True
                if credentials.password is None:
                    password = row.password
            elif credentials.password is None:
                self.log.warn(
                    "SQL: {mechanism} login for {user} refused: the row has no password to check it against",
                    mechanism=credentials.mechanism,
                    user=logQuote(user),
                )
                return Rejection()
        try:
            if row.backend is None:
                raise UnusableBackend("its backend column is NULL")
            backend = self.resolver.resolve(row.backend, request.port)
        except UnusableBackend as e:
            self.log.error("SQL: the row for {user} routes nowhere: {problem}", user=logQuote(user), problem=logQuote(str(e)))
            return Rejection(_UNAVAILABLE, temporary=True)
        return Route(
            backend=backend,
            user=row.loginUser,
            password=password,
            authenticated=authenticated,
            rule=f"sql -> {backend.name}",
        )

    # Without a login

    def explainRoute(self, user: str) -> Deferred[tuple[str, str | None] | None]:
        """
        What the query says about login name C{user}, without checking a
        password: C{("sql", backend)} as the row names it, a rule saying
        why logins are refused (with no backend) for several rows, or
        L{None} for none.

        @raise RouteStoreError: (in the Deferred) the lookup failed.
        """
        return Deferred.fromCoroutine(self._explain(user))

    async def _explain(self, user: str) -> tuple[str, str | None] | None:
        try:
            rows = await self._runner.run(self.timeout, self.database.lookup, _parameters(user))
        except Exception as e:
            raise RouteStoreError(f"SQL: the lookup failed: {_describe(e)}") from None
        if not rows:
            return None
        if len(rows) > 1:
            return "sql: more than one row (logins are refused)", None
        return "sql", rows[0].backend

    # IRouteStore

    def routes(self) -> Deferred[dict[str, str]]:
        """
        The entries C{routes_query} lists: account (or C{@domain}) to
        backend.
        """
        return Deferred.fromCoroutine(self._routes())

    async def _routes(self) -> dict[str, str]:
        statements = self._store()
        try:
            entries = await self._runner.run(self.timeout, self.database.entries, statements.routes)
        except Exception as e:
            self.log.error("SQL: routes_query failed: {error}", error=logQuote(_describe(e)))
            raise RouteStoreError(f"SQL: routes_query failed: {_describe(e)}") from None
        return dict(entries)

    def setRoute(self, key: str, backend: str) -> Deferred[None]:
        """
        Route C{key} to the configured backend C{backend}: an account with
        C{set_route}, a domain with C{set_domain_route}.

        @raise RouteStoreError: (in the Deferred) an unknown backend, a key
            this store cannot change, no row changed, or a database
            failure.
        """
        return self.setRoutes({key: backend})

    def setRoutes(self, changes: Mapping[str, str]) -> Deferred[None]:
        """
        Like L{setRoute} for several keys, in one transaction: all of the
        changes happen or none does.
        """
        return Deferred.fromCoroutine(self._setRoutes(dict(changes)))

    async def _setRoutes(self, changes: dict[str, str]) -> None:
        statements = self._store()
        work: list[tuple[str, Mapping[str, str]]] = []
        for key, backend in changes.items():
            if backend not in self.resolver.backends:
                configured = ", ".join(sorted(self.resolver.backends)) or "none"
                raise RouteStoreError(f"unknown backend {backend!r}; configured backends: {configured}")
            if key == "*":
                raise RouteStoreError("SQL: the default route is the query's, not a row's; it cannot be set")
            if key.startswith("@"):
                domain = _domain(key)
                if statements.setDomainRoute is None:
                    raise RouteStoreError(
                        f"SQL: cannot route the domain {domain!r}: set_domain_route is not configured"
                    )
                work.append((statements.setDomainRoute, {"domain": domain, "backend": backend}))
            else:
                work.append((statements.setRoute, {**_parameters(_account(key)), "backend": backend}))
        await self._change(list(changes), work, "set_route")
        self.log.info("SQL: routed {keys}", keys=changes)

    def deleteRoute(self, key: str) -> Deferred[None]:
        """
        Remove the account C{key} with C{delete_route}.

        @raise RouteStoreError: (in the Deferred) no such row, a key this
            store cannot remove, or a database failure.
        """
        return Deferred.fromCoroutine(self._deleteRoute(key))

    async def _deleteRoute(self, key: str) -> None:
        statements = self._store()
        if key == "*" or key.startswith("@"):
            raise RouteStoreError(f"SQL: only accounts can be removed, not {key!r}")
        if statements.deleteRoute is None:
            raise RouteStoreError("SQL: delete_route is not configured")
        await self._change([key], [(statements.deleteRoute, _parameters(_account(key)))], "delete_route")
        self.log.info("SQL: removed {key}", key=logQuote(key))

    def _store(self) -> RouteStatements:
        if self.statements is None:
            raise RouteStoreError("SQL: no routes_query and set_route are configured")
        return self.statements

    async def _change(self, keys: list[str], work: list[tuple[str, Mapping[str, str]]], what: str) -> None:
        try:
            await self._runner.run(self.timeout, self.database.change, work)
        except NoRowChanged as e:
            key = keys[e.index]
            statement = "set_domain_route" if key.startswith("@") and what == "set_route" else what
            raise RouteStoreError(
                f"SQL: {statement} changed no row for {key!r} (not in the database?); nothing was changed"
            ) from None
        except TimeoutError:
            self.log.error("SQL: a route change did not finish within {timeout} s", timeout=self.timeout)
            raise RouteStoreError(
                f"SQL: the change did not finish within {self.timeout:g} s; it may still take effect (see the routes)"
            ) from None
        except Exception as e:
            self.log.error("SQL: a route change failed: {error}", error=logQuote(_describe(e)))
            raise RouteStoreError(f"SQL: the change failed: {_describe(e)}") from None


def _describe(error: Exception) -> str:
    # A DatabaseUnavailable already names the driver's error.
    if isinstance(error, DatabaseUnavailable):
        return str(error)
    return f"{type(error).__name__}: {error}"


def _domain(key: str) -> str:
    domain = key[1:]
    if not domain or "@" in domain:
        raise RouteStoreError(f"not a domain: {key!r}")
    return domain


def _account(key: str) -> str:
    if not key:
        raise RouteStoreError("an account name must not be empty")
    return key


def _sqliteConnect(module: Any, path: str, timeout: float, writable: bool = False) -> Callable[[], Any]:
    # Read-only unless routes are changed here, and never create a missing
    # file: a typo must fail, not route everybody nowhere.
    uri = "file:" + quote(path) + ("?mode=rw" if writable else "?mode=ro")
    return lambda: module.connect(uri, uri=True, timeout=timeout, check_same_thread=False)


def _psycopgConnect(module: Any, dsn: str, password: bytes | None, timeout: float) -> Callable[[], Any]:
    extra: dict[str, Any] = {"connect_timeout": max(1, int(timeout)), "autocommit": True}
    if password is not None:
        extra["password"] = password.decode("utf-8")
    return lambda: module.connect(dsn, **extra)


def _pymysqlArguments(dsn: str) -> dict[str, Any]:
    """
    PyMySQL's keyword arguments for a C{mysql://user@host:port/database}
    URL.

    @raise ValueError: it is not such a URL, or carries a password.
    """
    parts = urlsplit(dsn)
    if parts.scheme not in ("mysql", "mariadb") or not parts.hostname or not parts.path.strip("/"):
        raise ValueError("must be a URL like mysql://user@host:3306/database")
    if parts.password is not None:
        raise ValueError("must not contain the password; use password_file")
    arguments: dict[str, Any] = {"host": parts.hostname, "database": unquote(parts.path.strip("/"))}
    if parts.port is not None:
        arguments["port"] = parts.port
    if parts.username:
        arguments["user"] = unquote(parts.username)
    return arguments


def _pymysqlConnect(module: Any, arguments: dict[str, Any], password: bytes | None, timeout: float) -> Callable[[], Any]:
    extra: dict[str, Any] = {
        "connect_timeout": timeout,
        "read_timeout": timeout,
        "write_timeout": timeout,
        "autocommit": True,
        "charset": "utf8mb4",
        # An UPDATE then counts the rows it matched, not only those whose
        # value differed: setting a route to what it is must not look like
        # "no such account".
        "client_flag": _FOUND_ROWS,
    }
    if password is not None:
        extra["password"] = password
    return lambda: module.connect(**arguments, **extra)


#: MySQL's CLIENT_FOUND_ROWS capability flag.
_FOUND_ROWS = 2


def buildSQLRouter(options: Table, backends: Mapping[str, Backend], reactor: Any) -> SQLRouter:
    """
    Make an L{SQLRouter} from its C{[router]} options.

    @raise mailproxy.config.ConfigError: naming the key that is wrong.
    """
    options.allow(
        "driver", "database", "dsn", "password_file", "query", "pool_size", "timeout", "backend_defaults",
        *ROUTE_STATEMENTS,
    )
    driver = options.string("driver", choices=tuple(DRIVERS))
    missing: str | None = None
    try:
        module = importlib.import_module(driver)
    except ImportError:
        options.fail("driver", f"{driver} is not installed; {DRIVERS[driver]}")
    # Read with collect: a wrong one is noted and the others still read
    # (when the configuration's problems are gathered, as for check).
    timeout = options.collect(lambda: options.number("timeout", 5.0, positive=True), 5.0)
    password = readSecretLine(options, "password_file") if "password_file" in options else None
    if driver == "sqlite3":
        for key in ("dsn", "password_file"):
            if key in options:
                options.fail(key, "not used by sqlite3; name the file with database")
        writable = any(key in options for key in ROUTE_STATEMENTS)
        database = options.path("database", readable=False)
        if not os.path.exists(database):
            # Refused (once the other options are read, so that check names
            # their problems too): the proxy opens it, never creates it, and
            # every login would fail. A start or reload with it fails.
            missing = f"{database!r} does not exist; the proxy never creates it, so every login would fail"
        connect = _sqliteConnect(module, database, timeout, writable)
    else:
        if "database" in options:
            options.fail("database", f"only for sqlite3; {driver} connects with dsn")
        dsn = options.string("dsn")
        if driver == "psycopg":
            connect = _psycopgConnect(module, dsn, password, timeout)
        else:
            try:
                arguments = _pymysqlArguments(dsn)
            except ValueError as e:
                options.fail("dsn", str(e))
            connect = _pymysqlConnect(module, arguments, password, timeout)
    try:
        query, _ = translateQuery(options.string("query"), _PARAMSTYLES[driver])
    except ValueError as e:
        options.fail("query", str(e))
    statements = _routeStatements(options, _PARAMSTYLES[driver])
    if missing is not None:
        options.fail("database", missing)
    sql = SQLDatabase(connect, module, query)
    poolSize = options.collect(lambda: options.integer("pool_size", 4, 1, 64), 4)
    runner = ThreadRunner(reactor, poolSize, f"mailproxy-sql-{driver}")
    runner.whenStopping(sql.close)
    router = SQLRouter(
        sql,
        BackendResolver(backends, parseBackendDefaults(options.tableOrEmpty("backend_defaults"))),
        runner=runner,
        timeout=2 * timeout + 1,
        statements=statements,
    )
    return router


def _routeStatements(options: Table, paramstyle: str) -> RouteStatements | None:
    """
    The route store's statements from C{options}, checked, or L{None} if
    there are none.

    @raise mailproxy.config.ConfigError: naming the statement that is
        wrong, or the one missing.
    """
    present = [key for key in ROUTE_STATEMENTS if key in options]
    if not present:
        return None
    for key in ("routes_query", "set_route"):
        if key not in options:
            others = ", ".join(name for name in present if name != key)
            options.fail(key, f"required with {others} (a route store lists and sets routes)")
    translated: dict[str, str] = {}
    for key in present:
        allowed, required, namesAccount = ROUTE_STATEMENTS[key]
        try:
            statement, names = translateQuery(options.string(key), paramstyle, allowed)
        except ValueError as e:
            options.fail(key, str(e))
        for name in required:
            if name not in names:
                options.fail(key, f"must use :{name}")
        if namesAccount and "user" not in names and not ("local" in names and "domain" in names):
            # Without the account, the statement would change every row.
            options.fail(key, "must name the account with :user, or with :local and :domain")
        translated[key] = statement
    return RouteStatements(
        routes=translated["routes_query"],
        setRoute=translated["set_route"],
        deleteRoute=translated.get("delete_route"),
        setDomainRoute=translated.get("set_domain_route"),
    )
