"""
HTTP through mailproxy: JMAP session-resource requests per second and a
10 MB JMAP blob download's MB/s, straight to Cyrus, through mailproxy and
through nginx as a plain HTTP reverse proxy, in one run.

One private Cyrus IMAP 3.6 (C{tests/integration/cyrus.py}: its C{httpd}
with JMAP) with one account; mailproxy with a plain C{protocol = "http"}
listener (static router, the one backend, C{forward = "none"}); nginx
with C{proxy_pass} to the same C{httpd} (HTTP/1.1 and keep-alive towards
it, nothing buffered, no access log). Every request carries the account's
Basic credentials, so Cyrus checks the password on every path.

 - session resource: C{GET /jmap/} (about 2.5 KB of JSON), on keep-alive
   connections of C{--requests} requests each, C{--concurrency} of them in
   flight (L{benchmarks.load}'s non-blocking driver);
 - download: C{GET} of a 10 MB blob, one at a time on one connection,
   C{--downloads} times; MB/s of the whole transfer.

The paths are measured in turn, C{--rounds} times (each round a third of
the time and downloads by default), and the median round is shown: on a
busy machine the load changes from one minute to the next.

Run from the repository root::

    /tmp/venv/bin/python benchmarks/jmap.py [--quick] [--json jmap.json]

It prints a markdown table with the mailproxy/direct, nginx/direct and
mailproxy/nginx ratios. (Not C{http.py}: run as a script, this directory
comes first on C{sys.path}, and a module named C{http} there would hide
the standard library's from every benchmark.)
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
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

from benchmarks import procstat  # noqa: E402
from benchmarks.load import (  # noqa: E402
    Connection,
    Driver,
    ProtocolError,
    Step,
    Target,
    cpuSeconds,
    percentile,
    raiseFileLimit,
    summarizeLogins,
)
from benchmarks.run import chosenSettings, formatNumber, stopServers, workDirectory, writeReport  # noqa: E402
from tests.integration.cyrus import Cyrus  # noqa: E402
from tests.integration.servers import Proxy, _dieWithParent, _stopProcess, _waitForPorts, freePort  # noqa: E402

PATHS = ("direct", "mailproxy", "nginx")
USER = "bench@example.org"
PASSWORD = "bench-secret"
DOWNLOAD_SIZE = 10 * 1024 * 1024


@attrs.frozen
class Settings:
    """
    The sizes of one HTTP run.
    """

    concurrency: int = 10
    duration: float = 10.0
    warmup: float = 1.0
    requests: int = 50
    downloads: int = 21
    rounds: int = 3

    @classmethod
    def quick(cls) -> Settings:
        """
        Small counts: a smoke test of every path.
        """
        return cls(duration=1.5, warmup=0.3, requests=10, downloads=3, rounds=1)


class NginxHTTP:
    """
    nginx as a plain HTTP reverse proxy to one backend on 127.0.0.1.

    @ivar port: its port, once started.
    @ivar pid: the master process id, once started.
    """

    def __init__(self, directory: Path, backendPort: int) -> None:
        self.directory = directory
        self.backendPort = backendPort
        self.logPath = directory / "error.log"
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """
        Write the configuration, start nginx and wait for its port.
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = freePort()
        temporary = "".join(
            f"    {kind}_temp_path {self.directory}/{kind};\n"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        (self.directory / "nginx.conf").write_text(
            "daemon off;\nmaster_process on;\nworker_processes 1;\n"
            f"pid {self.directory}/nginx.pid;\nerror_log {self.logPath} warn;\n"
            "events { worker_connections 1024; }\n"
            "http {\n    access_log off;\n" + temporary
            + f"    upstream backend {{ server 127.0.0.1:{self.backendPort}; keepalive 32; }}\n"
            "    server {\n"
            f"        listen 127.0.0.1:{self.port};\n"
            "        location / {\n"
            "            proxy_pass http://backend;\n"
            "            proxy_http_version 1.1;\n"
            '            proxy_set_header Connection "";\n'
            "            proxy_set_header Host $http_host;\n"
            "            proxy_buffering off;\n"
            "            proxy_request_buffering off;\n"
            "        }\n    }\n}\n"
        )
        with open(self.logPath, "ab") as log:
            self._process = subprocess.Popen(
                ["nginx", "-p", f"{self.directory}/", "-c", str(self.directory / "nginx.conf"), "-e", str(self.logPath)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_dieWithParent,
            )
        self.pid = self._process.pid
        _waitForPorts(self._process, [self.port], timeout=20, describe="nginx", log=self.logPath)

    def stop(self) -> None:
        """
        Stop nginx.
        """
        if self._process is not None:
            _stopProcess(self._process)
            self._process = None


def _authorization() -> bytes:
    return b"Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode())


def _readResponse(connection: Connection) -> Step:
    """
    Read one response with a C{Content-Length} body; its status and body
    length.
    """
    status = yield from connection.readLine()
    if not status.startswith(b"HTTP/1.1 200"):
        raise ProtocolError(status.decode("latin-1")[:200])
    length = None
    while (line := (yield from connection.readLine())) != b"":
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    if length is None:
        raise ProtocolError("no Content-Length")
    while len(connection.buffer) < length:
        yield from connection._recv()
    del connection.buffer[:length]
    return length


def sessionSteps(requests: int, answered: list[tuple[float, float]]) -> Any:
    """
    The steps of one keep-alive connection asking for the session resource
    C{requests} times, one after the other; each answer's start and end
    times go to C{answered}.
    """
    request = (
        b"GET /jmap/ HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: " + _authorization() + b"\r\n"
        b"Accept: application/json\r\n\r\n"
    )

    def steps(connection: Connection, index: int) -> Step:
        yield from connection.connect()
        for _ in range(requests):
            started = time.monotonic()
            yield from connection.sendAll(request)
            yield from _readResponse(connection)
            answered.append((started, time.monotonic()))

    return steps


def runSessionRequests(port: int, settings: Settings) -> dict[str, Any]:
    """
    Session-resource requests for C{warmup} + C{duration} seconds; the
    summary of L{summarizeLogins} (per connection) with the requests
    answered within the measured window: C{requestsPerSecond}, and their
    latency C{requestP50ms} and C{requestP99ms}.
    """
    target = Target("127.0.0.1", port, "none", (USER,), PASSWORD, None, None)
    answered: list[tuple[float, float]] = []
    driver = Driver(sessionSteps(settings.requests, answered), target, settings.concurrency)
    now = time.monotonic()
    driver.recordFrom = now + settings.warmup
    stopAt = driver.recordUntil = now + settings.warmup + settings.duration
    cpuBefore = cpuSeconds()
    while True:
        running = time.monotonic() < stopAt
        while running and driver.inFlight < settings.concurrency:
            driver.start()
        if driver.inFlight == 0 and not running:
            break
        driver.poll(0.2)
        driver.expire()
    summary = summarizeLogins(
        [
            {
                "ok": len(driver.latencies),
                "completed": driver.completed,
                "window": settings.duration,
                "latencies": driver.latencies,
                "errors": dict(driver.errors),
                "clientCpu": cpuSeconds() - cpuBefore,
            }
        ]
    )
    measured = [end - start for start, end in answered if driver.recordFrom <= end <= driver.recordUntil]
    summary["requests"] = len(measured)
    # All of them, warm-up included: what the proxy's CPU time was spent on.
    summary["answered"] = len(answered)
    summary["requestsPerSecond"] = round(len(measured) / settings.duration, 1)
    p50, p99 = (percentile(measured, fraction) for fraction in (0.50, 0.99))
    summary["requestP50ms"] = None if p50 is None else round(p50 * 1000, 2)
    summary["requestP99ms"] = None if p99 is None else round(p99 * 1000, 2)
    return summary


def runDownloads(port: int, blobId: str, settings: Settings) -> dict[str, Any]:
    """
    Download the blob C{settings.downloads} times on one connection; MB/s.
    """
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    path = f"/jmap/download/{USER}/{blobId}/bench.bin?accept=application/octet-stream"
    headers = {"Authorization": _authorization().decode()}
    started = time.monotonic()
    total = 0
    try:
        for _ in range(settings.downloads):
            connection.request("GET", path, headers=headers)
            response = connection.getresponse()
            if response.status != 200:
                raise ProtocolError(f"download: {response.status} {response.reason}")
            while block := response.read(1 << 16):
                total += len(block)
    finally:
        connection.close()
    seconds = time.monotonic() - started
    if total != DOWNLOAD_SIZE * settings.downloads:
        raise ProtocolError(f"downloaded {total} octets, not {DOWNLOAD_SIZE * settings.downloads}")
    return {"seconds": round(seconds, 3), "megabytes": total / 1e6, "mbPerSecond": round(total / 1e6 / seconds, 1)}


def uploadBlob(port: int) -> str:
    """
    Upload the 10 MB blob straight to Cyrus; its id.
    """
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.request(
            "POST",
            f"/jmap/upload/{USER}/",
            body=os.urandom(DOWNLOAD_SIZE),
            headers={"Authorization": _authorization().decode(), "Content-Type": "application/octet-stream"},
        )
        response = connection.getresponse()
        body = response.read()
        if response.status != 201:
            raise ProtocolError(f"upload: {response.status} {body[:200]!r}")
        return str(json.loads(body)["blobId"])
    finally:
        connection.close()


def startMailproxy(directory: Path, backendPort: int) -> Proxy:
    """
    mailproxy with one plain HTTP listener (port 0) and Cyrus as its only
    backend.
    """
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "routes.toml").write_text('default = "cyrus"\n')
    proxy = Proxy(
        str(directory),
        '[proxy]\nhostname = "proxy.example.org"\n'
        "[limits]\nconnections_per_address = 0\n"
        '[[listener]]\nprotocol = "http"\nendpoint = "tcp:0:interface=127.0.0.1"\ntls = "none"\n'
        '[http]\ndefault_backend = "cyrus"\n'
        '[router]\ntype = "static"\npath = "routes.toml"\n'
        f'[backend.cyrus]\nhost = "127.0.0.1"\nports = {{ http = {backendPort} }}\nforward = "none"\n',
    )
    proxy.start()
    return proxy


def measure(ports: dict[str, int], blobId: str, settings: Settings, pids: dict[str, int]) -> dict[str, dict[str, Any]]:
    """
    Both workloads on every path, in C{settings.rounds} rounds that take
    the paths in turn (so that a change in the machine's load meanwhile
    touches every path alike); per path, the round with the median
    requests/s and download MB/s, and every round's figures.
    """
    perRound = attrs.evolve(
        settings,
        duration=settings.duration / settings.rounds,
        downloads=max(1, settings.downloads // settings.rounds),
    )
    rounds: dict[str, dict[str, list[dict[str, Any]]]] = {name: {"session": [], "download": []} for name in ports}
    for number in range(settings.rounds):
        for name, port in ports.items():
            print(f"  http round {number + 1}: session resource, 10 MB download: {name}", file=sys.stderr, flush=True)
            pid = pids.get(name)
            before = procstat.usage(pid) if pid else None
            summary = runSessionRequests(port, perRound)
            after = procstat.usage(pid) if pid else None
            summary["proxyCpuMsPerRequest"] = procstat.cpuMsPer(before, after, summary["answered"])
            rounds[name]["session"].append(summary)
            rounds[name]["download"].append(runDownloads(port, blobId, perRound))
    results: dict[str, dict[str, Any]] = {}
    for name, parts in rounds.items():
        session = sorted(parts["session"], key=lambda s: s["requestsPerSecond"])
        download = sorted(parts["download"], key=lambda d: d["mbPerSecond"])
        results[name] = {
            "session": session[len(session) // 2],
            "download": download[len(download) // 2],
            "rounds": parts,
        }
    return results


def markdownTable(results: dict[str, dict[str, Any]]) -> str:
    """
    The results as a markdown table with ratios.
    """
    lines = [
        "| HTTP metric | direct | mailproxy | nginx | mailproxy/direct | nginx/direct | mailproxy/nginx |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, part, field in (
        ("JMAP session resource, requests/s", "session", "requestsPerSecond"),
        ("session resource p50 ms", "session", "requestP50ms"),
        ("session resource p99 ms", "session", "requestP99ms"),
        ("proxy CPU ms/request", "session", "proxyCpuMsPerRequest"),
        ("10 MB blob download, MB/s", "download", "mbPerSecond"),
    ):
        values = [results.get(path, {}).get(part, {}).get(field) for path in PATHS]
        direct, proxied, nginx = values

        def ratio(a: float | None, b: float | None) -> float | None:
            return a / b if a is not None and b else None

        cells = [label, *(formatNumber(v) for v in values)]
        cells += [formatNumber(ratio(a, b)) for a, b in ((proxied, direct), (nginx, direct), (proxied, nginx))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """
    Start Cyrus, mailproxy and nginx, measure, print the table.
    """
    parser = argparse.ArgumentParser(description="HTTP (JMAP) through mailproxy vs direct Cyrus vs nginx proxy_pass.")
    parser.add_argument("--quick", action="store_true", help="small counts: a smoke test")
    parser.add_argument("--concurrency", type=int, help="connections in flight (10)")
    parser.add_argument("--duration", type=float, help="measured seconds of session requests per path, over all rounds (10)")
    parser.add_argument("--warmup", type=float, help="unmeasured seconds before (1)")
    parser.add_argument("--requests", type=int, help="session-resource requests per keep-alive connection (50)")
    parser.add_argument("--downloads", type=int, help="10 MB downloads per path, over all rounds (21)")
    parser.add_argument("--rounds", type=int, help="rounds taking the paths in turn; the median is shown (3)")
    parser.add_argument("--json", help="write the raw results and the table to this file")
    parser.add_argument("--keep", help="keep the servers' files and logs in this directory")
    options = parser.parse_args(argv)
    settings = chosenSettings(options, Settings, ("concurrency", "duration", "warmup", "requests", "downloads", "rounds"))
    raiseFileLimit()

    directory, cleanup = workDirectory(options.keep, "mailproxy-jmap-bench-")
    started = time.monotonic()
    # Cyrus's default process reuse: one account, created once.
    cyrus = Cyrus(str(directory / "cyrus"), "bench", {USER: PASSWORD}, reuseProcesses=True)
    proxy: Proxy | None = None
    nginx: NginxHTTP | None = None
    try:
        cyrus.start()
        cyrus.provision(USER, b"From: bench@example.org\r\nSubject: http benchmark\r\n\r\nHello.\r\n")
        blobId = uploadBlob(cyrus.http)
        proxy = startMailproxy(directory / "mailproxy", cyrus.http)
        nginx = NginxHTTP(directory / "nginx", cyrus.http)
        nginx.start()
        ports = {"direct": cyrus.http, "mailproxy": proxy.ports[0], "nginx": nginx.port}
        results = measure(ports, blobId, settings, pids={"mailproxy": proxy.pid, "nginx": nginx.pid})
    finally:
        stopServers([nginx, proxy, cyrus], cleanup)

    table = markdownTable(results)
    print(table)
    failures = [
        f"{name} session: {summary['errors']} errors {summary['errorKinds']}"
        for name, parts in results.items()
        for summary in [parts["session"]]
        if summary.get("errors")
    ]
    for line in failures:
        print(f"- errors: {line}")
    if options.json:
        writeReport(options.json, settings, started, results, failures, table)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
