"""
The floor under mailproxy's CPU per plain login: a bare Twisted relay of the
same IMAP LOGIN (benchmarks/floorrelay.py: greet, read one line, connect,
send it, pass the answer, relay; nothing else) measured beside mailproxy and
nginx's mail proxy, each with one process, in the same run.

    python benchmarks/floor.py [--rounds 3] [--duration 5] [--tls none,implicit] [--json out.json]

The paths are measured in turn, round after round (the machine's noise
moves every path alike within a round), with the same load as
benchmarks/run.py (C{load.py logins}: connect, LOGIN, LOGOUT, plain,
C{--concurrency} clients), plain and with implicit TLS (the relay with
mailproxy's TLS settings and Twisted's TLS layer); each path's best round
is reported. The relay runs on mailproxy's reactor and transports
(C{floor}) and on Twisted's own (C{floor-stock}). What it shows: how much of mailproxy's CPU per login is
its own work, and how close to nginx a Twisted program on CPython can get
at all.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import attrs

_HERE = Path(__file__).resolve().parent
_REPOSITORY = _HERE.parent
if str(_REPOSITORY) not in sys.path:
    sys.path.insert(0, str(_REPOSITORY))

from benchmarks.load import raiseFileLimit  # noqa: E402
from benchmarks.nginx import Nginx  # noqa: E402
from benchmarks.run import Bench, Endpoint, Settings, startDovecot, workDirectory, writeReport  # noqa: E402
from benchmarks.workers import startMailproxy  # noqa: E402
from tests.integration.servers import TestCA  # noqa: E402

#: The paths measured, in the table's order.
PATHS = ("mailproxy", "floor", "floor-stock", "nginx")


class FloorRelay:
    """
    benchmarks/floorrelay.py in a subprocess.
    """

    def __init__(self, backendPort: int, stock: bool, certificate: tuple[str, str]) -> None:
        command = [sys.executable, str(_HERE / "floorrelay.py"), "0", str(backendPort), "--tls", *certificate]
        self.process = subprocess.Popen(command + (["--stock"] if stock else []), stdout=subprocess.PIPE, cwd=_REPOSITORY)
        assert self.process.stdout is not None
        ready = self.process.stdout.readline().split()
        if ready[:1] != [b"ready"]:
            raise RuntimeError(f"floorrelay.py did not start (status {self.process.wait()})")
        self.ports = {"none": int(ready[1]), "implicit": int(ready[2])}
        self.pid = self.process.pid

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


def table(results: dict[str, dict[str, list[dict[str, Any]]]]) -> str:
    """
    Per TLS mode, each path's best round: logins per second, CPU per
    login, and the CPU as a multiple of nginx's and of the floor's.
    """

    def ratio(a: float | None, b: float | None) -> str:
        return f"{a / b:.2f}" if a is not None and b else ""

    lines = [
        "| TLS | path | logins/s | CPU ms/login (best round) | every round | x nginx | x floor |",
        "|---|---|---:|---:|---|---:|---:|",
    ]
    for mode, byPath in results.items():
        best = {
            path: min(rounds, key=lambda r: r["proxyCpuMsPerLogin"]) for path, rounds in byPath.items() if rounds
        }
        cpu = {path: result["proxyCpuMsPerLogin"] for path, result in best.items()}
        for path in PATHS:
            if path not in best:
                continue
            rounds = ", ".join(f"{r['proxyCpuMsPerLogin']:.3f}" for r in byPath[path])
            lines.append(
                f"| {mode} | {path} | {best[path]['perSecond']:.0f} | {cpu[path]:.3f} | {rounds} | "
                f"{ratio(cpu[path], cpu.get('nginx'))} | {ratio(cpu[path], cpu.get('floor'))} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """
    Start Dovecot, mailproxy, the two relays and nginx; measure; print the
    table.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tls", default="none,implicit", help="TLS modes measured: none, implicit")
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds per path and round")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--json", help="also write the raw results and the table here")
    parser.add_argument("--keep", help="keep the servers' files (logs) in this directory")
    options = parser.parse_args(argv)
    settings = attrs.evolve(Settings(), duration=options.duration, concurrency=options.concurrency)
    raiseFileLimit()
    directory, cleanup = workDirectory(options.keep, "mailproxy-floor-")
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    started = time.monotonic()
    ca = TestCA(str(directory / "ca"))
    servers: list[Any] = []
    bench = Bench(settings, directory, ca.caPath)
    modes = [mode.strip() for mode in options.tls.split(",") if mode.strip()]
    results: dict[str, dict[str, list[dict[str, Any]]]] = {mode: {path: [] for path in PATHS} for mode in modes}
    try:
        dovecot, bench.dovecotPid = startDovecot(directory / "dovecot", ca, settings.users)
        servers.append(dovecot)
        proxy, ports = startMailproxy(directory / "mailproxy", 1, dovecot.imap, ca)
        servers.append(proxy)
        paths = [Endpoint("mailproxy", ports, proxy.pid)]
        relayCertificate = ca.issue("floor")
        for name, stock in (("floor", False), ("floor-stock", True)):
            relay = FloorRelay(dovecot.imap, stock, relayCertificate)
            servers.append(relay)
            paths.append(Endpoint(name, relay.ports, relay.pid))
        certificate, key = ca.issue("nginx")
        nginx = Nginx(str(directory / "nginx"), dovecot.imap, certificate, key, workers=1)
        nginx.start()
        servers.append(nginx)
        paths.append(Endpoint("nginx", {"none": nginx.plain, "implicit": nginx.ssl}, nginx.pid))
        for mode in modes:
            for number in range(options.rounds):
                for path in paths:
                    print(f"  {mode}, round {number + 1}: {path.name}", file=sys.stderr, flush=True)
                    bench.results = {path.name: {}}
                    bench.logins(path, mode)
                    results[mode][path.name].append(bench.results[path.name][f"logins.{mode}"])
    finally:
        for server in reversed(servers):
            server.stop()
        if cleanup is not None:
            cleanup.cleanup()
    text = table(results)
    print(text)
    print(f"\n{os.cpu_count()} CPUs; {settings.concurrency} clients, {settings.duration:.0f} s per path and round")
    for line in bench.failures:
        print(f"- errors: {line}")
    if options.json:
        writeReport(options.json, settings, started, results, bench.failures, text)
    return 1 if bench.failures else 0


if __name__ == "__main__":
    sys.exit(main())
