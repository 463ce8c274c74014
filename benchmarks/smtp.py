"""
ESMTP through mailproxy against Postfix directly, on this machine.

Starts a private Dovecot (SASL for Postfix), a private Postfix that discards
what it accepts (so that delivery is not what is measured), and mailproxy
in front of it, then measures:

- submissions per second: sessions of connect, (STARTTLS), EHLO, AUTH
  PLAIN, MAIL, RCPT, DATA with a small message, QUIT, from concurrent
  client processes for a fixed time, without TLS, with STARTTLS and with
  implicit TLS; directly to Postfix's submission ports and through the
  proxy's submission listeners (which log in at Postfix with XCLIENT and
  AUTH, as a located account does);
- inbound mail (MX): Postfix's own C{smtp-source} sending a number of
  messages over concurrent sessions, directly to Postfix's port 25
  listener and through the proxy's MX listener.

Run from the repository root::

    /tmp/venv/bin/python benchmarks/smtp.py [--quick] [--json out.json]

It prints a markdown table; the exit status is 1 if any session failed.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import smtplib
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

_HERE = Path(__file__).resolve().parent
_REPOSITORY = _HERE.parent
if str(_REPOSITORY) not in sys.path:
    sys.path.insert(0, str(_REPOSITORY))

from benchmarks import procstat  # noqa: E402
from benchmarks.run import stopServers, submitMessage  # noqa: E402
from tests.integration.postfix import Postfix, dovecotSASLConfig  # noqa: E402
from tests.integration.servers import Dovecot, Proxy, TestCA  # noqa: E402

TLS_MODES = ("none", "starttls", "implicit")
PATHS = ("direct", "mailproxy")
PASSWORD = "bench-pw"
DOMAIN = "example.org"
MESSAGE = (
    b"From: bench0@example.org\r\nTo: bench0@example.org\r\nSubject: benchmark\r\n"
    b"Message-ID: <bench@example.org>\r\n\r\n" + b"A line of a small message body.\r\n" * 30
)

#: Postfix tuned so that it is not the first limit: enough smtpd processes,
#: no per-client rate limits, and accepted mail discarded.
POSTFIX_TUNING = """
default_process_limit = 400
smtpd_client_connection_count_limit = 0
smtpd_client_connection_rate_limit = 0
smtpd_client_message_rate_limit = 0
virtual_transport = discard:benchmark
"""

#: Dovecot's auth service answering many smtpd processes.
DOVECOT_TUNING = """
service auth {
  client_limit = 2000
}
"""


def _session(host: str, port: int, tls: str, user: str, context: ssl.SSLContext) -> None:
    submitMessage(host, port, tls, user, PASSWORD, MESSAGE, context, "bench.example")


def _worker(arguments: tuple[str, int, str, str, str, float, float]) -> tuple[int, int, list[float], str]:
    """
    One client process: sessions back to back until the deadline; those
    finishing after the warm-up count.
    """
    host, port, tls, user, caFile, start, deadline = arguments
    context = ssl.create_default_context(cafile=caFile)
    done = failed = 0
    latencies: list[float] = []
    error = ""
    while time.time() < deadline:
        began = time.time()
        try:
            _session(host, port, tls, user, context)
        except (OSError, smtplib.SMTPException) as e:
            failed += 1
            error = f"{type(e).__name__}: {e}"
            continue
        if began >= start:
            done += 1
            latencies.append(time.time() - began)
    return done, failed, latencies, error


def submissions(
    port: int, tls: str, caFile: str, concurrency: int, duration: float, warmup: float, users: int
) -> dict[str, Any]:
    """
    Submissions per second on C{port} with C{concurrency} client processes.
    """
    start = time.time() + warmup
    deadline = start + duration
    jobs = [("127.0.0.1", port, tls, f"bench{i % users}@{DOMAIN}", caFile, start, deadline) for i in range(concurrency)]
    with multiprocessing.Pool(concurrency) as pool:
        results = pool.map(_worker, jobs)
    latencies = sorted(latency for _, _, found, _ in results for latency in found)
    done = sum(r[0] for r in results)
    return {
        "sessions": done,
        "failed": sum(r[1] for r in results),
        "error": next((r[3] for r in results if r[3]), ""),
        "perSecond": done / duration,
        "p50ms": 1000 * statistics.median(latencies) if latencies else None,
        "p95ms": 1000 * latencies[int(len(latencies) * 0.95)] if latencies else None,
    }


def smtpSource(port: int, messages: int, concurrency: int) -> dict[str, Any]:
    """
    Send C{messages} with Postfix's C{smtp-source} over C{concurrency}
    parallel sessions, one message per session.
    """
    command = [
        shutil.which("smtp-source", path="/usr/sbin:/usr/bin") or "smtp-source",
        "-c", "-s", str(concurrency), "-m", str(messages), "-l", "2000",
        "-f", "sender@remote.example", "-t", f"bench0@{DOMAIN}", "-M", "bench.example",
        f"127.0.0.1:{port}",
    ]
    began = time.time()
    result = subprocess.run(command, capture_output=True, timeout=600)
    elapsed = time.time() - began
    output = (result.stdout + result.stderr).decode("utf-8", "replace")
    return {
        "messages": messages,
        "failed": 0 if result.returncode == 0 else messages,
        "error": "" if result.returncode == 0 else output.strip().splitlines()[-1:],
        "perSecond": messages / elapsed,
    }


def proxyConfig(ports: dict[str, int], postfix: Postfix, certificate: str, key: str) -> str:
    """
    mailproxy in front of C{postfix}: a submission listener per TLS mode and
    an MX listener, every account located at the one backend.
    """
    listeners = "".join(
        f'[[listener]]\nprotocol = "smtp"\nmode = "submission"\nendpoint = "tcp:{ports[tls]}:interface=127.0.0.1"\n'
        f'tls = "{tls}"\n\n'
        for tls in TLS_MODES
    )
    return (
        f'[proxy]\nhostname = "localhost"\n\n'
        f"[limits]\nconnections_per_address = 0\nfailure_delay = 0\n\n"
        f'[tls]\ncertificate = "{certificate}"\nkey = "{key}"\n\n'
        + listeners
        + f'[[listener]]\nprotocol = "smtp"\nmode = "mx"\nendpoint = "tcp:{ports["mx"]}:interface=127.0.0.1"\ntls = "none"\n\n'
        f'[router]\ntype = "static"\npath = "routes.toml"\n\n'
        f'[backend.pf]\nhost = "127.0.0.1"\nports = {{ smtp = {postfix.submission}, mx = {postfix.mx} }}\n'
        f'tls = "none"\nforward = "xclient"\n'
    )


def markdown(results: dict[str, Any]) -> str:
    """
    The results as a markdown table.
    """
    lines = [
        "| test | direct | mailproxy | ratio | proxy CPU ms per session | p50 ms direct / mailproxy |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in results.items():
        direct, proxied = row["direct"], row["mailproxy"]
        ratio = proxied["perSecond"] / direct["perSecond"] if direct["perSecond"] else None
        p50 = ""
        if "p50ms" in direct and direct["p50ms"] is not None and proxied["p50ms"] is not None:
            p50 = f"{direct['p50ms']:.1f} / {proxied['p50ms']:.1f}"
        cpu = f"{row['proxyCpuMs']:.2f}" if row.get("proxyCpuMs") is not None else ""
        lines.append(
            f"| {name} | {direct['perSecond']:.1f}/s | {proxied['perSecond']:.1f}/s | "
            f"{ratio:.2f} | {cpu} | {p50} |" if ratio is not None else f"| {name} | - | - | - | | |"
        )
    return "\n".join(lines)


def buildParser() -> argparse.ArgumentParser:
    """
    The command line.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small counts: a smoke test of every path")
    parser.add_argument("--tls", default=",".join(TLS_MODES), help="submission TLS modes to measure")
    parser.add_argument("--concurrency", type=int, default=8, help="client processes (default 8)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds measured per test (default 10)")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds before measuring (default 1)")
    parser.add_argument("--users", type=int, default=20, help="accounts the clients use in turn (default 20)")
    parser.add_argument("--mx-messages", type=int, default=2000, help="messages smtp-source sends (default 2000)")
    parser.add_argument("--no-mx", action="store_true", help="skip the smtp-source (MX) test")
    parser.add_argument("--json", help="write the raw results to this file")
    parser.add_argument("--keep", help="keep the servers' files in this directory")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """
    Run the benchmark; print the table.

    @return: the exit status: 1 if any session failed.
    """
    options = buildParser().parse_args(argv)
    if options.quick:
        options.duration, options.warmup, options.concurrency, options.mx_messages = 2.0, 0.5, 4, 200
    modes = [mode for mode in options.tls.split(",") if mode]
    directory = Path(options.keep or tempfile.mkdtemp(prefix="mailproxy-smtp-bench-"))
    directory.mkdir(parents=True, exist_ok=True)
    users = {f"bench{i}@{DOMAIN}": PASSWORD for i in range(options.users)}
    ca = TestCA(str(directory / "ca"))
    dovecot = Dovecot(str(directory / "dovecot"), "bench", users, ca=ca, extraConfig=dovecotSASLConfig() + DOVECOT_TUNING)
    postfix: Postfix | None = None
    proxy: Proxy | None = None
    results: dict[str, Any] = {}
    try:
        dovecot.start()
        sasl = os.path.join(os.path.realpath(dovecot.directory / "runtime"), "run", "postfix-auth")
        postfix = Postfix(
            str(directory / "postfix"),
            "bench",
            domains=[DOMAIN],
            mailboxes=list(users),
            lmtpPort=dovecot.lmtp,
            saslPath=sasl,
            ca=ca,
            extraMainCf=POSTFIX_TUNING,
        )
        postfix.start()
        # Port 0: the proxy logs the ports the kernel chose.
        ports = {name: 0 for name in (*TLS_MODES, "mx")}
        certificate, key = ca.issue("proxy")
        proxy = Proxy(str(directory / "mailproxy"), proxyConfig(ports, postfix, certificate, key))
        (proxy.directory / "routes.toml").write_text(f'[domains]\n"{DOMAIN}" = "pf"\n')
        proxy.start()
        ports = dict(zip((*TLS_MODES, "mx"), proxy.ports))
        direct = {"none": postfix.submission, "starttls": postfix.submission, "implicit": postfix.submissions}
        for tls in modes:
            row: dict[str, Any] = {}
            for path in PATHS:
                port = direct[tls] if path == "direct" else ports[tls]
                before = procstat.usage(proxy.pid)
                row[path] = submissions(
                    port, tls, ca.caPath, options.concurrency, options.duration, options.warmup, options.users
                )
                if path == "mailproxy":
                    used = procstat.usage(proxy.pid).cpu - before.cpu
                    sessions = row[path]["sessions"] + row[path]["failed"]
                    row["proxyCpuMs"] = 1000 * used / sessions if sessions else None
            results[f"submission, TLS {tls}"] = row
        if not options.no_mx:
            row = {}
            for path in PATHS:
                port = postfix.mx if path == "direct" else ports["mx"]
                before = procstat.usage(proxy.pid)
                row[path] = smtpSource(port, options.mx_messages, options.concurrency)
                if path == "mailproxy":
                    row["proxyCpuMs"] = 1000 * (procstat.usage(proxy.pid).cpu - before.cpu) / options.mx_messages
            results["MX, smtp-source, no TLS"] = row
    finally:
        stopServers([proxy, postfix, dovecot], None)
        if not options.keep:
            shutil.rmtree(directory, ignore_errors=True)
    table = markdown(results)
    print(table)
    failures = {
        f"{name} ({path})": row[path]["error"]
        for name, row in results.items()
        for path in PATHS
        if row[path]["failed"]
    }
    for where, error in failures.items():
        print(f"failed sessions in {where}: {error}", file=sys.stderr)
    if options.json:
        Path(options.json).write_text(json.dumps({"results": results, "table": table}, indent=2))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
