"""
Tests for L{mailproxy._blocking}: the bounded thread pool the LDAP
and SQL routers run their blocking libraries in, on the real reactor.
"""

from __future__ import annotations

import threading
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, TimeoutError, gatherResults
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mailproxy._blocking import PerThread, ThreadRunner


class ThreadRunnerTests(TestCase):
    """
    Tests for L{ThreadRunner}.
    """

    def runner(self, size: int = 2) -> ThreadRunner:
        """
        A runner on the global reactor, stopped after the test.
        """
        runner = ThreadRunner(reactor, size, "test-pool")
        self.addCleanup(runner.stop)
        return runner

    def test_runsInThread(self) -> None:
        """
        The call runs in another thread and its result arrives in the
        reactor thread.
        """
        main = threading.get_ident()
        d = self.runner().run(5, threading.get_ident)
        return d.addCallback(lambda ident: self.assertNotEqual(ident, main))

    def test_bounded(self) -> Deferred[Any]:
        """
        No more than C{size} calls run at once.
        """
        lock = threading.Lock()
        running = [0]
        most = [0]
        release = threading.Event()

        def work() -> None:
            with lock:
                running[0] += 1
                most[0] = max(most[0], running[0])
            release.wait(5)
            with lock:
                running[0] -= 1

        runner = self.runner(size=2)
        calls = [runner.run(10, work) for _ in range(5)]
        reactor.callLater(0.2, release.set)
        return gatherResults(calls).addCallback(lambda _: self.assertEqual(most[0], 2))

    def test_timeout(self) -> Deferred[Any]:
        """
        A call that takes longer than its timeout fails with
        L{TimeoutError}; the thread's late answer is dropped.
        """
        release = threading.Event()
        runner = self.runner()
        d = runner.run(0.1, release.wait, 5)
        self.addCleanup(release.set)
        return self.assertFailure(d, TimeoutError)

    def test_errorsPassed(self) -> Deferred[Any]:
        """
        An exception in the call fails the Deferred with it.
        """

        def boom() -> None:
            raise ValueError("boom")

        return self.assertFailure(self.runner().run(5, boom), ValueError)


def poolThreads(name: str) -> list[threading.Thread]:
    """
    The live threads of the pools called C{name}.
    """
    return [thread for thread in threading.enumerate() if thread.name.startswith(f"PoolThread-{name}-")]


class CloseTests(TestCase):
    """
    L{ThreadRunner.close}: a replaced router's pool stops once idle.
    """

    def test_closeIdle(self) -> None:
        """
        Closing an idle runner ends its threads and runs the cleanups at
        once; a later call still runs, and its pool ends after it.
        """
        runner = ThreadRunner(reactor, 2, "close-idle")
        self.addCleanup(runner.stop)
        cleaned: list[bool] = []
        runner.whenStopping(lambda: cleaned.append(True))

        def closeNow(_: object) -> Deferred[Any]:
            self.assertEqual(len(poolThreads("close-idle")), 1)
            runner.close()
            self.assertEqual((poolThreads("close-idle"), cleaned), ([], [True]))
            return runner.run(5, threading.get_ident)

        def afterLateCall(_: object) -> None:
            self.assertEqual((poolThreads("close-idle"), cleaned), ([], [True, True]))

        return runner.run(5, threading.get_ident).addCallback(closeNow).addCallback(afterLateCall)

    def test_closeWaitsForCalls(self) -> None:
        """
        A runner closed while a call runs (even one whose deadline passed)
        keeps its pool until that call returns, then ends its threads and
        runs the cleanups.
        """
        runner = ThreadRunner(reactor, 2, "close-busy")
        self.addCleanup(runner.stop)
        release = threading.Event()
        self.addCleanup(release.set)
        stopped: Deferred[None] = Deferred()
        runner.whenStopping(lambda: stopped.called or stopped.callback(None))
        late = runner.run(0.01, release.wait, 5)
        running = runner.run(5, release.wait, 5)

        def closeWhileRunning(_: object) -> Deferred[Any]:
            runner.close()
            self.assertFalse(stopped.called)
            self.assertEqual(len(poolThreads("close-busy")), 2)
            release.set()
            return gatherResults([running, stopped])

        def afterwards(_: object) -> None:
            self.assertEqual(poolThreads("close-busy"), [])

        d = self.assertFailure(late, TimeoutError).addCallback(closeWhileRunning)
        return d.addCallback(afterwards)


class LazyStartTests(SynchronousTestCase):
    """
    Building a router starts nothing.
    """

    def test_nothingBeforeRun(self) -> None:
        """
        No thread and no shutdown trigger exist before the first call; the
        cleanups run when the runner stops.
        """
        clock = Clock()
        runner = ThreadRunner(clock, 2, "lazy")
        cleaned: list[bool] = []
        runner.whenStopping(lambda: cleaned.append(True))
        self.assertIsNone(runner._pool)
        runner.stop()
        self.assertEqual(cleaned, [True])


class PerThreadTests(SynchronousTestCase):
    """
    Tests for L{PerThread}.
    """

    def test_oneEach(self) -> None:
        """
        Each thread gets its own resource, made once; discarding closes it
        and the next L{PerThread.get} makes a new one; L{PerThread.closeAll}
        closes the rest.
        """
        made: list[object] = []
        closed: list[object] = []

        def make() -> object:
            made.append(object())
            return made[-1]

        resources = PerThread(make, closed.append)
        first = resources.get()
        self.assertIs(resources.get(), first)
        other: list[object] = []
        thread = threading.Thread(target=lambda: other.append(resources.get()))
        thread.start()
        thread.join()
        self.assertIsNot(other[0], first)
        resources.discard()
        self.assertEqual(closed, [first])
        second = resources.get()
        self.assertIsNot(second, first)
        resources.closeAll()
        self.assertEqual(set(map(id, closed)), {id(first), id(second), id(other[0])})
