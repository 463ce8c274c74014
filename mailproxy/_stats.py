"""
What one proxy counts, and how it is shown: JSON for C{GET /stats} and the
Prometheus text format for C{GET /metrics}.

The session path reports events (a login succeeded or failed, the router
answered, a session ended) to a L{ProxyStats}; nothing is counted per relayed
chunk.  Bytes of sessions still open are read from their relays when a
snapshot is taken, and added to the totals when a session ends, so that the
counters only ever grow.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

from twisted.internet.interfaces import IReactorTime

__all__ = [
    "LATENCY_BUCKETS",
    "LatencyHistogram",
    "ProxyStats",
    "routerChain",
    "snapshot",
    "metricsText",
    "METRICS_CONTENT_TYPE",
]

#: Upper bounds (seconds) of the router latency histogram's buckets.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, math.inf,
)

#: The C{Content-Type} of L{metricsText}.
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_Labels = tuple[str, str]


class LatencyHistogram:
    """
    A cumulative histogram of durations, in Prometheus's shape.

    @ivar counts: for each bound in L{LATENCY_BUCKETS}, how many
        observations were at most that long.
    @ivar total: the sum of all observations, in seconds.
    @ivar count: the number of observations.
    """

    def __init__(self) -> None:
        self.counts = [0] * len(LATENCY_BUCKETS)
        self.total = 0.0
        self.count = 0

    def observe(self, seconds: float) -> None:
        """
        Count one duration.
        """
        self.count += 1
        self.total += seconds
        for index, bound in enumerate(LATENCY_BUCKETS):
            if seconds <= bound:
                self.counts[index] += 1


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
    @ivar routerLatency: how long the router took to answer.
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
        self.routerLatency = LatencyHistogram()

    def loginSucceeded(self, protocol: str, backend: str) -> None:
        """
        A login reached C{backend}: the session is being relayed.
        """
        self.logins[protocol, backend, "ok"] += 1

    def loginFailed(self, protocol: str, backend: str, reason: str) -> None:
        """
        A login attempt failed for C{reason} (a L{LoginFailed} kind).

        @param backend: the routed backend, or C{""} if the router refused.
        """
        self.logins[protocol, backend, reason] += 1

    def routerAnswered(self, seconds: float) -> None:
        """
        The router answered (or failed) after C{seconds}.
        """
        self.routerLatency.observe(seconds)

    def sessionEnded(self, protocol: str, backend: str, fromClient: int, fromBackend: int) -> None:
        """
        A relayed session ended after moving these octets.
        """
        self.ended[protocol, backend] += 1
        self.bytesFromClient[protocol, backend] += fromClient
        self.bytesFromBackend[protocol, backend] += fromBackend


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
    The hits and misses of every cache in C{router}'s chain (routers with
    integer C{hits} and C{misses} attributes), or L{None} if none caches.
    """
    hits = misses = 0
    found = False
    for member in routerChain(router):
        memberHits, memberMisses = getattr(member, "hits", None), getattr(member, "misses", None)
        if isinstance(memberHits, int) and isinstance(memberMisses, int):
            found = True
            hits += memberHits
            misses += memberMisses
    return (hits, misses) if found else None


def _openSessions(sessions: Iterable[Any]) -> tuple[Counter[_Labels], Counter[_Labels], Counter[_Labels]]:
    """
    Count the open sessions, and the octets their relays moved so far, by
    C{(protocol, backend)}; a session not yet relayed has backend C{""}.
    """
    open_: Counter[_Labels] = Counter()
    fromClient: Counter[_Labels] = Counter()
    fromBackend: Counter[_Labels] = Counter()
    for session in sessions:
        relay = session.relay
        labels = (session.protocolName, session.route.backend.name if relay is not None else "")
        open_[labels] += 1
        if relay is not None:
            fromClient[labels] += relay.bytesFromClient
            fromBackend[labels] += relay.bytesFromBackend
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
    in); logins by protocol, backend, then result.
    """
    open_, liveClient, liveBackend = _openSessions(sessions)
    fromClient = stats.bytesFromClient + liveClient
    fromBackend = stats.bytesFromBackend + liveBackend
    latency = stats.routerLatency
    cache = _cacheCounts(router)
    return {
        "uptime": (stats.clock.seconds() - stats.started) if stats.clock is not None else 0.0,
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
            "answers": latency.count,
            "averageSeconds": latency.total / latency.count if latency.count else None,
            "cache": None
            if cache is None
            else {
                "hits": cache[0],
                "misses": cache[1],
                "hitRate": cache[0] / (cache[0] + cache[1]) if cache[0] + cache[1] else None,
            },
        },
    }


class _Collector:
    """
    A Prometheus collector that reads a proxy's state when scraped.
    """

    def __init__(self, stats: ProxyStats, sessions: Iterable[Any], router: object) -> None:
        self.stats = stats
        self.sessions = sessions
        self.router = router

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        stats = self.stats
        open_, liveClient, liveBackend = _openSessions(self.sessions)
        sessions = GaugeMetricFamily(
            "mailproxy_sessions_open",
            "Open client sessions; backend is empty before login.",
            labels=["protocol", "backend"],
        )
        for (protocol, backend), count in sorted(open_.items()):
            sessions.add_metric([protocol, backend], count)
        yield sessions

        logins = CounterMetricFamily(
            "mailproxy_logins",
            "Login attempts by outcome: ok, auth, unavailable, refused.",
            labels=["protocol", "backend", "result"],
        )
        for (protocol, backend, result), count in sorted(stats.logins.items()):
            logins.add_metric([protocol, backend, result], count)
        yield logins

        ended = CounterMetricFamily(
            "mailproxy_sessions_ended",
            "Relayed sessions that have ended.",
            labels=["protocol", "backend"],
        )
        for (protocol, backend), count in sorted(stats.ended.items()):
            ended.add_metric([protocol, backend], count)
        yield ended

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

        latency = stats.routerLatency
        histogram = HistogramMetricFamily(
            "mailproxy_router_latency_seconds", "Time the router took to answer a login."
        )
        histogram.add_metric(
            [],
            [("+Inf" if math.isinf(bound) else repr(bound), count) for bound, count in zip(LATENCY_BUCKETS, latency.counts)],
            latency.total,
        )
        yield histogram

        cache = _cacheCounts(self.router)
        if cache is not None:
            for name, value, text in (
                ("mailproxy_router_cache_hits", cache[0], "Logins answered from the route cache."),
                ("mailproxy_router_cache_misses", cache[1], "Logins the route cache passed on to its router."),
            ):
                counter = CounterMetricFamily(name, text)
                counter.add_metric([], value)
                yield counter


def metricsText(stats: ProxyStats, sessions: Iterable[Any], router: object) -> bytes:
    """
    The proxy's metrics in the Prometheus text exposition format, from a
    registry of its own (nothing global is involved).
    """
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(stats, sessions, router))  # type: ignore[arg-type]
    return generate_latest(registry)
