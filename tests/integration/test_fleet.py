"""
A fleet, end to end: two proxies (A one process, B a parent with two
worker processes; each its own ports)
sharing one real Redis (C{redis-server}), a real HAProxy in front doing
round-robin with a PROXY v2 header to both, the two real Dovecot servers
of the migration drill behind, and one SQL route table (an SQLite file)
that both proxies read through a route cache.
"""

from __future__ import annotations

import json
import socket
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from .servers import Proxy, Redis, fixtureDirectory, freePort, requireServer, sharedFixture
from .test_migration import (
    ACCOUNTS,
    MOVED_BYE,
    PASSWORD,
    TIMEOUT,
    TOKEN,
    DrillServers,
    IMAPClient,
    mailproxyCommand,
)


class Member:
    """
    One proxy of the fleet: a plaintext IMAP listener that takes PROXY
    headers from the balancer, the SQL router on the shared database with
    a route cache, the management endpoint, the JSON event log, and
    C{[cluster]}.
    """

    def __init__(
        self, name: str, servers: DrillServers, redis: Redis, database: Path, cluster: str = "", workers: int = 1
    ) -> None:
        """
        @param cluster: more C{[cluster]} lines; without a C{redis} line
            among them, C{redis://} to C{redis}.
        @param workers: C{[proxy] workers}.
        """
        self.name = name
        self.admin = freePort()
        directory = Path(fixtureDirectory(f"fleet-{name}"))
        text = (
            f'[proxy]\nhostname = "proxy.example.org"\nworkers = {workers}\n'
            "[limits]\nfailure_delay = 0.1\nshutdown_grace = 0\nlogin_failures = 1\n"
            '[[listener]]\nprotocol = "imap"\nendpoint = "tcp:0:interface=127.0.0.1"\ntls = "none"\n'
            'proxy_protocol = true\nproxy_trusted = ["127.0.0.1/32"]\n'
            f'[router]\ntype = "sql"\ndriver = "sqlite3"\ndatabase = "{database}"\n'
            'query = "SELECT backend FROM accounts WHERE address = lower(:user)"\n'
            'routes_query = "SELECT address AS account, backend FROM accounts"\n'
            'set_route = "UPDATE accounts SET backend = :backend WHERE address = lower(:user)"\n'
            "[router.cache]\nttl = 300\n"
            + "".join(
                f'[backend.{server.name}]\nhost = "127.0.0.1"\nports = {{ imap = {server.imap} }}\n'
                for server in (servers.old, servers.new)
            )
            + f'[admin]\nendpoint = "tcp:{self.admin}:interface=127.0.0.1"\ntoken_file = "admin.token"\n'
            '[log]\nformat = "json"\npath = "events.jsonl"\n'
            + "[cluster]\n"
            + (cluster if "redis =" in cluster else f'redis = "redis://127.0.0.1:{redis.port}/0"\n' + cluster)
            + f'name = "{name}"\nheartbeat = 1\ntimeout = 1\nconnect_timeout = 1\n'
        )
        self.proxy = Proxy(str(directory), text)
        (self.proxy.directory / "admin.token").write_text(TOKEN + "\n")

    def start(self) -> None:
        self.proxy.start(choosePorts=self.chooseAdminPort)
        [self.imap] = self.proxy.ports

    def chooseAdminPort(self) -> None:
        old, self.admin = self.admin, freePort()
        text = self.proxy.configPath.read_text().replace(f'"tcp:{old}:', f'"tcp:{self.admin}:')
        self.proxy.configPath.write_text(text)

    def request(self, path: str) -> tuple[int, Any]:
        """
        GET C{path} from its management endpoint: the status and the JSON.
        """
        import urllib.error
        import urllib.request

        request = urllib.request.Request(f"http://127.0.0.1:{self.admin}{path}")
        request.add_header("Authorization", "Bearer " + TOKEN)
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def sessions(self) -> list[dict[str, Any]]:
        status, body = self.request("/sessions")
        assert status == 200, body
        return body["sessions"]  # type: ignore[no-any-return]

    def events(self, event: str) -> list[dict[str, Any]]:
        path = self.proxy.directory / "events.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        return [record for record in map(json.loads, filter(None, lines)) if record.get("event") == event]


class RoundRobin:
    """
    Debian's haproxy in TCP mode, round-robin over the proxies, with a
    PROXY v2 header on each connection.
    """

    def __init__(self, directory: str, targets: list[int]) -> None:
        self.directory = Path(directory)
        self.targets = targets
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        for attempt in range(3):
            self.port = freePort()
            (self.directory / "haproxy.cfg").write_text(
                "global\n    maxconn 200\n"
                "defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 60s\n    timeout server 60s\n"
                f"frontend clients\n    bind 127.0.0.1:{self.port}\n    default_backend proxies\n"
                "backend proxies\n    balance roundrobin\n"
                + "".join(
                    f"    server proxy{index} 127.0.0.1:{port} send-proxy-v2\n" for index, port in enumerate(self.targets)
                )
            )
            log = open(self.directory / "haproxy.log", "wb")
            self.process = subprocess.Popen(
                ["haproxy", "-db", "-f", str(self.directory / "haproxy.cfg")],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
            log.close()
            deadline = time.monotonic() + 10
            while True:
                try:
                    socket.create_connection(("127.0.0.1", self.port), 1).close()
                    return
                except OSError:
                    if self.process.poll() is not None or time.monotonic() > deadline:
                        self.stop()
                        said = (self.directory / "haproxy.log").read_text()
                        if attempt == 2 or "Address already in use" not in said:
                            raise RuntimeError(said)
                        break
                    time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


class FleetTests(SynchronousTestCase):
    """
    Two proxies, C{proxy-a} (one process) and C{proxy-b} (two workers),
    behind HAProxy, sharing Redis.
    """

    def setUp(self) -> None:
        requireServer("redis-server", "redis-cli", "haproxy")
        self.servers = sharedFixture("mail servers", __name__, DrillServers.start)
        directory = Path(fixtureDirectory("fleet"))
        self.redis = Redis(str(directory / "redis"))
        self.redis.start()
        self.addCleanup(self.redis.stop)
        self.database = directory / "accounts.sqlite"
        with sqlite3.connect(self.database) as db:
            db.execute("CREATE TABLE accounts (address TEXT PRIMARY KEY, backend TEXT NOT NULL)")
            db.executemany("INSERT INTO accounts VALUES (?, 'old')", [(account,) for account in ACCOUNTS])
        db.close()
        self.a = Member("proxy-a", self.servers, self.redis, self.database)
        # B runs two worker processes: its parent is its member of the fleet.
        self.b = Member("proxy-b", self.servers, self.redis, self.database, workers=2)
        for member in (self.a, self.b):
            member.start()
            self.addCleanup(member.proxy.stop)
        self.balancer = RoundRobin(str(directory), [self.a.imap, self.b.imap])
        self.balancer.start()
        self.addCleanup(self.balancer.stop)
        for member in (self.a, self.b):
            self.waitFor(lambda member=member: member.request("/health")[1].get("cluster", {}).get("redis") == "ok",
                         f"{member.name} connected to Redis")

    def waitFor(self, condition: Any, what: str) -> None:
        """
        Wait until C{condition()} holds.
        """
        deadline = time.monotonic() + TIMEOUT
        while not condition():
            if time.monotonic() > deadline:
                self.fail(f"not within {TIMEOUT}s: {what}\n{self.a.proxy.logText()[-2000:]}\n{self.b.proxy.logText()[-2000:]}")
            time.sleep(0.1)

    def idlers(self, accounts: list[str]) -> dict[str, IMAPClient]:
        """
        C{accounts} logged in through the balancer, and idling.
        """
        clients = {}
        for account in accounts:
            client = IMAPClient(self.balancer.port)
            self.addCleanup(client.close)
            self.assertEqual(client.login(account), f"{account} on old")
            client.idle()
            clients[account] = client
        return clients

    def listed(self, member: Member) -> dict[str, str]:
        """
        The fleet's sessions as C{member} lists them: each account's proxy.
        """
        return {session["account"]: session["proxy"] for session in member.sessions()}

    def test_sessionsAndMoveAcrossTheFleet(self) -> None:
        """
        IDLE sessions through the balancer land on both proxies; each
        proxy's C{/sessions} (and C{mailproxy sessions}) lists all of them
        with their proxy. C{mailproxy move} through A drops the moved accounts' sessions on B too (the
        clients get the BYE of a move), the others idle on, and B routes
        the moved accounts to their new home at once (its route cache was
        told).
        """
        accounts = ACCOUNTS[:8]
        clients = self.idlers(accounts)
        for member in (self.a, self.b):
            proxies = self.listed(member)
            self.assertEqual(sorted(proxies), sorted(accounts))
            self.assertEqual(set(proxies.values()), {"proxy-a", "proxy-b"})
        listed = mailproxyCommand("sessions", "--config", str(self.a.proxy.configPath))
        self.assertEqual(listed.returncode, 0, listed.stderr)
        self.assertIn("8 sessions", listed.stdout)
        self.assertIn(" proxy=proxy-b\n", listed.stdout)
        onB = [account for account, proxy in self.listed(self.a).items() if proxy == "proxy-b"]
        moving = accounts[:4]
        self.assertTrue(set(moving) & set(onB))
        moved = mailproxyCommand("move", *moving, "new", "--config", str(self.a.proxy.configPath))
        self.assertEqual(moved.returncode, 0, moved.stderr)
        self.assertIn("4 open sessions dropped", moved.stdout)
        for account in moving:
            self.assertEqual(clients[account].untilClosed(), [MOVED_BYE], account)
        for account in accounts[4:]:
            self.assertEqual(clients[account].done()[-1].split()[1], b"OK", account)
        self.assertEqual(sorted(self.listed(self.b)), sorted(accounts[4:]))
        # Two logins through the balancer: one on each proxy, both at the
        # new home.
        for account in moving[:2]:
            client = IMAPClient(self.balancer.port)
            self.assertEqual(client.login(account), f"{account} on new")
            client.close()

    def test_failedLoginsCountedByTheFleet(self) -> None:
        """
        Five failed logins from one client address, spread over both
        proxies by the balancer, count five in the fleet: the fifth is
        logged with five failures of the address (the failed-login delay
        grows with that count).
        """
        for _ in range(5):
            client = IMAPClient(self.balancer.port)
            reply = client.command(f'LOGIN "{ACCOUNTS[0]}" "wrong"')
            self.assertEqual(reply[-1].split()[1], b"NO", reply)
            client.close()
        self.waitFor(lambda: len(self.a.events("login_failed")) + len(self.b.events("login_failed")) == 5, "5 failures logged")
        failures = {member.name: [e["addressFailures"] for e in member.events("login_failed")] for member in (self.a, self.b)}
        self.assertTrue(failures["proxy-a"] and failures["proxy-b"], failures)
        self.assertEqual(max(failures["proxy-a"] + failures["proxy-b"]), 5, failures)
        self.assertEqual(self.redis.cli("GET", "mailproxy:failures:127.0.0.1").strip(), "5")

    def test_redisAwayAndBack(self) -> None:
        """
        With Redis stopped, logins through both proxies still work and
        C{/health} says degraded and why; once Redis is back (empty, as
        after a restart), each proxy registers its open sessions again and
        the registry lists both proxies' sessions.
        """
        self.idlers(ACCOUNTS[:2])
        self.redis.stop()
        for member in (self.a, self.b):
            self.waitFor(lambda member=member: member.request("/health")[1]["status"] == "degraded", f"{member.name} degraded")
            status, health = member.request("/health")
            self.assertEqual(status, 200)
            self.assertEqual(health["cluster"]["redis"], "unavailable")
            self.assertIn(f"Redis at 127.0.0.1:{self.redis.port}", health["cluster"]["why"])
        self.assertIn("serving with this proxy's own state", self.a.proxy.logText())
        self.idlers(ACCOUNTS[2:4])
        self.redis.start()
        for member in (self.a, self.b):
            self.waitFor(lambda member=member: sorted(self.listed(member)) == sorted(ACCOUNTS[:4]), f"{member.name} lists all")
            self.assertEqual(set(self.listed(member).values()), {"proxy-a", "proxy-b"})
            self.assertEqual(member.request("/health")[1]["cluster"], {"name": member.name, "redis": "ok"})


class SecuredRedisTests(SynchronousTestCase):
    """
    A proxy whose Redis speaks only TLS and requires a password
    (C{rediss://}, C{ca_file}, C{password_file}).
    """

    def test_rediss(self) -> None:
        """
        Over TLS, with the certificate checked against C{ca_file} and the
        password from C{password_file}, the proxy registers its sessions:
        Redis holds them, C{/health} says ok, and the password appears in
        no log. A wrong password leaves the proxy serving, degraded.
        """
        requireServer("redis-server", "redis-cli", "openssl")
        servers = sharedFixture("mail servers", __name__, DrillServers.start)
        directory = Path(fixtureDirectory("fleet-tls"))
        certificate, key = servers.ca.issue("redis")
        redis = Redis(str(directory / "redis"), tls=(certificate, key, servers.ca.caPath), password="redis-s3cret")
        redis.start()
        self.addCleanup(redis.stop)
        database = directory / "accounts.sqlite"
        with sqlite3.connect(database) as db:
            db.execute("CREATE TABLE accounts (address TEXT PRIMARY KEY, backend TEXT NOT NULL)")
            db.executemany("INSERT INTO accounts VALUES (?, 'old')", [(account,) for account in ACCOUNTS])
        db.close()
        (directory / "redis.pw").write_text("redis-s3cret\n")
        (directory / "wrong.pw").write_text("not-it\n")
        members = {}
        for name, passwordFile in (("proxy-tls", "redis.pw"), ("proxy-wrong", "wrong.pw")):
            member = Member(
                name, servers, redis, database,
                cluster=f'redis = "rediss://localhost:{redis.port}/2"\nca_file = "{servers.ca.caPath}"\n'
                f'password_file = "{directory / passwordFile}"\n',
            )
            text = member.proxy.configPath.read_text().replace("proxy_protocol = true\n", "").replace(
                'proxy_trusted = ["127.0.0.1/32"]\n', ""
            )
            member.proxy.configPath.write_text(text)
            member.start()
            self.addCleanup(member.proxy.stop)
            members[name] = member
        good, wrong = members["proxy-tls"], members["proxy-wrong"]
        deadline = time.monotonic() + TIMEOUT
        while good.request("/health")[1].get("cluster", {}).get("redis") != "ok":
            self.assertLess(time.monotonic(), deadline, good.proxy.logText()[-2000:])
            time.sleep(0.1)
        client = IMAPClient(good.imap)
        self.addCleanup(client.close)
        self.assertEqual(client.login(ACCOUNTS[0]), f"{ACCOUNTS[0]} on old")
        deadline = time.monotonic() + TIMEOUT
        while ACCOUNTS[0] not in redis.cli("-n", "2", "HGETALL", "mailproxy:sessions:proxy-tls"):
            self.assertLess(time.monotonic(), deadline, good.proxy.logText()[-2000:])
            time.sleep(0.1)
        # The wrong password: serving all the same, and saying why.
        deadline = time.monotonic() + TIMEOUT
        while "why" not in wrong.request("/health")[1].get("cluster", {}):
            self.assertLess(time.monotonic(), deadline, wrong.proxy.logText()[-2000:])
            time.sleep(0.1)
        status, health = wrong.request("/health")
        self.assertEqual((status, health["status"]), (200, "degraded"))
        other = IMAPClient(wrong.imap)
        self.addCleanup(other.close)
        self.assertEqual(other.login(ACCOUNTS[1]), f"{ACCOUNTS[1]} on old")
        for member in (good, wrong):
            self.assertNotIn("s3cret", member.proxy.logText())
            self.assertNotIn("not-it", member.proxy.logText())
