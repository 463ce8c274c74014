"""
Compare IMAP direct to Dovecot, through mailproxy and through nginx's mail
proxy, in one run on this machine, and print a table with ratios and the
targets mailproxy is held to.

Run from the repository root::

    /tmp/venv/bin/python benchmarks/run.py [--quick] [--only logins,relay,idle] [--json out.json]

See benchmarks/README.md for what each number means.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import signal
import smtplib
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import attrs

_HERE = Path(__file__).resolve().parent
_REPOSITORY = _HERE.parent
if str(_REPOSITORY) not in sys.path:
    sys.path.insert(0, str(_REPOSITORY))

from benchmarks import procstat  # noqa: E402
from benchmarks.load import raiseFileLimit  # noqa: E402
from benchmarks.nginx import Nginx  # noqa: E402
from tests.integration.servers import Dovecot, Proxy, TestCA  # noqa: E402

PATHS = ("direct", "mailproxy", "nginx")
GROUPS = ("logins", "latency", "relay", "idle")
TLS_MODES = ("none", "starttls", "implicit")
PASSWORD = "pw"
BIG_USER = "benchbig"

#: Dovecot settings so that Dovecot is not the bottleneck and can hold
#: thousands of sessions: long-lived login processes serving many clients,
#: imap processes reused between sessions, one imap process per session
#: (client_limit = 1) and enough of them, and the services every imap
#: process connects to able to take them all.
DOVECOT_TUNING = """
service imap-login {
  service_count = 0
  process_min_avail = 2
  process_limit = 8
  client_limit = 6000
  vsz_limit = 1G
}
service imap {
  service_count = 0
  client_limit = 1
  process_limit = 6500
  process_min_avail = 25
}
mail_max_userip_connections = 100000
# Every imap process keeps a connection to auth, stats and anvil.
service auth {
  client_limit = 8000
}
service stats {
  client_limit = 8000
}
service anvil {
  client_limit = 8000
}
"""


def mailproxyConfig(
    protocol: str,
    ports: dict[str, int],
    backendPort: int,
    certificate: str,
    key: str,
    limits: Mapping[str, object],
    workers: int = 1,
) -> str:
    """
    mailproxy in front of one Dovecot: a C{protocol} listener for each TLS
    mode on C{ports} (by mode), the static router reading C{routes.toml},
    and the backend C{dovecot} on C{backendPort}, in plain text and without
    forwarding, so that Dovecot checks every password on both paths.

    @param limits: the C{[limits]} table.
    @param workers: C{[proxy] workers}: 1 (one process, as nginx runs one
        worker here) unless a benchmark compares more.
    """
    listeners = "".join(
        f'[[listener]]\nprotocol = "{protocol}"\n'
        f'endpoint = "tcp:{ports[tls]}:interface=127.0.0.1:backlog=4096"\ntls = "{tls}"\n\n'
        for tls in TLS_MODES
    )
    return (
        '[proxy]\nhostname = "localhost"\n'
        + f"workers = {workers}\n\n"
        + "[limits]\n" + "".join(f"{name} = {value}\n" for name, value in limits.items()) + "\n"
        + f'[tls]\ncertificate = "{certificate}"\nkey = "{key}"\n\n'
        + listeners
        + '[router]\ntype = "static"\npath = "routes.toml"\n\n'
        + f'[backend.dovecot]\nhost = "127.0.0.1"\nports = {{ {protocol} = {backendPort} }}\ntls = "none"\nforward = "none"\n'
    )  # fmt: skip


def givenOptions(options: argparse.Namespace, names: Sequence[str]) -> dict[str, Any]:
    """
    The command-line options among C{names} that were given, by name: the
    changes to a benchmark's settings (C{attrs.evolve(settings, **...)}).
    """
    return {name: getattr(options, name) for name in names if getattr(options, name) is not None}


def startMailproxy(
    directory: Path,
    protocol: str,
    backendPort: int,
    ca: TestCA,
    limits: Mapping[str, object],
    workers: int = 1,
) -> tuple[Proxy, dict[str, int]]:
    """
    Start mailproxy in C{directory} as L{mailproxyConfig} describes it,
    with every account routed to C{dovecot} and a certificate from C{ca}.

    @param workers: C{[proxy] workers}.

    @return: the started proxy and its listeners' ports by TLS mode.
    """
    certificate, key = ca.issue("mailproxy")
    directory.mkdir(exist_ok=True)
    (directory / "routes.toml").write_text('default = "dovecot"\n')
    # Port 0: the proxy logs the ports the kernel chose.
    ports = {mode: 0 for mode in TLS_MODES}
    proxy = Proxy(str(directory), mailproxyConfig(protocol, ports, backendPort, certificate, key, limits, workers))
    proxy.start()
    return proxy, dict(zip(TLS_MODES, proxy.ports))


def workDirectory(keep: str | None, prefix: str) -> tuple[Path, tempfile.TemporaryDirectory[str] | None]:
    """
    Where a benchmark writes its servers' files and logs: C{keep} (made if
    missing, left afterwards), or else a new temporary directory, also
    returned for the caller to clean up.
    """
    if keep:
        directory = Path(keep).resolve()
        directory.mkdir(parents=True, exist_ok=True)
        return directory, None
    holder = tempfile.TemporaryDirectory(prefix=prefix)
    return Path(holder.name), holder


def submitMessage(
    host: str, port: int, tls: str, user: str, password: str, message: bytes, context: ssl.SSLContext, helo: str
) -> None:
    """
    One ESMTP submission session: C{EHLO helo} (over implicit TLS, or then
    C{STARTTLS} and C{EHLO} again, as C{tls} says), C{AUTH PLAIN} as
    C{user}, C{message} from and to C{user}, C{QUIT}.
    """
    client: smtplib.SMTP
    if tls == "implicit":
        client = smtplib.SMTP_SSL(host, port, timeout=30, context=context)
    else:
        client = smtplib.SMTP(host, port, timeout=30)
    try:
        client.ehlo(helo)
        if tls == "starttls":
            client.starttls(context=context)
            client.ehlo(helo)
        client.login(user, password)
        refused = client.sendmail(user, [user], message)
        if refused:
            raise smtplib.SMTPRecipientsRefused(refused)
        client.quit()
    finally:
        client.close()


def stopServers(servers: Sequence[Any], cleanup: tempfile.TemporaryDirectory[str] | None) -> None:
    """
    Stop, in order, each of C{servers} that started (L{None} for one that
    did not), then remove the work directory L{workDirectory} made, if any.
    """
    for server in servers:
        if server is not None:
            server.stop()
    if cleanup is not None:
        cleanup.cleanup()


def chosenSettings(options: argparse.Namespace, kind: Any, names: Sequence[str]) -> Any:
    """
    The settings of a benchmark: C{kind}'s defaults (or C{kind.quick()}'s
    with C{--quick}), changed by the options among C{names} that were given.
    """
    settings = kind.quick() if options.quick else kind()
    return attrs.evolve(settings, **givenOptions(options, names))


def startDovecot(directory: Path, ca: TestCA, users: int) -> tuple[Dovecot, int]:
    """
    Start a private Dovecot tuned as L{DOVECOT_TUNING} says in
    C{directory}, with accounts C{bench0} to C{bench<users - 1>} (password
    L{PASSWORD}) and a certificate from C{ca}.

    @return: the started Dovecot and its master process's id.
    """
    accounts = {f"bench{i}": PASSWORD for i in range(users)}
    dovecot = Dovecot(str(directory), "bench", accounts, ca=ca, extraConfig=DOVECOT_TUNING)
    dovecot.start()
    return dovecot, int((dovecot.directory / "runtime" / "run" / "master.pid").read_text().strip())


def writeReport(path: str, settings: Any, started: float, results: Any, failures: list[str], table: str) -> None:
    """
    Write a benchmark's outcome as JSON to C{path}: its settings (an
    C{attrs} instance), this machine's CPU count and the seconds since
    C{started} (a C{time.monotonic()} reading), the raw results, the
    failures and the table printed.
    """
    document = {
        "settings": attrs.asdict(settings),
        "environment": {"cpus": os.cpu_count(), "seconds": round(time.monotonic() - started, 1)},
        "results": results,
        "failures": failures,
        "table": table,
    }
    Path(path).write_text(json.dumps(document, indent=2) + "\n")


@attrs.frozen
class Settings:
    """
    The sizes of one benchmark run.
    """

    concurrency: int = 20
    duration: float = 10.0
    warmup: float = 1.0
    latencyCount: int = 200
    sessions: int = 2000
    idleConcurrency: int = 50
    sizeMB: float = 10.0
    repeat: int = 10
    users: int = 50
    procs: int = 1
    #: Seconds the idle sessions are left alone before their memory is
    #: read: longer than mailproxy's TLS_BUFFERS_QUIET, after which an
    #: idle TLS session gives back the buffers its login grew.
    idleSettle: float = 12.0

    @classmethod
    def quick(cls) -> Settings:
        """
        Small counts: the whole run in well under a minute.
        """
        return cls(
            duration=1.5, warmup=0.3, latencyCount=20, sessions=60,
            idleConcurrency=20, sizeMB=2.0, repeat=2, idleSettle=1.0,
        )  # fmt: skip


@attrs.frozen
class Endpoint:
    """
    One way to reach Dovecot.

    @ivar name: C{direct}, C{mailproxy} or C{nginx}.
    @ivar ports: TLS mode (C{none}, C{starttls}, C{implicit}) to port.
    @ivar proxyPid: the proxy's (master) process, or L{None} for direct.
    """

    name: str
    ports: dict[str, int]
    proxyPid: int | None


def mailproxyRunnable() -> tuple[bool, str]:
    """
    Whether C{twistd mailproxy} can run from this checkout.

    @return: the answer and, if not, why.
    """
    twistd = Path(sys.executable).parent / "twistd"
    environment = dict(os.environ)
    environment["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(_REPOSITORY), environment.get("PYTHONPATH")])
    )
    try:
        result = subprocess.run(
            [str(twistd), "mailproxy", "--help"],
            env=environment,
            capture_output=True,
            timeout=60,
            cwd=_REPOSITORY,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, str(e)
    if result.returncode != 0:
        lines = (result.stdout + result.stderr).decode("utf-8", "replace").strip().splitlines()
        return False, lines[-1] if lines else f"exit status {result.returncode}"
    return True, ""


def bigMessage(size: int) -> bytes:
    """
    An RFC 5322 message of C{size} octets (CRLF line ends), its body lines
    of base64-like text.
    """
    header = (
        b"From: bench@example.org\r\nTo: benchbig@example.org\r\n"
        b"Subject: benchmark message\r\nMessage-ID: <bench@example.org>\r\n"
        b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: application/octet-stream\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n"
    )
    line = (b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/" * 2)[:76] + b"\r\n"
    body = line * ((size - len(header)) // len(line) + 1)
    return header + body[: size - len(header) - 2] + b"\r\n"


def medianResult(rounds: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """
    The rounds of one test as one result: the median of each number (the
    errors summed, none hidden), the last round's other fields, and every
    round's proxy CPU per login under C{"rounds"}.
    """
    merged = dict(rounds[-1])
    for key in rounds[-1]:
        values = [r.get(key) for r in rounds]
        numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if key == "errors":
            merged[key] = sum(numbers)
        elif len(numbers) == len(values):
            merged[key] = statistics.median(numbers)
    merged["rounds"] = [r.get("proxyCpuMsPerLogin") for r in rounds]
    return merged


class Bench:
    """
    The servers, the load tool invocations and the measurements of one run.
    """

    def __init__(self, settings: Settings, directory: Path, caFile: str) -> None:
        self.settings = settings
        self.directory = directory
        self.caFile = caFile
        self.results: dict[str, dict[str, Any]] = {name: {} for name in PATHS}
        #: Every round's result of a test run more than once (--rounds), by
        #: path and test.
        self.rounds: dict[str, dict[str, list[dict[str, Any]]]] = {name: {} for name in PATHS}
        self.dovecotPid: int | None = None
        self.failures: list[str] = []

    def load(self, arguments: Sequence[str], timeout: float) -> dict[str, Any]:
        """
        Run C{benchmarks/load.py} with C{arguments} and return its JSON.
        """
        command = [sys.executable, str(_HERE / "load.py"), *arguments]
        result = subprocess.run(command, capture_output=True, timeout=timeout, cwd=_REPOSITORY)
        if result.returncode != 0:
            raise RuntimeError(
                f"load.py {' '.join(arguments)} failed:\n"
                + result.stderr.decode("utf-8", "replace")[-3000:]
            )
        return dict(json.loads(result.stdout.decode().strip().splitlines()[-1]))

    def common(self, path: Endpoint, tls: str) -> list[str]:
        """
        The load.py options naming the target.
        """
        return [
            "--port", str(path.ports[tls]), "--tls", tls,
            "--ca", self.caFile, "--server-name", "localhost", "--password", PASSWORD,
        ]  # fmt: skip

    def usage(self, path: Endpoint) -> tuple[procstat.Usage | None, procstat.Usage | None]:
        """
        The proxy's and Dovecot's usage now.
        """
        proxy = procstat.usage(path.proxyPid) if path.proxyPid else None
        dovecot = procstat.usage(self.dovecotPid) if self.dovecotPid else None
        return proxy, dovecot

    def note(self, path: Endpoint, key: str, result: dict[str, Any]) -> None:
        """
        Record C{result} and complain on stderr if sessions failed. A test
        run again (another round) is recorded as the median of its rounds
        (L{medianResult}).
        """
        # Benchmarks built on this one (workers.py, floor.py) add paths of
        # their own.
        rounds = self.rounds.setdefault(path.name, {}).setdefault(key, [])
        rounds.append(result)
        self.results[path.name][key] = result if len(rounds) == 1 else medianResult(rounds)
        errors = result.get("errors", 0)
        if errors:
            message = f"{path.name} {key}: {errors} errors {result.get('errorKinds')}"
            self.failures.append(message)
            print("  ! " + message, file=sys.stderr)

    def logins(self, path: Endpoint, tls: str) -> None:
        """
        Logins per second at the configured concurrency, and the proxy's
        and Dovecot's CPU per login.
        """
        s = self.settings
        before = self.usage(path)
        result = self.load(
            ["logins", *self.common(path, tls), "--concurrency", str(s.concurrency),
             "--duration", str(s.duration), "--warmup", str(s.warmup),
             "--users", str(s.users), "--procs", str(s.procs)],
            timeout=s.duration + s.warmup + 300,
        )  # fmt: skip
        after = self.usage(path)
        completed = max(1, result["completed"])
        result["proxyCpuMsPerLogin"] = procstat.cpuMsPer(before[0], after[0], completed)
        result["dovecotCpuMsPerLogin"] = procstat.cpuMsPer(before[1], after[1], completed)
        result["clientCpuShare"] = round(result["clientCpu"] / (s.duration + s.warmup), 3)
        self.note(path, f"logins.{tls}", result)

    def latency(self, path: Endpoint) -> None:
        """
        Sequential implicit-TLS logins by one client.
        """
        s = self.settings
        result = self.load(
            ["logins", *self.common(path, "implicit"), "--concurrency", "1",
             "--count", str(s.latencyCount), "--warmup", "0", "--users", str(s.users)],
            timeout=s.latencyCount * 2 + 120,
        )  # fmt: skip
        self.note(path, "latency.implicit", result)

    def relay(self, path: Endpoint, tls: str) -> None:
        """
        MB/s of the big message's FETCH and the proxy's CPU per MB.
        """
        s = self.settings
        before = self.usage(path)
        result = self.load(
            ["fetch", *self.common(path, tls), "--user", BIG_USER, "--repeat", str(s.repeat)],
            timeout=600,
        )
        after = self.usage(path)
        megabytes = result["size"] * (s.repeat + 1) / 1e6
        result["proxyCpuMsPerMB"] = procstat.cpuMsPer(before[0], after[0], megabytes)
        result["dovecotCpuMsPerMB"] = procstat.cpuMsPer(before[1], after[1], megabytes)
        self.note(path, f"relay.{tls}", result)

    def idle(self, path: Endpoint, tls: str) -> None:
        """
        Hold the configured number of sessions in IDLE and measure the RSS
        they add to the proxy, and to Dovecot.
        """
        s = self.settings
        before = self.usage(path)
        command = [
            sys.executable, str(_HERE / "load.py"), "idle", *self.common(path, tls),
            "--sessions", str(s.sessions), "--concurrency", str(s.idleConcurrency),
            "--users", str(s.users), "--procs", str(s.procs),
        ]  # fmt: skip
        process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=_REPOSITORY
        )
        assert process.stdin is not None and process.stdout is not None
        try:
            readyLine = process.stdout.readline()
            if not readyLine:
                raise RuntimeError(f"load.py idle ended early (status {process.wait()})")
            ready = json.loads(readyLine)
            # Let lazily freed buffers and late writes settle.
            time.sleep(s.idleSettle)
            during = self.usage(path)
            process.stdin.write(b"release\n")
            process.stdin.flush()
            final = json.loads(process.stdout.readline())
            process.wait(120)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        held = max(1, ready["ready"])
        final["kibPerSession"] = _kib(before[0], during[0], held)
        final["proxyProcesses"] = during[0].processes if during[0] else None
        # Dovecot reuses imap processes between rounds, so its growth depends
        # on what ran before: context only.
        final["dovecotKibPerSession"] = _kib(before[1], during[1], held)
        final["dovecotProcesses"] = during[1].processes if during[1] else None
        self.note(path, f"idle.{tls}", final)


def _kib(before: procstat.Usage | None, during: procstat.Usage | None, per: int) -> float | None:
    if before is None or during is None:
        return None
    return round((during.rss - before.rss) / 1024 / per, 2)


@attrs.frozen
class Row:
    """
    One line of the result table.

    @ivar label: what is measured, with its unit.
    @ivar values: per path name, the number or L{None}.
    @ivar target: the target's text, or C{""}.
    @ivar verdict: C{PASS}, C{MISS}, C{n/a} or C{""} (no target).
    """

    label: str
    values: dict[str, float | None]
    target: str = ""
    verdict: str = ""


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def _judge(
    values: dict[str, float | None], description: str, test: Callable[..., bool], *needs: str
) -> tuple[str, str]:
    arguments = [values.get(name) for name in needs]
    # A zero or missing reference (too few sessions to move the RSS, say)
    # judges nothing.
    if any(a is None for a in arguments) or not arguments[-1]:
        return description, "n/a"
    return description, "PASS" if test(*arguments) else "MISS"


def buildRows(results: dict[str, dict[str, Any]]) -> list[Row]:
    """
    The table rows, with targets judged, from the raw results per path.
    """

    def pick(key: str, field: str, paths: Sequence[str] = PATHS) -> dict[str, float | None]:
        values: dict[str, float | None] = {}
        for name in PATHS:
            result = results.get(name, {}).get(key)
            value = result.get(field) if result and name in paths else None
            values[name] = value
        return values

    rows: list[Row] = []
    modeNames = {"none": "plain", "starttls": "STARTTLS", "implicit": "implicit TLS"}
    proxies = ("mailproxy", "nginx")
    for tls in TLS_MODES:
        key = f"logins.{tls}"
        if not any(key in r for r in results.values()):
            continue
        mode = modeNames[tls]
        rate = pick(key, "perSecond")
        if tls == "none":
            target = _judge(
                rate, ">= 0.75x direct",
                lambda m, d: m >= 0.75 * d, "mailproxy", "direct",
            )  # fmt: skip
        else:
            target = _judge(rate, ">= nginx", lambda m, n: m >= n, "mailproxy", "nginx")
        rows.append(Row(f"logins/s, {mode}", rate, *target))
        rows.append(Row(f"login p50 ms, {mode}", pick(key, "p50ms")))
        rows.append(Row(f"login p99 ms, {mode}", pick(key, "p99ms")))
        cpu = pick(key, "proxyCpuMsPerLogin", proxies)
        # Issue 11's targets: a plain login's CPU at most twice nginx's, a
        # TLS login's (whose handshake both pay) at most 1.3 times.
        if tls == "none":
            target = _judge(cpu, "<= 2x nginx", lambda m, n: m <= 2 * n, "mailproxy", "nginx")
        else:
            target = _judge(cpu, "<= 1.3x nginx", lambda m, n: m <= 1.3 * n, "mailproxy", "nginx")
        rows.append(Row(f"proxy CPU ms/login, {mode}", cpu, *target))
        rows.append(Row(f"Dovecot CPU ms/login, {mode}", pick(key, "dovecotCpuMsPerLogin")))
    if any("latency.implicit" in r for r in results.values()):
        values = pick("latency.implicit", "p50ms")
        target = _judge(
            values, "<= direct + 2 ms", lambda m, d: m <= d + 2.0, "mailproxy", "direct"
        )
        rows.append(Row("single-client TLS login p50 ms", values, *target))
    for tls, mode in (("none", "plain"), ("implicit", "TLS")):
        key = f"relay.{tls}"
        if not any(key in r for r in results.values()):
            continue
        values = pick(key, "medianMBps")
        target = _judge(
            values, ">= 0.85x direct", lambda m, d: m >= 0.85 * d, "mailproxy", "direct"
        )
        rows.append(Row(f"FETCH MB/s, {mode}", values, *target))
        rows.append(Row(f"proxy CPU ms/MB, {mode}", pick(key, "proxyCpuMsPerMB", proxies)))
    for tls, mode in (("none", "plain"), ("implicit", "TLS")):
        key = f"idle.{tls}"
        if not any(key in r for r in results.values()):
            continue
        values = pick(key, "kibPerSession")
        if tls == "none":
            target = _judge(values, "<= 3x nginx", lambda m, n: m <= 3 * n, "mailproxy", "nginx")
        else:
            # Issue 11: an idle TLS session holds no more than nginx's.
            target = _judge(values, "<= nginx", lambda m, n: m <= n, "mailproxy", "nginx")
        rows.append(Row(f"proxy RSS KiB/idle session, {mode}", values, *target))
    return rows


def formatNumber(value: float | None) -> str:
    """
    A number for a table cell, with fewer decimals the larger it is.
    """
    if value is None:
        return "n/a"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def markdownTable(rows: Sequence[Row]) -> str:
    """
    The rows as a markdown table with ratio columns.
    """
    header = (
        "| metric | direct | mailproxy | nginx | mailproxy/direct | nginx/direct "
        "| mailproxy/nginx | target (mailproxy) | result |"
    )
    lines = [header, "|" + "---|" * 9]
    for row in rows:
        v = row.values
        cells = [
            row.label,
            formatNumber(v.get("direct")),
            formatNumber(v.get("mailproxy")),
            formatNumber(v.get("nginx")),
            formatNumber(_ratio(v.get("mailproxy"), v.get("direct"))),
            formatNumber(_ratio(v.get("nginx"), v.get("direct"))),
            formatNumber(_ratio(v.get("mailproxy"), v.get("nginx"))),
            row.target,
            row.verdict,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def buildParser() -> argparse.ArgumentParser:
    """
    The command line parser.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--quick", action="store_true", help="small counts: a smoke test")
    parser.add_argument(
        "--only", default=",".join(GROUPS),
        help="comma-separated subset of: " + ", ".join(GROUPS) + " (logins includes latency)",
    )  # fmt: skip
    parser.add_argument("--paths", default=",".join(PATHS), help="subset of: " + ", ".join(PATHS))
    parser.add_argument(
        "--require-mailproxy", action="store_true",
        help="fail instead of leaving the mailproxy column empty when it cannot run",
    )  # fmt: skip
    parser.add_argument(
        "--rounds", type=int, default=1,
        help="run the login tests this many times, the paths in turn, and report each number's median (1)",
    )  # fmt: skip
    parser.add_argument("--json", help="also write the raw results and the table here")
    parser.add_argument("--keep", help="keep the servers' files (logs) in this directory")
    parser.add_argument("--concurrency", type=int)
    parser.add_argument("--duration", type=float, help="measured seconds per login test")
    parser.add_argument("--warmup", type=float)
    parser.add_argument("--latency-count", type=int)
    parser.add_argument("--sessions", type=int, help="idle sessions held")
    parser.add_argument("--idle-concurrency", type=int)
    parser.add_argument("--idle-settle", type=float, help="seconds the idle sessions wait before RSS is read (12)")
    parser.add_argument("--size-mb", type=float, help="size of the fetched message")
    parser.add_argument("--repeat", type=int, help="timed fetches")
    parser.add_argument("--users", type=int)
    parser.add_argument("--procs", type=int, help="load generator worker processes")
    parser.add_argument(
        "--workers", type=int, default=1, help="mailproxy's [proxy] workers (default 1: one process, like nginx's one worker)"
    )
    parser.add_argument("--nginx-workers", type=int, default=1)
    parser.add_argument("--nginx-buffer", default="4k", help="nginx proxy_buffer")
    parser.add_argument("--nginx-log-level", default="info")
    parser.add_argument(
        "--strict", action="store_true", help="exit with status 1 if a target is missed"
    )
    return parser


def settingsFrom(options: argparse.Namespace) -> Settings:
    """
    The defaults (or C{--quick}'s), with the explicit options applied.
    """
    settings = Settings.quick() if options.quick else Settings()
    overrides = {
        "concurrency": options.concurrency,
        "duration": options.duration,
        "warmup": options.warmup,
        "latencyCount": options.latency_count,
        "sessions": options.sessions,
        "idleConcurrency": options.idle_concurrency,
        "sizeMB": options.size_mb,
        "repeat": options.repeat,
        "users": options.users,
        "procs": options.procs,
        "idleSettle": options.idle_settle,
    }
    return attrs.evolve(settings, **{k: v for k, v in overrides.items() if v is not None})


def main(argv: list[str] | None = None) -> int:
    """
    Start the servers, run the selected measurements, print the table.
    """
    options = buildParser().parse_args(argv)
    settings = settingsFrom(options)
    groups = {g.strip() for g in options.only.split(",") if g.strip()}
    if "logins" in groups:
        groups.add("latency")
    unknown = groups - set(GROUPS)
    wanted = [p.strip() for p in options.paths.split(",") if p.strip()]
    if unknown or set(wanted) - set(PATHS):
        print(f"unknown --only or --paths entries: {unknown | (set(wanted) - set(PATHS))}",
              file=sys.stderr)  # fmt: skip
        return 2
    # Children (Dovecot, nginx, mailproxy, load.py) inherit the limit.
    fdLimit = raiseFileLimit()
    notes: list[str] = []
    if options.rounds < 1:
        print("--rounds must be 1 or more", file=sys.stderr)
        return 2
    if options.rounds > 1 and "logins" in groups:
        notes.append(f"login tests: each figure is the median of {options.rounds} rounds, the paths in turn")

    if "mailproxy" in wanted:
        runnable, why = mailproxyRunnable()
        if not runnable:
            if options.require_mailproxy:
                print(f"mailproxy cannot run: {why}", file=sys.stderr)
                return 2
            wanted.remove("mailproxy")
            notes.append(f"mailproxy column empty: `twistd mailproxy` cannot run ({why})")

    directory, cleanup = workDirectory(options.keep, "mailproxy-bench-")

    # SIGTERM, like Ctrl-C, stops the run but still prints what was measured.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    interrupted = False
    started = time.monotonic()
    ca = TestCA(str(directory / "ca"))
    users = {f"bench{i}": PASSWORD for i in range(settings.users)}
    users[BIG_USER] = PASSWORD
    dovecot = Dovecot(str(directory / "dovecot"), "bench", users, ca=ca, extraConfig=DOVECOT_TUNING)
    nginx: Nginx | None = None
    proxy: Proxy | None = None
    bench = Bench(settings, directory, ca.caPath)
    try:
        dovecot.start()
        bench.dovecotPid = int(
            (dovecot.directory / "runtime" / "run" / "master.pid").read_text().strip()
        )
        dovecot.deliver(BIG_USER, bigMessage(int(settings.sizeMB * 1e6)))
        dovecot.indexAll()

        paths: list[Endpoint] = []
        if "direct" in wanted:
            ports = {"none": dovecot.imap, "starttls": dovecot.imap, "implicit": dovecot.imaps}
            paths.append(Endpoint("direct", ports, None))
        if "mailproxy" in wanted:
            limits = {"connections_per_address": 0, "preauth_timeout": 300, "idle_timeout": 3600}
            proxy, ports = startMailproxy(directory / "mailproxy", "imap", dovecot.imap, ca, limits, options.workers)
            paths.append(Endpoint("mailproxy", ports, proxy.pid))
        if "nginx" in wanted:
            certificate, key = ca.issue("nginx")
            nginx = Nginx(
                str(directory / "nginx"), dovecot.imap, certificate, key,
                workers=options.nginx_workers, proxyBuffer=options.nginx_buffer,
                logLevel=options.nginx_log_level,
            )  # fmt: skip
            nginx.start()
            ports = {"none": nginx.plain, "starttls": nginx.starttls, "implicit": nginx.ssl}
            paths.append(Endpoint("nginx", ports, nginx.pid))

        def each(label: str, run: Callable[[Endpoint], None]) -> None:
            for path in paths:
                print(f"  {label}: {path.name}", file=sys.stderr, flush=True)
                run(path)

        if "logins" in groups:
            # Round after round, each path in turn: the machine's noise then
            # moves every path alike within a round.
            for number in range(options.rounds):
                for tls in TLS_MODES:
                    label = f"logins {tls}" + (f", round {number + 1}" if options.rounds > 1 else "")
                    each(label, functools.partial(bench.logins, tls=tls))
        if "latency" in groups:
            each("latency implicit", bench.latency)
        if "relay" in groups:
            for tls in ("none", "implicit"):
                each(f"relay {tls}", functools.partial(bench.relay, tls=tls))
        if "idle" in groups:
            for tls in ("none", "implicit"):
                # Each round in freshly started proxies: memory the round
                # before freed stays with the allocator and would be
                # reused, flattering the later round.
                for index, path in enumerate(paths):
                    if path.name == "mailproxy" and proxy is not None:
                        proxy.stop()
                        proxy, ports = startMailproxy(
                            directory / f"mailproxy-idle-{tls}", "imap", dovecot.imap, ca, limits, options.workers
                        )
                        paths[index] = Endpoint("mailproxy", ports, proxy.pid)
                    elif path.name == "nginx" and nginx is not None:
                        nginx.stop()
                        nginx.start()
                        ports = {"none": nginx.plain, "starttls": nginx.starttls, "implicit": nginx.ssl}
                        paths[index] = Endpoint("nginx", ports, nginx.pid)
                each(f"idle {tls}", functools.partial(bench.idle, tls=tls))
    except KeyboardInterrupt:
        interrupted = True
        notes.append("interrupted: the table shows the tests completed before that")
    finally:
        for server in (proxy, nginx, dovecot):
            if server is not None:
                server.stop()
        if cleanup is not None:
            cleanup.cleanup()

    rows = buildRows(bench.results)
    table = markdownTable(rows)
    print(table)
    if notes:
        print()
        for line in notes:
            print(f"- {line}")
    if bench.failures:
        print()
        for line in bench.failures:
            print(f"- errors: {line}")
    environment = {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "fdLimit": fdLimit,
        "mailproxyWorkers": options.workers,
        "nginxWorkers": options.nginx_workers,
        "nginxProxyBuffer": options.nginx_buffer,
        "nginxLogLevel": options.nginx_log_level,
        "seconds": round(time.monotonic() - started, 1),
    }
    if options.json:
        document = {
            "settings": attrs.asdict(settings),
            "environment": environment,
            "notes": notes,
            "failures": bench.failures,
            "results": bench.results,
            "rows": [attrs.asdict(row) for row in rows],
            "table": table,
        }
        Path(options.json).write_text(json.dumps(document, indent=2) + "\n")
    if interrupted:
        return 130
    if bench.failures:
        return 1
    if options.strict and any(row.verdict == "MISS" for row in rows):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
