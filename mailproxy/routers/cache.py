"""
A cache in front of any router.

Configured as a sub-table of any router's table::

    [router]
    type = "ldap"
    ...
    [router.cache]
    ttl = 300            # seconds a Route is reused
    negative_ttl = 30    # seconds a (non-temporary) Rejection is reused
    size = 10000         # entries at most; the least recently used go first
    serve_stale = 3600   # seconds past expiry an answer may still be used
                         # while the router fails (0: never)

What is cached is the router's answer to one question, keyed by everything
the answer can depend on (L{CachingRouter.keyFor}): the protocol, the login
name, the authorization identity and a keyed hash of the password (for
digest mechanisms, of the challenge and the response), so a cached answer
for one password never answers another password, and a wrong password never
gets a cached success.  The hash key is random per process: the cache holds
no password and nothing an attacker could test passwords against offline.

Questions that are already being asked are not asked twice: later callers
with the same key wait for the first answer.  Temporary failures (a
L{Rejection} with C{temporary}, or an exception) are never cached; with
C{serve_stale}, they are answered with the last good answer instead, if one
is young enough, so that known users keep working while a directory is down.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any

from attrs import frozen
from zope.interface import implementer

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailproxy._routing import callRouter
from mailproxy._safetext import logQuote
from mailproxy.config import Table
from mailproxy.interfaces import IReloadable, IRouteCache, IRouter
from mailproxy.model import Rejection, Route, RouteRequest

__all__ = ["VARY_FIELDS", "CachingRouter", "buildCache"]

VARY_FIELDS: dict[str, str] = {
    "client_address": "the client's IP address",
    "local_address": "the proxy address the client connected to",
    "local_port": "the proxy port the client connected to",
    "tls": "whether the client uses TLS",
    "server_name": "the TLS server name (SNI) the client asked for",
    "attempt": "the login attempt number within the session",
    "helo": "the SMTP HELO/EHLO name",
    "mail_from": "the SMTP envelope sender",
    "client_id": "the IMAP ID the client sent",
}
"""
Facts of a request that can be added to the cache key (C{vary = [...]}) for
routers whose answer depends on them.
"""


def _varyValue(request: RouteRequest, name: str) -> object:
    client = request.client
    tls = client.tls
    return {
        "client_address": lambda: client.address,
        "local_address": lambda: client.localAddress,
        "local_port": lambda: client.localPort,
        "tls": lambda: tls is not None,
        "server_name": lambda: tls.serverName if tls is not None else None,
        "attempt": lambda: request.attempt,
        "helo": lambda: request.helo,
        "mail_from": lambda: request.mailFrom,
        "client_id": lambda: request.clientID,
    }[name]()


@frozen
class _Entry:
    answer: Route | Rejection
    expires: float
    user: str


@implementer(IRouter, IReloadable, IRouteCache)
class CachingRouter:
    """
    Remembers another router's answers for a while (see the module
    docstring).  The management endpoint finds it in the router chain as
    an L{IRouteCache}: it reports its hit rate and invalidates it when a
    route changes.

    @ivar router: the router asked on a miss.
    @ivar stats: counters: C{hits}, C{misses}, C{collapsed} (callers that
        waited for a question already asked), C{stale} (stale answers
        served), C{stored}.
    """

    log = Logger()

    def __init__(
        self,
        router: Any,
        *,
        reactor: Any,
        ttl: float = 60.0,
        negativeTTL: float = 10.0,
        size: int = 10000,
        serveStale: float = 0.0,
        vary: Sequence[str] = (),
    ) -> None:
        """
        @param reactor: the clock (C{seconds()}).
        @param ttl: seconds a L{Route} is reused; 0 caches none.
        @param negativeTTL: seconds a non-temporary L{Rejection} is reused;
            0 caches none.
        @param size: the most entries kept.
        @param serveStale: seconds past expiry an answer may be served when
            the router fails; 0 never.
        @param vary: names from L{VARY_FIELDS} added to the key.
        """
        unknown = set(vary) - set(VARY_FIELDS)
        if unknown:
            raise ValueError(f"unknown vary fields: {', '.join(sorted(unknown))}")
        self.router = router
        self.ttl = ttl
        self.negativeTTL = negativeTTL
        self.size = size
        self.serveStale = serveStale
        self.vary = tuple(vary)
        self.stats = {"hits": 0, "misses": 0, "collapsed": 0, "stale": 0, "stored": 0}
        self._reactor = reactor
        self._hashKey = os.urandom(32)
        self._entries: OrderedDict[tuple[object, ...], _Entry] = OrderedDict()
        self._pending: dict[tuple[object, ...], list[Deferred[Route | Rejection]]] = {}
        # Bumped by every invalidation: an answer to a question asked
        # before it is delivered but not stored.
        self._generation = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def wrapped(self) -> Any:
        """
        The router this cache is in front of (how tools walk composed
        routers: caches expose C{wrapped}, chains C{routers}).
        """
        return self.router

    @property
    def hits(self) -> int:
        """
        Questions answered from the cache.
        """
        return self.stats["hits"]

    @property
    def misses(self) -> int:
        """
        Questions passed to the router.
        """
        return self.stats["misses"]

    def keyFor(self, request: RouteRequest) -> tuple[object, ...]:
        """
        The cache key of C{request}: protocol, the credentials (user,
        authorization identity, mechanism class and a keyed hash of the
        secret), the SMTP recipient, and the L{vary} facts.
        """
        credentials = request.credentials
        identity: tuple[object, ...] | None = None
        if credentials is not None:
            if credentials.password is not None:
                kind, secret = "cleartext", credentials.password
            else:
                kind = credentials.mechanism.upper()
                secret = b"%d:%s%s%s" % (
                    len(credentials.challenge or b""),
                    credentials.challenge or b"",
                    credentials.response or b"",
                    credentials.token or b"",
                )
            digest = hmac.new(self._hashKey, secret, hashlib.sha256).digest()
            identity = (credentials.user, credentials.authzid, kind, digest)
        return (request.protocol, identity, request.rcptTo) + tuple(
            _varyValue(request, name) for name in self.vary
        )

    def route(self, request: RouteRequest) -> Deferred[Route | Rejection]:
        """
        The cached answer for C{request}, or the router's.
        """
        key = self.keyFor(request)
        now = self._reactor.seconds()
        entry = self._entries.get(key)
        if entry is not None and now < entry.expires:
            self._entries.move_to_end(key)
            self.stats["hits"] += 1
            return succeed(entry.answer)
        waiter: Deferred[Route | Rejection] = Deferred(self._forget(key))
        if key in self._pending:
            self.stats["collapsed"] += 1
            self._pending[key].append(waiter)
            return waiter
        self.stats["misses"] += 1
        self._pending[key] = [waiter]
        user = request.credentials.user if request.credentials is not None else ""
        d = callRouter(self.router, request)
        d.addBoth(self._answered, key, user, self._generation)
        return waiter

    def _forget(self, key: tuple[object, ...]) -> Any:
        def cancel(waiter: Deferred[Route | Rejection]) -> None:
            waiters = self._pending.get(key, [])
            if waiter in waiters:
                waiters.remove(waiter)

        return cancel

    def _answered(self, result: Route | Rejection | Failure, key: tuple[object, ...], user: str, generation: int) -> None:
        waiters = self._pending.pop(key, [])
        now = self._reactor.seconds()
        failed = isinstance(result, Failure) or (isinstance(result, Rejection) and result.temporary)
        outcome: Route | Rejection | Failure = result
        if failed:
            stale = self._entries.get(key)
            if stale is not None and now <= stale.expires + self.serveStale and self.serveStale > 0:
                self.stats["stale"] += len(waiters)
                self.log.warn(
                    "router failed for {user}; serving the answer cached {age:.0f} s past its expiry",
                    user=logQuote(user),
                    age=now - stale.expires,
                )
                outcome = stale.answer
        elif generation == self._generation:
            assert not isinstance(result, Failure)
            self._store(key, user, result, now)
        for waiter in waiters:
            if isinstance(outcome, Failure):
                waiter.errback(outcome)
            else:
                waiter.callback(outcome)
        if isinstance(outcome, Failure) and not waiters:
            # Nobody is waiting any more (all gave up): the failure was
            # still the router's and is logged by no one else.
            self.log.failure("router failed for {user} after every caller gave up", outcome, user=logQuote(user))

    def _store(self, key: tuple[object, ...], user: str, answer: Route | Rejection, now: float) -> None:
        ttl = self.ttl if isinstance(answer, Route) else self.negativeTTL
        if ttl <= 0:
            self._entries.pop(key, None)
            return
        self._entries[key] = _Entry(answer, now + ttl, user.lower())
        self._entries.move_to_end(key)
        self.stats["stored"] += 1
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def invalidate(self, user: str | None = None) -> int:
        """
        Forget the cached answers for login name C{user} (compared without
        case; every protocol and password), or all of them.

        C{user} may also be a domain (no C{@}, as the keys of a route
        table's C{[domains]}): every login name in it is forgotten too.
        Answers to questions asked before this call are not stored when
        they arrive.

        @return: how many entries were dropped.
        """
        if user is None:
            self._generation += 1
            count = len(self._entries)
            self._entries.clear()
            self.log.info("cache invalidated for everyone: {count} entries", count=count)
            return count
        return self.invalidateMany([user])

    def invalidateMany(self, users: Iterable[str]) -> int:
        """
        Like L{invalidate} for several login names or domains, in one pass
        over the cache (a move of a thousand accounts is one pass, not a
        thousand).

        @return: how many entries were dropped.
        """
        self._generation += 1
        folded = {user.lower() for user in users}
        domains = {name for name in folded if "@" not in name}
        keys = [
            key
            for key, entry in self._entries.items()
            if entry.user in folded or (domains and entry.user.rpartition("@")[2] in domains and "@" in entry.user)
        ]
        for key in keys:
            del self._entries[key]
        who = logQuote(next(iter(folded))) if len(folded) == 1 else f"{len(folded)} names"
        self.log.info("cache invalidated for {who}: {count} entries", who=who, count=len(keys))
        return len(keys)

    def reload(self) -> None:
        """
        Reload the wrapped router (if it can) and forget every answer.
        """
        if IReloadable.providedBy(self.router):
            self.router.reload()
        self.invalidate()

    def close(self) -> None:
        """
        Close the wrapped router (a reload replaced this one), if it can.
        """
        close = getattr(self.router, "close", None)
        if close is not None:
            close()

    def startWatching(self) -> None:
        """
        Start the wrapped router's watching, if it has any.
        """
        start = getattr(self.router, "startWatching", None)
        if start is not None:
            start()

    def stopWatching(self) -> None:
        """
        Stop the wrapped router's watching, if it has any.
        """
        stop = getattr(self.router, "stopWatching", None)
        if stop is not None:
            stop()


def buildCache(options: Table, router: Any, reactor: Any) -> CachingRouter:
    """
    Wrap C{router} in the cache its C{cache} sub-table describes.

    @raise mailproxy.config.ConfigError: naming the key that is wrong.
    """
    options.allow("ttl", "negative_ttl", "size", "serve_stale", "vary")
    # An empty array is the default written out, as the README shows it.
    vary = () if options.data.get("vary") == [] else options.strings("vary", ())
    for name in vary:
        if name not in VARY_FIELDS:
            options.fail("vary", f"unknown field {name!r}; known: {', '.join(VARY_FIELDS)}")
    return CachingRouter(
        router,
        reactor=reactor,
        ttl=options.number("ttl", 60.0, minimum=0),
        negativeTTL=options.number("negative_ttl", 10.0, minimum=0),
        size=options.integer("size", 10000, 1),
        serveStale=options.number("serve_stale", 0.0, minimum=0),
        vary=vary,
    )

