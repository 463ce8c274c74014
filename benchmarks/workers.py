"""
Worker processes: IMAP logins per second and CPU per login through
mailproxy with C{[proxy] workers = 1} and C{workers = 2}, against Dovecot
reached directly and through nginx with C{worker_processes 2}, in one run,
as ratios.

    python benchmarks/workers.py [--quick] [--json out.json]

Each path is measured in turn with the same load (C{load.py logins}: connect,
LOGIN, LOGOUT, C{--concurrency} clients) against one Dovecot; the proxies
sit idle while the others are measured. CPU per login is the proxy's
processes' (the parent and its workers; nginx's master and workers) over
the logins completed. See benchmarks/README.md ("Worker processes") for
why the gain is bounded on a small machine.
"""

from __future__ import annotations

import argparse
import os
import signal
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
from benchmarks.run import (  # noqa: E402
    TLS_MODES,
    Bench,
    Endpoint,
    Settings,
    mailproxyConfig,
    startDovecot,
    workDirectory,
    writeReport,
)
from tests.integration.servers import Proxy, TestCA  # noqa: E402

#: The paths measured, in the table's order.
PATHS = ("direct", "mailproxy-1", "mailproxy-2", "nginx-2")


def startMailproxy(directory: Path, workers: int, backendPort: int, ca: TestCA) -> tuple[Proxy, dict[str, int]]:
    """
    mailproxy with C{workers} worker processes in front of Dovecot (the
    configuration of benchmarks/run.py).
    """
    certificate, key = ca.issue("mailproxy")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "routes.toml").write_text('default = "dovecot"\n')
    limits = {"connections_per_address": 0, "preauth_timeout": 300, "idle_timeout": 3600}
    proxy = Proxy(str(directory), mailproxyConfig("imap", {mode: 0 for mode in TLS_MODES}, backendPort, certificate, key, limits, workers))
    proxy.start()
    return proxy, dict(zip(TLS_MODES, proxy.ports))


def table(results: dict[str, dict[str, Any]], tls: list[str]) -> str:
    """
    The results as a Markdown table: per TLS mode and path, logins per
    second, the ratio to direct, CPU per login and its ratio to nginx's.
    """
    lines = [
        "| TLS | path | logins/s | x direct | x mailproxy-1 | proxy CPU ms/login | x nginx-2 CPU |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for mode in tls:
        key = f"logins.{mode}"
        rate = {path: results.get(path, {}).get(key, {}).get("perSecond") for path in PATHS}
        cpu = {path: results.get(path, {}).get(key, {}).get("proxyCpuMsPerLogin") for path in PATHS}
        for path in PATHS:
            if rate[path] is None:
                continue

            def ratio(a: float | None, b: float | None) -> str:
                return f"{a / b:.2f}" if a is not None and b else ""

            lines.append(
                f"| {mode} | {path} | {rate[path]:.0f} | {ratio(rate[path], rate['direct'])} | "
                f"{ratio(rate[path], rate['mailproxy-1'])} | "
                f"{'' if cpu[path] is None else format(cpu[path], '.3f')} | {ratio(cpu[path], cpu['nginx-2'])} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """
    Start Dovecot, the two mailproxies and nginx; measure; print the table.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--quick", action="store_true", help="small counts: a smoke test")
    parser.add_argument("--tls", default="none,implicit", help="TLS modes measured: none, starttls, implicit")
    parser.add_argument("--concurrency", type=int)
    parser.add_argument("--duration", type=float)
    parser.add_argument("--procs", type=int, help="load generator processes (default 2: one client cannot load two workers)")
    parser.add_argument("--json", help="also write the raw results and the table here")
    parser.add_argument("--keep", help="keep the servers' files (logs) in this directory")
    options = parser.parse_args(argv)
    settings = Settings.quick() if options.quick else Settings(duration=8.0)
    settings = attrs.evolve(
        settings,
        **{
            name: value
            for name, value in (("concurrency", options.concurrency), ("duration", options.duration), ("procs", options.procs or 2))
            if value is not None
        },
    )
    modes = [mode.strip() for mode in options.tls.split(",") if mode.strip()]
    raiseFileLimit()
    directory, cleanup = workDirectory(options.keep, "mailproxy-workers-")
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    started = time.monotonic()
    ca = TestCA(str(directory / "ca"))
    servers: list[Any] = []
    bench = Bench(settings, directory, ca.caPath)
    bench.results = {path: {} for path in PATHS}
    try:
        dovecot, bench.dovecotPid = startDovecot(directory / "dovecot", ca, settings.users)
        servers.append(dovecot)
        paths = [Endpoint("direct", {"none": dovecot.imap, "starttls": dovecot.imap, "implicit": dovecot.imaps}, None)]
        for workers in (1, 2):
            proxy, ports = startMailproxy(directory / f"mailproxy-{workers}", workers, dovecot.imap, ca)
            servers.append(proxy)
            paths.append(Endpoint(f"mailproxy-{workers}", ports, proxy.pid))
        certificate, key = ca.issue("nginx")
        nginx = Nginx(str(directory / "nginx"), dovecot.imap, certificate, key, workers=2)
        nginx.start()
        servers.append(nginx)
        paths.append(Endpoint("nginx-2", {"none": nginx.plain, "starttls": nginx.starttls, "implicit": nginx.ssl}, nginx.pid))
        for mode in modes:
            for path in paths:
                print(f"  logins {mode}: {path.name}", file=sys.stderr, flush=True)
                bench.logins(path, mode)
    finally:
        for server in reversed(servers):
            server.stop()
        if cleanup is not None:
            cleanup.cleanup()
    text = table(bench.results, modes)
    print(text)
    print(
        f"\n{os.cpu_count()} CPUs; {settings.concurrency} clients in {settings.procs} load processes, "
        f"{settings.duration:.0f} s per path"
    )
    for line in bench.failures:
        print(f"- errors: {line}")
    if options.json:
        writeReport(options.json, settings, started, bench.results, bench.failures, text)
    return 1 if bench.failures else 0


if __name__ == "__main__":
    sys.exit(main())
