"""
POP3 logins per second, straight to Dovecot, through mailproxy and through
nginx's mail proxy, in one run.

One private Dovecot (its pop3-login and pop3 services tuned like the IMAP
benchmark's), mailproxy with three POP3 listeners (plain, STLS, implicit
TLS; static router, one backend reached in plain POP3, C{forward = "none"})
and nginx with the same three (one worker process, C{auth_http} answered by
nginx itself with the one backend), so that Dovecot checks every password
on every path. Each session connects,
reads the greeting, does STLS or the TLS handshake as the mode says, sends
C{USER} and C{PASS} in one write (both servers offer PIPELINING), says
C{QUIT} and waits for the server to close. The load generator is
L{benchmarks.load}'s non-blocking driver with a POP3 session.

Run from the repository root::

    /tmp/venv/bin/python benchmarks/pop3.py [--quick] [--json pop3.json]

It prints a markdown table (logins/s, latency and CPU per login per TLS
mode, on each path, with mailproxy's ratios to direct and to nginx, and
issue 11's CPU targets judged: a plain login at most twice nginx's CPU, a
TLS login at most 1.3 times). L{measure} runs the same measurements
against servers someone else started, for C{benchmarks/run.py}.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import attrs

_HERE = Path(__file__).resolve().parent
_REPOSITORY = _HERE.parent
if str(_REPOSITORY) not in sys.path:
    sys.path.insert(0, str(_REPOSITORY))

from benchmarks import procstat  # noqa: E402
from benchmarks.nginx import Nginx  # noqa: E402
from benchmarks.load import (  # noqa: E402
    Connection,
    Driver,
    ProtocolError,
    Step,
    Target,
    cpuSeconds,
    raiseFileLimit,
    summarizeLogins,
)
from benchmarks.run import (  # noqa: E402
    TLS_MODES,
    chosenSettings,
    formatNumber,
    startMailproxy,
    stopServers,
    workDirectory,
    writeReport,
)
from tests.integration.servers import Dovecot, Proxy, TestCA  # noqa: E402

PATHS = ("direct", "mailproxy", "nginx")
PASSWORD = "pw"

#: Dovecot settings so that Dovecot's POP3 side is not the bottleneck:
#: long-lived login processes serving many clients and pop3 processes
#: reused between sessions, as the IMAP benchmark does for imap.
POP3_TUNING = """
service pop3-login {
  service_count = 0
  process_min_avail = 2
  process_limit = 8
  client_limit = 6000
  vsz_limit = 1G
}
service pop3 {
  service_count = 0
  client_limit = 1
  process_limit = 2000
  process_min_avail = 25
}
mail_max_userip_connections = 100000
"""


#: nginx's configuration: the three POP3 listeners of L{Pop3Nginx}, the
#: TLS settings of benchmarks/nginx.conf.in.
NGINX_CONFIG = """\
load_module /usr/lib/nginx/modules/ngx_mail_module.so;
daemon off;
master_process on;
worker_processes 1;
worker_rlimit_nofile 20000;
pid {dir}/nginx.pid;
error_log {dir}/error.log info;
events {{ worker_connections 10000; }}
http {{
    access_log off;
    client_body_temp_path {dir}/tmp/body;
    proxy_temp_path {dir}/tmp/proxy;
    fastcgi_temp_path {dir}/tmp/fastcgi;
    uwsgi_temp_path {dir}/tmp/uwsgi;
    scgi_temp_path {dir}/tmp/scgi;
    server {{
        listen 127.0.0.1:{authPort};
        location = /auth {{
            add_header Auth-Status OK;
            add_header Auth-Server 127.0.0.1;
            add_header Auth-Port {backend};
            return 204;
        }}
    }}
}}
mail {{
    server_name localhost;
    auth_http 127.0.0.1:{authPort}/auth;
    proxy_pass_error_message on;
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_certificate {certificate};
    ssl_certificate_key {key};
    pop3_auth plain;
    server {{ listen 127.0.0.1:{plain} backlog=4096; protocol pop3; starttls off; }}
    server {{ listen 127.0.0.1:{starttls} backlog=4096; protocol pop3; starttls on; }}
    server {{ listen 127.0.0.1:{ssl} ssl backlog=4096; protocol pop3; }}
}}
"""


class Pop3Nginx(Nginx):
    """
    nginx proxying POP3 to one backend: the parent class's ports C{plain},
    C{starttls} and C{ssl} are POP3 without TLS, with STLS offered and
    with implicit TLS.
    """

    def configuration(self, authPort: int) -> str:
        """
        The text of C{nginx.conf}.
        """
        return NGINX_CONFIG.format(
            dir=self.directory, authPort=authPort, certificate=self.certificate, key=self.key,
            backend=self.backendPort, plain=self.plain, starttls=self.starttls, ssl=self.ssl,
        )  # fmt: skip


@attrs.frozen
class Settings:
    """
    The sizes of one POP3 run.
    """

    concurrency: int = 20
    duration: float = 10.0
    warmup: float = 1.0
    users: int = 50

    @classmethod
    def quick(cls) -> Settings:
        """
        Small counts: a smoke test of every path.
        """
        return cls(duration=1.5, warmup=0.3)


def _expectOK(line: bytes, what: str) -> None:
    if not line.startswith(b"+OK"):
        raise ProtocolError(f"{what}: " + line.decode("utf-8", "replace")[:200])


def pop3LoginSteps(connection: Connection, index: int) -> Step:
    """
    One full POP3 session: connect, greeting, STLS or TLS as the target
    says, USER and PASS pipelined, QUIT, wait for the close.
    """
    target = connection.target
    context = target.clientContext()
    yield from connection.connect()
    if target.tls == "implicit":
        assert context is not None
        yield from connection.startTLS(context)
    _expectOK((yield from connection.readLine()), "greeting")
    if target.tls == "starttls":
        assert context is not None
        yield from connection.sendAll(b"STLS\r\n")
        _expectOK((yield from connection.readLine()), "STLS")
        yield from connection.startTLS(context)
    user = target.user(index).encode("utf-8")
    yield from connection.sendAll(b"USER " + user + b"\r\nPASS " + target.password.encode("utf-8") + b"\r\n")
    _expectOK((yield from connection.readLine()), "USER")
    _expectOK((yield from connection.readLine()), "PASS")
    yield from connection.sendAll(b"QUIT\r\n")
    _expectOK((yield from connection.readLine()), "QUIT")
    yield from connection.waitClosed()


def runLogins(target: Target, concurrency: int, duration: float, warmup: float) -> dict[str, Any]:
    """
    Run POP3 login sessions for C{warmup} + C{duration} seconds at
    C{concurrency} and summarise what was recorded after the warm-up (the
    same fields as C{load.py logins}: C{perSecond}, C{p50ms}, ...).
    """
    driver = Driver(pop3LoginSteps, target, concurrency)
    now = time.monotonic()
    driver.recordFrom = now + warmup
    stopAt = driver.recordUntil = now + warmup + duration
    cpuBefore = cpuSeconds()
    while True:
        running = time.monotonic() < stopAt
        while running and driver.inFlight < concurrency:
            driver.start()
        if driver.inFlight == 0 and not running:
            break
        driver.poll(0.2)
        driver.expire()
    part = {
        "ok": len(driver.latencies),
        "completed": driver.completed,
        "window": duration,
        "latencies": driver.latencies,
        "errors": dict(driver.errors),
        "clientCpu": cpuSeconds() - cpuBefore,
    }
    return summarizeLogins([part])


def measure(
    ports: dict[str, dict[str, int]],
    caFile: str,
    users: Sequence[str],
    settings: Settings,
    pids: dict[str, int | None] | None = None,
    dovecotPid: int | None = None,
) -> dict[str, dict[str, Any]]:
    """
    Logins per second for every path and TLS mode.

    @param ports: per path (C{direct}, C{mailproxy}, C{nginx}), the port of
        each TLS mode (C{none}, C{starttls}, C{implicit}).
    @param pids: per path, the proxy process whose CPU per login to report.
    @return: per path, C{"pop3.logins.<mode>"} to the summary.
    """
    results: dict[str, dict[str, Any]] = {name: {} for name in ports}
    for tls in TLS_MODES:
        for name, modes in ports.items():
            print(f"  pop3 logins {tls}: {name}", file=sys.stderr, flush=True)
            target = Target("127.0.0.1", modes[tls], tls, tuple(users), PASSWORD, caFile, "localhost")
            pid = (pids or {}).get(name)
            before = (procstat.usage(pid) if pid else None, procstat.usage(dovecotPid) if dovecotPid else None)
            summary = runLogins(target, settings.concurrency, settings.duration, settings.warmup)
            after = (procstat.usage(pid) if pid else None, procstat.usage(dovecotPid) if dovecotPid else None)
            completed = max(1, summary["completed"])
            summary["proxyCpuMsPerLogin"] = procstat.cpuMsPer(before[0], after[0], completed)
            summary["dovecotCpuMsPerLogin"] = procstat.cpuMsPer(before[1], after[1], completed)
            summary["clientCpuShare"] = round(summary["clientCpu"] / (settings.duration + settings.warmup), 3)
            results[name][f"pop3.logins.{tls}"] = summary
    return results


def markdownTable(results: dict[str, dict[str, Any]]) -> str:
    """
    The results as a markdown table: one row per metric and TLS mode, with
    mailproxy's ratios to direct and to nginx and the targets: for plain
    logins/s the one the IMAP benchmark sets (at least 0.75 of direct), for
    the proxy's CPU per login issue 11's (at most twice nginx's for a plain
    login, 1.3 times for a TLS one).
    """
    modeNames = {"none": "plain", "starttls": "STLS", "implicit": "implicit TLS"}
    lines = [
        "| POP3 metric | direct | mailproxy | nginx | mailproxy/direct | mailproxy/nginx | target | result |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    def judged(value: float | None, bound: float) -> str:
        return "n/a" if value is None else ("PASS" if value <= bound else "MISS")

    for tls in TLS_MODES:
        key = f"pop3.logins.{tls}"
        for field, label in (
            ("perSecond", "logins/s"),
            ("p50ms", "login p50 ms"),
            ("p99ms", "login p99 ms"),
            ("proxyCpuMsPerLogin", "proxy CPU ms/login"),
            ("dovecotCpuMsPerLogin", "Dovecot CPU ms/login"),
        ):
            direct, proxied, nginx = (results.get(path, {}).get(key, {}).get(field) for path in PATHS)
            toDirect, toNginx = ratio(proxied, direct), ratio(proxied, nginx)
            target = result = ""
            if field == "perSecond" and tls == "none":
                target = ">= 0.75x direct"
                result = "n/a" if toDirect is None else ("PASS" if toDirect >= 0.75 else "MISS")
            elif field == "proxyCpuMsPerLogin":
                bound = 2.0 if tls == "none" else 1.3
                target, result = f"<= {bound:g}x nginx", judged(toNginx, bound)
            numbers = [formatNumber(value) for value in (direct, proxied, nginx, toDirect, toNginx)]
            cells = [f"{label}, {modeNames[tls]}", *numbers, target, result]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """
    Start Dovecot and mailproxy, measure, print the table.
    """
    parser = argparse.ArgumentParser(
        description="POP3 logins per second: direct to Dovecot, through mailproxy and through nginx."
    )
    parser.add_argument("--quick", action="store_true", help="small counts: a smoke test")
    parser.add_argument("--concurrency", type=int, help="sessions in flight (20)")
    parser.add_argument("--duration", type=float, help="measured seconds per test (10)")
    parser.add_argument("--warmup", type=float, help="unmeasured seconds before each test (1)")
    parser.add_argument("--users", type=int, help="distinct accounts, used round-robin (50)")
    parser.add_argument("--json", help="write the raw results and the table to this file")
    parser.add_argument("--keep", help="keep the servers' files and logs in this directory")
    options = parser.parse_args(argv)
    settings = chosenSettings(options, Settings, ("concurrency", "duration", "warmup", "users"))
    raiseFileLimit()

    directory, cleanup = workDirectory(options.keep, "mailproxy-pop3-bench-")
    started = time.monotonic()
    ca = TestCA(str(directory / "ca"))
    users = [f"bench{i}" for i in range(settings.users)]
    dovecot = Dovecot(
        str(directory / "dovecot"), "pop3bench", {user: PASSWORD for user in users}, ca=ca, extraConfig=POP3_TUNING
    )
    proxy: Proxy | None = None
    nginx: Nginx | None = None
    try:
        dovecot.start()
        dovecotPid = int((dovecot.directory / "runtime" / "run" / "master.pid").read_text().strip())
        message = b"From: bench@example.org\r\nSubject: pop3 benchmark\r\n\r\nHello.\r\n"
        for user in users:
            dovecot.deliver(user, message)
        dovecot.indexAll()
        proxy, proxyPorts = startMailproxy(
            directory / "mailproxy", "pop3", dovecot.pop3, ca, {"connections_per_address": 0}
        )
        certificate, key = ca.issue("nginx")
        nginx = Pop3Nginx(str(directory / "nginx"), dovecot.pop3, certificate, key)
        nginx.start()
        ports = {
            "direct": {"none": dovecot.pop3, "starttls": dovecot.pop3, "implicit": dovecot.pop3s},
            "mailproxy": proxyPorts,
            "nginx": {"none": nginx.plain, "starttls": nginx.starttls, "implicit": nginx.ssl},
        }
        pids: dict[str, int | None] = {"mailproxy": proxy.pid, "nginx": nginx.pid}
        results = measure(ports, ca.caPath, users, settings, pids=pids, dovecotPid=dovecotPid)
    finally:
        stopServers([proxy, nginx, dovecot], cleanup)

    table = markdownTable(results)
    print(table)
    failures = [
        f"{name} {key}: {summary['errors']} errors {summary['errorKinds']}"
        for name, byKey in results.items()
        for key, summary in byKey.items()
        if summary.get("errors")
    ]
    for line in failures:
        print(f"- errors: {line}")
    if options.json:
        writeReport(options.json, settings, started, results, failures, table)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
