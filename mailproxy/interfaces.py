"""
The contracts between mailproxy's parts.
"""

from __future__ import annotations

from typing import Any

from zope.interface import Attribute, Interface


class IRouter(Interface):
    """
    Decides which backend serves a login.

    Two styles are natural: a router that I{authenticates} (checks the
    password itself, e.g. with C{request.credentials.check(secret)}, and
    answers L{mailproxy.model.Rejection} when it is wrong) and one that only
    I{locates} the account and lets the backend judge the password.
    """

    def route(request: Any) -> Any:
        """
        Answer a L{mailproxy.model.RouteRequest}.

        @return: a L{mailproxy.model.Route} or L{mailproxy.model.Rejection},
            or a L{twisted.internet.defer.Deferred} or coroutine that gives
            one. An exception counts as a temporary failure.
        """


class IReloadable(Interface):
    """
    A router (or other part) whose data can be re-read without a restart.
    """

    def reload() -> None:
        """
        Re-read the data; on error keep the last good data and log why.
        """


class RouteStoreError(Exception):
    """
    A route table change was refused or failed; C{str(error)} says why, for
    an operator, without secrets.
    """


class IRouteStore(Interface):
    """
    A router whose route table can be read and changed while the proxy runs:
    what moving accounts between backends needs.

    A key is an account (the login name, matched without case), a domain
    written with a leading C{@} (C{"@example.org"}), or C{"*"} for the
    default.  A store that cannot hold a kind of key refuses it with
    L{RouteStoreError}.  Each method may return its result or a Deferred of
    it; once that arrives, the change is durable and the next login sees it.

    Optional, found by name: C{setRoutes(mapping)} changes several keys at
    once, all or none (a move uses it when present);
    C{explainRoute(user) -> (rule, backend) | None} says which rule decides
    an account without a login; C{domainCoversAccounts = True} says that a
    domain's entry routes every account of the domain, those with an entry
    of their own too (so a domain move drops all of their sessions).
    """

    def routes() -> Any:
        """
        The entries: a dict of key to backend name.
        """

    def setRoute(key: str, backend: str) -> Any:
        """
        Route C{key} to the backend named C{backend}, keeping whatever else
        its entry says (a stored password, a login rewrite).

        @raise RouteStoreError: an unknown backend, or the store cannot
            change the entry.
        """

    def deleteRoute(key: str) -> Any:
        """
        Remove the entry for C{key}.

        @raise RouteStoreError: there is no such entry, or it cannot be
            removed.
        """


class IRouteCache(Interface):
    """
    A router that keeps other routers' answers for a while.

    The management endpoint finds caches by walking the router chain (a
    router's C{wrapped} router, or its C{routers} in order), reports their
    hit rate, and invalidates them when a route changes.
    """

    wrapped = Attribute("The router whose answers are cached.")
    hits = Attribute("How many logins were answered from the cache (an int).")
    misses = Attribute("How many logins were passed on to C{wrapped} (an int).")

    def invalidate(user: str | None = None) -> Any:
        """
        Forget the answers for login name C{user}, or for every login name
        of a domain when C{user} has no C{@} (C{"example.org"}, as a route
        table's C{[domains]} keys), or every answer when C{user} is L{None}.
        """
