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
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from attrs import field, frozen
from zope.interface import implementer

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from mailproxy.config import Table, _readSecretLine
from mailproxy.interfaces import IRouter
from mailproxy.model import Backend, Rejection, Route, RouteRequest
from mailproxy.routers._backends import BackendResolver, UnusableBackend, parseBackendDefaults, portName
from mailproxy.routers._blocking import PerThread, ThreadRunner

__all__ = [
    "DRIVERS",
    "QUERY_PARAMETERS",
    "translateQuery",
    "AccountRow",
    "DatabaseUnavailable",
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

_PARAMSTYLES = {"sqlite3": "named", "psycopg": "pyformat", "pymysql": "pyformat"}
_UNAVAILABLE = "Service temporarily unavailable, try again later."
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def translateQuery(query: str, paramstyle: str) -> tuple[str, tuple[str, ...]]:
    """
    Rewrite C{:name} parameters for a driver's C{paramstyle}.

    Quoted strings, quoted identifiers, comments and PostgreSQL's C{::}
    casts are left alone.  For C{pyformat} every other C{%} is doubled, as
    those drivers require when parameters are given.

    @param paramstyle: C{"named"} (sqlite3) or C{"pyformat"} (psycopg,
        PyMySQL).
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
            if name not in QUERY_PARAMETERS:
                raise ValueError(
                    f"unknown parameter :{name}; use {', '.join(':' + p for p in QUERY_PARAMETERS)}"
                )
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


@implementer(IRouter)
class SQLRouter:
    """
    Routes (and optionally authenticates) logins with an SQL query (see the
    module docstring).
    """

    log = Logger()

    def __init__(self, database: Any, resolver: BackendResolver, *, runner: Any, timeout: float = 5.0) -> None:
        """
        @param database: an L{SQLDatabase} (or a double with its C{lookup}).
        @param runner: runs the blocking lookup: a L{ThreadRunner} or
            anything with its C{run(timeout, f, *args)}.
        @param timeout: seconds one lookup may take.
        """
        self.database = database
        self.resolver = resolver
        self.timeout = timeout
        self._runner = runner

    def route(self, request: RouteRequest) -> Deferred[Route | Rejection]:
        """
        Run the query for C{request} and route by its row.
        """
        return Deferred.fromCoroutine(self._route(request))

    async def _route(self, request: RouteRequest) -> Route | Rejection:
        credentials = request.credentials
        user = credentials.user if credentials is not None else (request.rcptTo or "")
        local, at, domain = user.rpartition("@")
        if not at:
            local, domain = user, ""
        parameters = {"user": user, "local": local, "domain": domain}
        try:
            rows = await self._runner.run(self.timeout, self.database.lookup, parameters)
        except Exception as e:
            self.log.error("SQL: lookup failed for {user}: {error}", user=user, error=f"{type(e).__name__}: {e}")
            return Rejection(_UNAVAILABLE, temporary=True)
        if not rows:
            self.log.info("SQL: no row for {user}", user=user)
            return Rejection(unknown=True)
        if len(rows) > 1:
            self.log.error("SQL: more than one row for {user}; refusing", user=user)
            return Rejection()
        row: AccountRow = rows[0]
        password = None
        authenticated = False
        if credentials is not None:
            if row.password is not None:
                if not credentials.check(row.password):
                    self.log.info("SQL: wrong password for {user}", user=user)
                    return Rejection()
                authenticated = True
                if credentials.password is None:
                    password = row.password
            elif credentials.password is None:
                self.log.warn(
                    "SQL: {mechanism} login for {user} refused: the row has no password to check it against",
                    mechanism=credentials.mechanism,
                    user=user,
                )
                return Rejection()
        try:
            if row.backend is None:
                raise UnusableBackend("its backend column is NULL")
            backend = self.resolver.resolve(row.backend, portName(request))
        except UnusableBackend as e:
            self.log.error("SQL: the row for {user} routes nowhere: {problem}", user=user, problem=str(e))
            return Rejection(_UNAVAILABLE, temporary=True)
        return Route(
            backend=backend,
            user=row.loginUser,
            password=password,
            authenticated=authenticated,
            rule=f"sql -> {backend.name}",
        )


def _sqliteConnect(module: Any, path: str, timeout: float) -> Callable[[], Any]:
    # Read-only, and never create a missing file: a typo must fail, not
    # route everybody nowhere.
    uri = "file:" + quote(path) + "?mode=ro"
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
    }
    if password is not None:
        extra["password"] = password
    return lambda: module.connect(**arguments, **extra)


def buildSQLRouter(options: Table, backends: Mapping[str, Backend], reactor: Any) -> SQLRouter:
    """
    Make an L{SQLRouter} from its C{[router]} options.

    @raise mailproxy.config.ConfigError: naming the key that is wrong.
    """
    options.allow("driver", "database", "dsn", "password_file", "query", "pool_size", "timeout", "backend_defaults")
    driver = options.string("driver", choices=tuple(DRIVERS))
    try:
        module = importlib.import_module(driver)
    except ImportError:
        options.fail("driver", f"{driver} is not installed; {DRIVERS[driver]}")
    timeout = options.number("timeout", 5.0, positive=True)
    password = _readSecretLine(options, "password_file") if "password_file" in options else None
    if driver == "sqlite3":
        for key in ("dsn", "password_file"):
            if key in options:
                options.fail(key, "not used by sqlite3; name the file with database")
        # Not checked for existence here: `mailproxy check` may run where
        # the database is not; a missing file fails each lookup, logged.
        connect = _sqliteConnect(module, options.path("database", readable=False), timeout)
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
    database = SQLDatabase(connect, module, query)
    runner = ThreadRunner(reactor, options.integer("pool_size", 4, 1, 64), f"mailproxy-sql-{driver}")
    runner.whenStopping(database.close)
    return SQLRouter(
        database,
        BackendResolver(backends, parseBackendDefaults(options.table("backend_defaults"))),
        runner=runner,
        timeout=2 * timeout + 1,
    )
