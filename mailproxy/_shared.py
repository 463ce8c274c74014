"""
What failed-login throttling counts per client address, behind a small
interface, so that it can be counted for one process, for the worker
processes of one machine (L{mailproxy._workers}), or later for a fleet.

Two things are counted: the open connections per client address (the
C{[limits] connections_per_address} limit, L{IConnectionCounter}) and the
recent failed logins per client address (the failed-login delay grows with
them, L{IFailureCounter}).

Both are asked on the session path, where nothing may wait: each answers
at once from what it knows here, and a shared implementation learns what
the others count in the background (the parent of the workers tells each
worker which addresses are at the limit and how often each failed). A
fleet's (L{mailproxy._fleet.FleetFailures}) has the same shape: C{INCR}
and C{EXPIRE} per address, sent without waiting, their answers (and a
pub/sub channel) updating what is known here; while Redis is away, what
is known here is what decides. Connections per address are not counted
across a fleet (each proxy counts its own).
"""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime
from zope.interface import Attribute, Interface, implementer

__all__ = ["IConnectionCounter", "IFailureCounter", "LocalFailures", "accountKey", "FAILURE_MEMORY", "MAX_FAILURES_COUNTED"]

#: Seconds after its latest failed login an address's failures are
#: forgotten.
FAILURE_MEMORY = 900.0

#: The most failures of one address the delay counts: the n-th failed
#: login waits n * failure_delay, n at most this.
MAX_FAILURES_COUNTED = 15


class IConnectionCounter(Interface):
    """
    Counts open client connections per address, and says when an address
    is at its limit (L{mailproxy._registry.ConnectionTracker} counts them
    for one process).
    """

    limit = Attribute("The most connections from one address; 0: no limit. A reload sets it.")

    def add(address: str) -> bool:
        """
        Count a new connection from C{address}.

        @return: C{False} (and nothing counted) if the address is at its
            limit, as far as known here.
        """

    def remove(address: str) -> None:
        """
        A connection from C{address} that L{add} counted closed.
        """


def pairKey(address: str, user: str) -> str:
    """
    The key the failed logins of one account from one client address are
    counted under, beside the address's and the account's: those a
    success of the account from the address forgives (an address never
    contains a space).
    """
    return address + " " + accountKey(user)


def accountKey(user: str) -> str:
    """
    The key an account's failed logins are counted under, beside the
    client addresses' (an address never starts with C{account:}), so that
    guessing one account's password from many addresses gains nothing
    either.  Names that differ only in case count together, as backends
    treat them.
    """
    return "account:" + user.lower()


class IFailureCounter(Interface):
    """
    Counts failed logins per key, a client address or an account
    (L{accountKey}); the failed-login delay grows with the count.  Keys are
    opaque to every implementation.
    """

    def failed(address: str) -> int:
        """
        Count a failed login from C{address}.

        @return: the failed logins from C{address} within
            L{FAILURE_MEMORY} of each other, this one included, as far as
            known here.
        """

    def recent(address: str) -> int:
        """
        The failed logins from C{address} within L{FAILURE_MEMORY} of
        each other, as far as known here, without counting one.
        """

    def forgive(address: str, count: int) -> None:
        """
        Take C{count} failures off those of C{address} (a key as in
        L{failed}), here and wherever they were counted.
        """


@implementer(IFailureCounter)
class LocalFailures:
    """
    The failed logins of the addresses this process served.

    @ivar known: by address, its failure count and when the latest was
        counted (the count may come from elsewhere: see L{learn}).
    """

    def __init__(self, clock: IReactorTime, memory: float = FAILURE_MEMORY) -> None:
        self.clock = clock
        self.memory = memory
        self.known: dict[str, tuple[int, float]] = {}
        self._sinceSweep = 0

    def failed(self, address: str) -> int:
        now = self.clock.seconds()
        self._forget(now)
        count = self._current(address, now) + 1
        self.known[address] = (count, now)
        return count

    def recent(self, address: str) -> int:
        return self._current(address, self.clock.seconds())

    def forgive(self, address: str, count: int) -> None:
        self.lower(address, self._current(address, self.clock.seconds()) - count)

    def lower(self, address: str, count: int) -> None:
        """
        The failures of C{address} are C{count} now, if that is fewer than
        known here (some were forgiven, here or in another process).
        """
        known, last = self.known.get(address, (0, 0.0))
        if count <= 0:
            self.known.pop(address, None)
        elif count < known:
            self.known[address] = (count, last)

    def learn(self, address: str, count: int) -> None:
        """
        Another process counted C{count} failures from C{address} (its
        latest just now): keep the larger count.
        """
        now = self.clock.seconds()
        if count > self._current(address, now):
            self.known[address] = (count, now)

    def _current(self, address: str, now: float) -> int:
        count, last = self.known.get(address, (0, now))
        return count if now - last <= self.memory else 0

    def _forget(self, now: float) -> None:
        # A sweep every so many failures keeps the table to the addresses
        # failing lately without a timer.
        self._sinceSweep += 1
        if self._sinceSweep < 256:
            return
        self._sinceSweep = 0
        for address, (_, last) in list(self.known.items()):
            if now - last > self.memory:
                del self.known[address]
