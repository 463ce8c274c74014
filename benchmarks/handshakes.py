"""
The proxy's CPU per TLS handshake towards clients, full and resumed (a
session ticket): what a client that resumes saves the proxy.

The proxy's own server context (L{mailproxy._tls.serverOptions}) answers a
Python C{ssl} client over memory BIOs in this process; only the time the
server side spends in C{do_handshake} is counted (process CPU time), so
the client's work is left out. TLS 1.3, with a P-256 ECDSA certificate (what
C{makeSelfSigned} makes) and an RSA 2048 one.

Run from the repository root::

    /tmp/venv/bin/python benchmarks/handshakes.py [--count 500]
"""

from __future__ import annotations

import argparse
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

_REPOSITORY = Path(__file__).resolve().parent.parent
if str(_REPOSITORY) not in sys.path:
    sys.path.insert(0, str(_REPOSITORY))

from OpenSSL import SSL  # noqa: E402
from OpenSSL._util import lib  # noqa: E402

from mailproxy._tls import CertificateSource, makeSelfSigned, serverOptions  # noqa: E402


def handshake(options: object, client: ssl.SSLContext, session: ssl.SSLSession | None) -> tuple[float, ssl.SSLSession, bool]:
    """
    One handshake of a new client offering C{session}, and the proxy's
    first line after it (which brings the client its tickets).

    @return: the server's CPU seconds, the client's session, and whether
        the server resumed.
    """
    server = options.serverConnectionForTLS(None)  # type: ignore[attr-defined]
    server.set_accept_state()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    connection = client.wrap_bio(incoming, outgoing, server_hostname="localhost", session=session)
    cpu = 0.0
    for _ in range(6):
        try:
            connection.do_handshake()
        except ssl.SSLWantReadError:
            pass
        data = outgoing.read()
        if data:
            server.bio_write(data)
        began = time.process_time()
        try:
            server.do_handshake()
        except SSL.WantReadError:
            pass
        cpu += time.process_time() - began
        try:
            incoming.write(server.bio_read(65536))
        except SSL.WantReadError:
            pass
    server.send(b"* OK\r\n")
    incoming.write(server.bio_read(65536))
    connection.read(1024)
    return cpu, connection.session, bool(lib.SSL_session_reused(server._ssl))


def measure(certificate: str, key: str, count: int) -> dict[str, float]:
    """
    Server CPU ms per handshake, full and resumed, with this certificate.
    """
    options = serverOptions(CertificateSource(certificate, key, names=("localhost",)), [])
    client = ssl.create_default_context(cafile=certificate)
    _, session, _ = handshake(options, client, None)
    results: dict[str, float] = {}
    for kind in ("full", "resumed"):
        total, resumed = 0.0, 0
        for _ in range(count):
            cpu, newSession, reused = handshake(options, client, session if kind == "resumed" else None)
            total += cpu
            resumed += reused
            if kind == "resumed":
                session = newSession
        if resumed != (count if kind == "resumed" else 0):
            raise RuntimeError(f"{kind}: {resumed} of {count} handshakes resumed")
        results[kind] = 1000 * total / count
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """
    Measure both certificates, print the table.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--count", type=int, default=500, help="handshakes of each kind (500)")
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
        print("| certificate | full handshake, server CPU ms | resumed (ticket) ms | saved |")
        print("|---|---|---|---|")
        for label, (certificate, key) in certificates.items():
            result = measure(certificate, key, options.count)
            saved = 1 - result["resumed"] / result["full"]
            print(f"| {label} | {result['full']:.3f} | {result['resumed']:.3f} | {saved:.0%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
