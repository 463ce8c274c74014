"""
Moving accounts between backends while the proxy runs.

A move is one operation: optionally hold new logins of the accounts, change
their routes in the router's store (durably), forget cached routes, drop the
accounts' sessions that are on another backend so that their clients
reconnect to the new home, then let the held logins go on.  Rollback is the
same move back.  A dry run computes the same plan and changes nothing.

"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from attrs import frozen
from twisted.internet.defer import Deferred, DeferredLock, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from ._stats import routerChain
from .interfaces import IRouteCache, IRouteStore, RouteStoreError

__all__ = [
    "MoveError", "RouteChange", "MoveResult", "LoginHold", "Mover", "findRouteStore", "invalidateCaches", "MOVED",
]

#: What a moved account's clients are told when their session is dropped.
MOVED = "Your mailbox has moved, please reconnect."

#: The longest hold a move accepts, in seconds.
MAX_HOLD = 60.0


class MoveError(Exception):
    """
    A move was refused or failed; C{str(error)} is for the operator.
    """


@frozen
class RouteChange:
    """
    One entry of the route store that a move changes.

    @ivar key: an account, C{"@domain"} or C{"*"}.
    @ivar before: the backend the entry named, or L{None} if there was none.
    @ivar after: the backend it names after the move.
    """

    key: str
    before: str | None
    after: str


@frozen
class MoveResult:
    """
    What a move did (or, for a dry run, would do).

    @ivar changes: the entries changed; entries already on the target are
        not among them.
    @ivar sessions: the sessions dropped (would be dropped), by id.
    @ivar accounts: the accounts of those sessions.
    @ivar held: seconds new logins of the accounts were held.
    @ivar kept: for a domain move, the domain's accounts that keep an
        entry of their own on another backend (and so do not move): the
        move changed only the domain's entry.
    """

    backend: str
    changes: tuple[RouteChange, ...]
    sessions: tuple[str, ...]
    accounts: tuple[str, ...]
    dryRun: bool
    held: float = 0.0
    kept: tuple[str, ...] = ()

    def asJSON(self) -> dict[str, Any]:
        """
        This result as JSON-ready data.
        """
        return {
            "backend": self.backend,
            "dryRun": self.dryRun,
            "changes": [{"key": c.key, "from": c.before, "to": c.after} for c in self.changes],
            "sessions": len(self.sessions),
            "sessionIds": list(self.sessions),
            "accounts": list(self.accounts),
            "held": self.held,
            "kept": len(self.kept),
            "keptAccounts": list(self.kept),
        }


class LoginHold:
    """
    The login gate of a proxy (L{ProxyContext.gate}): logins of accounts or
    domains being moved wait until the move releases them; a hold made with
    C{mail=True} (a migration's) also holds mail for them (MX recipients).
    """

    def __init__(self) -> None:
        self._holds: list[tuple[frozenset[str], frozenset[str], list[Deferred[None]], bool]] = []
        # The sessions whose logins wait, per hold (by the hold's waiters).
        self._sessions: dict[int, set[str]] = {}

    def wait(self, request: Any) -> Deferred[None] | None:
        """
        L{None} if C{request}'s login (or, for MX, its recipient) may go on
        now, else a Deferred that fires when it may.
        """
        if not self._holds:
            return None
        if request.credentials is not None:
            user, isMail = request.credentials.user.lower(), False
        elif getattr(request, "rcptTo", None):
            user, isMail = request.rcptTo.lower(), True
        else:
            return None
        domain = user.rpartition("@")[2] if "@" in user else None
        for accounts, domains, waiters, mail in self._holds:
            if isMail and not mail:
                continue
            if user in accounts or domain in domains:
                waiter: Deferred[None] = Deferred()
                waiters.append(waiter)
                sessionId = getattr(request.client, "sessionId", None)
                if sessionId is not None:
                    self._sessions.setdefault(id(waiters), set()).add(sessionId)
                return waiter
        return None

    def heldSessions(self) -> frozenset[str]:
        """
        The ids of the sessions whose logins wait at this gate now (they go
        on when their hold ends; a session that closed meanwhile may still
        be named).
        """
        return frozenset(sessionId for held in self._sessions.values() for sessionId in held)

    def hold(self, accounts: Iterable[str], domains: Iterable[str], mail: bool = False) -> Callable[[], None]:
        """
        Hold new logins of C{accounts} and of every account in C{domains}.

        @param mail: hold their incoming mail too (MX recipients wait), so
            that nothing is delivered where they are moving from meanwhile.
        @return: a function that ends this hold and lets the waiting logins
            go on.
        """
        entry: tuple[frozenset[str], frozenset[str], list[Deferred[None]], bool] = (
            frozenset(a.lower() for a in accounts),
            frozenset(d.lower() for d in domains),
            [],
            mail,
        )
        self._holds.append(entry)

        def release() -> None:
            # By identity: another hold may have equal contents.
            for index, held in enumerate(self._holds):
                if held is entry:
                    del self._holds[index]
                    self._sessions.pop(id(entry[2]), None)
                    for waiter in entry[2]:
                        waiter.callback(None)
                    break

        return release


def findRouteStore(router: object) -> Any:
    """
    The first router in C{router}'s chain that provides L{IRouteStore}, or
    L{None}.
    """
    for member in routerChain(router):
        if IRouteStore.providedBy(member):
            return member
    return None


def invalidateCaches(router: object, *keys: str) -> None:
    """
    Make every cache (L{IRouteCache}) in C{router}'s chain forget its
    answers for route store keys: an account, C{"@domain"} (every account
    in it) or C{"*"} (everything).  A cache with C{invalidateMany(names)}
    forgets all of them in one pass over its entries.
    """
    if not keys:
        return
    # Caches name a domain without its "@" (as a route table does).
    names = [key[1:] if key.startswith("@") else key for key in keys]
    for member in routerChain(router):
        if not IRouteCache.providedBy(member):
            continue
        many = getattr(member, "invalidateMany", None)
        if "*" in keys:
            member.invalidate(None)
        elif callable(many):
            many(names)
        else:
            for name in names:
                member.invalidate(name)


class Mover:
    """
    Moves accounts for one proxy.

    @ivar context: the proxy's L{ProxyContext}: its router, sessions and
        gate (a L{LoginHold}).
    @ivar backends: the names of the configured backends.
    """

    log = Logger()

    def __init__(self, context: Any, backends: Iterable[str], clock: IReactorTime) -> None:
        self.context = context
        self.backends = set(backends)
        self.clock = clock
        self._lock = DeferredLock()

    def move(
        self,
        backend: str,
        accounts: Sequence[str] = (),
        domain: str | None = None,
        *,
        dryRun: bool = False,
        hold: float = 0.0,
        drop: bool = True,
        includeAccounts: bool = False,
    ) -> Deferred[MoveResult]:
        """
        Route C{accounts} (and/or every account of C{domain} that has no
        entry of its own) to C{backend}.

        The route store is changed once for all of them (in its own
        threads: see L{IRouteStore}); the reactor only compares the
        entries and drops the sessions.

        @param hold: seconds to hold new logins of these accounts, from
            before the change until after their sessions are dropped.
        @param drop: drop the accounts' sessions that are on another
            backend.
        @param includeAccounts: with C{domain}, also move the domain's
            accounts that have an entry of their own (else they stay, and
            the result's C{kept} names them).
        @return: fires with a L{MoveResult}, or fails with L{MoveError}.
        """
        return self._lock.run(self._move, backend, list(accounts), domain, dryRun, hold, drop, includeAccounts)

    def refusal(self) -> str | None:
        """
        Why this mover can move no account at all, whatever it is asked
        (a migration asks before it copies anything); L{None} if it can.
        """
        return None

    async def _movePlan(
        self, backend: str, accounts: list[str], domain: str | None, includeAccounts: bool
    ) -> tuple[Any, list[RouteChange], list[Any], list[str]]:
        if backend not in self.backends:
            configured = ", ".join(sorted(self.backends)) or "none"
            raise MoveError(f"unknown backend {backend!r}; configured backends: {configured}")
        if not accounts and not domain:
            raise MoveError("name at least one account or a domain")
        for account in accounts:
            if not account or account.startswith("@") or account == "*":
                raise MoveError(f"not an account: {account!r}")
        if domain is not None and (not domain or "@" in domain):
            raise MoveError(f"not a domain: {domain!r}")
        if includeAccounts and domain is None:
            raise MoveError("include_accounts needs a domain")
        store = findRouteStore(self.context.router)
        if store is None:
            raise MoveError(f"the router ({self.context.routerName or type(self.context.router).__name__}) cannot change routes")
        entries = await maybeDeferred(store.routes)
        # Keys are compared without case.  A store's keys are usually lower
        # case already (the static router's always are): then one look at
        # all of them joined is much cheaper, on the reactor, than folding
        # each of tens of thousands.
        joined = "".join(entries)
        folded = entries if joined == joined.lower() else {key.lower(): value for key, value in entries.items()}
        keys = list(dict.fromkeys(a.lower() for a in accounts))
        # A store whose domain entry overrides its accounts' own (the SQL
        # router's set_domain_route rewrites them all) moves every account.
        covers = bool(getattr(store, "domainCoversAccounts", False))
        kept: list[str] = []
        if domain is not None:
            suffix = "@" + domain.lower()
            if not covers:
                # The domain's accounts with an entry of their own: the
                # domain's entry does not route them.
                own = sorted(key for key in folded if key.endswith(suffix) and not key.startswith("@"))
                named = set(keys)
                if includeAccounts:
                    keys.extend(key for key in own if key not in named)
                else:
                    kept = [key for key in own if folded[key] != backend and key not in named]
            keys.append(suffix)
        changes = [
            RouteChange(key, folded.get(key), backend)
            for key in keys
            if folded.get(key) != backend or (covers and key.startswith("@"))
        ]
        moving = set(keys)
        sessions = []
        for session in self.candidates():
            user = (session.user or "").lower()
            if not user or session.backendName in (None, backend):
                continue
            if user in moving or (
                domain is not None
                and "@" in user
                and user.rpartition("@")[2] == domain.lower()
                and (covers or user not in folded)
            ):
                sessions.append(session)
        return store, changes, sessions, kept

    async def _move(
        self,
        backend: str,
        accounts: list[str],
        domain: str | None,
        dryRun: bool,
        hold: float,
        drop: bool,
        includeAccounts: bool,
    ) -> MoveResult:
        if not 0 <= hold <= MAX_HOLD:
            raise MoveError(f"hold must be 0 to {MAX_HOLD:.0f} seconds, not {hold}")
        release = None
        if hold and not dryRun:
            release = self.context.gate.hold([a for a in accounts], [domain] if domain else [])
        started = self.clock.seconds()
        try:
            store, changes, sessions, kept = await self._movePlan(backend, accounts, domain, includeAccounts)
            if not drop:
                sessions = []
            result = MoveResult(
                backend=backend,
                changes=tuple(changes),
                sessions=tuple(s.client.sessionId for s in sessions),
                accounts=tuple(sorted({(s.user or "").lower() for s in sessions})),
                dryRun=dryRun,
                held=hold if release is not None else 0.0,
                kept=tuple(kept),
            )
            if dryRun:
                return result
            if changes:
                await self._write(store, {change.key: backend for change in changes})
            self.invalidate(*(change.key for change in changes))
            for session in sessions:
                session.drop(MOVED)
            self.log.info(
                "moved {keys} to {backend}: {count} sessions dropped; {kept} accounts keep their own entry",
                event="move",
                keys=[change.key for change in changes],
                backend=backend,
                count=len(sessions),
                kept=len(kept),
            )
            if release is not None:
                remaining = hold - (self.clock.seconds() - started)
                if remaining > 0:
                    waited: Deferred[None] = Deferred()
                    self.clock.callLater(remaining, waited.callback, None)
                    await waited
            return result
        finally:
            if release is not None:
                release()

    def candidates(self) -> Iterable[Any]:
        """
        The sessions a move may drop (those of other accounts and backends
        are left out by the move): this proxy's.
        """
        return self.context.sessions  # type: ignore[no-any-return]

    def invalidate(self, *keys: str) -> None:
        """
        Make the route caches forget C{keys} (see L{invalidateCaches}).
        """
        invalidateCaches(self.context.router, *keys)

    async def _write(self, store: Any, changes: Mapping[str, str]) -> None:
        try:
            if callable(getattr(store, "setRoutes", None)):
                await maybeDeferred(store.setRoutes, changes)
            else:
                for key, backend in changes.items():
                    await maybeDeferred(store.setRoute, key, backend)
        except RouteStoreError as e:
            raise MoveError(str(e)) from None
