"""
The management endpoint: a small HTTP API (twisted.web) on its own listener.

Every request but C{GET /health} needs C{Authorization: Bearer TOKEN} with
the token from C{[admin] token_file}; tokens are compared in constant time,
and each wrong one from an address is answered later than the one before.
A request with a body is judged by its headers before any of the body is
read: without the right token, or declaring more than L{MAX_BODY} octets,
it is answered (401 or 413) and the connection closed; a chunked body is
cut off at L{MAX_BODY} octets the same way.

  - C{GET /health}: 200 when the proxy is up and every backend port answers
    its greeting, 503 otherwise (or while shutting down); the status in
    JSON, and each backend port's state with the token (or without it,
    with C{[admin] health_details}).
  - C{GET /stats}: JSON counters (see L{mailproxy._stats.snapshot}).
  - C{GET /metrics}: the same in Prometheus's text format, with each
    backend port's health (C{mailproxy_backend_up}) and the process's own
    figures (C{process_*}).
  - C{GET /sessions?account=&backend=&domain=}: the open sessions.
  - C{POST /sessions/drop} C{{"account": ..., "backend": ..., "session": ...}}:
    drop the matching sessions (at least one filter).
  - C{GET /routes}: the route store's entries.  C{PUT /routes/KEY}
    C{{"backend": ...}} and C{DELETE /routes/KEY} change one.
  - C{GET /explain?account=}: which router, rule and backend decide.
  - C{POST /move} C{{"backend": ..., "accounts": [...], "domain": ...,
    "include_accounts": false, "dry_run": false, "hold": 0, "drop": true}}:
    move accounts.
  - C{POST /reload}: re-read the configuration (as SIGHUP does).
  - C{POST /migrations} C{{"accounts": [...], "domain": ..., "to": ...,
    "dry_run": false, "concurrency": N}}: start a migration campaign
    (copy, verify, flip; see L{mailproxy.migration}); C{GET /migrations}
    lists the campaigns, C{GET /migrations/ID} shows one with its progress,
    C{DELETE /migrations/ID} cancels it.

Answers are JSON objects; errors are C{{"error": "..."}} with a 4xx or 5xx
status.
"""

from __future__ import annotations

import hmac
import json
import socket
from collections.abc import Callable, Mapping, Sequence
from io import BytesIO
from typing import Any, cast
from urllib.parse import unquote

from twisted.internet.defer import Deferred, gatherResults, maybeDeferred, succeed
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IHandshakeListener, IReactorTime, ITCPTransport
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import RESPONSES
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

from . import _tls
from ._endpoints import connectQuietly
from ._migrate import MoveError, findRouteStore
from ._routing import explainRoute
from ._migrationhooks import domainAccounts
from ._safetext import logQuote
from ._stats import METRICS_CONTENT_TYPE
from .config import MAX_MIGRATION_CONCURRENCY
from .interfaces import RouteStoreError
from .migration import MigrationError
from .model import Backend
from .protocols import PROTOCOLS, ProbeStep, protocolForPort

__all__ = ["AdminResource", "HealthChecker", "TokenGuard", "adminSite", "GREETINGS", "greetingProblem"]

#: How the first line of a well server starts, by backend C{ports} key
#: (from the protocol registry: C{mx} is SMTP's).
GREETINGS: dict[str, tuple[bytes, ...]] = {port: protocol.greeting for protocol in PROTOCOLS for port in protocol.ports}

#: A PROXY header that says "this connection is the proxy's own" (v1
#: UNKNOWN, v2 LOCAL): backends that require a header still greet a probe.
_PROXY_LOCAL = {
    "proxy-v1": b"PROXY UNKNOWN\r\n",
    "proxy-v2": b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00",
}

#: The largest request body accepted.
MAX_BODY = 64 * 1024

#: Paths whose last segment is the argument (a route key, a campaign id).
_PREFIXES = ("/routes/", "/migrations/")


class TokenGuard:
    """
    Checks bearer tokens, and slows down whoever gets them wrong.

    @ivar token: the expected token.
    @ivar delay: seconds added to the answer per recent failure from the
        same address, up to L{maxDelay}.
    @ivar forget: seconds after which an address's failures are forgotten.
    """

    def __init__(self, token: bytes, clock: IReactorTime, delay: float = 1.0, maxDelay: float = 10.0, forget: float = 900.0) -> None:
        self.token = token
        self.clock = clock
        self.delay = delay
        self.maxDelay = maxDelay
        self.forget = forget
        self._failures: dict[str, tuple[int, float]] = {}

    def check(self, header: bytes | None) -> bool:
        """
        Whether an C{Authorization} header value carries the token.
        """
        if header is None:
            return False
        scheme, _, given = header.strip().partition(b" ")
        if scheme.lower() != b"bearer":
            return False
        return hmac.compare_digest(given.strip(), self.token)

    def failed(self, address: str) -> float:
        """
        Count a failure from C{address}.

        @return: how many seconds to wait before answering it.
        """
        now = self.clock.seconds()
        for other, (_, last) in list(self._failures.items()):
            if now - last > self.forget:
                del self._failures[other]
        count = self._failures.get(address, (0, now))[0] + 1
        self._failures[address] = (count, now)
        return min(count * self.delay, self.maxDelay)

    def succeeded(self, address: str) -> None:
        """
        C{address} presented the token: forget its failures.
        """
        self._failures.pop(address, None)


@implementer(IHandshakeListener)
class _GreetingProbe(Protocol):
    """
    Reads a server's first line and judges it, then hangs up. On a port
    reached with STARTTLS it first goes on to the server's go-ahead (the
    protocol's L{ProbeStep}s) and through the TLS handshake, the
    certificate checked as for a login.

    @ivar outcome: fires with what is wrong (L{None}: nothing), or fails
        when the connection ends before the greeting.
    """

    # None until connected; the timeout, which may come first, checks.
    transport: ITCPTransport

    def __init__(
        self,
        header: bytes,
        judge: Callable[[bytes], str | None],
        steps: Sequence[ProbeStep] = (),
        tls: object = None,
        hostname: bytes = b"",
    ) -> None:
        self.header = header
        self.judge = judge
        self.steps = list(steps)
        self.tls = tls
        self.hostname = hostname
        self.outcome: Deferred[str | None] = Deferred()
        self.greeted = False
        self._handshaking = False
        self._buffer = b""

    def connectionMade(self) -> None:
        if self.header:
            self.transport.write(self.header)

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        while not self.outcome.called and not self._handshaking:
            end = self._buffer.find(b"\n")
            if end < 0:
                if len(self._buffer) > 4096:
                    self._finish("a line longer than 4096 octets")
                return
            line, self._buffer = self._buffer[:end].rstrip(b"\r"), self._buffer[end + 1 :]
            self._lineReceived(line)

    def _lineReceived(self, line: bytes) -> None:
        if not self.greeted:
            self.greeted = True
            problem = self.judge(line)
            if problem is not None or self.tls is None:
                self._finish(problem)
                return
            if self.steps[0].send:
                self._nextStep()
                return
            # A first step that sends nothing reads the rest of a greeting
            # of several lines (SMTP's 220-, ManageSieve's capabilities),
            # this first line included.
        step = self.steps[0]
        if not step.last.match(line):
            return
        if not step.yes.match(line):
            self._finish("STARTTLS refused: " + line[:80].decode("ascii", "replace"))
            return
        del self.steps[0]
        self._nextStep()

    def _nextStep(self) -> None:
        if self.steps:
            send = self.steps[0].send.replace(b"{hostname}", self.hostname)
            if send:
                self.transport.write(send)
            return
        # The go-ahead: what came with it in clear is no part of TLS.
        self._buffer = b""
        self._handshaking = True
        self.transport.startTLS(self.tls)  # type: ignore[attr-defined]

    def handshakeCompleted(self) -> None:
        # On an implicit-TLS port the handshake comes before the greeting,
        # which is still to be read and judged.
        if self._handshaking:
            self._finish(None)

    def _finish(self, problem: str | None) -> None:
        if not self.outcome.called:
            self.outcome.callback(problem)
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self.outcome.called:
            return
        if self._handshaking:
            self.outcome.callback("TLS handshake failed: " + (reason.getErrorMessage() if reason else "closed"))
        elif self.greeted:
            self.outcome.callback("closed before the STARTTLS go-ahead")
        else:
            self.outcome.errback(Failure(ConnectionError("closed before greeting")))


def greetingProblem(port: str, line: bytes) -> str | None:
    """
    What is wrong with C{line}, the first a backend sent on its C{ports}
    key C{port}, or L{None} if it is how a well server of that protocol
    greets (a key no protocol knows accepts any line).
    """
    try:
        protocol = protocolForPort(port)
    except KeyError:
        return None
    if protocol.greets(line):
        return None
    return "unexpected greeting: " + line[:80].decode("ascii", "replace")


def _startTLSSteps(port: str) -> tuple[ProbeStep, ...]:
    """
    The exchanges of the health probe of the backend C{ports} key C{port},
    reached with STARTTLS, before its handshake.
    """
    try:
        return protocolForPort(port).startTLS
    except KeyError:
        return ()


def _probeRequest(port: str) -> bytes:
    """
    What the health probe of the backend C{ports} key C{port} sends before
    it reads the first line (nothing for the mail protocols).
    """
    try:
        return protocolForPort(port).probe
    except KeyError:
        return b""


class HealthChecker:
    """
    Asks every backend port for its greeting; answers are kept for a
    moment so that a busy monitor cannot make the proxy hammer its backends.

    @ivar backends: a function giving the configured backends by name.
    """

    def __init__(
        self,
        reactor: Any,
        backends: Callable[[], Mapping[str, Backend]],
        timeout: float = 3.0,
        keep: float = 2.0,
        hostname: str = "",
    ) -> None:
        """
        @param hostname: the proxy's name, for an SMTP probe's C{EHLO}
            before STARTTLS (by default this host's).
        """
        self.reactor = reactor
        self.backends = backends
        self.timeout = timeout
        # Encoded once: an EHLO's name, for SMTP probes through STARTTLS.
        self._ehloName = (hostname or socket.getfqdn()).encode("idna")
        self.keep = keep
        self._last: tuple[float, dict[str, Any]] | None = None
        self._waiting: list[Deferred[dict[str, Any]]] | None = None

    def check(self) -> Deferred[dict[str, Any]]:
        """
        The state of every backend port: C{{name: {protocol: {"ok": bool,
        "seconds": float, "error": str}}}}.
        """
        now = self.reactor.seconds()
        if self._last is not None and now - self._last[0] < self.keep:
            return succeed(self._last[1])
        waiter: Deferred[dict[str, Any]] = Deferred()
        if self._waiting is not None:
            self._waiting.append(waiter)
            return waiter
        self._waiting = [waiter]
        probes = []
        keys = []
        for name, backend in sorted(self.backends().items()):
            for protocol, port in sorted(backend.ports.items()):
                keys.append((name, protocol))
                # A probe that cannot even start (a CA file unreadable just
                # now) is that port's failure; raised here, it would leave
                # every later check waiting.
                probes.append(
                    maybeDeferred(self.probe, backend, protocol, port).addErrback(
                        lambda reason: {"ok": False, "error": reason.getErrorMessage()}
                    )
                )

        def collect(results: list[dict[str, Any]]) -> None:
            states: dict[str, Any] = {}
            for (name, protocol), state in zip(keys, results):
                states.setdefault(name, {})[protocol] = state
            self._last = (self.reactor.seconds(), states)
            waiters, self._waiting = self._waiting or [], None
            for each in waiters:
                each.callback(states)

        # Each probe turns its own trouble into a state: this cannot fail.
        gatherResults(probes).addCallback(collect)
        return waiter

    def probe(self, backend: Backend, protocol: str, port: int) -> Deferred[dict[str, Any]]:
        """
        Connect to one backend port (with implicit TLS if configured) and
        read its greeting.
        """
        started = self.reactor.seconds()
        endpoint: Any = HostnameEndpoint(self.reactor, backend.host, port, timeout=self.timeout)
        tls = backend.tlsFor(protocol)
        if tls == "implicit":
            endpoint = wrapClientTLS(_tls.clientOptions(backend), endpoint)
        steps = _startTLSSteps(protocol) if tls == "starttls" else ()
        probe = _GreetingProbe(
            _PROXY_LOCAL.get(backend.forward, b"") + _probeRequest(protocol),
            lambda line: greetingProblem(protocol, line),
            steps,
            _tls.clientOptions(backend) if steps else None,
            self._ehloName,
        )
        connecting = connectQuietly(endpoint, probe)
        timer = self.reactor.callLater(self.timeout, self._timedOut, probe, connecting)

        def connected(_: object) -> Deferred[str | None]:
            return probe.outcome

        def judge(problem: str | None) -> dict[str, Any]:
            if problem is not None:
                return {"ok": False, "error": problem}
            return {"ok": True, "seconds": round(self.reactor.seconds() - started, 4)}

        def trouble(reason: Failure) -> dict[str, Any]:
            return {"ok": False, "error": reason.getErrorMessage() or cast("type[BaseException]", reason.type).__name__}

        def done(result: dict[str, Any]) -> dict[str, Any]:
            if timer.active():
                timer.cancel()
            return result

        return connecting.addCallback(connected).addCallbacks(judge, trouble).addBoth(done)

    def _timedOut(self, probe: _GreetingProbe, connecting: Deferred[Any]) -> None:
        if probe.transport is not None:
            if not probe.outcome.called:
                what = "answer to STARTTLS" if probe.greeted else "greeting"
                probe.outcome.errback(Failure(TimeoutError(f"no {what} within {self.timeout:.0f}s")))
            probe.transport.abortConnection()
        else:
            connecting.cancel()


class _HTTPError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class AdminResource(Resource):
    """
    The whole management API as one resource, dispatched by method and
    path through an explicit table.

    @ivar proxy: what the API operates on; it has C{context} (the
        L{mailproxy._session.ProxyContext}: its router), C{mover} (a
        L{mailproxy._migrate.Mover}), C{backends} (the configured backends
        by name), C{draining} (a bool), C{reload()} (JSON-ready data on the
        outcome), C{migrations} (a L{mailproxy.migration.MigrationManager}),
        and C{statsSnapshot()}, C{metrics(health)},
        C{describeSessions(account, backend, domain)} and
        C{dropSessions(account, backend, sessionId, reason)} (see
        L{mailproxy._lifecycle.ProxyService}); each may answer with a
        Deferred (a parent of worker processes asks its workers).
    @ivar healthDetails: C{GET /health} without a token names the backends
        and their troubles too, not only the status.
    """

    isLeaf = True
    log = Logger()

    def __init__(self, proxy: Any, guard: TokenGuard, health: HealthChecker, healthDetails: bool = False) -> None:
        super().__init__()
        self.proxy = proxy
        self.guard = guard
        self.health = health
        self.healthDetails = healthDetails
        self._routes: dict[tuple[bytes, str], Callable[[Request, str], Any]] = {
            (b"GET", "/health"): self.getHealth,
            (b"GET", "/stats"): self.getStats,
            (b"GET", "/metrics"): self.getMetrics,
            (b"GET", "/sessions"): self.getSessions,
            (b"POST", "/sessions/drop"): self.dropSessions,
            (b"GET", "/routes"): self.getRoutes,
            (b"PUT", "/routes/"): self.putRoute,
            (b"DELETE", "/routes/"): self.deleteRoute,
            (b"GET", "/explain"): self.getExplain,
            (b"POST", "/move"): self.postMove,
            (b"POST", "/reload"): self.postReload,
            **self._migrationRoutes(),
        }

    def render(self, request: Request) -> Any:
        path = unquote(request.path.decode("ascii", "replace"))
        method = request.method
        address = getattr(request.getClientAddress(), "host", "")
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))

        def answer(result: tuple[int, bytes, str]) -> None:
            status, body, contentType = result
            if gone:
                return
            request.setResponseCode(status)
            request.setHeader(b"Content-Type", contentType.encode("ascii"))
            request.setHeader(b"Cache-Control", b"no-store")
            request.write(body)
            request.finish()

        authorization = request.getHeader(b"authorization")
        if method == b"GET" and path == "/health" and authorization is None:
            d = self.getHealth(request, "", details=self.healthDetails)
        elif not self.guard.check(authorization):
            wait = self.refusedToken(request)
            request.setHeader(b"WWW-Authenticate", b'Bearer realm="mailproxy"')
            d = Deferred()
            self.guard.clock.callLater(wait, d.callback, _UNAUTHORIZED)
        else:
            self.guard.succeeded(address)
            d = self._dispatch(method, path, request)
        d.addErrback(self._failed).addCallback(answer)
        return NOT_DONE_YET

    def refusedToken(self, request: Request) -> float:
        """
        Count and log a request without the right token.

        @return: how many seconds to wait before answering it.
        """
        address = getattr(request.getClientAddress(), "host", "")
        self.log.warn("management: refused a request from {address} without the right token", address=address)
        return self.guard.failed(address)

    def judgeHeaders(self, request: Request, length: int | None) -> tuple[float, tuple[int, bytes, str]] | None:
        """
        Judge a request with a body by its headers alone, before any of the
        body is read: a body needs the token, and must not be declared
        larger than L{MAX_BODY}.

        @param length: the declared length of the body, L{None} if chunked.
        @return: L{None} to read the body, or the seconds to wait and the
            answer to give instead.
        """
        if length == 0:
            return None
        if not self.guard.check(request.getHeader(b"authorization")):
            return self.refusedToken(request), _UNAUTHORIZED
        if length is not None and length > MAX_BODY:
            return 0.0, _TOO_LARGE
        return None

    def _dispatch(self, method: bytes, path: str, request: Request) -> Deferred[tuple[int, bytes, str]]:
        handler = self._routes.get((method, path))
        argument = ""
        prefix = next((p for p in _PREFIXES if path.startswith(p)), None)
        if handler is None and prefix is not None:
            handler = self._routes.get((method, prefix))
            argument = path[len(prefix) :]
        if handler is None:
            known = {p for (_, p) in self._routes} | {"/health"}
            status = 405 if path in known or prefix is not None else 404
            return succeed(_json(status, {"error": f"no {method.decode()} {path}"}))
        return maybeDeferred(handler, request, argument)

    def _failed(self, reason: Failure) -> tuple[int, bytes, str]:
        if reason.check(_HTTPError):
            error = cast(_HTTPError, reason.value)
            return _json(error.status, {"error": error.message})
        if reason.check(MoveError, RouteStoreError, MigrationError):
            return _json(409, {"error": str(reason.value)})
        self.log.failure("management request failed", reason)
        return _json(500, {"error": "internal error; see the proxy's log"})

    # Handlers

    def getHealth(self, request: Request, _: str, details: bool = True) -> Deferred[tuple[int, bytes, str]]:
        """
        C{GET /health}: the status, and with C{details} every backend
        port's state.
        """
        def report(backends: dict[str, Any]) -> tuple[int, bytes, str]:
            healthy = all(state["ok"] for ports in backends.values() for state in ports.values())
            # A proxy of a fleet that cannot reach Redis serves on with
            # its own state: degraded, and the details say why.
            fleet = getattr(self.proxy, "fleet", None)
            cluster = fleet.health() if fleet is not None else None
            # With worker processes: one that died (and is being started
            # again, maybe after a back-off) serves nobody meanwhile.
            countWorkers = getattr(self.proxy, "workerHealth", None)
            workers = countWorkers() if countWorkers is not None else None
            allServing = workers is None or workers["serving"] == workers["configured"]
            if self.proxy.draining:
                status = "draining"
            else:
                status = "ok" if healthy and allServing and (cluster is None or cluster["redis"] == "ok") else "degraded"
            answer: dict[str, Any] = {"status": status}
            if details:
                answer["backends"] = backends
                if workers is not None:
                    answer["workers"] = workers
                if cluster is not None:
                    answer["cluster"] = cluster
            # Redis away, or some of the workers, alone keeps 200: the proxy
            # serves every login, and a load balancer checking /health must
            # not take every proxy of the fleet out at once. No worker
            # serving is 503: the connections queue and nobody answers.
            anyServing = workers is None or workers["serving"] > 0
            return _json(200 if anyServing and (status == "ok" or (healthy and status == "degraded")) else 503, answer)

        return self.health.check().addCallback(report)

    def getStats(self, request: Request, _: str) -> Deferred[tuple[int, bytes, str]]:
        """
        C{GET /stats}.
        """
        return maybeDeferred(self.proxy.statsSnapshot).addCallback(lambda answer: _json(200, answer))

    def getMetrics(self, request: Request, _: str) -> Deferred[tuple[int, bytes, str]]:
        """
        C{GET /metrics}, with the backends' health from the probes (run at
        most every L{HealthChecker.keep} seconds, as for C{GET /health}).
        """
        def render(backends: dict[str, Any]) -> Deferred[bytes]:
            return maybeDeferred(self.proxy.metrics, backends)

        return self.health.check().addCallback(render).addCallback(lambda text: (200, text, METRICS_CONTENT_TYPE))

    def getSessions(self, request: Request, _: str) -> Deferred[tuple[int, bytes, str]]:
        """
        C{GET /sessions?account=&backend=&domain=}.
        """
        filters = {name: _argument(request, name) for name in ("account", "backend", "domain")}

        def answer(sessions: list[dict[str, Any]]) -> tuple[int, bytes, str]:
            described = sorted(sessions, key=lambda s: -s["seconds"])
            return _json(200, {"count": len(described), "sessions": described})

        return maybeDeferred(self.proxy.describeSessions, **filters).addCallback(answer)

    def dropSessions(self, request: Request, _: str) -> Deferred[tuple[int, bytes, str]]:
        """
        C{POST /sessions/drop}.
        """
        body = _body(request)
        account, backend, sessionId = (_optionalString(body, key) for key in ("account", "backend", "session"))
        if account is None and backend is None and sessionId is None:
            raise _HTTPError(400, "name an account, a backend or a session")
        reason = _optionalString(body, "reason") or "Disconnected by the administrator."

        def dropped(sessions: list[str]) -> tuple[int, bytes, str]:
            self.log.info(
                "management: dropped {count} sessions (account={account} backend={backend} session={session})",
                count=len(sessions), account=logQuote(account), backend=logQuote(backend), session=logQuote(sessionId),
            )
            return _json(200, {"dropped": len(sessions), "sessions": sessions})

        return maybeDeferred(self.proxy.dropSessions, account, backend, sessionId, reason).addCallback(dropped)

    def _store(self) -> Any:
        store = findRouteStore(self.proxy.context.router)
        if store is None:
            raise _HTTPError(409, "the router cannot list or change routes")
        return store

    def getRoutes(self, request: Request, _: str) -> Deferred[tuple[int, bytes, str]]:
        """
        C{GET /routes}.
        """
        return maybeDeferred(self._store().routes).addCallback(lambda routes: _json(200, {"routes": dict(sorted(routes.items()))}))

    def putRoute(self, request: Request, key: str) -> Deferred[tuple[int, bytes, str]]:
        """
        C{PUT /routes/KEY}.
        """
        backend = _optionalString(_body(request), "backend")
        if backend is None:
            raise _HTTPError(400, "backend is required")
        store = self._store()

        def done(_: object) -> tuple[int, bytes, str]:
            self.proxy.mover.invalidate(key)
            self.log.info("management: route {key} set to {backend}", key=logQuote(key), backend=logQuote(backend))
            return _json(200, {"key": key, "backend": backend})

        return maybeDeferred(store.setRoute, key, backend).addCallback(done)

    def deleteRoute(self, request: Request, key: str) -> Deferred[tuple[int, bytes, str]]:
        """
        C{DELETE /routes/KEY}.
        """
        def done(_: object) -> tuple[int, bytes, str]:
            self.proxy.mover.invalidate(key)
            self.log.info("management: route {key} deleted", key=logQuote(key))
            return _json(200, {"key": key, "deleted": True})

        return maybeDeferred(self._store().deleteRoute, key).addCallback(done)

    def getExplain(self, request: Request, _: str) -> Deferred[tuple[int, bytes, str]]:
        """
        C{GET /explain?account=}.
        """
        account = _argument(request, "account")
        if not account:
            raise _HTTPError(400, "account is required")
        context = self.proxy.context
        return explainRoute(context.router, context.routerName, account).addCallback(lambda answer: _json(200, answer))

    def postMove(self, request: Request, _: str) -> Deferred[tuple[int, bytes, str]]:
        """
        C{POST /move}.
        """
        body = _body(request)
        backend = _optionalString(body, "backend")
        if backend is None:
            raise _HTTPError(400, "backend is required")
        accounts = _accounts(body)
        hold = body.get("hold", 0)
        if isinstance(hold, bool) or not isinstance(hold, (int, float)):
            raise _HTTPError(400, "hold must be a number of seconds")
        try:
            hold = float(hold)
        except OverflowError:
            # An integer of hundreds of digits; the mover judges the range.
            raise _HTTPError(400, "hold must be a number of seconds") from None
        dryRun, drop = body.get("dry_run", False), body.get("drop", True)
        includeAccounts = body.get("include_accounts", False)
        if not all(isinstance(flag, bool) for flag in (dryRun, drop, includeAccounts)):
            raise _HTTPError(400, "dry_run, drop and include_accounts must be true or false")
        moving = self.proxy.mover.move(
            backend,
            accounts,
            _optionalString(body, "domain"),
            dryRun=dryRun,
            hold=float(hold),
            drop=drop,
            includeAccounts=includeAccounts,
        )
        return moving.addCallback(lambda result: _json(200, result.asJSON()))

    def postReload(self, request: Request, _: str) -> Deferred[tuple[int, bytes, str]]:
        """
        C{POST /reload}.
        """
        return maybeDeferred(self.proxy.reload).addCallback(lambda outcome: _json(200 if outcome["ok"] else 409, outcome))

    # Migration campaigns (the engine: mailproxy.migration)

    def _migrationRoutes(self) -> dict[tuple[bytes, str], Callable[[Request, str], Any]]:
        return {
            (b"POST", "/migrations"): self.postMigrations,
            (b"GET", "/migrations"): self.getMigrations,
            (b"GET", "/migrations/"): self.getMigration,
            (b"DELETE", "/migrations/"): self.deleteMigration,
        }

    def postMigrations(self, request: Request, _: str) -> Deferred[tuple[int, bytes, str]]:
        """
        C{POST /migrations}: start a campaign; the answer is its
        description (C{Campaign.describe()}), with its C{id}.  A domain
        adds the accounts the route store has of it
        (L{mailproxy._migrationhooks.domainAccounts}).
        """
        body = _body(request)
        target = _optionalString(body, "to")
        if target is None:
            raise _HTTPError(400, "to is required")
        accounts = _accounts(body)
        domain = _optionalString(body, "domain")
        if not accounts and domain is None:
            raise _HTTPError(400, "name at least one account or a domain")
        dryRun = body.get("dry_run", False)
        if not isinstance(dryRun, bool):
            raise _HTTPError(400, "dry_run must be true or false")
        concurrency = body.get("concurrency")
        if concurrency is not None and (
            isinstance(concurrency, bool) or not isinstance(concurrency, int) or not 1 <= concurrency <= MAX_MIGRATION_CONCURRENCY
        ):
            raise _HTTPError(400, f"concurrency must be an integer from 1 to {MAX_MIGRATION_CONCURRENCY}")
        manager = self.proxy.migrations
        if domain is None:
            starting = manager.start(accounts, target, dryRun=dryRun, concurrency=concurrency)
        else:
            starting = domainAccounts(self.proxy.context.router, domain).addCallback(
                lambda more: manager.start(accounts + more, target, dryRun=dryRun, concurrency=concurrency)
            )

        def started(campaign: Any) -> tuple[int, bytes, str]:
            self.log.info(
                "management: migration {campaign} of {count} accounts to {target} started (dry run: {dryRun})",
                campaign=campaign.id, count=len(campaign.accounts), target=logQuote(target), dryRun=dryRun,
            )
            return _json(200, campaign.describe())

        return starting.addCallback(started)

    def getMigrations(self, request: Request, _: str) -> tuple[int, bytes, str]:
        """
        C{GET /migrations}: every campaign this proxy knows, newest last.
        """
        described = [campaign.describe() for campaign in self.proxy.migrations.campaigns()]
        return _json(200, {"count": len(described), "migrations": described})

    def _campaign(self, campaignId: str) -> Any:
        campaign = self.proxy.migrations.campaign(campaignId) if campaignId else None
        if campaign is None:
            raise _HTTPError(404, f"no migration campaign {campaignId!r}")
        return campaign

    def getMigration(self, request: Request, campaignId: str) -> tuple[int, bytes, str]:
        """
        C{GET /migrations/ID}.
        """
        return _json(200, self._campaign(campaignId).describe())

    def deleteMigration(self, request: Request, campaignId: str) -> tuple[int, bytes, str]:
        """
        C{DELETE /migrations/ID}: cancel a running campaign; accounts
        already flipped stay flipped, the others stay where they are.
        """
        campaign = self._campaign(campaignId)
        if not self.proxy.migrations.cancel(campaignId):
            state = campaign.describe()["state"]
            raise _HTTPError(409, f"migration campaign {campaignId!r} has ended ({state})")
        self.log.info("management: migration {campaign} cancelled", campaign=logQuote(campaignId))
        return _json(200, campaign.describe())


def _json(status: int, data: Any) -> tuple[int, bytes, str]:
    # Compact: only then does json use its C encoder; indented, the answer
    # to a move of 1,000 accounts (or a list of 20,000 routes) took the
    # reactor 10 ms (100 ms) to write.
    return status, json.dumps(data, sort_keys=False).encode("utf-8") + b"\n", "application/json"


_UNAUTHORIZED = _json(401, {"error": "a valid bearer token is required"})
_TOO_LARGE = _json(413, {"error": f"the body is larger than {MAX_BODY} bytes"})


class _AdminRequest(Request):
    """
    A request to the management endpoint that is judged by its headers
    (L{AdminResource.judgeHeaders}) before its body is read, and whose body
    is cut off at L{MAX_BODY} octets while it is read. A refused request is
    answered at once (or after the wrong token's wait), without a
    C{100 Continue}, and its connection is closed: its body is never
    stored, and no more of it is read than arrived with the headers.
    """

    _refused = False
    _received = 0
    _answerCall: Any = None

    @property
    def _resource(self) -> AdminResource:
        return cast(AdminResource, cast(Any, self.channel).site.resource)

    def gotLength(self, length: int | None) -> None:
        judged = self._resource.judgeHeaders(self, length)
        if judged is None:
            super().gotLength(length)
        else:
            self._refuse(*judged)

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        self._received += len(data)
        if self._received > MAX_BODY:
            self._refuse(0.0, _TOO_LARGE)
            return
        super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._refused:
            # Answered already; the connection is closing.
            return
        super().requestReceived(command, path, version)

    def connectionLost(self, reason: Failure) -> None:
        if self._answerCall is not None and self._answerCall.active():
            self._answerCall.cancel()
        super().connectionLost(reason)

    def _refuse(self, wait: float, answer: tuple[int, bytes, str]) -> None:
        self._refused = True
        self.content = BytesIO()
        # Without "100 Continue" a client that asked need not send the body.
        self.requestHeaders.removeHeader(b"expect")
        # Read no more of the body: it is not wanted, not even to discard.
        pause = getattr(self.transport, "pauseProducing", None)
        if pause is not None:
            pause()
        self._answerCall = self._resource.guard.clock.callLater(wait, self._answer, answer)

    def _answer(self, answer: tuple[int, bytes, str]) -> None:
        # twisted.web makes a request answerable only once its body is in,
        # so the answer is written here, as twisted.web writes its own 400.
        status, body, contentType = answer
        head = [
            b"HTTP/1.1 %d %s" % (status, RESPONSES[status]),
            b"Content-Type: " + contentType.encode("ascii"),
            b"Content-Length: %d" % (len(body),),
            b"Cache-Control: no-store",
            b"Connection: close",
        ]
        if status == 401:
            head.append(b'WWW-Authenticate: Bearer realm="mailproxy"')
        assert self.transport is not None
        self.transport.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
        self.channel.loseConnection()


def _argument(request: Request, name: str) -> str | None:
    values = request.args.get(name.encode("ascii"))
    return values[0].decode("utf-8", "replace") if values else None


def _body(request: Request) -> dict[str, Any]:
    data = request.content.read(MAX_BODY + 1) if request.content is not None else b""
    if len(data) > MAX_BODY:
        raise _HTTPError(413, f"the body is larger than {MAX_BODY} bytes")
    if not data.strip():
        return {}
    try:
        body = json.loads(data)
    except ValueError:
        raise _HTTPError(400, "the body is not JSON") from None
    except RecursionError:
        # Arrays nested thousands deep fit in MAX_BODY; json gives up.
        raise _HTTPError(400, "the body is nested too deeply") from None
    if not isinstance(body, dict):
        raise _HTTPError(400, "the body must be a JSON object")
    return body


def _accounts(body: Mapping[str, Any]) -> list[str]:
    # The accounts a move or a migration names (none: the domain's).
    accounts = body.get("accounts", [])
    if not isinstance(accounts, list) or not all(isinstance(a, str) for a in accounts):
        raise _HTTPError(400, "accounts must be a list of strings")
    return accounts


def _optionalString(body: Mapping[str, Any], key: str) -> str | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise _HTTPError(400, f"{key} must be a non-empty string")
    return value


def adminSite(proxy: Any, token: bytes, reactor: Any, healthDetails: bool = False) -> tuple[Site, AdminResource]:
    """
    The management endpoint's site for C{proxy}, and its resource (whose
    C{guard.token} and C{healthDetails} a reload may replace).
    """
    resource = AdminResource(
        proxy,
        TokenGuard(token, reactor),
        HealthChecker(reactor, lambda: proxy.backends, hostname=getattr(getattr(proxy, "config", None), "hostname", "")),
        healthDetails,
    )
    site = Site(resource, reactor=reactor)
    site.requestFactory = _AdminRequest
    site.displayTracebacks = False
    # The access log would show every request; the API logs what it does.
    site.log = lambda request: None  # type: ignore[method-assign]
    return site, resource

