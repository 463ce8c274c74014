"""
A fleet of proxies sharing their state through Redis (C{[cluster]}).

Several proxies behind one load balancer serve one mail system; what an
operator does through one of them must hold for all:

  - the session registry: each proxy keeps its logged-in sessions in a
    hash of its own (C{PREFIX sessions:NAME}, one JSON value per session),
    which expires unless the proxy renews it every C{heartbeat}; the
    proxies alive are the members of the sorted set C{PREFIX proxies}
    scored by their latest heartbeat. C{GET /sessions} on any proxy lists
    them all, each with its C{proxy};
  - drops, holds and route-cache invalidation: messages on the channel
    C{PREFIX events} (pub/sub), which every proxy carries out on its own
    sessions, gate and caches. A move through one proxy holds the logins
    on every proxy, drops the moved accounts' sessions wherever they are,
    and makes every proxy forget the routes it changed;
  - failed logins per client address (C{PREFIX failures:ADDRESS}, an
    C{INCR} with an expiry), which every proxy hears of on the channel.

Nothing on a session's path waits for Redis: a login asks the local gate,
the local failure count, the local router; what Redis says arrives in the
background. Redis down or slow (no answer within C{timeout}) makes the
proxy go on alone: C{/health} says C{degraded} and why, the log says so,
and it connects again after a back-off that doubles up to
L{MAX_RETRY_DELAY}; once connected it registers its open sessions again.

One process per machine talks to Redis: the proxy itself, or with
C{[proxy] workers} above 1 the parent (L{mailproxy._workers.Machine}). The
parent already answers the management endpoint for every worker, holds
and drops in them, changes the routes and counts their failed logins; its
workers tell it of each login and session end. One connection pair per
machine instead of one per worker, and a worker that dies takes nothing
of the fleet's state with it (the parent forgets its sessions).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ._contract import ISessionObserver
from ._migrate import MoveError, Mover, findRouteStore, invalidateCaches
from ._shared import FAILURE_MEMORY, LocalFailures
from .config import ClusterConfig
from .routers.static import StaticRouter

__all__ = ["Fleet", "FleetFailures", "FleetGate", "FleetMover", "joinFleet", "redisConnector", "MAX_RETRY_DELAY", "HOLD_LIMIT"]

#: The longest wait, in seconds, between two attempts to reach Redis.
MAX_RETRY_DELAY = 30.0

#: Seconds a hold that another proxy asked for lasts at most, if the
#: proxy that asked never says it ended (it died meanwhile).
HOLD_LIMIT = 3600.0


class _RemoteSession:
    """
    A session on another proxy, as a move sees it: its account, backend
    and id, and a drop carried out by that proxy.
    """

    class _Client:
        def __init__(self, sessionId: str) -> None:
            self.sessionId = sessionId

    def __init__(self, fleet: Fleet, proxy: str, described: dict[str, Any]) -> None:
        self.fleet = fleet
        self.proxy = proxy
        self.user = described.get("account")
        self.backendName = described.get("backend")
        self.client = self._Client(str(described.get("session")))

    def drop(self, reason: str) -> None:
        self.fleet.dropRemote(self.proxy, self.client.sessionId, reason)


def _matches(described: dict[str, Any], account: str | None, backend: str | None, domain: str | None) -> bool:
    # The filters of SessionRegistry.find, on a described session.
    user = (described.get("account") or "").lower()
    if account is not None and user != account.lower():
        return False
    if domain is not None and ("@" not in user or user.rpartition("@")[2] != domain.lower()):
        return False
    return backend is None or described.get("backend") == backend


@implementer(ISessionObserver)
class Fleet(Service):
    """
    This proxy's membership in the fleet.

    @ivar settings: the C{[cluster]} table.
    @ivar proxyName: this proxy's name in the fleet.
    @ivar client: the Redis connection for commands, while connected.
    @ivar problem: why Redis is not used now (L{None}: it is).
    @ivar local: this proxy's logged-in sessions as the registry keeps
        them, by session id.
    """

    log = Logger()

    def __init__(
        self,
        settings: ClusterConfig,
        context: Any,
        clock: IReactorTime,
        connect: Callable[[Fleet], Deferred[Any]],
    ) -> None:
        """
        @param context: the proxy's L{mailproxy._session.ProxyContext}.
        @param connect: connects to Redis: fires with the command client
            and the subscriber (see L{redisConnector}); the subscriber
            calls L{messageReceived} and L{connectionLost}.
        """
        self.settings = settings
        self.proxyName = settings.name
        self.context = context
        self.clock = clock
        self.connect = connect
        self.client: Any = None
        self.subscriber: Any = None
        self.problem: str | None = "not connected yet"
        self.local: dict[str, dict[str, Any]] = {}
        self.failures = FleetFailures(self)
        self._retryDelay = 1.0
        self._retry: Any = None
        self._heartbeat = LoopingCall(self._beat)
        self._heartbeat.clock = clock
        self._holds: dict[str, tuple[Callable[[], None], Any]] = {}
        self._holdIds = itertools.count(1)
        self._drops: dict[str, list[tuple[str, str]]] = {}
        self._dropCall: Any = None
        self._connecting = False
        self._stopObserving: Callable[[], None] | None = None
        # What a route change elsewhere makes this proxy do (the parent of
        # worker processes tells its workers too).
        self.forgetRoutes: Callable[[list[str]], None] = lambda keys: invalidateCaches(self.context.router, *keys)

    # Keys

    def key(self, *parts: str) -> str:
        """
        The Redis key or channel made of C{parts}, after the key prefix.
        """
        return self.settings.keyPrefix + ":".join(parts)

    @property
    def _ttl(self) -> int:
        # An entry not renewed for three heartbeats is a proxy gone.
        return max(3, int(3 * self.settings.heartbeat))

    # Start, stop, connect

    def startService(self) -> None:
        super().startService()
        self._stopObserving = self.context.sessions.observe(self)
        self._heartbeat.start(self.settings.heartbeat, now=False)
        self._connect()

    def stopService(self) -> Any:
        super().stopService()
        if self._stopObserving is not None:
            self._stopObserving()
        if self._heartbeat.running:
            self._heartbeat.stop()
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        client, self.client = self.client, None
        subscriber, self.subscriber = self.subscriber, None
        if client is None:
            return None
        # Leave the fleet's registry at once rather than when the entry
        # expires; a Redis that does not answer keeps nobody waiting long
        # (the client's own timeout).
        leaving: Deferred[Any] = DeferredList(
            [client.delete(self.key("sessions", self.proxyName)), client.zrem(self.key("proxies"), self.proxyName)],
            consumeErrors=True,
        )

        def disconnect(_: object) -> None:
            for connection in (client, subscriber):
                if connection is not None and connection.transport is not None:
                    connection.transport.loseConnection()

        return leaving.addBoth(disconnect)

    def _connect(self) -> None:
        self._retry = None
        if not self.running or self._connecting:
            return
        self._connecting = True
        self.connect(self).addCallbacks(self._connected, self._unreachable).addBoth(self._connectDone)

    def _connectDone(self, _: object) -> None:
        self._connecting = False

    def _connected(self, connections: tuple[Any, Any]) -> Deferred[Any]:
        client, subscriber = connections
        if not self.running:
            for connection in connections:
                connection.transport.loseConnection()
            return succeed(None)
        self.client, self.subscriber = client, subscriber
        try:
            subscribing = subscriber.subscribe(self.key("events"))
        except Exception:
            subscribing = fail(Failure())
        return subscribing.addCallbacks(lambda _: self._resynchronise(), self.trouble)

    def _resynchronise(self) -> Deferred[Any]:
        # Redis may have lost this proxy's entry (restarted, or it expired
        # while Redis was away): write it anew from what is open here.
        client = self.client
        key = self.key("sessions", self.proxyName)
        sessions = {sessionId: json.dumps(entry) for sessionId, entry in self.local.items()}
        commands = [client.delete(key)]
        if sessions:
            commands.append(client.hmset(key, sessions))
        commands.append(client.expire(key, self._ttl))
        commands.append(client.zadd(self.key("proxies"), self.clock.seconds(), self.proxyName))

        def written(results: list[tuple[bool, Any]]) -> None:
            for ok, result in results:
                if not ok:
                    result.raiseException()
            was, self.problem = self.problem, None
            self._retryDelay = 1.0
            self.log.info(
                "cluster: connected to Redis at {host}:{port} as {name}; {count} sessions registered"
                "{after}",
                host=self.settings.host, port=self.settings.port, name=self.proxyName, count=len(sessions),
                after="" if was == "not connected yet" else f" (it was unavailable: {was})",
            )

        return DeferredList(commands, consumeErrors=True).addCallback(written).addErrback(self.trouble)

    def _unreachable(self, reason: Failure) -> None:
        self.trouble(reason)

    def trouble(self, reason: Failure | str) -> None:
        """
        Redis failed us (a refused or lost connection, an error, no answer
        in time): go on alone, and connect again after the back-off.
        """
        why = reason if isinstance(reason, str) else (reason.getErrorMessage() or repr(reason.value))
        client, self.client = self.client, None
        subscriber, self.subscriber = self.subscriber, None
        for connection in (client, subscriber):
            if connection is not None and connection.transport is not None:
                connection.transport.abortConnection()
        if not self.running:
            return
        if self.problem is None or self.problem == "not connected yet" or self._retry is None:
            self.log.warn(
                "cluster: Redis at {host}:{port} unavailable ({why}); serving with this proxy's own state, "
                "trying again in {delay:.0f}s",
                host=self.settings.host, port=self.settings.port, why=why, delay=self._retryDelay,
            )
        self.problem = f"Redis at {self.settings.host}:{self.settings.port}: {why}"
        if self._retry is None or not self._retry.active():
            self._retry = self.clock.callLater(self._retryDelay, self._connect)
            self._retryDelay = min(MAX_RETRY_DELAY, self._retryDelay * 2)

    def connectionLost(self, connection: Any, reason: Failure) -> None:
        """
        One of the connections to Redis closed.
        """
        if connection is self.client or connection is self.subscriber:
            self.trouble(reason)

    def _send(self, command: Callable[..., Deferred[Any]] | None, *arguments: Any) -> None:
        # A command whose answer nobody waits for; a failure means Redis
        # is in trouble.
        if command is None:
            return
        try:
            command(*arguments).addErrback(self.trouble)
        except Exception:
            self.trouble(Failure())

    def _command(self, name: str) -> Callable[..., Deferred[Any]] | None:
        return getattr(self.client, name) if self.client is not None else None

    def _beat(self) -> None:
        if self.client is None:
            return
        self._send(self._command("expire"), self.key("sessions", self.proxyName), self._ttl)
        self._send(self._command("zadd"), self.key("proxies"), self.clock.seconds(), self.proxyName)

    def health(self) -> dict[str, Any]:
        """
        The cluster's part of C{GET /health}.
        """
        answer: dict[str, Any] = {"name": self.proxyName, "redis": "ok" if self.problem is None else "unavailable"}
        if self.problem is not None:
            answer["why"] = self.problem
        return answer

    # The registry

    def sessionLoggedIn(self, session: Any) -> None:
        entry = {
            "session": session.client.sessionId,
            "protocol": session.protocolName,
            "account": session.user,
            "backend": session.backendName,
            "address": session.client.address,
            "port": session.client.port,
            "since": self.clock.seconds(),
        }
        self.local[session.client.sessionId] = entry
        self._send(self._command("hset"), self.key("sessions", self.proxyName), session.client.sessionId, json.dumps(entry))

    def sessionEnded(self, session: Any) -> None:
        if self.local.pop(session.client.sessionId, None) is not None:
            self._send(self._command("hdel"), self.key("sessions", self.proxyName), session.client.sessionId)

    def remoteSessions(self) -> Deferred[dict[str, list[dict[str, Any]]]]:
        """
        The other proxies' registered sessions, by proxy name; none while
        Redis is unavailable.
        """
        client = self.client
        if client is None:
            return succeed({})
        alive = self.clock.seconds() - self._ttl

        def read(names: list[Any]) -> Deferred[Any]:
            others = [self._text(name) for name in names if self._text(name) != self.proxyName]
            reads = [client.hgetall(self.key("sessions", name)) for name in others]
            return DeferredList(reads, consumeErrors=True).addCallback(
                lambda results: {
                    name: [json.loads(self._text(value)) for value in (entries or {}).values()]
                    for name, (ok, entries) in zip(others, results)
                    if ok
                }
            )

        def failed(reason: Failure) -> dict[str, Any]:
            self.trouble(reason)
            return {}

        try:
            return client.zrangebyscore(self.key("proxies"), alive, "+inf").addCallback(read).addErrback(failed)
        except Exception:
            return succeed(failed(Failure()))

    @staticmethod
    def _text(value: Any) -> str:
        return value.decode("utf-8") if isinstance(value, bytes) else str(value)

    def describeSessions(
        self, local: list[dict[str, Any]], account: str | None, backend: str | None, domain: str | None
    ) -> Deferred[list[dict[str, Any]]]:
        """
        C{GET /sessions} for the fleet: this proxy's C{local} sessions and
        the other proxies' registered ones matching the filters, each with
        its C{proxy}.
        """
        now = self.clock.seconds()

        def merge(remote: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
            found = [dict(described, proxy=self.proxyName) for described in local]
            for proxy, sessions in sorted(remote.items()):
                for entry in sessions:
                    if _matches(entry, account, backend, domain):
                        described = {key: value for key, value in entry.items() if key != "since"}
                        described["seconds"] = round(max(0.0, now - entry.get("since", now)), 3)
                        # What only the session's own proxy knows.
                        described.update(state="relay", tls=None, sni=None, bytesFromClient=None, bytesFromBackend=None)
                        found.append(dict(described, proxy=proxy))
            return found

        return self.remoteSessions().addCallback(merge)

    def findRemote(self, account: str | None, backend: str | None) -> Deferred[list[_RemoteSession]]:
        """
        The other proxies' sessions matching C{account} and C{backend}.
        """
        return self.remoteSessions().addCallback(
            lambda remote: [
                _RemoteSession(self, proxy, entry)
                for proxy, sessions in remote.items()
                for entry in sessions
                if _matches(entry, account, backend, None)
            ]
        )

    # Messages

    def publish(self, message: dict[str, Any]) -> None:
        """
        Tell every other proxy C{message} (nobody, while Redis is
        unavailable).
        """
        self._send(self._command("publish"), self.key("events"), json.dumps(dict(message, sender=self.proxyName)))

    def dropRemote(self, proxy: str, sessionId: str, reason: str) -> None:
        """
        Have C{proxy} drop its session C{sessionId} (told once per turn of
        the reactor, with the others dropped meanwhile).
        """
        self._drops.setdefault(proxy, []).append((sessionId, reason))
        if self._dropCall is None:
            self._dropCall = self.clock.callLater(0, self._sendDrops)

    def _sendDrops(self) -> None:
        self._dropCall = None
        drops, self._drops = self._drops, {}
        for proxy, sessions in drops.items():
            self.publish({"op": "drop", "proxy": proxy, "sessions": [[sid, reason] for sid, reason in sessions]})

    def messageReceived(self, channel: Any, data: Any) -> None:
        """
        A message on the fleet's channel: carry it out here (unless this
        proxy sent it).
        """
        try:
            message = json.loads(self._text(data))
            if message.get("sender") == self.proxyName:
                return
            handler = getattr(self, "_on_" + str(message.get("op")), None)
            if handler is None:
                self.log.warn("cluster: unknown message {op!r} from {sender}", op=message.get("op"), sender=message.get("sender"))
                return
            handler(message)
        except Exception:
            self.log.failure("cluster: a message from the fleet failed")

    def _on_drop(self, message: dict[str, Any]) -> None:
        if message.get("proxy") != self.proxyName:
            return
        wanted = {sessionId: reason for sessionId, reason in message.get("sessions", ())}
        for session in self.context.sessions:
            reason = wanted.get(session.client.sessionId)
            if reason is not None:
                session.drop(reason)

    def _on_hold(self, message: dict[str, Any]) -> None:
        gate = self.context.gate
        inner = gate.inner if isinstance(gate, FleetGate) else gate
        release = inner.hold(message.get("accounts", ()), message.get("domains", ()), bool(message.get("mail")))
        holdId = str(message["id"])
        expiry = self.clock.callLater(HOLD_LIMIT, self._endHold, holdId)
        self._holds[holdId] = (release, expiry)

    def _on_release(self, message: dict[str, Any]) -> None:
        self._endHold(str(message.get("id")))

    def _endHold(self, holdId: str) -> None:
        held = self._holds.pop(holdId, None)
        if held is not None:
            release, expiry = held
            if expiry.active():
                expiry.cancel()
            release()

    def _on_routes(self, message: dict[str, Any]) -> None:
        self.forgetRoutes(list(message.get("keys", ())))

    def _on_failed(self, message: dict[str, Any]) -> None:
        self.failures.learn(str(message["address"]), int(message["count"]))

    def _on_lowered(self, message: dict[str, Any]) -> None:
        self.failures.loweredElsewhere(str(message["address"]), int(message["count"]))

    def holdEverywhere(self, accounts: list[str], domains: list[str], mail: bool) -> Callable[[], None]:
        """
        Hold these logins on every other proxy.

        @return: ends that hold.
        """
        holdId = f"{self.proxyName}:{next(self._holdIds)}"
        self.publish({"op": "hold", "id": holdId, "accounts": accounts, "domains": domains, "mail": mail})
        return lambda: self.publish({"op": "release", "id": holdId})


class FleetGate:
    """
    The login gate of a proxy in a fleet: a hold made here holds the
    logins on every proxy; waiting is asked of this proxy's own gate
    (where the other proxies' holds are, too).

    @ivar inner: this proxy's own L{mailproxy._migrate.LoginHold}.
    """

    def __init__(self, inner: Any, fleet: Fleet) -> None:
        self.inner = inner
        self.fleet = fleet

    def wait(self, request: Any) -> Deferred[None] | None:
        return self.inner.wait(request)  # type: ignore[no-any-return]

    def heldSessions(self) -> frozenset[str]:
        return self.inner.heldSessions()  # type: ignore[no-any-return]

    def hold(self, accounts: Iterable[str], domains: Iterable[str], mail: bool = False) -> Callable[[], None]:
        accounts, domains = list(accounts), list(domains)
        local = self.inner.hold(accounts, domains, mail)
        remote = self.fleet.holdEverywhere(accounts, domains, mail)

        def release() -> None:
            local()
            remote()

        return release


class FleetMover(Mover):
    """
    Moves accounts for the fleet: the sessions to drop are this proxy's
    and those the others registered (each dropped by its proxy); the route
    caches of every proxy forget the routes changed. Holds go to every
    proxy through the context's L{FleetGate}.
    """

    fleet: Fleet

    def refusal(self) -> str | None:
        if isinstance(findRouteStore(self.context.router), StaticRouter):
            # The other proxies read their own files: they would go on
            # routing the accounts to where they were.
            return (
                "the static route table is this proxy's own file, which the other proxies of the fleet do not "
                "read: move accounts with a shared route store (the sql router's database), or edit every proxy's "
                "route table and reload each"
            )
        return None

    async def _movePlan(self, backend: str, accounts: list[str], domain: str | None, includeAccounts: bool) -> Any:
        refusal = self.refusal()
        if refusal is not None:
            raise MoveError(refusal)
        self.remote = await self.fleet.findRemote(None, None)
        return await super()._movePlan(backend, accounts, domain, includeAccounts)

    def candidates(self) -> Iterable[Any]:
        return [*super().candidates(), *getattr(self, "remote", ())]

    def invalidate(self, *keys: str) -> None:
        super().invalidate(*keys)
        if keys:
            self.fleet.publish({"op": "routes", "keys": list(keys)})


class FleetFailures(LocalFailures):
    """
    Failed logins per client address, counted by the whole fleet: the
    count answered at once is what this proxy knows (its own, and what the
    others told); each failure is counted in Redis too, whose count every
    proxy then learns.
    """

    def __init__(self, fleet: Fleet) -> None:
        super().__init__(fleet.clock, FAILURE_MEMORY)
        self.fleet = fleet
        # Told of each count learned from the fleet (the parent of worker
        # processes tells its workers).
        self.learned: Callable[[str, int], None] = lambda address, count: None
        # Told of each count lowered by another proxy's forgiving.
        self.lowered: Callable[[str, int], None] = lambda address, count: None

    def learn(self, address: str, count: int) -> None:
        super().learn(address, count)
        self.learned(address, count)

    def failed(self, address: str) -> int:
        count = super().failed(address)
        client = self.fleet.client
        if client is not None:
            key = self.fleet.key("failures", address)

            def counted(total: Any) -> None:
                self.learn(address, int(total))
                self.fleet._send(self.fleet._command("expire"), key, int(self.memory))
                self.fleet.publish({"op": "failed", "address": address, "count": int(total)})

            try:
                client.incr(key).addCallbacks(counted, self.fleet.trouble)
            except Exception:
                self.fleet.trouble(Failure())
        return count

    def forgive(self, address: str, count: int) -> None:
        super().forgive(address, count)
        client = self.fleet.client
        if client is None:
            return
        key = self.fleet.key("failures", address)

        def lowered(total: Any) -> None:
            left = max(0, int(total))
            if left == 0:
                # Not left below zero for the next failure to count from.
                self.fleet._send(self.fleet._command("delete"), key)
            self.lower(address, left)
            self.fleet.publish({"op": "lowered", "address": address, "count": left})

        try:
            client.decrby(key, count).addCallbacks(lowered, self.fleet.trouble)
        except Exception:
            self.fleet.trouble(Failure())

    def loweredElsewhere(self, address: str, count: int) -> None:
        """
        Another proxy forgave failures of C{address}: C{count} are left.
        """
        self.lower(address, count)
        self.lowered(address, self.recent(address))


def joinFleet(proxy: Any, settings: ClusterConfig, backends: Iterable[str], clock: Any, connect: Callable[[Fleet], Deferred[Any]]) -> Fleet:
    """
    Make C{proxy} (a L{mailproxy._lifecycle.ProxyService}) a member of
    the fleet: its failed logins counted, its holds and moves carried out
    by every proxy, its sessions registered. The fleet service returned is
    to be started with the proxy (a child service).
    """
    context = proxy.context
    fleet = Fleet(settings, context, clock, connect)
    context.failures = fleet.failures
    context.gate = FleetGate(context.gate, fleet)
    mover = FleetMover(context, backends, clock)
    mover.fleet = fleet
    proxy.mover = proxy.migrations.mover = mover
    proxy.fleet = fleet
    return fleet


def redisConnector(settings: ClusterConfig, reactor: Any) -> Callable[[Fleet], Deferred[Any]]:
    """
    How a L{Fleet} connects to the Redis of C{settings} with txredisapi:
    two connections (commands, and the subscriber that pub/sub takes over),
    each authenticated and with its database chosen, TLS for C{rediss://}
    checked against C{ca_file}; an answer slower than C{timeout} closes
    the connection (the fleet then goes on alone and connects again).
    """
    import txredisapi  # type: ignore[import-untyped]
    from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
    from twisted.internet.protocol import Factory
    from twisted.internet.ssl import Certificate, optionsForClientTLS, platformTrust

    class _Commands(txredisapi.RedisProtocol):  # type: ignore[misc]
        def connectionLost(self, why: Failure) -> None:
            super().connectionLost(why)
            self.factory.fleet.connectionLost(self, why)

    class _Subscriber(txredisapi.SubscriberProtocol):  # type: ignore[misc]
        def messageReceived(self, pattern: Any, channel: Any, message: Any) -> None:
            self.factory.fleet.messageReceived(channel, message)

        def connectionLost(self, why: Failure) -> None:
            super().connectionLost(why)
            self.factory.fleet.connectionLost(self, why)

    class _Factory(Factory):
        # What txredisapi's protocol asks of its factory when AUTH or
        # SELECT fail: the connection is closed, and the fleet told why.
        noisy = False
        isLazy = False

        def __init__(self, fleet: Fleet, protocol: type) -> None:
            self.fleet = fleet
            self.redisProtocol = protocol

        def buildProtocol(self, addr: Any) -> Any:
            built = self.redisProtocol(
                password=settings.password.decode("utf-8") if settings.password is not None else None,
                dbid=settings.db or None,
                replyTimeout=settings.timeout,
                convertNumbers=True,
            )
            built.callLater = reactor.callLater
            built.factory = self
            return built

        def stopTrying(self) -> None:
            pass

        def connectionError(self, why: str) -> None:
            self.fleet.trouble(why)

    # Read once, here at start-up: every reconnection, which may come while
    # sessions are open, reuses it instead of reading the file on the
    # reactor (a changed [cluster] needs a restart anyway).
    options: Any = None
    if settings.tls:
        trust: Any = platformTrust()
        if settings.caFile is not None:
            with open(settings.caFile, "rb") as f:
                trust = Certificate.loadPEM(f.read())
        options = optionsForClientTLS(settings.host, trustRoot=trust)

    def endpoint() -> Any:
        plain = HostnameEndpoint(reactor, settings.host, settings.port, timeout=settings.connectTimeout)
        if options is None:
            return plain
        return wrapClientTLS(options, plain)

    def connect(fleet: Fleet) -> Deferred[Any]:
        def ready(protocol: Any) -> Deferred[Any]:
            # Once AUTH and SELECT are done; a refused AUTH closes the
            # connection and never says ready: the time-out below ends
            # the wait.
            waiting: Deferred[Any] = Deferred(lambda _: protocol.transport.abortConnection())
            protocol.whenConnected().chainDeferred(waiting)
            return waiting

        def both(commands: Any) -> Deferred[Any]:
            subscribing = endpoint().connect(_Factory(fleet, _Subscriber)).addCallback(ready)
            return subscribing.addCallback(lambda subscriber: (commands, subscriber))

        connecting = endpoint().connect(_Factory(fleet, _Commands)).addCallback(ready)
        return connecting.addCallback(both).addTimeout(2 * settings.connectTimeout + 2 * settings.timeout, reactor)

    return connect
