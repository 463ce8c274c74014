"""
What one proxy counts, and how it is shown: JSON for C{GET /stats} and the
Prometheus text format for C{GET /metrics}.

The session path reports events (a connection was accepted or refused, a TLS
handshake failed, a login succeeded or failed and how long it took, the
router answered, a session ended) to a L{ProxyStats}; nothing is counted per
relayed chunk.  Bytes of sessions still open are read from their relays when a
snapshot is taken, and added to the totals when a session ends, so that the
counters only ever grow.  The backends' health comes from the management
endpoint's probes, and the process's own figures (C{process_*}) from
prometheus_client, when the metrics are scraped.

Everything is counted per process; with worker processes the parent sums
what each worker counted (L{statsState}, L{mergeStates}).
"""

from __future__ import annotations

import math
import platform
from bisect import bisect_left
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from itertools import accumulate
from typing import Any, TypeVar

import twisted
from OpenSSL import SSL
from twisted.internet.interfaces import IReactorTime

from . import __version__
from .interfaces import IRouteCache

__all__ = [
    "LATENCY_BUCKETS",
    "LOGIN_BUCKETS",
    "LatencyHistogram",
    "ProxyStats",
    "routerChain",
    "snapshot",
    "metricsText",
    "METRICS_CONTENT_TYPE",
    "SessionTotals",
    "statsState",
    "mergeStates",
]

#: Upper bounds (seconds) of the router latency histogram's buckets.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, math.inf,
)

#: Upper bounds (seconds) of the login latency histograms' buckets: a login
#: takes milliseconds to seconds, a slow backend up to its timeout.
LOGIN_BUCKETS: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, math.inf,
)

#: The C{Content-Type} of L{metricsText}.
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_Labels = tuple[str, str]
_Key = TypeVar("_Key")


class LatencyHistogram:
    """
    A cumulative histogram of durations, in Prometheus's shape.

    @ivar buckets: the upper bounds of the buckets, the last infinite.
    @ivar total: the sum of all observations, in seconds.
    @ivar count: the number of observations.
    """

    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.buckets = buckets
        # Per bucket, the observations above the bound before it: one
        # count to add to per observation (a login makes three), where the
        # cumulative counts would take one per bucket at most as long.
        self._within = [0] * len(buckets)
        self.total = 0.0
        self.count = 0

    @property
    def counts(self) -> list[int]:
        """
        For each bound in L{buckets}, how many observations were at most
        that long.
        """
        return list(accumulate(self._within))

    def observe(self, seconds: float) -> None:
        """
        Count one duration.
        """
        self.count += 1
        self.total += seconds
        self._within[bisect_left(self.buckets, seconds)] += 1

    def add(self, counts: list[int], total: float, count: int) -> None:
        """
        Add another histogram's L{counts}, L{total} and L{count} (with the
        same buckets) to this one.
        """
        for index, (cumulative, before) in enumerate(zip(counts, [0, *counts])):
            self._within[index] += cumulative - before
        self.total += total
        self.count += count


def _observe(
    histograms: dict[_Key, LatencyHistogram], key: _Key, seconds: float | None, buckets: tuple[float, ...]
) -> None:
    """
    Count C{seconds} in the histogram of C{key}, made on first use; nothing
    if C{seconds} is L{None} (not measured).
    """
    if seconds is None:
        return
    histogram = histograms.get(key)
    if histogram is None:
        histogram = histograms[key] = LatencyHistogram(buckets)
    histogram.observe(seconds)


class ProxyStats:
    """
    The counters of one proxy.

    @ivar logins: login outcomes by C{(protocol, backend, result)}; C{result}
        is C{"ok"} or the failure's kind (C{"auth"}, C{"unavailable"},
        C{"refused"}); C{backend} is C{""} when no route was found.
    @ivar ended: sessions that ended after login, by C{(protocol, backend)}.
    @ivar bytesFromClient: octets relayed to backends by sessions that have
        ended, by C{(protocol, backend)}.
    @ivar bytesFromBackend: octets relayed to clients likewise.
    @ivar accepted: client connections served, by C{(protocol, listener)};
        C{listener} is the C{[[listener]]}'s position in the configuration.
    @ivar refused: client connections closed at once without service, by
        C{(protocol, listener, reason)}; C{reason} is the limit that refused
        them (C{"connections_per_address"}).
    @ivar tlsFailures: client connections whose TLS handshake (implicit or
        after STARTTLS) failed, by C{(protocol, listener)}.
    @ivar loginLatency: from a client's credentials to the outcome of its
        login (before any failed-login delay), by C{(protocol, result)}.
    @ivar backendLoginLatency: from connecting a backend to the outcome of
        the login there, by C{(protocol, backend, result)}.
    @ivar routerLatency: how long the router took to answer, by router (the
        configured type).
    @ivar migrations: accounts whose migration ended, by result (C{"done"},
        C{"failed"}, C{"cancelled"}).
    @ivar migrationBytes: octets of mail in the accounts migrated.
    @ivar migrating: the accounts being migrated now, by C{(campaign,
        account)}.
    @ivar started: when counting began, in the clock's seconds.
    """

    def __init__(self, clock: object = None) -> None:
        """
        @param clock: an L{IReactorTime} to measure uptime; anything else
            (a reactor that only pretends to listen) leaves uptime at 0.
        """
        self.clock = clock if IReactorTime.providedBy(clock) else None
        self.started = self.clock.seconds() if self.clock is not None else 0.0
        self.logins: Counter[tuple[str, str, str]] = Counter()
        self.ended: Counter[_Labels] = Counter()
        self.bytesFromClient: Counter[_Labels] = Counter()
        self.bytesFromBackend: Counter[_Labels] = Counter()
        self.accepted: Counter[_Labels] = Counter()
        self.refused: Counter[tuple[str, str, str]] = Counter()
        self.tlsFailures: Counter[_Labels] = Counter()
        self.loginLatency: dict[_Labels, LatencyHistogram] = {}
        self.backendLoginLatency: dict[tuple[str, str, str], LatencyHistogram] = {}
        self.routerLatency: dict[str, LatencyHistogram] = {}
        self.migrations: Counter[str] = Counter()
        self.migrationBytes = 0
        self.migrating: set[tuple[str, str]] = set()

    def connectionAccepted(self, protocol: str, listener: str) -> None:
        """
        A client connection to C{listener} is served.
        """
        self.accepted[protocol, listener] += 1

    def connectionRefused(self, protocol: str, listener: str, reason: str) -> None:
        """
        A client connection to C{listener} was refused because of the limit
        C{reason}.
        """
        self.refused[protocol, listener, reason] += 1

    def tlsHandshakeFailed(self, protocol: str, listener: str) -> None:
        """
        A client connection to C{listener} failed its TLS handshake.
        """
        self.tlsFailures[protocol, listener] += 1

    def loginSucceeded(self, protocol: str, backend: str, seconds: float | None = None) -> None:
        """
        A login reached C{backend}: the session is being relayed.

        @param seconds: how long the login took, if measured.
        """
        self.logins[protocol, backend, "ok"] += 1
        _observe(self.loginLatency, (protocol, "ok"), seconds, LOGIN_BUCKETS)

    def loginFailed(self, protocol: str, backend: str, reason: str, seconds: float | None = None) -> None:
        """
        A login attempt failed for C{reason} (a L{LoginFailed} kind).

        @param backend: the routed backend, or C{""} if the router refused.
        @param seconds: how long it took to fail, if measured.
        """
        self.logins[protocol, backend, reason] += 1
        _observe(self.loginLatency, (protocol, reason), seconds, LOGIN_BUCKETS)

    def backendLoginDone(self, protocol: str, backend: str, result: str, seconds: float) -> None:
        """
        The login at C{backend} ended with C{result} (C{"ok"} or a
        L{mailproxy._backend.BackendFailure} kind) C{seconds} after the proxy began connecting.
        """
        _observe(self.backendLoginLatency, (protocol, backend, result), seconds, LOGIN_BUCKETS)

    def routerAnswered(self, seconds: float, router: str = "") -> None:
        """
        The router answered (or failed) after C{seconds}.

        @param router: how the router is named (its configured type).
        """
        _observe(self.routerLatency, router, seconds, LATENCY_BUCKETS)

    def sessionEnded(self, protocol: str, backend: str, fromClient: int, fromBackend: int) -> None:
        """
        A relayed session ended after moving these octets.
        """
        self.ended[protocol, backend] += 1
        self.bytesFromClient[protocol, backend] += fromClient
        self.bytesFromBackend[protocol, backend] += fromBackend


    def migrationStep(self, campaign: str, account: str) -> None:
        """
        A step of C{account}'s migration in C{campaign} began: the account
        is being migrated.
        """
        self.migrating.add((campaign, account))

    def migrationEnded(self, campaign: str, account: str, result: str, copied: int = 0) -> None:
        """
        C{account}'s migration in C{campaign} ended with C{result}, after
        copying C{copied} octets (its mail, for a migration that is done).
        """
        self.migrating.discard((campaign, account))
        self.migrations[result] += 1
        self.migrationBytes += copied


def routerChain(router: object) -> Iterator[object]:
    """
    C{router} and every router it wraps, depth first in the order they are
    asked: a router, then what it wraps, then the next one.

    A router that wraps one other router (a cache) exposes it as C{wrapped};
    one that asks several (a chain) exposes them as C{routers}.
    """
    seen: set[int] = set()
    pending = [router]
    while pending:
        current = pending.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        pending[0:0] = [getattr(current, "wrapped", None), *(getattr(current, "routers", None) or ())]


def _cacheCounts(router: object) -> tuple[int, int] | None:
    """
    The hits and misses of every cache (L{IRouteCache}) in C{router}'s
    chain, or L{None} if none caches.
    """
    if isinstance(router, _CacheCounts):
        # The workers' caches, summed by the parent (mergeStates).
        return router.hits, router.misses
    hits = misses = 0
    found = False
    for member in routerChain(router):
        if IRouteCache.providedBy(member):
            found = True
            hits += member.hits
            misses += member.misses
    return (hits, misses) if found else None


class SessionTotals:
    """
    What L{snapshot} and L{metricsText} read from the open sessions,
    counted already (by the workers, for their parent).

    @ivar open: open sessions by C{(protocol, backend)}.
    @ivar fromClient: octets their relays moved from the clients so far.
    @ivar fromBackend: octets moved from the backends so far.
    """

    def __init__(self) -> None:
        self.open: Counter[_Labels] = Counter()
        self.fromClient: Counter[_Labels] = Counter()
        self.fromBackend: Counter[_Labels] = Counter()


def _openSessions(sessions: Iterable[Any]) -> tuple[Counter[_Labels], Counter[_Labels], Counter[_Labels]]:
    """
    Count the open sessions, and the octets their relays moved so far, by
    C{(protocol, backend)}; a session not yet relayed has backend C{""}.
    """
    if isinstance(sessions, SessionTotals):
        return sessions.open, sessions.fromClient, sessions.fromBackend
    open_: Counter[_Labels] = Counter()
    fromClient: Counter[_Labels] = Counter()
    fromBackend: Counter[_Labels] = Counter()
    for session in sessions:
        backend, octetsIn, octetsOut = session.relayed()
        labels = (session.protocolName, backend)
        open_[labels] += 1
        fromClient[labels] += octetsIn
        fromBackend[labels] += octetsOut
    return open_, fromClient, fromBackend


def _nested(counter: Counter[Any]) -> dict[str, Any]:
    """
    C{{("imap", "old"): 3}} as C{{"imap": {"old": 3}}}, keys sorted.
    """
    result: dict[str, Any] = {}
    for key in sorted(counter):
        level = result
        for part in key[:-1]:
            level = level.setdefault(part, {})
        level[key[-1]] = counter[key]
    return result


def snapshot(stats: ProxyStats, sessions: Iterable[Any], router: object) -> dict[str, Any]:
    """
    Everything counted, as JSON-ready data for C{GET /stats}.

    Sessions are keyed by protocol, then backend (C{""}: not yet logged
    in); logins by protocol, backend, then result; connections by protocol,
    then listener (then the reason of a refusal).
    """
    open_, liveClient, liveBackend = _openSessions(sessions)
    fromClient = stats.bytesFromClient + liveClient
    fromBackend = stats.bytesFromBackend + liveBackend
    answers = sum(h.count for h in stats.routerLatency.values())
    answerSeconds = sum(h.total for h in stats.routerLatency.values())
    cache = _cacheCounts(router)
    return {
        "uptime": (stats.clock.seconds() - stats.started) if stats.clock is not None else 0.0,
        "connections": {
            "accepted": _nested(stats.accepted),
            "refused": _nested(stats.refused),
            "tlsHandshakeFailures": _nested(stats.tlsFailures),
        },
        "sessions": {"open": sum(open_.values()), "byBackend": _nested(open_)},
        "logins": _nested(stats.logins),
        "sessionsEnded": _nested(stats.ended),
        "bytes": {
            "fromClient": sum(fromClient.values()),
            "fromBackend": sum(fromBackend.values()),
            "fromClientByBackend": _nested(fromClient),
            "fromBackendByBackend": _nested(fromBackend),
        },
        "router": {
            "answers": answers,
            "averageSeconds": answerSeconds / answers if answers else None,
            "cache": None
            if cache is None
            else {
                "hits": cache[0],
                "misses": cache[1],
                "hitRate": cache[0] / (cache[0] + cache[1]) if cache[0] + cache[1] else None,
            },
        },
        "migrations": {
            "inFlight": len(stats.migrating),
            "ended": dict(sorted(stats.migrations.items())),
            "bytes": stats.migrationBytes,
        },
    }


def _histogramFamily(name: str, documentation: str, labels: list[str], histograms: Mapping[Any, LatencyHistogram]) -> Any:
    """
    A Prometheus histogram family with one histogram per label values.

    @param histograms: by label values, a tuple in the order of C{labels}
        (a lone string if there is one label).
    """
    from prometheus_client.core import HistogramMetricFamily

    family = HistogramMetricFamily(name, documentation, labels=labels)
    for key, histogram in sorted(histograms.items()):
        buckets = [
            ("+Inf" if math.isinf(bound) else repr(bound), count)
            for bound, count in zip(histogram.buckets, histogram.counts)
        ]
        family.add_metric(list(key) if isinstance(key, tuple) else [key], buckets, histogram.total)
    return family


def _counterFamily(name: str, documentation: str, labels: list[str], counter: Counter[Any]) -> Any:
    """
    A Prometheus counter family from a L{Counter} keyed by label values.

    @param name: without the C{_total} suffix, which prometheus_client adds.
    """
    from prometheus_client.core import CounterMetricFamily

    family = CounterMetricFamily(name, documentation, labels=labels)
    for key, count in sorted(counter.items()):
        family.add_metric(list(key), count)
    return family


def _buildInfo() -> dict[str, str]:
    """
    The versions of mailproxy and of what it runs on, for
    C{mailproxy_build_info}.
    """
    return {
        "version": __version__,
        "python": platform.python_version(),
        "twisted": twisted.__version__,
        "openssl": SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode("ascii", "replace"),
    }


class _Collector:
    """
    A Prometheus collector that reads a proxy's state when scraped.

    @ivar health: the backends' states from the health probes,
        C{{name: {port: {"ok": bool, ...}}}}, or L{None} if not probed.
    """

    def __init__(
        self,
        stats: ProxyStats,
        sessions: Iterable[Any],
        router: object,
        health: Mapping[str, Mapping[str, Mapping[str, Any]]] | None = None,
        workers: Mapping[str, float] | None = None,
    ) -> None:
        self.stats = stats
        self.sessions = sessions
        self.router = router
        self.health = health
        self.workers = workers

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            InfoMetricFamily,
        )

        stats = self.stats
        yield InfoMetricFamily(
            "mailproxy_build", "The versions of mailproxy, Python, Twisted and OpenSSL.", value=_buildInfo()
        )

        if self.health is not None:
            up = GaugeMetricFamily(
                "mailproxy_backend_up",
                "1 if the backend port answered the health probe with its greeting, else 0.",
                labels=["backend", "port"],
            )
            for backend, ports in sorted(self.health.items()):
                for port, state in sorted(ports.items()):
                    up.add_metric([backend, port], 1 if state.get("ok") else 0)
            yield up

        yield _counterFamily(
            "mailproxy_connections_accepted",
            "Client connections served, per listener (its position in the configuration).",
            ["protocol", "listener"],
            stats.accepted,
        )
        yield _counterFamily(
            "mailproxy_connections_refused",
            "Client connections closed at once by a limit (reason: connections_per_address).",
            ["protocol", "listener", "reason"],
            stats.refused,
        )
        yield _counterFamily(
            "mailproxy_tls_handshake_failures",
            "Client connections whose TLS handshake failed (implicit TLS or STARTTLS).",
            ["protocol", "listener"],
            stats.tlsFailures,
        )

        open_, liveClient, liveBackend = _openSessions(self.sessions)
        sessions = GaugeMetricFamily(
            "mailproxy_sessions_open",
            "Open client sessions; backend is empty before login.",
            labels=["protocol", "backend"],
        )
        for (protocol, backend), count in sorted(open_.items()):
            sessions.add_metric([protocol, backend], count)
        yield sessions

        yield _counterFamily(
            "mailproxy_logins",
            "Login attempts by outcome: ok, auth, unavailable, refused.",
            ["protocol", "backend", "result"],
            stats.logins,
        )
        yield _histogramFamily(
            "mailproxy_login_latency_seconds",
            "Time from a client's credentials to its login's outcome, before any failed-login delay.",
            ["protocol", "result"],
            stats.loginLatency,
        )
        yield _histogramFamily(
            "mailproxy_backend_login_latency_seconds",
            "Time from connecting a backend to the outcome of the login there.",
            ["protocol", "backend", "result"],
            stats.backendLoginLatency,
        )
        yield _counterFamily(
            "mailproxy_sessions_ended", "Relayed sessions that have ended.", ["protocol", "backend"], stats.ended
        )

        relayed = CounterMetricFamily(
            "mailproxy_relayed_bytes",
            "Octets relayed, by direction: from_client (to the backend) or from_backend.",
            labels=["protocol", "backend", "direction"],
        )
        for direction, total in (
            ("from_client", stats.bytesFromClient + liveClient),
            ("from_backend", stats.bytesFromBackend + liveBackend),
        ):
            for (protocol, backend), count in sorted(total.items()):
                relayed.add_metric([protocol, backend, direction], count)
        yield relayed

        yield _histogramFamily(
            "mailproxy_router_latency_seconds",
            "Time the router took to answer a login, by router (its configured type).",
            ["router"],
            stats.routerLatency,
        )

        yield from self._migrations()

        cache = _cacheCounts(self.router)
        if cache is not None:
            for name, value, text in (
                ("mailproxy_router_cache_hits", cache[0], "Logins answered from the route cache."),
                ("mailproxy_router_cache_misses", cache[1], "Logins the route cache passed on to its router."),
            ):
                counter = CounterMetricFamily(name, text)
                counter.add_metric([], value)
                yield counter

        if self.workers is not None:
            # Summed, the workers' CPU would hide one that is saturated.
            cpu = CounterMetricFamily(
                "mailproxy_worker_cpu_seconds",
                "CPU time (user and system) each worker process used; process_* are the parent's own.",
                labels=["worker"],
            )
            for worker, seconds in sorted(self.workers.items()):
                cpu.add_metric([worker], seconds)
            yield cpu


    def _migrations(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        stats = self.stats
        ended = CounterMetricFamily(
            "mailproxy_migrations", "Accounts whose migration ended, by result: done, failed, cancelled.", labels=["result"]
        )
        for result, count in sorted(stats.migrations.items()):
            ended.add_metric([result], count)
        yield ended
        copied = CounterMetricFamily("mailproxy_migration_bytes", "Octets of mail in the accounts migrated (as verified on both backends).")
        copied.add_metric([], stats.migrationBytes)
        yield copied
        yield GaugeMetricFamily(
            "mailproxy_migrations_in_flight", "Accounts being migrated (copying, held, syncing, verifying or flipping).",
            value=len(stats.migrating),
        )


def metricsText(
    stats: ProxyStats,
    sessions: Iterable[Any],
    router: object,
    health: Mapping[str, Mapping[str, Mapping[str, Any]]] | None = None,
    workers: Mapping[str, float] | None = None,
) -> bytes:
    """
    The proxy's metrics in the Prometheus text exposition format, from a
    registry of its own (nothing global is involved), with the process's
    own (C{process_*}: CPU, memory, open files, start time).

    @param health: the backends' states from
        L{mailproxy.admin.HealthChecker.check}, for C{mailproxy_backend_up};
        without them that metric is left out.
    @param workers: with worker processes, each one's CPU seconds by its
        number, for C{mailproxy_worker_cpu_seconds_total}.
    """
    from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(stats, sessions, router, health, workers))  # type: ignore[arg-type]
    ProcessCollector(registry=registry)
    return generate_latest(registry)


# The state of a worker, for its parent

_COUNTERS = ("logins", "ended", "bytesFromClient", "bytesFromBackend", "accepted", "refused", "tlsFailures")
_HISTOGRAMS = ("loginLatency", "backendLoginLatency", "routerLatency")


def statsState(stats: ProxyStats, sessions: Iterable[Any], router: object) -> dict[str, Any]:
    """
    What one worker counted, as JSON-ready data for its parent to sum with
    L{mergeStates}.
    """
    state: dict[str, Any] = {}
    for name in _COUNTERS:
        state[name] = [[*key, count] for key, count in getattr(stats, name).items()]
    for name in _HISTOGRAMS:
        state[name] = [
            [list(key) if isinstance(key, tuple) else key, list(h.buckets[:-1]), h.counts, h.total, h.count]
            for key, h in getattr(stats, name).items()
        ]
    open_, fromClient, fromBackend = _openSessions(sessions)
    state["sessions"] = [[*key, open_[key], fromClient[key], fromBackend[key]] for key in open_]
    state["cache"] = _cacheCounts(router)
    return state


class _CacheCounts:
    # What _cacheCounts reads from a cache: the workers' caches summed.
    def __init__(self, hits: int, misses: int) -> None:
        self.hits = hits
        self.misses = misses


def mergeStates(states: Iterable[Mapping[str, Any]], clock: IReactorTime) -> tuple[ProxyStats, SessionTotals, object]:
    """
    Sum what the workers counted (each a L{statsState}).

    @param clock: the parent's clock: uptime is the parent's.
    @return: the counters, the open sessions and a stand-in for the router
        (its caches' hits and misses) to give L{snapshot} or
        L{metricsText}.
    """
    stats = ProxyStats(clock)
    totals = SessionTotals()
    cache: _CacheCounts | None = None
    for state in states:
        for name in _COUNTERS:
            counter = getattr(stats, name)
            for *key, count in state[name]:
                counter[tuple(key)] += count
        for name in _HISTOGRAMS:
            histograms = getattr(stats, name)
            for key, bounds, counts, total, count in state[name]:
                key = tuple(key) if isinstance(key, list) else key
                histogram = histograms.get(key)
                if histogram is None:
                    histogram = histograms[key] = LatencyHistogram((*bounds, math.inf))
                histogram.add(counts, total, count)
        for protocol, backend, open_, fromClient, fromBackend in state["sessions"]:
            totals.open[protocol, backend] += open_
            totals.fromClient[protocol, backend] += fromClient
            totals.fromBackend[protocol, backend] += fromBackend
        if state["cache"] is not None:
            if cache is None:
                cache = _CacheCounts(0, 0)
            cache.hits += state["cache"][0]
            cache.misses += state["cache"][1]
    return stats, totals, cache
