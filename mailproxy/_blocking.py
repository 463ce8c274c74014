"""
Blocking work off the reactor thread: the client libraries of the LDAP and
SQL routers (ldap3, DB-API drivers), the migration's IMAP and ManageSieve
conversations and its journal.

L{ThreadRunner} runs calls in a bounded pool of threads of its own, so that
a slow directory can occupy at most that many threads and never the
reactor, and gives each call a deadline: a call that has not returned in
time fails with L{twisted.internet.defer.TimeoutError} (its thread finishes
on its own later; the answer is dropped).  L{PerThread} keeps one client
connection per pool thread, since these libraries' connections are not
thread-safe.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

__all__ = ["ThreadRunner", "PerThread", "closeRunner"]

_T = TypeVar("_T")


class ThreadRunner:
    """
    A bounded thread pool that starts on first use and stops when the
    reactor shuts down, or once idle after L{close}.

    @ivar size: the most threads used at once.
    """

    def __init__(self, reactor: Any, size: int, name: str) -> None:
        """
        @param reactor: provides C{callFromThread}, C{callLater} and
            C{addSystemEventTrigger}; nothing is started before the first
            L{run}, so building a router starts no thread.
        @param name: names the threads (visible in debuggers and C{ps -L}).
        """
        self.size = size
        self._reactor = reactor
        self._name = name
        self._pool: ThreadPool | None = None
        self._shutdownTrigger: Any = None
        self._onStop: list[Callable[[], None]] = []
        # Calls whose thread has not returned yet (timed out ones included).
        self._running = 0
        self._closing = False

    def run(self, timeout: float, f: Callable[..., _T], *args: Any) -> Deferred[_T]:
        """
        Call C{f(*args)} in a pool thread.

        @param timeout: seconds until the Deferred fails with
            L{twisted.internet.defer.TimeoutError}.
        """
        if self._pool is None:
            self._pool = ThreadPool(minthreads=0, maxthreads=self.size, name=self._name)
            self._pool.start()
            self._shutdownTrigger = self._reactor.addSystemEventTrigger("during", "shutdown", self._shutdown)
        self._running += 1
        d: Deferred[_T] = deferToThreadPool(self._reactor, self._pool, self._call, f, args)
        return d.addTimeout(timeout, self._reactor)

    def _call(self, f: Callable[..., _T], args: tuple[Any, ...]) -> _T:
        # In the pool thread. The count drops when the thread is done, not
        # when the caller's deadline passed.
        try:
            return f(*args)
        finally:
            self._reactor.callFromThread(self._returned)

    def _returned(self) -> None:
        self._running -= 1
        if self._closing and not self._running:
            self.stop()

    def whenStopping(self, cleanup: Callable[[], None]) -> None:
        """
        Call C{cleanup()} (in the reactor thread) when the pool stops, e.g.
        to close the connections the threads kept.
        """
        self._onStop.append(cleanup)

    def close(self) -> None:
        """
        The router using this runner is no longer used (a reload replaced
        it): stop the pool and run the cleanups once the calls under way
        have returned, without waiting for them here.  A call made later
        still runs, in a pool that stops again when it is idle.
        """
        self._closing = True
        if not self._running:
            self.stop()

    def _shutdown(self) -> None:
        self._shutdownTrigger = None
        self.stop()

    def stop(self) -> None:
        """
        Stop the threads (waiting for running calls) and run the cleanups.
        Doing so twice is harmless; a later L{run} starts a new pool.
        """
        pool, self._pool = self._pool, None
        if self._shutdownTrigger is not None:
            self._reactor.removeSystemEventTrigger(self._shutdownTrigger)
            self._shutdownTrigger = None
        if pool is not None:
            pool.stop()
        for cleanup in self._onStop:
            cleanup()


def closeRunner(runner: Any) -> None:
    """
    Close a router's runner when it has a C{close} (a L{ThreadRunner}; a
    test double may have only C{run}).
    """
    close = getattr(runner, "close", None)
    if close is not None:
        close()


class PerThread(Generic[_T]):
    """
    One resource (a connection) per thread, made on demand, dropped on
    failure, all closed together.
    """

    def __init__(self, make: Callable[[], _T], close: Callable[[_T], None]) -> None:
        """
        @param make: makes the resource, in the thread that will use it.
        @param close: closes one; it must not raise.
        """
        self._make = make
        self._close = close
        self._local = threading.local()
        self._lock = threading.Lock()
        self._objects: dict[int, _T] = {}

    def get(self) -> _T:
        """
        This thread's resource, made now if it has none.
        """
        resource = getattr(self._local, "resource", None)
        if resource is None:
            resource = self._make()
            self._local.resource = resource
            with self._lock:
                self._objects[id(resource)] = resource
        return resource  # type: ignore[no-any-return]

    def discard(self) -> None:
        """
        Close and forget this thread's resource (after an error that may
        have left it unusable); the next L{get} makes a new one.
        """
        resource = getattr(self._local, "resource", None)
        if resource is None:
            return
        self._local.resource = None
        with self._lock:
            self._objects.pop(id(resource), None)
        self._close(resource)

    def closeAll(self) -> None:
        """
        Close every thread's resource (when the pool has stopped).
        """
        with self._lock:
            resources = list(self._objects.values())
            self._objects.clear()
        for resource in resources:
            self._close(resource)
        self._local = threading.local()
