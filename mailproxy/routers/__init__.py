"""
Routers decide which backend serves a login.

L{buildRouter} makes the router the configuration asks for; L{callRouter}
asks any router, whatever style its C{route} method is written in.

Built in: C{static} (L{mailproxy.routers.static}), C{http} (nginx's
C{auth_http}, L{mailproxy.routers.http}), C{ldap}
(L{mailproxy.routers.ldap}), C{sql} (L{mailproxy.routers.sql}) and C{chain}
(L{mailproxy.routers.chain}); a C{cache} sub-table wraps any of them in a
L{mailproxy.routers.cache.CachingRouter}.  The key C{cache} is therefore
never passed to a router as an option.

A router of your own is a class named in the configuration::

    [router]
    type = "python:myrouter.ShardRouter"
    shards = ["store1", "store2"]

It is called as C{ShardRouter(backends=..., reactor=..., shards=[...])}: the
configured L{mailproxy.model.Backend}s by name, the reactor, and every other
key of C{[router]} as a keyword argument.  Its C{route(request)} may return a
L{mailproxy.model.Route} or L{mailproxy.model.Rejection}, a Deferred of one,
or be written with C{async def}.  See C{examples/myrouter.py}.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Mapping
from typing import Any

from mailproxy._routing import callRouter
from mailproxy.config import ROUTER_TYPES, Config, ConfigError, Problems, RouterConfig, Table, formatKey, isPathKey
from mailproxy.interfaces import IRouter
from mailproxy.model import Backend
from mailproxy.routers.static import StaticRouter

__all__ = ["buildRouter", "buildRouterFrom", "buildFromTable", "callRouter", "closeRouter"]

_Builder = Callable[[Table, Mapping[str, Backend], Any], IRouter]


def _buildStatic(options: Table, backends: Mapping[str, Backend], reactor: Any) -> IRouter:
    options.allow("path", "watch_interval")
    return StaticRouter(
        options.path("path"),
        backends,
        reactor=reactor,
        watchInterval=options.number("watch_interval", 2.0, positive=True),
    )


# The other routers' modules (and their libraries: treq, ldap3, a database
# driver) are imported only when configured.
def _buildHTTP(options: Table, backends: Mapping[str, Backend], reactor: Any) -> IRouter:
    from mailproxy.routers.http import buildHTTPRouter

    return buildHTTPRouter(options, backends, reactor)


def _buildLDAP(options: Table, backends: Mapping[str, Backend], reactor: Any) -> IRouter:
    from mailproxy.routers.ldap import buildLDAPRouter

    return buildLDAPRouter(options, backends, reactor)


def _buildSQL(options: Table, backends: Mapping[str, Backend], reactor: Any) -> IRouter:
    from mailproxy.routers.sql import buildSQLRouter

    return buildSQLRouter(options, backends, reactor)


def _buildChain(options: Table, backends: Mapping[str, Backend], reactor: Any) -> IRouter:
    from mailproxy.routers.chain import buildChain

    return buildChain(options, backends, reactor, buildFromTable, closeRouter)


_BUILDERS: dict[str, _Builder] = {
    "static": _buildStatic,
    "http": _buildHTTP,
    "ldap": _buildLDAP,
    "sql": _buildSQL,
    "chain": _buildChain,
}
assert set(_BUILDERS) == set(ROUTER_TYPES)


def buildRouter(config: Config, reactor: Any) -> IRouter:
    """
    Make the router that C{config.router} describes.

    @param reactor: handed to the router for its timers and connections.
    @raise ConfigError: if the router cannot be made (a bad route table, a
        class that cannot be imported or that refuses its options).
    """
    return buildRouterFrom(config.path, config.router, config.backends, reactor)


def buildRouterFrom(path: str, router: RouterConfig, backends: Mapping[str, Backend], reactor: Any) -> IRouter:
    """
    L{buildRouter} from the parts of a configuration a router needs: the
    file's (absolute) C{path}, its C{[router]} and its backends.
    """
    table = Table(path, ("router",), {"type": router.type, **router.options}, os.path.dirname(path))
    return buildFromTable(table, backends, reactor)


def buildFromTable(table: Table, backends: Mapping[str, Backend], reactor: Any) -> IRouter:
    """
    Make the router one table describes: C{[router]}, or one of a chain's
    C{[[router.routers]]}.

    Its C{type} picks the kind; an C{oauth} sub-table wraps it in a
    L{mailproxy.routers.oauth.TokenValidatingRouter}, then a C{cache}
    sub-table in a L{mailproxy.routers.cache.CachingRouter}; every other
    key is the router's option.

    @raise ConfigError: naming the file and the key that is wrong.
    """
    kind = table.string("type")
    cache = table.table("cache")
    oauth = table.table("oauth")
    # Problems a builder can note and go on after (unknown keys, options it
    # reads with collect) are gathered, so that check reports them together
    # with the one that stops it, if any.
    problems = Problems()
    options = Table(
        table.file,
        table.key,
        {name: value for name, value in table.data.items() if name not in ("type", "cache", "oauth")},
        table.base,
        problems,
    )
    router: IRouter | None = None
    try:
        if kind in _BUILDERS:
            router = _BUILDERS[kind](options, backends, reactor)
        elif kind.startswith("python:"):
            router = _buildPython(options, backends, reactor, kind[len("python:") :])
        else:
            allowed = ", ".join(ROUTER_TYPES + ("python:package.module.Class",))
            table.fail("type", f"must be one of {allowed}, not {kind!r}")
        if oauth is not None:
            from mailproxy.routers.oauth import buildTokenValidation

            router = buildTokenValidation(oauth, router, reactor)
        if cache is not None:
            from mailproxy.routers.cache import buildCache

            router = buildCache(cache, router, reactor)
    except ConfigError as e:
        problems.found.extend(e.problems)
    if problems.found:
        closeRouter(router)
        problems.check()
    assert router is not None
    return router


def closeRouter(router: object) -> None:
    """
    Let C{router} go: one holding threads or connections (LDAP, SQL) lets
    them go once its lookups under way are done.
    """
    close = getattr(router, "close", None)
    if close is not None:
        close()


def _buildPython(options: Table, backends: Mapping[str, Backend], reactor: Any, name: str) -> IRouter:
    def problem(what: str) -> ConfigError:
        return ConfigError(f"{options.file}: {formatKey(options.key + ('type',))}: {what}")

    moduleName, _, className = name.rpartition(".")
    try:
        module = importlib.import_module(moduleName)
    except ImportError as e:
        raise problem(f"cannot import {moduleName!r} (is it on PYTHONPATH?): {e}") from None
    except Exception as e:
        raise problem(f"importing {moduleName!r} failed: {type(e).__name__}: {e}") from None
    factory = getattr(module, className, None)
    if not callable(factory):
        raise problem(f"module {moduleName!r} has no class {className!r}")
    # Paths in the top-level [router] are already resolved; those of a
    # chain's routers are resolved the same way here.
    arguments = {
        key: options.path(key, readable=False) if isPathKey(key) and isinstance(value, str) else value
        for key, value in options.data.items()
    }
    try:
        router = factory(backends=dict(backends), reactor=reactor, **arguments)
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(
            f"{options.file}: {formatKey(options.key)}: {name} refused its options: {type(e).__name__}: {e}"
        ) from None
    if not callable(getattr(router, "route", None)):
        raise problem(f"{name} has no route method")
    return router  # type: ignore[no-any-return]
