"""
Worker processes, end to end: the proxy with C{[proxy] workers = 2} in
front of the two real Dovecot servers of the migration drill
(L{tests.integration.test_migration}), driven by bare IMAP clients and the
C{mailproxy} command.

Which worker the kernel gives a connection to is its choice: to know that
both workers hold sessions, a test stops one worker (SIGSTOP) while it
connects clients, so that the other accepts them, then lets it go on
(SIGCONT).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from .servers import requireServer, sharedFixture
from .test_migration import (
    ACCOUNTS,
    MOVED_BYE,
    MOVING,
    PASSWORD,
    STAYING,
    TIMEOUT,
    DrillProxy,
    DrillServers,
    IMAPClient,
    adminRequest,
    mailproxyCommand,
)

_REPOSITORY = Path(__file__).resolve().parent.parent.parent

#: connections_per_address of the proxy under test: more than the twenty
#: idling clients, which all come from 127.0.0.1.
LIMIT = 25


def _state(pid: int) -> str:
    """
    The state of process C{pid} (C{T}: stopped), from C{/proc}.
    """
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


class WorkersProxy(DrillProxy):
    """
    The drill's proxy with two workers and a connection limit per address.
    """

    def __init__(self, servers: DrillServers) -> None:
        super().__init__(servers, grace=5)
        self.text = self.text.replace(
            '[proxy]\nhostname = "proxy.example.org"\n', '[proxy]\nhostname = "proxy.example.org"\nworkers = 2\n'
        ).replace("[limits]\n", f"[limits]\nconnections_per_address = {LIMIT}\n")
        assert "workers = 2" in self.text and "connections_per_address" in self.text
        self.proxy.configPath.write_text(self.text)

    def workers(self) -> dict[int, int]:
        """
        Each worker's process id, by its number, from C{/stats}.
        """
        status, body = adminRequest(self, "/stats")
        assert status == 200, body
        return {int(number): worker["pid"] for number, worker in json.loads(body)["workers"].items()}

    def sessions(self) -> list[dict[str, Any]]:
        """
        C{/sessions}.
        """
        status, body = adminRequest(self, "/sessions")
        assert status == 200, body
        answer = json.loads(body)
        assert answer["count"] == len(answer["sessions"])
        return answer["sessions"]  # type: ignore[no-any-return]

    def log(self) -> str:
        """
        The proxy's log so far.
        """
        return self.proxy.logPath.read_text()


class WorkersTests(SynchronousTestCase):
    """
    Sessions, moves, supervision and reloads across two workers.
    """

    def setUp(self) -> None:
        self.servers = sharedFixture("mail servers", __name__, DrillServers.start)
        self.proxy = WorkersProxy(self.servers)
        self.proxy.start()
        self.addCleanup(self.proxy.stop)
        self.pids = self.waitForWorkers(2)

    def waitForWorkers(self, count: int, gone: frozenset[int] = frozenset()) -> dict[int, int]:
        """
        Wait until C{count} workers serve, none of them one of C{gone}.
        """
        deadline = time.monotonic() + TIMEOUT
        while True:
            pids = self.proxy.workers()
            if len(pids) == count and not gone & set(pids.values()):
                return pids
            if time.monotonic() > deadline:
                self.fail(f"workers serving: {pids}\n{self.proxy.log()[-3000:]}")
            time.sleep(0.1)

    @contextmanager
    def onlyWorker(self, number: int) -> Iterator[None]:
        """
        While the block runs, only worker C{number} accepts: the others
        are stopped.
        """
        others = [pid for n, pid in self.pids.items() if n != number]
        for pid in others:
            os.kill(pid, signal.SIGSTOP)
        for pid in others:
            # kill() returns before the process stops: one still waking up
            # may take the next connection (the kernel wakes one worker per
            # connection) and then stop with it unanswered.
            deadline = time.monotonic() + TIMEOUT
            while _state(pid) != "T" and time.monotonic() < deadline:
                time.sleep(0.005)
        try:
            yield
        finally:
            for pid in others:
                os.kill(pid, signal.SIGCONT)

    def connect(self) -> IMAPClient:
        client = IMAPClient(self.proxy.imap)
        self.addCleanup(client.close)
        return client

    def idlers(self) -> dict[str, IMAPClient]:
        """
        The twenty drill accounts logged in and idling: the even ones
        through worker 1, the odd ones through worker 2.
        """
        clients = {}
        for number, accounts in ((1, ACCOUNTS[0::2]), (2, ACCOUNTS[1::2])):
            with self.onlyWorker(number):
                for account in accounts:
                    client = self.connect()
                    self.assertEqual(client.login(account), f"{account} on old")
                    client.idle()
                    clients[account] = client
        return clients

    def test_sessionsAndMoveInEveryWorker(self) -> None:
        """
        C{/sessions} lists the sessions of both workers, each with its
        worker; C{mailproxy move} of ten accounts, five in each worker,
        drops exactly their sessions (the clients get the BYE of a move)
        while the others idle on; C{mailproxy sessions} and C{stats} show
        the whole machine.
        """
        clients = self.idlers()
        sessions = self.proxy.sessions()
        self.assertEqual(sorted(s["account"] for s in sessions), sorted(ACCOUNTS))
        byAccount = {s["account"]: s["worker"] for s in sessions}
        self.assertEqual({byAccount[a] for a in ACCOUNTS[0::2]}, {1})
        self.assertEqual({byAccount[a] for a in ACCOUNTS[1::2]}, {2})
        self.assertEqual({byAccount[a] for a in MOVING}, {1, 2})

        listed = mailproxyCommand("sessions", "--config", str(self.proxy.proxy.configPath))
        self.assertEqual(listed.returncode, 0, listed.stderr)
        self.assertIn("20 sessions", listed.stdout)
        stats = mailproxyCommand("stats", "--json", "--config", str(self.proxy.proxy.configPath))
        self.assertEqual(stats.returncode, 0, stats.stderr)
        self.assertEqual(json.loads(stats.stdout)["sessions"]["open"], 20)

        moved = mailproxyCommand("move", *MOVING, "new", "--config", str(self.proxy.proxy.configPath))
        self.assertEqual(moved.returncode, 0, moved.stderr)
        self.assertIn("10 open sessions dropped", moved.stdout)
        for account in MOVING:
            self.assertEqual(clients[account].untilClosed(), [MOVED_BYE], account)
        for account in STAYING:
            self.assertEqual(clients[account].done()[-1].split()[1], b"OK", account)
        self.assertEqual(sorted(s["account"] for s in self.proxy.sessions()), sorted(STAYING))
        # Both workers route the moved accounts to their new home.
        for number in (1, 2):
            with self.onlyWorker(number):
                client = self.connect()
                self.assertEqual(client.login(MOVING[number]), f"{MOVING[number]} on new")
                client.close()

    def test_killedWorkerReplaced(self) -> None:
        """
        A worker killed with SIGKILL while clients log in is replaced (the
        log says so); the other worker's sessions go on, and new logins
        succeed, in both workers.
        """
        clients = self.idlers()
        killed = self.pids[1]
        os.kill(killed, signal.SIGKILL)
        # Until its replacement serves, health says a worker is missing
        # (200: the other one serves).
        deadline = time.monotonic() + TIMEOUT
        while True:
            status, body = adminRequest(self.proxy, "/health")
            health = json.loads(body)
            if health.get("workers") == {"configured": 2, "serving": 1}:
                break
            self.assertLess(time.monotonic(), deadline, health)
            time.sleep(0.01)
        self.assertEqual((status, health["status"]), (200, "degraded"))
        # Logins go on while the parent replaces the worker: those the
        # killed worker had accepted fail with it; the others succeed.
        succeeded = 0
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            try:
                client = self.connect()
                client.command(f'LOGIN "{ACCOUNTS[0]}" "{PASSWORD}"')
                client.close()
                succeeded += 1
            except (EOFError, OSError, AssertionError):
                pass
            if f"worker 1 (pid {killed}) was killed by signal 9" in self.proxy.log() and succeeded >= 5:
                break
        self.assertGreaterEqual(succeeded, 5)
        self.pids = self.waitForWorkers(2, gone=frozenset({killed}))
        status, body = adminRequest(self.proxy, "/health")
        self.assertEqual((status, json.loads(body)["workers"]), (200, {"configured": 2, "serving": 2}))
        self.assertRegex(self.proxy.log(), rf"worker 1 \(pid {killed}\) was killed by signal 9 after [0-9.]+s; starting another in 0\.[0-9]s")

        for account in ACCOUNTS[0::2]:
            self.assertEqual(clients[account].untilClosed(), [], account)
        for account in ACCOUNTS[1::2]:
            self.assertEqual(clients[account].done()[-1].split()[1], b"OK", account)
        for number in (1, 2):
            with self.onlyWorker(number):
                client = self.connect()
                self.assertEqual(client.login(ACCOUNTS[number]), f"{ACCOUNTS[number]} on old")
                client.close()

    def test_brokenReloadChangesNothing(self) -> None:
        """
        SIGHUP with a broken file: the parent says why and no worker
        reloads (the greeting keeps the old host name in both); a SIGHUP
        with the file mended reloads every worker.
        """
        good = self.proxy.text
        broken = good.replace('hostname = "proxy.example.org"', 'hostname = "changed.example.org"').replace(
            '[router]\ntype = "static"', '[router]\ntype = "nonesuch"'
        )
        self.assertNotEqual(broken, good)
        self.proxy.proxy.configPath.write_text(broken)
        mark = len(self.proxy.log())
        os.kill(self.proxy.proxy.pid, signal.SIGHUP)
        self.waitForLog(mark, "reload failed, every worker keeps the running configuration:")
        for number in (1, 2):
            with self.onlyWorker(number):
                self.assertIn(b" proxy.example.org IMAP proxy ready.", self.greeting())
        self.assertNotIn("] reloaded", self.proxy.log()[mark:])

        self.proxy.proxy.configPath.write_text(good.replace('hostname = "proxy.example.org"', 'hostname = "mended.example.org"'))
        mark = len(self.proxy.log())
        os.kill(self.proxy.proxy.pid, signal.SIGHUP)
        self.waitForLog(mark, "[worker 1] reloaded", "[worker 2] reloaded")
        for number in (1, 2):
            with self.onlyWorker(number):
                self.assertIn(b" mended.example.org IMAP proxy ready.", self.greeting())

    def test_replacementUsesCheckedConfiguration(self) -> None:
        """
        A worker that replaces a dead one runs the configuration the parent
        checked last, not a file edited since (here broken) and not
        reloaded: it starts, and greets with the running host name.
        """
        self.proxy.proxy.configPath.write_text(
            self.proxy.text.replace('hostname = "proxy.example.org"', 'hostname = "edited.example.org"').replace(
                '[router]\ntype = "static"', '[router]\ntype = "nonesuch"'
            )
        )
        killed = self.pids[2]
        os.kill(killed, signal.SIGKILL)
        self.pids = self.waitForWorkers(2, gone=frozenset({killed}))
        status, body = adminRequest(self.proxy, "/health")
        self.assertEqual((status, json.loads(body)["workers"]), (200, {"configured": 2, "serving": 2}))
        with self.onlyWorker(2):
            self.assertIn(b" proxy.example.org IMAP proxy ready.", self.greeting())
            client = self.connect()
            self.assertEqual(client.login(ACCOUNTS[3]), f"{ACCOUNTS[3]} on old")

    def test_parentKilled(self) -> None:
        """
        When the parent dies (SIGKILL: nothing is told), its workers see
        the channel close, drain and exit: no worker outlives it.
        """
        os.kill(self.proxy.proxy.pid, signal.SIGKILL)
        deadline = time.monotonic() + TIMEOUT
        while any(os.path.exists(f"/proc/{pid}") and _state(pid) != "Z" for pid in self.pids.values()):
            self.assertLess(time.monotonic(), deadline, self.pids)
            time.sleep(0.05)

    def test_connectionsPerAddressAcrossWorkers(self) -> None:
        """
        C{connections_per_address} counts the connections of both workers:
        with the limit's worth open from one address, split over the two
        workers, the next connection from it is refused by either.
        """
        sockets = []
        for number, count in ((1, LIMIT // 2), (2, LIMIT - LIMIT // 2)):
            with self.onlyWorker(number):
                for _ in range(count):
                    sockets.append(self.connectFrom("127.0.0.5"))
                    self.assertTrue(_readLine(sockets[-1]).startswith(b"* OK "))
        for each in sockets:
            self.addCleanup(each.close)
        self.assertEqual(len(self.proxy.sessions()), LIMIT)
        for number in (1, 2):
            with self.onlyWorker(number):
                refused = self.connectFrom("127.0.0.5")
                self.addCleanup(refused.close)
                self.assertEqual(_readLine(refused), b"* BYE Too many connections from your address.\r\n")
        sockets.pop().close()
        deadline = time.monotonic() + TIMEOUT
        while len(self.proxy.sessions()) >= LIMIT and time.monotonic() < deadline:
            time.sleep(0.05)
        # The parent saw the close: the address is below its limit again.
        time.sleep(0.2)
        accepted = self.connectFrom("127.0.0.5")
        self.addCleanup(accepted.close)
        self.assertTrue(_readLine(accepted).startswith(b"* OK "))

    def failLogins(self, count: int) -> None:
        """
        Fail C{count} logins in one session, then wait until their lines
        have left the worker: a worker's lines leave at the end of the
        turn that sent the reply, and one stopped before that holds them.
        """
        client = self.connect()
        for _ in range(count):
            reply = client.command(f'LOGIN "{ACCOUNTS[0]}" "wrong"')
            self.assertEqual(reply[-1].split()[1:3], [b"NO", b"[AUTHENTICATIONFAILED]"])
        client.close()

    def failedEvents(self, count: int) -> list[dict[str, Any]]:
        """
        The JSON log's C{login_failed} events, once there are C{count}.
        """
        deadline = time.monotonic() + TIMEOUT
        while True:
            failed = [e for e in self.proxy.events() if e.get("event") == "login_failed"]
            if len(failed) >= count or time.monotonic() > deadline:
                return failed
            time.sleep(0.05)

    def test_failedLoginsAcrossWorkers(self) -> None:
        """
        Failed logins from one address count in both workers: after two in
        worker 1, the next in worker 2 is the address's third (the delay
        grows with it); the JSON log's C{login_failed} events say so, each
        with the worker that served it.
        """
        logged = 0
        for number, failures in ((1, 2), (2, 1)):
            with self.onlyWorker(number):
                self.failLogins(failures)
                logged += failures
                failed = self.failedEvents(logged)
        self.assertEqual([(e["worker"], e["addressFailures"]) for e in failed], [(1, 1), (1, 2), (2, 3)])
        self.assertEqual({e["address"] for e in failed}, {"127.0.0.1"})
        # The worker's number is in the text line's brackets: fail2ban's
        # filters in examples/ find every one of these failures.
        requireServer("fail2ban-regex")
        text = self.proxy.log()
        self.assertEqual(len(re.findall(r"^\S+ \[worker [12]\] authentication failed: ", text, re.MULTILINE)), 3, text[-3000:])
        filters = _REPOSITORY / "examples" / "fail2ban" / "filter.d"
        for log, name in ((self.proxy.proxy.logPath, "mailproxy.conf"), (self.proxy.directory / "events.jsonl", "mailproxy-json.conf")):
            result = subprocess.run(
                ["fail2ban-regex", "-v", str(log), str(filters / name)], capture_output=True, text=True
            )
            self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
            self.assertIn("Failregex: 3 total", result.stdout, name)

    def test_successForgivesAcrossWorkers(self) -> None:
        """
        A login that succeeds in one worker forgives the account's
        failures from its address in every worker: after a failure in
        worker 1 and the account's success in worker 2, the next failure
        in worker 1 is the address's first again.
        """
        with self.onlyWorker(1):
            self.failLogins(1)
            self.failedEvents(1)
        with self.onlyWorker(2):
            client = self.connect()
            self.assertEqual(client.login(ACCOUNTS[0]), f"{ACCOUNTS[0]} on old")
            client.close()
            deadline = time.monotonic() + TIMEOUT
            while not any(e.get("event") == "session_end" for e in self.proxy.events()) and time.monotonic() < deadline:
                time.sleep(0.05)
        # The parent tells worker 1 the count left: its word may follow the
        # success's by a moment.
        time.sleep(0.2)
        with self.onlyWorker(1):
            self.failLogins(1)
            failed = self.failedEvents(2)
        self.assertEqual([(e["worker"], e["addressFailures"]) for e in failed], [(1, 1), (1, 1)])

    def test_shutdownSessionsLogged(self) -> None:
        """
        Sessions a shutdown ends in the workers are logged by the parent
        like any other session's end: each worker's last lines reach the
        log before it exits.
        """
        clients = self.idlers()
        self.proxy.proxy.stop()
        text = self.proxy.log()
        ended = re.findall(r'^\S+ \[worker [12]\] .*end: imap .*reason="dropped: Server shutting down\."', text, re.MULTILINE)
        self.assertEqual(len(ended), len(clients), text[-3000:])

    def connectFrom(self, source: str) -> socket.socket:
        """
        A connection to the proxy from the local address C{source}, its
        greeting not read yet.
        """
        connection = socket.socket()
        connection.settimeout(TIMEOUT)
        connection.bind((source, 0))
        connection.connect(("127.0.0.1", self.proxy.imap))
        return connection

    def greeting(self) -> bytes:
        """
        The greeting of a new connection.
        """
        with socket.create_connection(("127.0.0.1", self.proxy.imap), TIMEOUT) as connection:
            return _readLine(connection)

    def waitForLog(self, mark: int, *fragments: str) -> None:
        """
        Wait until the log after C{mark} has every one of C{fragments}.
        """
        deadline = time.monotonic() + TIMEOUT
        while not all(fragment in self.proxy.log()[mark:] for fragment in fragments):
            if time.monotonic() > deadline:
                self.fail(f"not logged: {fragments}\n{self.proxy.log()[mark:][-3000:]}")
            time.sleep(0.05)


def _state(pid: int) -> str:
    """
    The state letter of process C{pid} (C{Z}: exited, not yet reaped), or
    C{""} if it is gone.
    """
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return ""


def _readLine(connection: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\r\n"):
        chunk = connection.recv(1024)
        if not chunk:
            break
        data += chunk
    return data

