"""
A chain of routers asked in order.

    [router]
    type = "chain"

    [[router.routers]]          # asked first: the migration table
    type = "static"
    path = "moved.toml"

    [[router.routers]]          # then the directory
    type = "ldap"
    ...

The first router that knows the account decides.  A router that does not
know it (a L{Rejection} with C{unknown}: a route table without a rule for
it, a directory without an entry) passes the question on.  Any other answer
ends the chain: a L{Route}, a wrong password, a temporary failure (a later
router must not be asked with a password an earlier one refused, nor decide
while an earlier one that might know better is down).  When every router
passes, the last one's refusal is the answer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from attrs import evolve
from zope.interface import implementer

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from mailproxy.config import Problems, Table
from mailproxy.interfaces import IReloadable, IRouter
from mailproxy.model import Backend, Rejection, Route, RouteRequest

__all__ = ["ChainRouter", "buildChain"]


@implementer(IRouter, IReloadable)
class ChainRouter:
    """
    Asks L{routers} in order (see the module docstring).

    @ivar routers: the routers, first asked first.
    """

    log = Logger()

    def __init__(self, routers: Sequence[Any]) -> None:
        """
        @param routers: at least one router.
        """
        if not routers:
            raise ValueError("a chain needs at least one router")
        self.routers = tuple(routers)

    def route(self, request: RouteRequest) -> Deferred[Route | Rejection]:
        """
        Ask each router in turn until one knows the account.
        """
        return Deferred.fromCoroutine(self._route(request))

    async def _route(self, request: RouteRequest) -> Route | Rejection:
        # Imported here: mailproxy.routers imports this module.
        from mailproxy._routing import callRouter

        answer: Route | Rejection = Rejection(unknown=True)
        for index, router in enumerate(self.routers):
            answer = await callRouter(router, request)
            if not (isinstance(answer, Rejection) and answer.unknown):
                if isinstance(answer, Route):
                    answer = evolve(answer, rule=f"routers[{index}]: {answer.rule}")
                return answer
        return answer

    def reload(self) -> None:
        """
        Reload every router that can be reloaded.
        """
        for router in self.routers:
            if IReloadable.providedBy(router):
                router.reload()

    def startWatching(self) -> None:
        """
        Start every router's watching, if it has any.
        """
        self._each("startWatching")

    def stopWatching(self) -> None:
        """
        Stop every router's watching, if it has any.
        """
        self._each("stopWatching")

    def close(self) -> None:
        """
        Close every router that can be closed (a reload replaced the chain).
        """
        self._each("close")

    def _each(self, method: str) -> None:
        for router in self.routers:
            call = getattr(router, method, None)
            if call is not None:
                call()


def buildChain(
    options: Table,
    backends: Mapping[str, Backend],
    reactor: Any,
    build: Callable[[Table, Mapping[str, Backend], Any], Any],
    close: Callable[[Any], None],
) -> ChainRouter:
    """
    Make a L{ChainRouter} from its C{[[router.routers]]} tables.

    @param build: makes one router from its table (any type, with its own
        C{cache} sub-table).
    @param close: lets a built router go (L{None} is let go too).
    @raise mailproxy.config.ConfigError: naming the key that is wrong.
    """
    options.allow("routers")
    tables = options.tables("routers")
    if not tables:
        options.fail("routers", "a chain needs at least one [[router.routers]] table")
    # Every router is built even after one fails, so that check reports the
    # problems of all of them in one run; those built are let go again.
    problems = Problems()
    built = [problems.collect(lambda: build(table, backends, reactor), None) for table in tables]
    if problems.found:
        for router in built:
            close(router)
        problems.check()
    return ChainRouter(built)
