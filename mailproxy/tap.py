"""
C{twistd mailproxy}: options and the service tree.
"""

from __future__ import annotations

import gc
from typing import Any, NoReturn, cast

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import AdoptedStreamServerEndpoint
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import (
    IListeningPort,
    IOpenSSLServerConnectionCreator,
    IProtocolFactory,
    IStreamServerEndpoint,
)
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure
from zope.interface import implementer

from . import _tls
from ._endpoints import serverEndpoint
from ._fleet import joinFleet, redisConnector
from ._lifecycle import ProxyService, ReloadableServerTLS
from ._logs import EventLogService, twistdLogObserver
from ._proxylistener import ProxyHeaderFactory, parseNetworks
from ._session import FrontendFactory, ProxyContext
from ._systemd import ServiceNotifier, passedSocketProblem
from ._tcp import AtOnceEndpoint, installReactor, listenAtOnce
from ._workers import Machine, workerMain
from .config import Config, ConfigError, Listener, loadConfig, workerCount
from .admin import adminSite
from .routers import buildRouter

#: Listen backlog when the endpoint string does not set one: Twisted's
#: default of 50 drops connection bursts.
DEFAULT_BACKLOG = 1024

#: The TLS ALPN ids the management endpoint accepts: it serves HTTP/1.1 only.
ADMIN_APPLICATION_PROTOCOLS = (b"http/1.1",)


class Options(usage.Options):
    """
    Command-line options of C{twistd mailproxy}.
    """

    synopsis = "--config FILE"
    longdesc = (
        "Run the mail proxy described by a TOML configuration file: listeners, "
        "TLS certificates, the router and the backends. Check a file without "
        "serving with `mailproxy check FILE`. SIGHUP reloads the configuration, "
        "route table and certificates; SIGTERM stops accepting, lets sessions "
        "drain for [limits] shutdown_grace seconds, then says goodbye to the rest."
    )
    optParameters = [
        ["config", "c", "/etc/mailproxy/mailproxy.toml", "The configuration file (TOML)."],
    ]

    def postOptions(self) -> None:
        try:
            self["loaded"] = loadConfig(self["config"])
        except ConfigError as e:
            raise usage.UsageError(str(e))


def withBacklog(endpoint: str) -> str:
    """
    Add a generous listen backlog to a C{tcp:} endpoint string without one.
    """
    kind = endpoint.split(":", 1)[0]
    if kind in ("tcp", "tcp6") and "backlog=" not in endpoint:
        return f"{endpoint}:backlog={DEFAULT_BACKLOG}"
    return endpoint


class ListenError(ConfigError):
    """
    A listener of the configuration cannot listen (its port is taken, its
    address is not this machine's): said as a problem of the file is,
    C{"FILE: listener[N].endpoint: cannot listen on HOST:PORT: why"}.
    """


@implementer(IStreamServerEndpoint)
class ReportingEndpoint:
    """
    A server endpoint that logs where it listens once it does, and keeps
    the listening port: with port 0 in the endpoint string, the log line
    (or L{port}) says which port the kernel chose.

    @ivar port: the listening port, once listening.
    """

    log = Logger()

    def __init__(self, endpoint: IStreamServerEndpoint, name: str, where: str | None = None) -> None:
        """
        @param name: how the log line names the listener (C{listener[0]}).
        @param where: the file and key that configure it
            (C{"FILE: listener[0].endpoint"}), to name in an error.
        """
        self.endpoint = endpoint
        self.name = name
        self.where = where
        self.port: IListeningPort | None = None

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        """
        Listen with the wrapped endpoint, then log the address.
        """

        def listening(port: IListeningPort) -> IListeningPort:
            self.port = listenAtOnce(port)
            address = port.getHost()
            self.log.info(
                "{name} listening on {host}:{port}",
                name=self.name,
                host=getattr(address, "host", "?"),
                port=getattr(address, "port", "?"),
            )
            return port

        def refused(reason: Failure) -> NoReturn:
            # Said the way a problem of the file is: where, and why.
            reason.trap(CannotListenError)
            cause = cast(CannotListenError, reason.value)
            why = getattr(cause.socketError, "strerror", None) or str(cause.socketError)
            raise ListenError(f"{self.where or self.name}: cannot listen on {cause.interface or '*'}:{cause.port}: {why}")

        return self.endpoint.listen(protocolFactory).addCallbacks(listening, refused)


def listeningPort(service: ProxyService, index: int) -> int | None:
    """
    The TCP port listener C{index} of a started proxy listens on (the one
    the kernel chose for port 0), or L{None} if it does not listen.
    """
    endpoint = service.getServiceNamed(f"listener-{index}").endpoint  # type: ignore[attr-defined]
    if endpoint.port is None:
        return None
    return endpoint.port.getHost().port  # type: ignore[no-any-return]


def listenerEndpoint(reactor: Any, endpoint: str) -> IStreamServerEndpoint:
    """
    The server endpoint of a listener's endpoint string.

    @raise ValueError: a C{systemd:} endpoint names a socket systemd did not
        pass (C{$LISTEN_FDS}, C{$LISTEN_FDNAMES}), or one of another kind;
        the message says which.
    """
    try:
        server = serverEndpoint(reactor, withBacklog(endpoint))
    except (IndexError, KeyError):
        # The configuration has checked the syntax; only the sockets passed
        # can be missing.
        raise ValueError(
            f"systemd passed no such socket (the socket unit's ListenStream= and "
            f"FileDescriptorName=, or the service's Sockets=): {endpoint!r}"
        ) from None
    if isinstance(server, AdoptedStreamServerEndpoint):
        # Twisted would adopt a socket of another family and misread its
        # addresses.
        problem = passedSocketProblem(server.fileno, server.addressFamily)
        if problem is not None:
            raise ValueError(f"{endpoint!r}: {problem}")
    return server


def listenerFactory(context: ProxyContext, listener: Listener, name: str = "") -> IProtocolFactory:
    """
    The protocol factory for one listener, with TLS wrapped around it for
    implicit TLS.

    @param name: how metrics name the listener (its index).
    """
    # The protocol registry names the front end; it is imported only now.
    frontend = listener.descriptor.frontendFactory(listener.mode)
    factory: IProtocolFactory = FrontendFactory(frontend, context, listener, name)
    if listener.tls == "implicit":
        # The configuration refuses a TLS listener without [tls].
        options = _tls.ApplicationProtocolOptions(
            cast(IOpenSSLServerConnectionCreator, context.serverTLS), listener.applicationProtocols
        )
        factory = _tls.TLSLayerFactory(options, False, factory)
    if listener.proxyProtocol:
        # Below TLS: a balancer sends the header before the ClientHello.
        factory = ProxyHeaderFactory(factory, parseNetworks(listener.proxyTrusted), context.reactor)
    return factory


def serviceFromConfig(
    config: Config,
    reactor: Any,
    notifier: ServiceNotifier | None = None,
    eventLogOnStandardOutput: bool = False,
    adopted: list[tuple[int, int]] | None = None,
) -> ProxyService:
    """
    Build the whole proxy from a loaded configuration: its listeners, the
    management endpoint and the event log (see L{ProxyService} for reload
    and shutdown).

    @param notifier: tells the service manager what the proxy does; by
        default nobody is told.
    @param eventLogOnStandardOutput: the process's own log already writes
        the C{[log]} lines to standard output (C{mailproxy run}), so
        C{[log] path = "-"} adds no second writer.
    @param adopted: for a worker process (L{mailproxy._workers}), the
        listening sockets its parent bound, as C{(descriptor, address
        family)} in the order of the listeners; the management endpoint and
        the event log are then the parent's, not built here.
    @raise ConfigError: if the router or the certificates cannot be set up,
        or a C{systemd:} listener has no socket.
    """
    router = buildRouter(config, reactor)
    serverTLS = adminTLS = None
    try:
        if config.tls is not None:
            serverTLS = ReloadableServerTLS(_tls.serverOptions(config.tls, config.sni))
        if config.admin is not None and config.admin.tls is not None:
            adminTLS = ReloadableServerTLS(_tls.serverOptions(config.admin.tls))
    except _tls.TLSConfigError as e:
        # It names the file and the setting.
        raise ConfigError(str(e))
    context = ProxyContext(
        reactor=reactor,
        router=router,
        limits=config.limits,
        hostname=config.hostname,
        serverTLS=serverTLS,
        backends=dict(config.backends),
        routerName=config.router.type,
    )
    # A worker leaves migrations to its parent.
    top = ProxyService(config, context, reactor, notifier, migrating=adopted is None)
    if config.cluster is not None and adopted is None:
        # A worker's parent is the machine's member of the fleet.
        _joinFleet(top, config, reactor)
    for index, listener in enumerate(config.listeners):
        endpoint: IStreamServerEndpoint
        if adopted is not None:
            # Its parent said where it listens.
            endpoint = AtOnceEndpoint(AdoptedStreamServerEndpoint(reactor, *adopted[index]))
        else:
            endpoint = _listenerEndpoint(config, reactor, index)
        service = StreamServerEndpointService(endpoint, listenerFactory(context, listener, str(index)))
        # A listener that cannot bind must stop the proxy, not be logged and
        # forgotten.
        service._raiseSynchronously = True
        service.setName(f"listener-{index}")
        service.setServiceParent(top)
    if adopted is None:
        _addAdminAndLog(top, config, reactor, adminTLS, eventLogOnStandardOutput)
    return top


def _joinFleet(top: ProxyService, config: Config, reactor: Any) -> None:
    # The proxy shares its sessions, holds, drops, route changes and
    # failed logins with the fleet (mailproxy._fleet).
    assert config.cluster is not None
    fleet = joinFleet(top, config.cluster, config.backends, reactor, redisConnector(config.cluster, reactor))
    fleet.setName("cluster")
    fleet.setServiceParent(top)


def _listenerEndpoint(config: Config, reactor: Any, index: int) -> ReportingEndpoint:
    listener = config.listeners[index]
    name = f"listener[{index}] ({listener.protocol}, tls={listener.tls})"
    try:
        return ReportingEndpoint(listenerEndpoint(reactor, listener.endpoint), name, f"{config.path}: listener[{index}].endpoint")
    except ValueError as e:
        raise ConfigError(f"{config.path}: listener[{index}]: endpoint: {e}")


def _addAdminAndLog(
    top: Any, config: Config, reactor: Any, adminTLS: ReloadableServerTLS | None, eventLogOnStandardOutput: bool
) -> None:
    # The management endpoint and the event log, as children of top (a
    # proxy, or the parent of worker processes).
    if config.admin is not None:
        site, top.admin = adminSite(top, config.admin.token, reactor, config.admin.healthDetails)
        factory: IProtocolFactory = site
        if adminTLS is not None:
            # Only HTTP/1.1's ALPN id, as each listener accepts only its own.
            options = _tls.ApplicationProtocolOptions(adminTLS, ADMIN_APPLICATION_PROTOCOLS)
            factory = _tls.TLSLayerFactory(options, False, site)
        top.adminTLS = adminTLS
        endpoint = ReportingEndpoint(serverEndpoint(reactor, config.admin.endpoint), "admin", f"{config.path}: admin.endpoint")
        service = StreamServerEndpointService(endpoint, factory)
        service._raiseSynchronously = True
        service.setName("admin")
        service.setServiceParent(top)
    if config.log.path is not None and not (config.log.path == "-" and eventLogOnStandardOutput):
        top.eventLog = EventLogService(config.log)
        top.eventLog.setName("log")
        # First among the children: it starts before anything logs.
        top.eventLog.setServiceParent(top)
        top.services.insert(0, top.services.pop())


def machineFromConfig(
    config: Config,
    count: int,
    reactor: Any,
    notifier: ServiceNotifier | None = None,
    eventLogOnStandardOutput: bool = False,
) -> Machine:
    """
    Build the parent of C{count} worker processes (L{mailproxy._workers}):
    the listeners it binds for them, its management endpoint and event log.

    @raise ConfigError: as L{serviceFromConfig}.
    """
    adminTLS = None
    try:
        # The workers build their own; a certificate that cannot load must
        # stop the parent, not make every worker die at its start.
        if config.tls is not None:
            _tls.serverOptions(config.tls, config.sni)
        if config.admin is not None and config.admin.tls is not None:
            adminTLS = ReloadableServerTLS(_tls.serverOptions(config.admin.tls))
    except _tls.TLSConfigError as e:
        # It names the file and the setting.
        raise ConfigError(str(e))
    endpoints = [_listenerEndpoint(config, reactor, index) for index in range(len(config.listeners))]
    top = Machine(config, count, reactor, endpoints, notifier)
    if config.cluster is not None:
        # The parent is the machine's member of the fleet; its workers are not.
        fleet = top.joinFleet(config.cluster, redisConnector(config.cluster, reactor))
        fleet.setName("cluster")
        fleet.setServiceParent(top)
    _addAdminAndLog(top, config, reactor, adminTLS, eventLogOnStandardOutput)
    return top


def raiseFileLimit() -> None:
    """
    Allow as many open files as the hard limit does: each relayed session
    holds two sockets (and, when both legs are plain TCP, two pipes).
    """
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError):
        pass


#: The garbage collector's thresholds in the proxy's processes (Python's
#: default is 700, 10, 10). Its youngest-generation pass runs after that
#: many new container objects and walks every young object still alive: at
#: 700, about once per login, each pass finds the objects of the sessions
#: in flight alive and promotes them, to be walked again by the older
#: generations' passes. At 50,000 most of a login's objects are freed by
#: reference counting before a pass sees them; what waits for the
#: collector (objects in reference cycles) is a few logins' worth at most.
#: Without it the collector cost 15-20 % of the CPU of a login.
GC_THRESHOLDS = (50_000, 20, 10)


def tuneGarbageCollector() -> None:
    """
    Set L{GC_THRESHOLDS}, and leave what exists at start-up (modules,
    classes, the configuration: hundreds of thousands of objects that live
    as long as the process) out of the collector's full passes
    (C{gc.freeze}).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def prepareProcess() -> None:
    """
    What every process of the proxy does before it serves: raise the
    descriptor limit and tune the garbage collector.
    """
    raiseFileLimit()
    tuneGarbageCollector()


def makeService(options: Options) -> IService:
    """
    The twistd entry point. Unless C{twistd -r} chose a reactor, the proxy
    runs on L{_tcp.DirectReactor}.
    """
    installReactor()
    from twisted.internet import reactor

    prepareProcess()

    config = options["loaded"]
    count = workerCount(config)
    service: ProxyService | Machine
    try:
        if count > 1:
            service = machineFromConfig(
                config,
                count,
                reactor,
                ServiceNotifier.fromEnvironment(),
                eventLogOnStandardOutput=options.get("eventLogOnStandardOutput", False),
            )
        else:
            service = serviceFromConfig(
                config,
                reactor,
                ServiceNotifier.fromEnvironment(),
                eventLogOnStandardOutput=options.get("eventLogOnStandardOutput", False),
            )
    except ConfigError as e:
        raise SystemExit(f"mailproxy: {e}")
    # twistd's options: its log, written with the proxy's formatter.
    if options.parent is not None:
        service.twistdLog = twistdLogObserver(options.parent)
    return service


def runWorker() -> None:
    """
    The entry point of a worker process (the parent starts it with the
    arguments L{mailproxy._workers.workerMain} reads): a proxy built as a
    single process's is, on the sockets the parent passes down.
    """
    installReactor()
    workerMain(serviceFromConfig, prepareProcess)
