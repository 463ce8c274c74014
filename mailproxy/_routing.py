"""
Asking a router: L{callRouter} takes whatever style a router's C{route}
method is written in and gives a Deferred of the answer.

This module imports no router and no configuration, so that the session
core and the routers that wrap other routers (cache, chain) can both use it.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, fail, succeed

from mailproxy.interfaces import IRouter
from mailproxy.model import Rejection, Route, RouteRequest

__all__ = ["callRouter"]

_T = TypeVar("_T")


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
