"""
Logins per second through mailproxy with each router, without a cache
(every login asks the router's source) and with a warm cache (every login
is answered from memory).

The routers and their sources, all on this machine:

 - C{static}: a route table with a default backend (locate only; Dovecot
   checks the password);
 - C{http}: C{examples/auth_server.py}, the nginx-style auth server
   (authenticates);
 - C{ldap}: OpenLDAP (C{slapd}), search as a service account then bind as
   the user (authenticates);
 - C{sql}: SQLite with the passwords (authenticates).

Run from the repository root::

    /tmp/venv/bin/python benchmarks/routers.py [--quick] [--routers http,ldap] [--json out.json]

One plain-IMAP session per login (connect, greeting, LOGIN, LOGOUT), spread
over C{--users} accounts, at C{--concurrency} parallel clients, driven by
C{benchmarks/load.py}.  "cold" has no C{[router.cache]}; "warm" has one
(TTL an hour) and is measured after one login of every account.  The table
also shows the CPU the proxy and the router's source (auth server, slapd;
C{n/a} for the static file and SQLite, which live in the proxy) spent per
login.  C{main(argv)} returns the exit status and C{measure(settings)} the
results, for C{benchmarks/run.py}.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import attrs

_HERE = Path(__file__).resolve().parent
_REPOSITORY = _HERE.parent
if str(_REPOSITORY) not in sys.path:
    sys.path.insert(0, str(_REPOSITORY))

from benchmarks import procstat  # noqa: E402
from benchmarks.load import raiseFileLimit  # noqa: E402
from benchmarks.run import givenOptions, workDirectory  # noqa: E402
from tests.integration.servers import (  # noqa: E402
    Dovecot,
    Proxy,
    TestCA,
    _dieWithParent,
    _stopProcess,
    _waitForPorts,
    freePort,
)
from tests.integration.slapd import SERVICE_DN, Account, Slapd  # noqa: E402

ROUTERS = ("static", "http", "ldap", "sql")
PASSWORD = "pw"
USER_FORMAT = "bench{}@example.org"
AUTH_SECRET = "benchmark-shared-secret-0123456789"

#: Dovecot serving many short sessions without being the bottleneck.
DOVECOT_TUNING = """
service imap-login {
  service_count = 0
  process_min_avail = 2
  client_limit = 1000
}
service imap {
  service_count = 0
  process_min_avail = 10
}
mail_max_userip_connections = 10000
"""


@attrs.frozen
class Settings:
    """
    The sizes of one run.
    """

    concurrency: int = 20
    duration: float = 10.0
    warmup: float = 1.0
    users: int = 50

    @classmethod
    def quick(cls) -> Settings:
        """
        A smoke test: every router works, numbers are noisy.
        """
        return cls(duration=1.5, warmup=0.3, users=20)


class Sources:
    """
    Dovecot and every router's source, started once for all measurements.
    """

    def __init__(self, directory: Path, settings: Settings) -> None:
        self.directory = directory
        self.settings = settings
        self.users = [USER_FORMAT.format(i) for i in range(settings.users)]
        ca = TestCA(str(directory / "ca"))
        self.dovecot = Dovecot(
            str(directory / "dovecot"),
            "rbench",
            {user: PASSWORD for user in self.users},
            ca=ca,
            masterUser=None,
            extraConfig=DOVECOT_TUNING,
        )
        self.slapd: Slapd | None = None
        self.authPort = 0
        self.authProcess: subprocess.Popen[bytes] | None = None
        self.database = directory / "accounts.sqlite"

    def start(self, routers: tuple[str, ...]) -> None:
        """
        Start Dovecot and the sources the chosen routers need.
        """
        self.dovecot.start()
        self.dovecot.indexAll()
        if "ldap" in routers:
            accounts = {
                user: Account(mail=user, uid=user.partition("@")[0], password=PASSWORD, mailHost="dovecot")
                for user in self.users
            }
            self.slapd = Slapd(str(self.directory / "slapd"), accounts)
            self.slapd.start()
        if "http" in routers:
            self._startAuthServer()
        if "sql" in routers:
            with sqlite3.connect(self.database) as db:
                db.execute("CREATE TABLE accounts (address TEXT PRIMARY KEY, backend TEXT, password TEXT)")
                db.executemany("INSERT INTO accounts VALUES (?, 'dovecot', ?)", [(u, PASSWORD) for u in self.users])
            db.close()

    def _startAuthServer(self) -> None:
        users = self.directory / "auth_users.toml"
        lines = [
            "[auth]",
            'header = "X-Auth-Key"',
            f'secret = "{AUTH_SECRET}"',
            "[defaults]",
            'server = "127.0.0.1"',
            f"ports = {{ imap = {self.dovecot.imap} }}",
        ]
        for user in self.users:
            lines += [f'[users."{user}"]', f'password = "{PASSWORD}"']
        users.write_text("\n".join(lines) + "\n")
        self.authPort = freePort()
        log = self.directory / "auth.log"
        with open(log, "ab") as output:
            self.authProcess = subprocess.Popen(
                [
                    sys.executable,
                    str(_REPOSITORY / "examples" / "auth_server.py"),
                    "--listen",
                    f"tcp:{self.authPort}:interface=127.0.0.1",
                    "--users",
                    str(users),
                    "--quiet",
                ],
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                preexec_fn=_dieWithParent,
            )
        _waitForPorts(self.authProcess, [self.authPort], 20, "the auth server", log)

    def sourcePid(self, router: str) -> int | None:
        """
        The process that answers C{router}'s questions, if it is not the
        proxy itself.
        """
        if router == "http" and self.authProcess is not None:
            return self.authProcess.pid
        if router == "ldap" and self.slapd is not None and self.slapd._process is not None:
            return self.slapd._process.pid
        return None

    def routerTable(self, router: str) -> tuple[str, dict[str, str]]:
        """
        The C{[router]} TOML for C{router} and the files it needs.
        """
        if router == "static":
            return '[router]\ntype = "static"\npath = "routes.toml"\n', {"routes.toml": 'default = "dovecot"\n'}
        if router == "http":
            return (
                f'[router]\ntype = "http"\nurl = "http://127.0.0.1:{self.authPort}/auth"\n'
                f'headers = {{ X-Auth-Key = "{AUTH_SECRET}" }}\nconnections = 20\n',
                {},
            )
        if router == "ldap":
            assert self.slapd is not None
            return (
                f'[router]\ntype = "ldap"\nservers = ["{self.slapd.url}"]\nbind_dn = "{SERVICE_DN}"\n'
                'bind_password_file = "ldap.secret"\nbase = "ou=people,dc=example,dc=org"\n'
                'filter = "(mail={user})"\nbackend_attribute = "mailHost"\nauth = "bind"\npool_size = 8\n',
                {"ldap.secret": self.slapd.servicePassword + "\n"},
            )
        return (
            f'[router]\ntype = "sql"\ndriver = "sqlite3"\ndatabase = "{self.database}"\n'
            'query = "SELECT backend, password FROM accounts WHERE address = :user"\n',
            {},
        )

    def stop(self) -> None:
        """
        Stop everything.
        """
        if self.authProcess is not None:
            _stopProcess(self.authProcess)
        if self.slapd is not None:
            self.slapd.stop()
        self.dovecot.stop()


def proxyConfig(port: int, backendPort: int, router: str) -> str:
    """
    mailproxy with one plain IMAP listener and the backend C{dovecot}.
    """
    return (
        '[proxy]\nhostname = "bench.example.org"\n'
        "[limits]\nconnections_per_address = 0\nfailure_delay = 0.0\n"
        f'[[listener]]\nprotocol = "imap"\nendpoint = "tcp:{port}:interface=127.0.0.1:backlog=4096"\ntls = "none"\n'
        + router
        + f'[backend.dovecot]\nhost = "127.0.0.1"\nports = {{ imap = {backendPort} }}\nforward = "none"\n'
    )


def loadTool(arguments: list[str], timeout: float) -> dict[str, Any]:
    """
    Run C{benchmarks/load.py} and return its JSON summary.
    """
    result = subprocess.run(
        [sys.executable, str(_HERE / "load.py"), *arguments], capture_output=True, timeout=timeout, cwd=_REPOSITORY
    )
    if result.returncode != 0:
        raise RuntimeError("load.py failed:\n" + result.stderr.decode("utf-8", "replace")[-3000:])
    return dict(json.loads(result.stdout.decode().strip().splitlines()[-1]))


def measureOne(sources: Sources, router: str, cached: bool, directory: Path) -> dict[str, Any]:
    """
    Start a proxy with C{router} (and a cache if C{cached}), warm it, and
    measure logins per second.
    """
    settings = sources.settings
    table, files = sources.routerTable(router)
    if cached:
        table += "[router.cache]\nttl = 3600\nsize = 100000\n"
    proxyDirectory = directory / f"proxy-{router}-{'warm' if cached else 'cold'}"
    # Port 0: the proxy logs the port the kernel chose.
    proxy = Proxy(str(proxyDirectory), proxyConfig(0, sources.dovecot.imap, table))
    for name, text in files.items():
        (proxy.directory / name).write_text(text)
    proxy.start()
    [port] = proxy.ports
    common = [
        "logins", "--port", str(port), "--tls", "none", "--password", PASSWORD,
        "--user-format", USER_FORMAT, "--users", str(settings.users),
    ]  # fmt: skip
    try:
        # One login per account: the cache (if any) is warm, the source's
        # and Dovecot's first-login costs are paid before measuring.
        loadTool([*common, "--concurrency", "4", "--count", str(settings.users), "--warmup", "0"], 300)
        sourcePid = sources.sourcePid(router)
        before = (procstat.usage(proxy.pid), procstat.usage(sourcePid) if sourcePid else None)
        result = loadTool(
            [*common, "--concurrency", str(settings.concurrency), "--duration", str(settings.duration),
             "--warmup", str(settings.warmup)],
            settings.duration + settings.warmup + 300,
        )  # fmt: skip
        after = (procstat.usage(proxy.pid), procstat.usage(sourcePid) if sourcePid else None)
    finally:
        proxy.stop()
    completed = max(1, result["completed"])
    result["proxyCpuMsPerLogin"] = procstat.cpuMsPer(before[0], after[0], completed, digits=3)
    result["sourceCpuMsPerLogin"] = procstat.cpuMsPer(before[1], after[1], completed, digits=3)
    result["router"] = router
    result["cache"] = "warm" if cached else "cold"
    return result


def measure(settings: Settings, routers: tuple[str, ...], directory: Path, report: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """
    Every router, cold and warm.

    @param report: called with a progress line before each measurement.
    """
    sources = Sources(directory, settings)
    results = []
    try:
        sources.start(routers)
        for router in routers:
            for cached in (False, True):
                report(f"  {router} ({'warm cache' if cached else 'no cache'}) ...")
                results.append(measureOne(sources, router, cached, directory))
    finally:
        sources.stop()
    return results


def _format(value: Any) -> str:
    return "n/a" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def markdownTable(results: list[dict[str, Any]]) -> str:
    """
    The results as a markdown table.
    """
    lines = [
        "| router | cache | logins/s | p50 ms | p99 ms | proxy CPU ms/login | source CPU ms/login | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['router']} | {r['cache']} | {_format(r['perSecond'])} | {_format(r['p50ms'])} | "
            f"{_format(r['p99ms'])} | {_format(r['proxyCpuMsPerLogin'])} | {_format(r['sourceCpuMsPerLogin'])} | "
            f"{r['errors']} |"
        )
    return "\n".join(lines)


def buildParser() -> argparse.ArgumentParser:
    """
    The command line.
    """
    parser = argparse.ArgumentParser(description="Logins per second through mailproxy with each router.")
    parser.add_argument("--quick", action="store_true", help="small counts: a smoke test")
    parser.add_argument("--routers", default=",".join(ROUTERS), help="a subset of " + ",".join(ROUTERS))
    parser.add_argument("--concurrency", type=int)
    parser.add_argument("--duration", type=float)
    parser.add_argument("--warmup", type=float)
    parser.add_argument("--users", type=int)
    parser.add_argument("--json", metavar="FILE", help="write the raw results")
    parser.add_argument("--keep", metavar="DIR", help="keep configurations and logs in DIR")
    return parser


def main(argv: list[str] | None = None) -> int:
    """
    Run the benchmark and print the table.

    @return: 0, or 1 if any login failed, 2 for bad arguments.
    """
    options = buildParser().parse_args(argv)
    routers = tuple(r.strip() for r in options.routers.split(",") if r.strip())
    if set(routers) - set(ROUTERS):
        print(f"unknown routers: {', '.join(sorted(set(routers) - set(ROUTERS)))}", file=sys.stderr)
        return 2
    settings = Settings.quick() if options.quick else Settings()
    settings = attrs.evolve(settings, **givenOptions(options, ("concurrency", "duration", "warmup", "users")))
    raiseFileLimit()
    directory, holder = workDirectory(options.keep, "mailproxy-routers-")
    started = time.monotonic()
    try:
        results = measure(settings, routers, directory, lambda line: print(line, file=sys.stderr, flush=True))
    finally:
        if holder is not None:
            holder.cleanup()
    table = markdownTable(results)
    print(table)
    print(f"\n{settings.concurrency} clients, {settings.duration:g} s per row, {settings.users} accounts; "
          f"{time.monotonic() - started:.0f} s in all")  # fmt: skip
    if options.json:
        Path(options.json).write_text(
            json.dumps({"settings": attrs.asdict(settings), "results": results, "table": table}, indent=2)
        )
    return 1 if any(r["errors"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
