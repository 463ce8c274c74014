"""
The open sessions of one proxy (L{SessionRegistry}, which tells its
observers of logins and ends) and the open connections per client address
(L{ConnectionTracker}).
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Callable, Iterator

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from ._contract import ISessionObserver

if TYPE_CHECKING:
    from ._session import Session

__all__ = ["ConnectionTracker", "SessionRegistry"]


class ConnectionTracker:
    """
    Counts open connections per client address, across all listeners.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: Counter[str] = Counter()

    def add(self, address: str) -> bool:
        """
        Count a new connection from C{address}.

        @return: C{False} (and nothing counted) if the address is at its limit.
        """
        if self.limit and self._open[address] >= self.limit:
            return False
        self._open[address] += 1
        return True

    def remove(self, address: str) -> None:
        """
        A connection from C{address} closed.
        """
        self._open[address] -= 1
        if self._open[address] <= 0:
            del self._open[address]


class SessionRegistry:
    """
    The open sessions of one proxy, to find them by account or backend.

    A session is in the registry from its first byte to its close, before
    and after login.
    """

    log = Logger()

    def __init__(self) -> None:
        self._sessions: set[Session] = set()
        self._emptyWaiters: list[Deferred[None]] = []
        self._observers: list[ISessionObserver] = []

    def observe(self, observer: ISessionObserver) -> Callable[[], None]:
        """
        Tell C{observer} of every session that logs in or ends from now on.

        An observer's exception is logged and keeps neither the session nor
        the other observers from going on.

        @return: a function that stops the observing.
        """
        self._observers.append(observer)

        def stop() -> None:
            if observer in self._observers:
                self._observers.remove(observer)

        return stop

    def add(self, session: Session) -> None:
        """
        A session opened.
        """
        self._sessions.add(session)

    def loggedIn(self, session: Session) -> None:
        """
        C{session} was handed over to its backend.
        """
        self._tell("sessionLoggedIn", session)

    def discard(self, session: Session) -> None:
        """
        A session closed.
        """
        if session not in self._sessions:
            return
        self._sessions.discard(session)
        self._tell("sessionEnded", session)
        if not self._sessions:
            waiters, self._emptyWaiters = self._emptyWaiters, []
            for waiter in waiters:
                waiter.callback(None)

    def _tell(self, event: str, session: Session) -> None:
        for observer in list(self._observers):
            try:
                getattr(observer, event)(session)
            except Exception:
                self.log.failure("session observer {observer!r} failed on {event}", observer=observer, event=event)

    def __len__(self) -> int:
        return len(self._sessions)

    def __iter__(self) -> Iterator[Session]:
        # A copy: callers drop sessions while they iterate.
        return iter(list(self._sessions))

    def __contains__(self, session: object) -> bool:
        return session in self._sessions

    def find(
        self,
        account: str | None = None,
        backend: str | None = None,
        domain: str | None = None,
    ) -> list[Session]:
        """
        The sessions matching every filter given.

        @param account: the login name the client gave, without case.
        @param backend: the name of the backend the session is relayed to;
            sessions not logged in have none.
        @param domain: the part of the login name after the last C{@},
            without case.
        """
        found = []
        for session in self._sessions:
            user = (session.user or "").lower()
            if account is not None and (not session.user or user != account.lower()):
                continue
            if domain is not None and (not session.user or user.rpartition("@")[2] != domain.lower() or "@" not in user):
                continue
            if backend is not None and session.backendName != backend:
                continue
            found.append(session)
        return found

    def whenEmpty(self) -> Deferred[None]:
        """
        A Deferred that fires once no session is open (at once if none is).
        """
        if not self._sessions:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._emptyWaiters.append(waiter)
        return waiter
