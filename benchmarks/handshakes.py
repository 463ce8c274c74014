"""
The proxy's cost per TLS connection towards clients: CPU per handshake,
full and resumed (a session ticket), and the memory one idle established
connection holds; for the proxy's own path and for the alternatives it
could take.

Three server sides answer a Python C{ssl} client over memory BIOs in this
process, TLS 1.3:

  - C{pyopenssl}: the proxy's server context (L{mailproxy._tls.serverOptions}
    with an ALPN id, as a listener wraps it) driven directly, on the OpenSSL
    that C{cryptography} bundles;
  - C{proxy}: the same context under Twisted's TLS layer
    (C{TLSMemoryBIOFactory}, as the proxy's listeners and C{startTLS} use
    it), writing a greeting once the handshake is done: what the proxy
    really runs;
  - C{stdlib}: the standard library's C{ssl} (C{SSLContext}, C{MemoryBIO},
    C{SSLObject}) on the system's OpenSSL, with the proxy's minimum version,
    TLS 1.2 ciphers, options, ALPN and an SNI callback. Python 3.11's C{ssl}
    cannot set TLS 1.3 suites or key exchange groups, so those are that
    OpenSSL's defaults (no post-quantum hybrid group).

Only the server side's CPU is counted (process CPU time around its calls).
Memory is glibc's bytes in use (C heap and Python objects alike) over
C{--connections} established connections whose clients are gone, divided
by their number: OpenSSL's allocations are invisible to C{tracemalloc}.
Certificates: a P-256 ECDSA one (what C{makeSelfSigned} makes) and an RSA
2048 one.

Run from the repository root::

    /tmp/venv/bin/python benchmarks/handshakes.py [--count 500] [--connections 2000]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

_REPOSITORY = Path(__file__).resolve().parent.parent
if str(_REPOSITORY) not in sys.path:
    sys.path.insert(0, str(_REPOSITORY))

from OpenSSL import SSL  # noqa: E402
from twisted.internet.protocol import Factory, Protocol  # noqa: E402
from twisted.internet.task import Clock  # noqa: E402
from twisted.internet.testing import StringTransport  # noqa: E402
from twisted.protocols.tls import TLSMemoryBIOFactory  # noqa: E402

from mailproxy._tls import (  # noqa: E402
    _TLS12_CIPHERS,
    ApplicationProtocolOptions,
    CertificateSource,
    makeSelfSigned,
    serverOptions,
)

_GREETING = b"* OK ready\r\n"


class _PyOpenSSLServer:
    """
    The proxy's server context driven directly over memory BIOs.
    """

    def __init__(self, certificate: str, key: str) -> None:
        source = CertificateSource(certificate, key, names=("localhost",))
        self.options = ApplicationProtocolOptions(serverOptions(source), [b"imap"])

    def start(self) -> Any:
        connection = self.options.serverConnectionForTLS(None)
        connection.set_accept_state()
        return [connection, False]

    def feed(self, state: Any, data: bytes) -> bytes:
        connection = state[0]
        if data:
            connection.bio_write(data)
        if not state[1]:
            try:
                connection.do_handshake()
            except SSL.WantReadError:
                pass
            else:
                state[1] = True
                connection.send(_GREETING)
        try:
            return connection.bio_read(65536)  # type: ignore[no-any-return]
        except SSL.WantReadError:
            return b""


class _Greeting(Protocol):
    def connectionMade(self) -> None:
        self.transport.write(_GREETING)  # type: ignore[union-attr]


class _ProxyServer:
    """
    The proxy's server context under Twisted's TLS layer, over an in-memory
    transport; the clock runs the layer's deferred flush of small writes.
    """

    def __init__(self, certificate: str, key: str) -> None:
        source = CertificateSource(certificate, key, names=("localhost",))
        options = ApplicationProtocolOptions(serverOptions(source), [b"imap"])
        self.clock = Clock()
        self.factory = TLSMemoryBIOFactory(options, False, Factory.forProtocol(_Greeting), self.clock)

    def start(self) -> Any:
        protocol = self.factory.buildProtocol(None)
        transport = StringTransport()
        assert protocol is not None
        protocol.makeConnection(transport)
        return (protocol, transport)

    def feed(self, state: Any, data: bytes) -> bytes:
        protocol, transport = state
        if data:
            protocol.dataReceived(data)
        self.clock.advance(0)
        written: bytes = transport.value()
        transport.clear()
        return written


class _StdlibServer:
    """
    The standard library's C{ssl} over memory BIOs, the proxy's policy as far
    as C{ssl} can set it.
    """

    def __init__(self, certificate: str, key: str) -> None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION
        context.set_ciphers(_TLS12_CIPHERS.decode("ascii"))
        context.load_cert_chain(certificate, key)
        context.set_alpn_protocols(["imap"])
        context.sni_callback = lambda connection, name, context: None
        self.context = context

    def start(self) -> Any:
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        return [self.context.wrap_bio(incoming, outgoing, server_side=True), incoming, outgoing, False]

    def feed(self, state: Any, data: bytes) -> bytes:
        connection, incoming, outgoing, done = state
        if data:
            incoming.write(data)
        if not done:
            try:
                connection.do_handshake()
            except ssl.SSLWantReadError:
                pass
            else:
                state[3] = True
                connection.write(_GREETING)
        return outgoing.read()  # type: ignore[no-any-return]


_SERVERS = {"pyopenssl": _PyOpenSSLServer, "proxy": _ProxyServer, "stdlib": _StdlibServer}


def handshake(server: Any, client: ssl.SSLContext, session: ssl.SSLSession | None) -> tuple[float, Any, ssl.SSLObject]:
    """
    One handshake of a new client offering C{session}, up to the server's
    greeting (which brings the client its tickets).

    @return: the server's CPU seconds, its connection and the client's.
    """
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    connection = client.wrap_bio(incoming, outgoing, server_hostname="localhost", session=session)
    began = time.process_time()
    state = server.start()
    cpu = time.process_time() - began
    for _ in range(4):
        try:
            connection.do_handshake()
        except ssl.SSLWantReadError:
            pass
        data = outgoing.read()
        began = time.process_time()
        answer = server.feed(state, data)
        cpu += time.process_time() - began
        incoming.write(answer)
    if connection.read(1024) != _GREETING:
        raise RuntimeError("no greeting after the handshake")
    return cpu, state, connection


def _bytesInUse() -> int | None:
    """
    glibc's bytes allocated and not freed, or C{None} without glibc.
    """

    class MallInfo2(ctypes.Structure):
        _fields_ = [
            (name, ctypes.c_size_t)
            for name in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()
        ]

    try:
        mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    mallinfo2.restype = MallInfo2
    info = mallinfo2()
    return int(info.uordblks + info.hblkhd)


def measure(server: Any, certificate: str, count: int, connections: int) -> dict[str, float]:
    """
    Server CPU ms per handshake, full and resumed, and KiB held per idle
    connection (0 without glibc).
    """
    client = ssl.create_default_context(cafile=certificate)
    client.set_alpn_protocols(["imap"])
    _, _, first = handshake(server, client, None)
    session = first.session
    results: dict[str, float] = {}
    for kind in ("full", "resumed"):
        total, resumed = 0.0, 0
        for _ in range(count):
            cpu, _, connection = handshake(server, client, session if kind == "resumed" else None)
            total += cpu
            resumed += connection.session_reused
            if kind == "resumed":
                session = connection.session
        if resumed != (count if kind == "resumed" else 0):
            raise RuntimeError(f"{kind}: {resumed} of {count} handshakes resumed")
        results[kind] = 1000 * total / count
    gc.collect()
    before = _bytesInUse()
    held = [handshake(server, client, None)[1] for _ in range(connections)]
    gc.collect()
    after = _bytesInUse()
    results["idle"] = 0.0 if before is None or after is None else (after - before) / len(held) / 1024
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """
    Measure every server side with both certificates, print the table.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--count", type=int, default=500, help="handshakes of each kind (500)")
    parser.add_argument("--connections", type=int, default=2000, help="idle connections held (2000)")
    parser.add_argument("--servers", default=",".join(_SERVERS), help="comma-separated subset of: " + ", ".join(_SERVERS))
    options = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mailproxy-handshakes-") as name:
        directory = Path(name)
        certificates = {"ECDSA P-256": makeSelfSigned(str(directory), ["localhost"])}
        rsa = (str(directory / "rsa.pem"), str(directory / "rsa.key"))
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", rsa[1], "-out", rsa[0],
             "-days", "2", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"],
            check=True, capture_output=True,
        )  # fmt: skip
        certificates["RSA 2048"] = rsa
        print(f"pyOpenSSL on {SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode()}; ssl on {ssl.OPENSSL_VERSION}")
        print("| server side | certificate | full handshake, server CPU ms | resumed (ticket) ms | saved | KiB per idle connection |")
        print("|---|---|---|---|---|---|")
        for kind in options.servers.split(","):
            for label, (certificate, key) in certificates.items():
                result = measure(_SERVERS[kind](certificate, key), certificate, options.count, options.connections)
                saved = 1 - result["resumed"] / result["full"]
                print(
                    f"| {kind} | {label} | {result['full']:.3f} | {result['resumed']:.3f} | {saved:.0%}"
                    f" | {result['idle']:.1f} |"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
