"""
The least a Twisted program can do to proxy a plain IMAP LOGIN: the floor
under mailproxy's CPU per login in this language and framework.

It greets, reads the client's first line (taken to be C{TAG LOGIN user
password}: nothing is checked), connects to one fixed backend, waits for its
greeting, sends the same LOGIN line, passes the backend's tagged answer to
the client and from then on relays bytes both ways until either side
closes. No router, no parser, no timers, no limits, no logs, no metrics, no
TLS: none of what makes a proxy safe to run. It exists only so that
C{benchmarks/floor.py} can measure it.

Run: C{python benchmarks/floorrelay.py LISTEN_PORT BACKEND_PORT [--stock]
[--tls CERT KEY]}; it prints C{ready PORT [TLSPORT]} once it listens (port
0: the kernel's choice). Without C{--stock} it uses mailproxy's reactor and
transports that send at once (L{mailproxy._tcp}), as mailproxy does; with
it, Twisted's own. With C{--tls}, a second port (the kernel's choice)
serves the same relay in implicit TLS, with mailproxy's TLS settings for a
listener (L{mailproxy._tls.serverOptions}) and Twisted's TLS layer, as
mailproxy has them.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

_REPOSITORY = Path(__file__).resolve().parent.parent
if str(_REPOSITORY) not in sys.path:
    sys.path.insert(0, str(_REPOSITORY))

GREETING = b"* OK [CAPABILITY IMAP4rev1 LITERAL+ AUTH=PLAIN] floor ready\r\n"


def main(argv: list[str]) -> None:
    """
    Listen and relay until killed.
    """
    stock = "--stock" in argv
    tls: Any = None
    if "--tls" in argv:
        at = argv.index("--tls")
        from mailproxy._tls import CertificateSource, serverOptions

        tls = serverOptions(CertificateSource(argv[at + 1], argv[at + 2]))
        argv = argv[:at] + argv[at + 3 :]
    listenPort, backendPort = (int(a) for a in argv if not a.startswith("--"))
    if not stock:
        from mailproxy import _tcp

        _tcp.installReactor()
    from twisted.internet import reactor
    from twisted.internet.protocol import ClientFactory, Factory, Protocol

    def connect(host: str, port: int, factory: ClientFactory) -> None:
        if stock:
            reactor.connectTCP(host, port, factory, timeout=10)  # type: ignore[attr-defined]
        else:
            _tcp.connectAtOnce(reactor, host, port, factory, 10)

    # The transports are Twisted's TCP ones (and its TLS layer): Any, as
    # ITransport names neither setTcpNoDelay nor pauseProducing.
    class Backend(Protocol):
        transport: Any
        client: Any
        greeted: bool
        relaying: bool
        buffer: bytes

        def __init__(self, client: Client, login: bytes) -> None:
            self.client = client
            self.login = login
            self.tag = login.split(b" ", 1)[0] + b" "
            self.greeted = False
            self.relaying = False
            self.buffer = b""

        def connectionMade(self) -> None:
            self.transport.setTcpNoDelay(True)

        def dataReceived(self, data: bytes) -> None:
            if self.relaying:
                self.client.transport.write(data)
                return
            self.buffer += data
            if not self.greeted:
                if b"\r\n" not in self.buffer:
                    return
                self.greeted = True
                self.buffer = self.buffer.split(b"\r\n", 1)[1]
                self.transport.write(self.login)
            # The tagged answer ends the login: pass it and what came before.
            if not any(line.startswith(self.tag) for line in self.buffer.split(b"\r\n")[:-1]):
                return
            self.relaying = True
            self.client.backend = self
            self.client.transport.write(self.buffer)
            self.buffer = b""
            self.client.transport.resumeProducing()

        def connectionLost(self, reason: Any = None) -> None:
            self.client.transport.loseConnection()
            self.client = None

    class BackendFactory(ClientFactory):
        noisy = False

        def __init__(self, protocol: Backend) -> None:
            self.backendProtocol = protocol

        def buildProtocol(self, addr: object) -> Backend:  # type: ignore[override]
            return self.backendProtocol

        def clientConnectionFailed(self, connector: object, reason: Any) -> None:
            self.backendProtocol.client.transport.loseConnection()

    class Client(Protocol):
        transport: Any
        backend: Backend | None = None
        buffer = b""

        encrypted = False

        def connectionMade(self) -> None:
            self.transport.setTcpNoDelay(True)
            if self.encrypted:
                # Implicit TLS: the greeting is sent once the handshake is done.
                self.transport.startTLS(tls)
            self.transport.write(GREETING)

        def dataReceived(self, data: bytes) -> None:
            if self.backend is not None:
                self.backend.transport.write(data)
                return
            self.buffer += data
            if b"\r\n" not in self.buffer:
                return
            line, _, rest = self.buffer.partition(b"\r\n")
            self.buffer = b""
            self.transport.pauseProducing()
            connect("127.0.0.1", backendPort, BackendFactory(Backend(self, line + b"\r\n" + rest)))

        def connectionLost(self, reason: Any = None) -> None:
            if self.backend is not None:
                self.backend.transport.loseConnection()
                self.backend = None

    class TLSClient(Client):
        encrypted = True

    # The reactor module's interfaces are invisible to mypy.
    tcp: Any = reactor
    ports = []
    for protocol in (Client, TLSClient) if tls is not None else (Client,):
        factory = Factory.forProtocol(protocol)
        factory.noisy = False
        port: Any = tcp.listenTCP(listenPort if protocol is Client else 0, factory, backlog=4096, interface="127.0.0.1")
        if not stock:
            _tcp.listenAtOnce(port)
        ports.append(str(port.getHost().port))
    print("ready " + " ".join(ports), flush=True)
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main(sys.argv[1:])
