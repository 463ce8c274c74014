"""
Routers decide which backend serves a login.

L{buildRouter} makes the router the configuration asks for; L{callRouter}
asks any router, whatever style its C{route} method is written in.

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
import inspect
import os
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, fail, succeed

from mailproxy.config import ROUTER_TYPES, Config, ConfigError, Table
from mailproxy.interfaces import IRouter
from mailproxy.model import Rejection, Route, RouteRequest
from mailproxy.routers.static import StaticRouter

__all__ = ["buildRouter", "callRouter"]

_T = TypeVar("_T")


def _buildStatic(config: Config, reactor: Any) -> IRouter:
    options = Table(config.path, ("router",), config.router.options, os.path.dirname(config.path))
    options.allow("path", "watch_interval")
    return StaticRouter(
        options.path("path"),
        config.backends,
        reactor=reactor,
        watchInterval=options.number("watch_interval", 2.0, positive=True),
    )


_BUILDERS: dict[str, Callable[[Config, Any], IRouter]] = {"static": _buildStatic}
assert set(_BUILDERS) == set(ROUTER_TYPES)


def buildRouter(config: Config, reactor: Any) -> IRouter:
    """
    Make the router that C{config.router} describes.

    @param reactor: handed to the router for its timers and connections.
    @raise ConfigError: if the router cannot be made (a bad route table, a
        class that cannot be imported or that refuses its options).
    """
    kind = config.router.type
    if kind in _BUILDERS:
        return _BUILDERS[kind](config, reactor)
    return _buildPython(config, reactor, kind[len("python:") :])


def _buildPython(config: Config, reactor: Any, name: str) -> IRouter:
    def problem(what: str) -> ConfigError:
        return ConfigError(f"{config.path}: router.type: {what}")

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
    try:
        router = factory(backends=dict(config.backends), reactor=reactor, **config.router.options)
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(
            f"{config.path}: router: {name} refused its options: {type(e).__name__}: {e}"
        ) from None
    if not callable(getattr(router, "route", None)):
        raise problem(f"{name} has no route method")
    return router  # type: ignore[no-any-return]


def callRouter(router: IRouter, request: RouteRequest) -> Deferred[Route | Rejection]:
    """
    Ask C{router} about C{request}.

    @return: a Deferred that fires with the L{Route} or L{Rejection}, whether
        C{route} returned it, a Deferred of it, or is a coroutine function.
        It fails if C{route} raised, or answered with anything else.
    """
    try:
        result = router.route(request)
    except Exception:
        return fail()
    answer: Deferred[Any]
    if isinstance(result, Deferred):
        answer = result
    elif inspect.isawaitable(result):
        coroutine = result if inspect.iscoroutine(result) else _await(result)
        answer = Deferred.fromCoroutine(coroutine)
    else:
        answer = succeed(result)
    return answer.addCallback(_checkAnswer, router)


async def _await(awaitable: Awaitable[_T]) -> _T:
    return await awaitable


def _checkAnswer(result: object, router: object) -> Route | Rejection:
    if not isinstance(result, (Route, Rejection)):
        raise TypeError(
            f"{type(router).__name__}.route answered with {type(result).__name__}, "
            "not a Route or Rejection"
        )
    return result
