"""
What clients that flood pipelined commands and never read cost the proxy
and everybody else.

One private Dovecot and mailproxy in front of it (IMAP, static router, plain
backend, C{forward = "none"}, as in C{benchmarks/run.py}). Two flooding
clients connect to the proxy, read the greeting, then write C{a CAPABILITY}
lines as fast as the proxy takes them and never read a reply. Meanwhile a
third client logs in and out one session after another. The table shows
the proxy's resident memory and CPU, and the third client's login latency,
before the flood and during it.

Without backpressure before login the proxy reads and answers the flood as
fast as it can, and buffers every reply in memory; with it, it stops
reading each flooding client once 64 KiB of replies wait for it.

Run from the repository root::

    /tmp/venv/bin/python benchmarks/flood.py [--quick] [--json flood.json]
"""

from __future__ import annotations

import argparse
import multiprocessing
import multiprocessing.connection
import select
import socket
import ssl
import sys
import threading
import time
from pathlib import Path
from typing import Any

import attrs

_HERE = Path(__file__).resolve().parent
_REPOSITORY = _HERE.parent
if str(_REPOSITORY) not in sys.path:
    sys.path.insert(0, str(_REPOSITORY))

from benchmarks import procstat  # noqa: E402
from benchmarks.load import Target, raiseFileLimit, runLogins, summarizeLogins  # noqa: E402
from benchmarks.run import (  # noqa: E402
    chosenSettings,
    formatNumber,
    startMailproxy,
    stopServers,
    workDirectory,
    writeReport,
)
from tests.integration.servers import Dovecot, Proxy, TestCA  # noqa: E402

PASSWORD = "pw"
#: What each flooding client pipelines, over and over.
FLOOD_COMMAND = b"a CAPABILITY\r\n"


@attrs.frozen
class Settings:
    """
    The sizes of one flood run.
    """

    flooders: int = 2
    duration: float = 15.0
    baseline: float = 3.0
    warmup: float = 1.0
    users: int = 10
    tls: str = "none"

    @classmethod
    def quick(cls) -> Settings:
        """
        Small counts: a smoke test.
        """
        return cls(duration=3.0, baseline=1.0, warmup=0.5)


def flood(target: Target, seconds: float, result: multiprocessing.connection.Connection) -> None:
    """
    Connect to C{target} (plain or implicit TLS), read the greeting, then
    pipeline L{FLOOD_COMMAND} for C{seconds} without reading; send back how
    many octets went out.
    """
    sock = socket.create_connection((target.host, target.port))
    context = target.clientContext()
    if context is not None:
        sock = context.wrap_socket(sock, server_hostname=target.serverName)
    sock.recv(4096)
    sock.setblocking(False)
    chunk = FLOOD_COMMAND * 4096
    offset = sent = 0
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        _, writable, _ = select.select([], [sock], [], min(left, 0.5))
        if not writable:
            continue
        try:
            # Whole lines only: a partial send goes on where it stopped.
            count = sock.send(chunk[offset:])
        except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
            continue
        except OSError:
            break
        sent += count
        offset = (offset + count) % len(chunk)
    result.send(sent)
    sock.close()


class Sampler(threading.Thread):
    """
    Samples a process tree's resident memory every quarter second.

    @ivar peak: the largest RSS seen, in bytes.
    """

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peak = 0
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, procstat.usage(self.pid).rss)
            self._done.wait(0.25)

    def finish(self) -> int:
        """
        Stop sampling; the peak RSS in bytes.
        """
        self._done.set()
        self.join()
        self.peak = max(self.peak, procstat.usage(self.pid).rss)
        return self.peak


def measureLogins(target: Target, seconds: float, pid: int) -> dict[str, Any]:
    """
    Sequential logins for C{seconds}, with the proxy's peak RSS and CPU
    share meanwhile.
    """
    sampler = Sampler(pid)
    before = procstat.usage(pid)
    started = time.monotonic()
    sampler.start()
    part = runLogins(target, 1, seconds, None, 0.0)
    peak = sampler.finish()
    after = procstat.usage(pid)
    summary = summarizeLogins([part])
    summary["maxms"] = round(max(part["latencies"]) * 1000, 3) if part["latencies"] else None
    summary["proxyRssMB"] = round(peak / 2**20, 1)
    summary["proxyCpuShare"] = round((after.cpu - before.cpu) / (time.monotonic() - started), 3)
    return summary


def measure(target: Target, proxyPid: int, settings: Settings) -> dict[str, Any]:
    """
    Logins alone, then logins while the flooders write to C{target}.
    """
    print("  flood: logins alone", file=sys.stderr, flush=True)
    alone = measureLogins(target, settings.baseline, proxyPid)
    print(f"  flood: logins while {settings.flooders} clients flood", file=sys.stderr, flush=True)
    context = multiprocessing.get_context("fork")
    pipes, workers = [], []
    for _ in range(settings.flooders):
        receiver, sender = context.Pipe(duplex=False)
        worker = context.Process(target=flood, args=(target, settings.warmup + settings.duration + 1.0, sender))
        worker.start()
        pipes.append(receiver)
        workers.append(worker)
    time.sleep(settings.warmup)
    flooded = measureLogins(target, settings.duration, proxyPid)
    flooded["floodedMB"] = round(sum(pipe.recv() for pipe in pipes) / 2**20, 1)
    for worker in workers:
        worker.join()
    return {"alone": alone, "flooded": flooded}


def markdownTable(results: dict[str, Any], settings: Settings) -> str:
    """
    The results as a markdown table: each metric alone and during the
    flood.
    """
    lines = [
        f"| IMAP ({settings.tls}), {settings.flooders} clients pipelining `a CAPABILITY` without reading | alone | during the flood |",
        "|---|---|---|",
    ]
    for field, label in (
        ("proxyRssMB", "proxy RSS MB (peak)"),
        ("proxyCpuShare", "proxy CPU (share of one core)"),
        ("p50ms", "another client's login p50 ms"),
        ("maxms", "another client's login max ms"),
        ("perSecond", "another client's logins/s"),
        ("floodedMB", "MB the flooders got the proxy to take"),
    ):
        cells = [label] + [formatNumber(results[phase].get(field)) for phase in ("alone", "flooded")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """
    Start Dovecot and mailproxy, measure, print the table.
    """
    parser = argparse.ArgumentParser(description="Proxy memory and login latency while clients flood commands unread.")
    parser.add_argument("--quick", action="store_true", help="small counts: a smoke test")
    parser.add_argument("--flooders", type=int, help="flooding clients (2)")
    parser.add_argument("--duration", type=float, help="seconds of flood measured (15)")
    parser.add_argument("--tls", choices=("none", "implicit"), help="the listener every client uses (none)")
    parser.add_argument("--json", help="write the raw results and the table to this file")
    parser.add_argument("--keep", help="keep the servers' files and logs in this directory")
    options = parser.parse_args(argv)
    settings = chosenSettings(options, Settings, ("flooders", "duration", "tls"))
    raiseFileLimit()

    directory, cleanup = workDirectory(options.keep, "mailproxy-flood-bench-")
    started = time.monotonic()
    ca = TestCA(str(directory / "ca"))
    users = [f"bench{i}" for i in range(settings.users)]
    dovecot = Dovecot(str(directory / "dovecot"), "floodbench", {user: PASSWORD for user in users}, ca=ca)
    proxy: Proxy | None = None
    try:
        dovecot.start()
        proxy, proxyPorts = startMailproxy(
            directory / "mailproxy", "imap", dovecot.imap, ca, {"connections_per_address": 0}
        )
        port = proxyPorts[settings.tls]
        target = Target("127.0.0.1", port, settings.tls, tuple(users), PASSWORD, ca.caPath, "localhost")
        results = measure(target, proxy.pid, settings)
    finally:
        stopServers([proxy, dovecot], cleanup)

    table = markdownTable(results, settings)
    print(table)
    failures = [f"{phase}: {results[phase]['errorKinds']}" for phase in results if results[phase].get("errors")]
    for line in failures:
        print(f"- login errors {line}")
    if options.json:
        writeReport(options.json, settings, started, results, failures, table)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
