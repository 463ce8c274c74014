"""
Asking a router: L{callRouter} takes whatever style a router's C{route}
method is written in and gives a Deferred of the answer (L{askRouter}: the
answer itself when the router gave it at once); L{routeLogin} is how a
session asks, after the gate and with the router's time counted
(L{routeNow}: the answer itself when it is known at once);
L{explainRoute} says which router, rule and backend decide an account's
route without a login (for an operator, and for a request that carries
only the HTTP routing cookie).

This module imports no router and no configuration, so that the session
core and the routers that wrap other routers (cache, chain) can both use it.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable
from typing import Any, Callable, TypeVar

from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime

from mailproxy._stats import routerChain
from mailproxy.interfaces import IRouter
from mailproxy.model import Rejection, Route, RouteRequest

__all__ = ["askRouter", "callRouter", "routeLogin", "routeNow", "explainRoute"]

_T = TypeVar("_T")


def callRouter(router: IRouter, request: RouteRequest) -> Deferred[Route | Rejection]:
    """
    Ask C{router} about C{request}.

    @return: a Deferred that fires with the L{Route} or L{Rejection}, whether
        C{route} returned it, a Deferred of it, or is a coroutine function.
        It fails if C{route} raised, or answered with anything else.
    """
    try:
        answer = askRouter(router, request)
    except Exception:
        return fail()
    return answer if isinstance(answer, Deferred) else succeed(answer)


def askRouter(router: IRouter, request: RouteRequest) -> Route | Rejection | Deferred[Route | Rejection]:
    """
    Ask C{router} about C{request}, as L{callRouter} does, but with the
    answer itself when C{route} returned it at once (a static or file
    router): the caller goes on with a plain call instead of a callback.

    @return: the L{Route} or L{Rejection}, or a Deferred of it.
    @raise Exception: what C{route} raised; L{TypeError} if it answered
        at once with anything else.
    """
    result = router.route(request)
    if isinstance(result, (Route, Rejection)):
        return result
    answer: Deferred[Any]
    if isinstance(result, Deferred):
        answer = result
    elif inspect.isawaitable(result):
        coroutine = result if inspect.iscoroutine(result) else _await(result)
        answer = Deferred.fromCoroutine(coroutine)
    else:
        return _checkAnswer(result, router)
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


def routeLogin(
    router: IRouter,
    request: RouteRequest,
    clock: IReactorTime,
    answered: Callable[[float], None] | None = None,
    gate: Any = None,
) -> Deferred[Route | Rejection]:
    """
    Ask C{router} about a session's request (a login, or an MX session's
    recipient), once C{gate} lets it go on.

    @param answered: if given, called with the seconds the router took (the
        wait at the gate not included), whatever its answer; a session
        counts it in its statistics.
    @param gate: if given, its C{wait(request)} answers L{None} (go on) or
        a Deferred that fires when the request may go on (an operator holds
        the account while it moves).  Cancelling the Deferred returned here
        cancels that wait, or the router's answer.
    """
    try:
        answer = routeNow(router, request, clock, answered, gate)
    except Exception:
        return fail()
    return answer if isinstance(answer, Deferred) else succeed(answer)


def routeNow(
    router: IRouter,
    request: RouteRequest,
    clock: IReactorTime,
    answered: Callable[[float], None] | None = None,
    gate: Any = None,
) -> Route | Rejection | Deferred[Route | Rejection]:
    """
    L{routeLogin}, but with the answer itself when it is known at once (no
    hold at the gate, and a router that answers without waiting), for a
    login to go on with a plain call.

    @return: the L{Route} or L{Rejection}, or a Deferred of it.
    @raise Exception: what the router raised at once (C{answered} has been
        called), or L{TypeError} for an answer of another type.
    """
    waiting = gate.wait(request) if gate is not None else None
    if waiting is None:
        return _ask(router, request, clock, answered)
    return waiting.addCallback(lambda _: _ask(router, request, clock, answered))  # type: ignore[no-any-return]


def _ask(
    router: IRouter, request: RouteRequest, clock: IReactorTime, answered: Callable[[float], None] | None
) -> Route | Rejection | Deferred[Route | Rejection]:
    if answered is None:
        return askRouter(router, request)
    started = clock.seconds()
    try:
        answer = askRouter(router, request)
    except Exception:
        answered(clock.seconds() - started)
        raise
    if not isinstance(answer, Deferred):
        answered(clock.seconds() - started)
        return answer

    def timed(result: object) -> object:
        answered(clock.seconds() - started)
        return result

    return answer.addBoth(timed)


def explainRoute(router: object, routerName: str, account: str) -> Deferred[dict[str, Any]]:
    """
    Which router, rule and backend decide C{account}'s route, without a
    login: the routers that do the deciding (not caches or chains) are
    asked in the order a login asks them, each with
    C{explainRoute(user) -> (rule, backend) | None} (or a Deferred of it:
    a database is asked in its own threads); the first rule found decides,
    and a router that cannot tell without the password ends the search.

    @return: fires with JSON-ready data: C{account}, C{router} (the
        configured type), C{chain} (class names, outermost first), C{rule}
        and C{backend} (L{None} when no rule matches), and C{explained}
        (whether the answer is known without the password); fails with
        what a router raised (L{RouteStoreError} for a database that
        cannot answer).
    """
    return Deferred.fromCoroutine(_explainRoute(router, routerName, account))


async def _explainRoute(router: object, routerName: str, account: str) -> dict[str, Any]:
    chain = list(routerChain(router))
    answer: dict[str, Any] = {
        "account": account,
        "router": routerName,
        "chain": [type(member).__name__ for member in chain],
        "rule": None,
        "backend": None,
        "explained": False,
    }
    answer["explained"] = True
    for member in chain:
        if getattr(member, "wrapped", None) is not None or getattr(member, "routers", None):
            continue
        explain = getattr(member, "explainRoute", None)
        if not callable(explain):
            answer["explained"] = False
            break
        found = await maybeDeferred(explain, account)
        if found is not None:
            answer["rule"], answer["backend"] = found
            break
    return answer
