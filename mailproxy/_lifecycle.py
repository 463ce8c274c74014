"""
The running proxy as one service: reloading its configuration (SIGHUP or
the management endpoint) and draining its sessions on shutdown (SIGTERM).

A reload re-reads the configuration file and builds the new router and TLS
certificates before anything changes; any error keeps the running
configuration and says why.  What can change while sessions run is applied
at once: the router and its route table, the backends, the limits, the host
name, the TLS certificates (listeners hold a L{ReloadableServerTLS}, whose
options are replaced), the management token and certificate, C{[migration]}
but for its journal.  Listeners, the management endpoint's address, turning
its TLS on or off, C{[log]} and C{[migration] journal} need a restart; a
reload names what changed there and leaves it as it is.

On shutdown the listeners stop accepting first; open sessions then have
C{[limits] shutdown_grace} seconds to end on their own, after which each
gets its protocol's goodbye (IMAP C{* BYE Server shutting down.}) and is
closed.

Under systemd (C{Type=notify}) the service manager hears of each step: ready
once the listeners listen, reloading and ready again around a reload (with
its outcome as the status text), stopping at shutdown
(L{mailproxy._systemd.ServiceNotifier}).
"""

from __future__ import annotations

import os
import signal
from typing import Any

from attrs import evolve
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred, succeed
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOProtocol
from zope.interface import implementer

from . import _tls
from ._logs import TwistdLog
from ._migrate import LoginHold, Mover
from ._migrationhooks import OnLoginMigration, StepLog
from ._outcomes import EndReason
from ._stats import metricsText, snapshot
from ._systemd import ServiceNotifier
from .config import Config, ConfigError, journalPath, loadConfig, parseConfig
from .migration import MigrationManager
from .routers import buildRouter, closeRouter

__all__ = ["ReloadableServerTLS", "ProxyService", "SHUTDOWN", "RESTART_KEYS"]

#: The goodbye sessions get when the grace period is over.
SHUTDOWN = "Server shutting down."

#: Seconds to wait for dropped sessions' connections to close.
CLOSE_WAIT = 5.0

#: The configuration keys a reload cannot apply to a running proxy.
RESTART_KEYS = ("listener", "admin.endpoint", "admin.tls", "log", "migration.journal")


@implementer(IOpenSSLServerConnectionCreator)
class ReloadableServerTLS:
    """
    Server TLS options whose certificates a reload can replace: each new
    connection uses the options current when it starts.

    @ivar options: the L{mailproxy._tls.serverOptions} in use.
    """

    def __init__(self, options: IOpenSSLServerConnectionCreator) -> None:
        self.options = options

    def serverConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> Any:
        """
        Create the OpenSSL connection for one client, with the current
        certificates.
        """
        return self.options.serverConnectionForTLS(tlsProtocol)


def _startRouter(router: object) -> None:
    start = getattr(router, "startWatching", None)
    if start is not None:
        start()


def _stopRouter(router: object) -> None:
    stop = getattr(router, "stopWatching", None)
    if stop is not None:
        stop()


class ReloadOnHangup:
    """
    What a service that reloads its configuration on C{SIGHUP} does with
    the signal: the handler it installs at start and takes back at stop,
    and the reload it runs in the reactor thread (then the event log
    reopens, for logrotate).  The service provides C{reactor}, C{log},
    C{config}, C{eventLog} and C{reload}.
    """

    _previousHandler: Any = None

    def catchHangup(self) -> None:
        """
        Reload on C{SIGHUP} from now on (only the main thread may install
        a handler: embedded in another program, nothing is installed).
        """
        try:
            self._previousHandler = signal.signal(signal.SIGHUP, self._sighup)
        except ValueError:
            self._previousHandler = None

    def releaseHangup(self) -> None:
        """
        Give C{SIGHUP} back to the handler that was there before.
        """
        if self._previousHandler is not None:
            signal.signal(signal.SIGHUP, self._previousHandler)
            self._previousHandler = None

    def _sighup(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(self._reloadFromSignal)  # type: ignore[attr-defined]

    def _reloadFromSignal(self) -> None:
        self.log.info("SIGHUP: reloading {path}", path=self.config.path)  # type: ignore[attr-defined]
        self.reload()  # type: ignore[attr-defined]
        if self.eventLog is not None:  # type: ignore[attr-defined]
            self.eventLog.reopen()  # type: ignore[attr-defined]


class ProxyService(TwistdLog, ReloadOnHangup, MultiService):
    """
    The proxy: its listeners and management endpoint as children, its
    shared L{ProxyContext}, reload and drain.

    Listener children are named C{listener-N}.

    @ivar config: the configuration in effect (listeners, management
        endpoint and log settings may lag behind the file until a restart).
    @ivar context: what the sessions share.
    @ivar mover: moves accounts (used by the management endpoint).
    @ivar migrations: copies, verifies and moves accounts (the management
        endpoint's campaigns, and C{[migration] on_login}); it resumes the
        journal's unfinished work when the proxy starts.
    @ivar draining: shutdown has begun.
    @ivar admin: the management resource, if there is an endpoint.
    @ivar eventLog: the C{[log]} service, if C{[log] path} is set.
    @ivar notifier: tells the service manager (systemd) what happens.
    @ivar fleet: the proxy's L{mailproxy._fleet.Fleet} with C{[cluster]},
        else L{None}.
    """

    log = Logger()

    def __init__(
        self,
        config: Config,
        context: Any,
        reactor: Any,
        notifier: ServiceNotifier | None = None,
        migrating: bool = True,
    ) -> None:
        """
        @param notifier: by default, one that tells nobody.
        @param migrating: this process runs migrations: it resumes the
            journal and queues migrations on login. A worker process does
            not: its parent runs them for every worker
            (L{mailproxy._workers}).
        """
        super().__init__()
        self.config = config
        self.context = context
        self.reactor = reactor
        self.migrating = migrating
        if context.gate is None:
            context.gate = LoginHold()
        self.mover = Mover(context, config.backends, reactor)
        self.migrations = self._migrationManager(config)
        self.draining = False
        self.admin: Any = None
        self.adminTLS: ReloadableServerTLS | None = None
        self.eventLog: Any = None
        self.notifier = notifier if notifier is not None else ServiceNotifier()
        # In a fleet (a child service then): the shared registry, holds,
        # drops and health (see mailproxy._fleet).
        self.fleet: Any = None

    def _migrationManager(self, config: Config) -> MigrationManager:
        context = self.context
        manager = MigrationManager(
            reactor=self.reactor,
            mover=self.mover,
            router=context.router,
            backends=dict(config.backends),
            sessions=context.sessions,
            settings=config.migration,
            journalPath=journalPath(config.path, config.migration.journal),
            routerName=config.router.type,
        )
        manager.addObserver(StepLog(context.stats))
        if self.migrating:
            context.sessions.observe(OnLoginMigration(manager))
        return manager

    @property
    def backends(self) -> dict[str, Any]:
        """
        The configured backends, by name.
        """
        return self.config.backends

    # Start and stop

    def startService(self) -> None:
        super().startService()
        _startRouter(self.context.router)
        self._warn(self.config)
        if self.migrating and self.migrations.journalPath is not None and os.path.exists(self.migrations.journalPath):
            # Only a journal left by an earlier run has work to resume.
            self.migrations.resume().addErrback(lambda reason: self.log.failure("resuming migrations", reason))
        self.catchHangup()
        # The listeners listen by now: a listener that cannot has raised.
        listeners = sum(1 for child in self if (child.name or "").startswith("listener-"))
        self.notifier.writeStatus(None)
        self.notifier.ready(
            f"serving: {listeners} listener{'s' if listeners != 1 else ''}, router {self.context.routerName}"
        )

    def _warn(self, config: Config) -> None:
        # What works but should be fixed (a token file others can read).
        for warning in config.warnings:
            self.log.warn("configuration: {problem}", problem=warning)

    def stopService(self) -> Deferred[None]:
        self.releaseHangup()
        self.running = False
        self.draining = True
        self.notifier.stopping(f"stopping: {len(self.context.sessions)} sessions open")
        listeners = [child for child in self if (child.name or "").startswith("listener-")]
        others = [child for child in self if child not in listeners]
        stopping = gatherResults(
            [maybeDeferred(child.stopService) for child in listeners if child.running]
            # Without a campaign there is nothing to stop or to journal.
            + ([self.migrations.stop()] if self.migrations.campaigns() else [])
        )

        def stopOthers(_: object) -> Deferred[Any]:
            _stopRouter(self.context.router)
            return gatherResults([maybeDeferred(child.stopService) for child in reversed(others) if child.running])

        return stopping.addCallback(lambda _: self.drain()).addCallback(stopOthers).addCallback(lambda _: None)

    def drain(self) -> Deferred[None]:
        """
        Wait for the open sessions to end, at most the grace period; then
        say goodbye to the rest and close them.

        @return: fires once no session is open, or shortly after the
            goodbyes if some connections are slow to close.
        """
        sessions = self.context.sessions
        if not len(sessions):
            return succeed(None)
        grace = self.context.limits.shutdownGrace
        self.log.info(
            "shutting down: {count} sessions open, waiting up to {grace:.0f}s",
            count=len(sessions),
            grace=grace,
        )
        done: Deferred[None] = Deferred()
        calls: list[Any] = []

        def finish(_: object = None) -> None:
            for call in calls:
                if call.active():
                    call.cancel()
            if not done.called:
                done.callback(None)

        def graceOver() -> None:
            remaining = list(sessions)
            self.log.info("shutting down: closing {count} sessions", count=len(remaining))
            self.notifier.status(f"stopping: closing {len(remaining)} sessions")
            for session in remaining:
                session.drop(SHUTDOWN, EndReason.SHUTDOWN)
            # A session finishing what must not be cut (a message's reply)
            # closes once it is done: wait for it, within its own bound.
            finishing = max((session.finishing for session in remaining), default=0.0)
            if finishing:
                self.log.info(
                    "shutting down: waiting up to {seconds:.0f}s for messages awaiting their backend's reply",
                    seconds=finishing,
                )
            calls.append(self.reactor.callLater(CLOSE_WAIT + finishing, finish))

        sessions.whenEmpty().addCallback(finish)
        if not done.called:
            calls.append(self.reactor.callLater(grace, graceOver))
        return done

    # What the management endpoint asks (a parent of worker processes
    # answers the same for all of them: mailproxy._workers.Machine)

    def statsSnapshot(self) -> dict[str, Any]:
        """
        C{GET /stats}: L{mailproxy._stats.snapshot} of this proxy.
        """
        context = self.context
        return snapshot(context.stats, context.sessions, context.router)

    def metrics(self, health: dict[str, Any]) -> bytes:
        """
        C{GET /metrics}: L{mailproxy._stats.metricsText} of this proxy.
        """
        context = self.context
        return metricsText(context.stats, context.sessions, context.router, health)

    def describeSessions(
        self, account: str | None = None, backend: str | None = None, domain: str | None = None
    ) -> list[dict[str, Any]]:
        """
        C{GET /sessions}: the open sessions matching every filter given,
        each as its C{describe()}.
        """
        local = [session.describe() for session in self.context.sessions.find(account=account, backend=backend, domain=domain)]
        if self.fleet is not None:
            # Every proxy's, each with its name.
            return self.fleet.describeSessions(local, account, backend, domain)  # type: ignore[no-any-return]
        return local

    def dropSessions(self, account: str | None, backend: str | None, sessionId: str | None, reason: str) -> list[str]:
        """
        C{POST /sessions/drop}: drop the sessions matching every filter
        given, with C{reason} for their clients.

        @return: the ids of the sessions dropped.
        """
        sessions: list[Any] = self.context.sessions.find(account=account, backend=backend)

        def drop(remote: list[Any]) -> list[str]:
            chosen = sessions + remote
            if sessionId is not None:
                chosen = [s for s in chosen if s.client.sessionId == sessionId]
            for session in chosen:
                session.drop(reason)
            return [s.client.sessionId for s in chosen]

        if self.fleet is not None:
            # Those of the other proxies too, each dropped by its proxy.
            return self.fleet.findRemote(account, backend).addCallback(drop)  # type: ignore[no-any-return]
        return drop([])

    # Reload

    def reload(self, text: str | None = None) -> dict[str, Any]:
        """
        Re-read the configuration file and apply what can change live.

        @param text: the file's text as a worker's parent read and checked
            it (L{mailproxy._workers}), instead of reading the file again.

        @return: C{{"ok": True, "path": ..., "restartNeeded": [keys]}}, or
            C{{"ok": False, "path": ..., "error": why}} when the file (or
            what it names) is wrong and the running configuration was kept.
        """
        self.notifier.reloading(f"reloading {self.config.path}")
        outcome = self._reload(text)
        self.notifier.reloaded(outcome)
        return outcome

    def _reload(self, text: str | None = None) -> dict[str, Any]:
        path = self.config.path
        try:
            config = loadConfig(path) if text is None else parseConfig(text, path)
            router = buildRouter(config, self.reactor)
            serverTLS = _tls.serverOptions(config.tls, config.sni) if config.tls is not None else None
            adminTLS = None
            if config.admin is not None and config.admin.tls is not None:
                adminTLS = _tls.serverOptions(config.admin.tls)
        except (ConfigError, _tls.TLSConfigError) as e:
            self.log.error("reload failed, keeping the running configuration: {error}", error=str(e))
            return {"ok": False, "path": path, "error": str(e)}

        self._warn(config)
        restart = self._restartNeeded(config)
        context = self.context
        oldRouter, context.router = context.router, router
        _stopRouter(oldRouter)
        closeRouter(oldRouter)
        if self.running:
            _startRouter(router)
        context.routerName = config.router.type
        context.limits = config.limits
        context.tracker.limit = config.limits.connectionsPerAddress
        context.hostname = config.hostname
        context.backends = dict(config.backends)
        if serverTLS is not None and isinstance(context.serverTLS, ReloadableServerTLS):
            context.serverTLS.options = serverTLS
        self.mover.backends = set(config.backends)
        # The running engine keeps its journal where it is until a restart.
        migration = evolve(config.migration, journal=self.config.migration.journal)
        self.migrations.router = router
        self.migrations.routerName = config.router.type
        self.migrations.backends = dict(config.backends)
        self.migrations.settings = migration
        if self.admin is not None and config.admin is not None:
            self.admin.guard.token = config.admin.token
            self.admin.healthDetails = config.admin.healthDetails
        if adminTLS is not None and self.adminTLS is not None:
            self.adminTLS.options = adminTLS
        # Keep what was not applied, so the next reload compares with what runs.
        self.config = Config(
            path=config.path,
            hostname=config.hostname,
            limits=config.limits,
            tls=config.tls,
            sni=config.sni,
            listeners=self.config.listeners,
            router=config.router,
            backends=config.backends,
            admin=self.config.admin if {"admin.endpoint", "admin.tls"} & set(restart) else config.admin,
            log=self.config.log,
            migration=migration,
            workers=self.config.workers,
            cluster=self.config.cluster,
        )
        if restart:
            self.log.warn(
                "reloaded {path}; these changes need a restart: {keys}", path=path, keys=", ".join(restart)
            )
        else:
            self.log.info("reloaded {path}", path=path)
        return {"ok": True, "path": path, "restartNeeded": restart}

    def _restartNeeded(self, config: Config) -> list[str]:
        old = self.config
        changed = []
        if config.listeners != old.listeners or (config.tls is None) != (old.tls is None):
            changed.append("listener")
        oldAdmin, newAdmin = old.admin, config.admin
        if (oldAdmin is None) != (newAdmin is None) or (
            oldAdmin is not None and newAdmin is not None and oldAdmin.endpoint != newAdmin.endpoint
        ):
            changed.append("admin.endpoint")
        elif oldAdmin is not None and newAdmin is not None and (oldAdmin.tls is None) != (newAdmin.tls is None):
            changed.append("admin.tls")
        if config.log != old.log:
            changed.append("log")
        if config.migration.journal != old.migration.journal:
            changed.append("migration.journal")
        if config.cluster != old.cluster:
            changed.append("cluster")
        return changed
