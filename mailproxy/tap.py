"""
C{twistd mailproxy}: options and the service tree.
"""

from __future__ import annotations

import signal
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, MultiService, Service
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python import usage
from twisted.python.reflect import namedAny

from . import _tls
from ._proxylistener import ProxyHeaderFactory, parseNetworks
from ._session import FrontendFactory, ProxyContext
from .config import Config, ConfigError, Listener, loadConfig
from .interfaces import IReloadable
from .routers import buildRouter

#: The front end for each listener protocol. Adding a protocol adds a line.
FRONTENDS = {
    "imap": "mailproxy.imap._frontend.IMAPFrontend",
    "pop3": "mailproxy.pop3._frontend.POP3Frontend",
    "sieve": "mailproxy.sieve._frontend.SieveFrontend",
}

#: Listen backlog when the endpoint string does not set one: Twisted's
#: default of 50 drops connection bursts.
DEFAULT_BACKLOG = 1024


class Options(usage.Options):
    """
    Command-line options of C{twistd mailproxy}.
    """

    synopsis = "--config FILE"
    longdesc = (
        "Run the mail proxy described by a TOML configuration file: listeners, "
        "TLS certificates, the router and the backends. Check a file without "
        "serving with `mailproxy check FILE`. SIGHUP re-reads the route table."
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


class RouterService(Service):
    """
    Keeps the router's data fresh: file watching and SIGHUP reloads.
    """

    log = Logger()

    def __init__(self, router: Any, reactor: Any) -> None:
        self.router = router
        self.reactor = reactor
        self._previousHandler: Any = None

    def startService(self) -> None:
        super().startService()
        start = getattr(self.router, "startWatching", None)
        if start is not None:
            start()
        if IReloadable.providedBy(self.router):
            try:
                self._previousHandler = signal.signal(signal.SIGHUP, self._sighup)
            except ValueError:
                # Not the main thread (embedded use): no signal handling.
                self._previousHandler = None

    def stopService(self) -> None:
        stop = getattr(self.router, "stopWatching", None)
        if stop is not None:
            stop()
        if self._previousHandler is not None:
            signal.signal(signal.SIGHUP, self._previousHandler)
            self._previousHandler = None
        return super().stopService()

    def _sighup(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(self._reload)

    def _reload(self) -> None:
        self.log.info("SIGHUP: reloading the route table")
        self.router.reload()


def listenerFactory(context: ProxyContext, listener: Listener):
    """
    The protocol factory for one listener, with TLS wrapped around it for
    implicit TLS.
    """
    frontend = namedAny(FRONTENDS[listener.protocol])
    factory = FrontendFactory(frontend, context, listener)
    if listener.tls == "implicit":
        factory = TLSMemoryBIOFactory(context.serverTLS, False, factory)
    if listener.proxyProtocol:
        # Below TLS: a balancer sends the header before the ClientHello.
        factory = ProxyHeaderFactory(factory, parseNetworks(listener.proxyTrusted), context.reactor)
    return factory


def serviceFromConfig(config: Config, reactor: Any) -> MultiService:
    """
    Build the whole proxy from a loaded configuration.

    @raise ConfigError: if the router or the certificates cannot be set up.
    """
    router = buildRouter(config, reactor)
    serverTLS = None
    if config.tls is not None:
        try:
            serverTLS = _tls.serverOptions(config.tls, config.sni)
        except _tls.TLSConfigError as e:
            raise ConfigError(f"{config.path}: tls: {e}")
    context = ProxyContext(
        reactor=reactor,
        router=router,
        limits=config.limits,
        hostname=config.hostname,
        serverTLS=serverTLS,
    )
    top = MultiService()
    RouterService(router, reactor).setServiceParent(top)
    for index, listener in enumerate(config.listeners):
        endpoint = serverFromString(reactor, withBacklog(listener.endpoint))
        service = StreamServerEndpointService(endpoint, listenerFactory(context, listener))
        # A listener that cannot bind must stop the proxy, not be logged and
        # forgotten.
        service._raiseSynchronously = True
        service.setName(f"listener-{index}")
        service.setServiceParent(top)
    top.context = context  # type: ignore[attr-defined]
    return top


def makeService(options: Options) -> IService:
    """
    The twistd entry point.
    """
    from twisted.internet import reactor

    try:
        return serviceFromConfig(options["loaded"], reactor)
    except ConfigError as e:
        raise SystemExit(f"mailproxy: {e}")
