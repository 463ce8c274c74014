"""
The migration drill, end to end: two real Dovecot servers ("old" and "new"),
the proxy as a subprocess with its management endpoint, twenty IMAP clients
idling through it, and the C{mailproxy} command moving ten of them to the
new server and back.

Every account exists on both servers; UID 1 of each INBOX has the Subject
C{"<user> on <server>"}, so the mailbox a client reads shows where its login
went.  Also here: the token on the management endpoint, a reload with a
broken file, SIGTERM draining, and the failed-login line fail2ban reads.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from twisted.trial.unittest import SynchronousTestCase

from .servers import Dovecot, Proxy, TestCA, fixtureDirectory, freePort, requireServer, sharedFixture
from .test_imap import firstMessage

#: Seconds any single client operation may take before the test fails.
TIMEOUT = 30.0

ACCOUNTS = [f"user{n:02d}@example.org" for n in range(20)]
MOVING, STAYING = ACCOUNTS[:10], ACCOUNTS[10:]
PASSWORD = "drill-secret"
TOKEN = "drill-token-0123456789abcdef0123456789abcdef"
MOVED_BYE = b"* BYE Your mailbox has moved, please reconnect.\r\n"
_REPOSITORY = Path(__file__).resolve().parent.parent.parent


class DrillServers:
    """
    Old and new Dovecot with the drill's accounts and mail.
    """

    def __init__(self, directory: str) -> None:
        self.ca = TestCA(os.path.join(directory, "ca"))
        users = {account: PASSWORD for account in ACCOUNTS}
        self.old = Dovecot(os.path.join(directory, "old"), "old", users, ca=self.ca)
        self.new = Dovecot(os.path.join(directory, "new"), "new", users, ca=self.ca)

    @classmethod
    def start(cls) -> DrillServers:
        """
        Start both servers and put each account's first message in place.
        """
        requireServer("dovecot", "doveadm", "openssl")
        servers = cls(fixtureDirectory("drill-dovecot"))
        try:
            for dovecot in (servers.old, servers.new):
                dovecot.start()
                for account in ACCOUNTS:
                    dovecot.deliver(account, firstMessage(account, dovecot.name))
        except BaseException:
            servers.stop()
            raise
        return servers

    def stop(self) -> None:
        """
        Stop both servers.
        """
        self.old.stop()
        self.new.stop()


class DrillProxy:
    """
    The proxy for the drill: one plaintext IMAP listener, the static router,
    the management endpoint, and the JSON event log.
    """

    def __init__(self, servers: DrillServers, grace: float = 30) -> None:
        # The listeners on port 0: the proxy logs the ports the kernel chose.
        # The management endpoint's port is in the configuration, where
        # the mailproxy commands find it: it is chosen (see start).
        directory = fixtureDirectory("drill-proxy")
        self.admin = freePort()
        self.text = (
            '[proxy]\nhostname = "proxy.example.org"\n'
            f"[limits]\nfailure_delay = 0.1\nshutdown_grace = {grace}\n"
            '[tls]\ncertificate = "proxy.pem"\nkey = "proxy.key"\n'
            '[[listener]]\nprotocol = "imap"\nendpoint = "tcp:0:interface=127.0.0.1"\ntls = "none"\n'
            '[[listener]]\nprotocol = "imap"\nendpoint = "tcp:0:interface=127.0.0.1"\ntls = "implicit"\n'
            '[router]\ntype = "static"\npath = "routes.toml"\n'
            + "".join(
                f'[backend.{server.name}]\nhost = "127.0.0.1"\nports = {{ imap = {server.imap} }}\n'
                for server in (servers.old, servers.new)
            )
            + f'[admin]\nendpoint = "tcp:{self.admin}:interface=127.0.0.1"\ntoken_file = "admin.token"\n'
            '[log]\nformat = "json"\npath = "events.jsonl"\n'
        )
        self.proxy = Proxy(directory, self.text)
        self.directory = self.proxy.directory
        self.ca = servers.ca
        self.useCertificate("proxy-one")
        (self.directory / "admin.token").write_text(TOKEN + "\n")
        (self.directory / "routes.toml").write_text(
            '# The drill\'s route table: everyone starts on old.\ndefault = "old"\n\n[accounts]\n'
        )

    def useCertificate(self, name: str) -> None:
        """
        Put a new certificate (common name C{name}, signed by the test CA)
        where the configuration names it.
        """
        certificate, key = self.ca.issue(name)
        (self.directory / "proxy.pem").write_bytes(Path(certificate).read_bytes())
        (self.directory / "proxy.key").write_bytes(Path(key).read_bytes())

    def start(self) -> None:
        """
        Start the proxy and learn its listeners' ports.
        """
        self.proxy.start(choosePorts=self.chooseAdminPort)
        self.imap, self.imaps = self.proxy.ports

    def chooseAdminPort(self) -> None:
        """
        Move the management endpoint to another free port.
        """
        old, self.admin = self.admin, freePort()
        self.text = self.text.replace(f'"tcp:{old}:', f'"tcp:{self.admin}:')
        self.proxy.configPath.write_text(self.text)

    def stop(self) -> None:
        """
        Stop the proxy.
        """
        self.proxy.stop()

    def events(self) -> list[dict[str, Any]]:
        """
        The JSON events the proxy wrote so far.
        """
        path = self.directory / "events.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class IMAPClient:
    """
    A bare IMAP client on a socket, enough for LOGIN, SELECT, FETCH and IDLE.
    """

    def __init__(self, port: int) -> None:
        self.connection = socket.create_connection(("127.0.0.1", port), TIMEOUT)
        self.buffer = b""
        self.tags = 0
        greeting = self.readLine()
        assert greeting.startswith(b"* OK"), greeting

    def readLine(self) -> bytes:
        """
        The next line, CRLF included; literals are read as lines too.
        Dovecot's IDLE keepalive (C{* OK Still here}), which it may send at
        any moment of an IDLE, is skipped.

        @raise EOFError: the server closed the connection.
        """
        while True:
            while b"\r\n" not in self.buffer:
                data = self.connection.recv(65536)
                if not data:
                    raise EOFError(self.buffer)
                self.buffer += data
            line, self.buffer = self.buffer.split(b"\r\n", 1)
            if line != b"* OK Still here":
                return line + b"\r\n"

    def command(self, text: str) -> list[bytes]:
        """
        Send a tagged command and read up to its tagged reply.
        """
        self.tags += 1
        tag = f"t{self.tags}".encode()
        self.connection.sendall(tag + b" " + text.encode() + b"\r\n")
        lines = [self.readLine()]
        while not lines[-1].startswith(tag + b" "):
            lines.append(self.readLine())
        return lines

    def login(self, user: str) -> str:
        """
        Log in as C{user}, select the INBOX and return UID 1's Subject.
        """
        reply = self.command(f'LOGIN "{user}" "{PASSWORD}"')
        assert reply[-1].split()[1] == b"OK", reply
        self.command("SELECT INBOX")
        lines = self.command("UID FETCH 1 (BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        subject = [line for line in lines if line.startswith(b"Subject: ")]
        return subject[0].decode().strip().removeprefix("Subject: ")

    def idle(self) -> None:
        """
        Enter IDLE.
        """
        self.tags += 1
        self.idleTag = f"t{self.tags}".encode()
        self.connection.sendall(self.idleTag + b" IDLE\r\n")
        line = self.readLine()
        assert line.startswith(b"+ "), line

    def done(self) -> list[bytes]:
        """
        Leave IDLE; return the lines up to the IDLE's tagged reply.
        """
        self.connection.sendall(b"DONE\r\n")
        lines = [self.readLine()]
        while not lines[-1].startswith(self.idleTag + b" "):
            lines.append(self.readLine())
        return lines

    def untilClosed(self) -> list[bytes]:
        """
        Every line until the server closes the connection.
        """
        lines = []
        while True:
            try:
                lines.append(self.readLine())
            except EOFError:
                return lines

    def close(self) -> None:
        """
        Close the socket.
        """
        self.connection.close()


def mailproxyCommand(*arguments: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
    """
    Run the C{mailproxy} command of this checkout (with C{input} on its
    standard input).
    """
    environment = dict(os.environ)
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_REPOSITORY), environment.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-c", "import sys; from mailproxy.cli import main; sys.exit(main(sys.argv[1:]))", *arguments],
        capture_output=True,
        text=True,
        env=environment,
        timeout=TIMEOUT * 2,
        input=input,
    )


def metrics(proxy: DrillProxy) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """
    Scrape C{/metrics} and parse it with prometheus_client's own parser.
    """
    _, text = adminRequest(proxy, "/metrics")
    samples = {}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            samples[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def adminRequest(proxy: DrillProxy, path: str, token: str | None = TOKEN) -> tuple[int, bytes]:
    """
    GET C{path} from the management endpoint.
    """
    request = urllib.request.Request(f"http://127.0.0.1:{proxy.admin}{path}")
    if token is not None:
        request.add_header("Authorization", "Bearer " + token)
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def sample(samples: dict, name: str, **labels: str) -> float:
    """
    The value of one sample, 0 if it is absent.
    """
    return samples.get((name, tuple(sorted(labels.items()))), 0)


class DrillTestsMixin:
    """
    The shared servers and this class's proxy.
    """

    grace = 30.0

    def setUp(self) -> None:
        self.servers = sharedFixture("mail servers", __name__, DrillServers.start)
        self.proxy = sharedFixture("proxy", type(self).__qualname__, self._startProxy)

    def _startProxy(self) -> DrillProxy:
        proxy = DrillProxy(self.servers, grace=self.grace)
        proxy.start()
        return proxy

    def connect(self) -> IMAPClient:
        """
        A client of the proxy, closed after the test.
        """
        client = IMAPClient(self.proxy.imap)
        self.addCleanup(client.close)  # type: ignore[attr-defined]
        return client

    def mailproxy(self, *arguments: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
        """
        Run C{mailproxy ARGUMENTS --config} with the proxy's configuration.
        """
        return mailproxyCommand(*arguments, "--config", str(self.proxy.proxy.configPath), input=input)


class MigrationDrillTests(DrillTestsMixin, SynchronousTestCase):
    """
    Twenty idling clients; ten move to the new server and back.
    """

    def test_drill(self) -> None:
        """
        One C{mailproxy move} drops exactly the moved accounts' sessions
        with a BYE; their clients reconnect and read the new server's
        mailbox while the others idle on, untouched, and still get their
        new mail pushed; a second move rolls back. No login fails, and
        C{/metrics}, scraped along the way, shows it per backend.
        """
        clients = {}
        for account in ACCOUNTS:
            client = self.connect()
            self.assertEqual(client.login(account), f"{account} on old")
            client.idle()
            clients[account] = client
        samples = metrics(self.proxy)
        self.assertEqual(sample(samples, "mailproxy_sessions_open", protocol="imap", backend="old"), 20)
        self.assertEqual(sample(samples, "mailproxy_logins_total", protocol="imap", backend="old", result="ok"), 20)

        dry = self.mailproxy("move", "--dry-run", *MOVING, "new")
        self.assertEqual(dry.returncode, 0, dry.stderr)
        self.assertIn("10 open sessions would be dropped", dry.stdout)
        self.assertNotIn('"new"', (self.proxy.directory / "routes.toml").read_text())

        moved = self.mailproxy("move", *MOVING, "new")
        self.assertEqual(moved.returncode, 0, moved.stderr)
        self.assertEqual(moved.stdout.count("(no entry) -> new"), 10, moved.stdout)
        self.assertIn("10 open sessions dropped", moved.stdout)
        self.assertTrue((self.proxy.directory / "routes.toml").read_text().startswith("# The drill's route table"))

        for account in MOVING:
            self.assertEqual(clients[account].untilClosed(), [MOVED_BYE], account)
            clients[account] = self.connect()
            self.assertEqual(clients[account].login(account), f"{account} on new")
            clients[account].idle()

        # The staying clients are still in IDLE on old: new mail is pushed.
        for account in STAYING:
            self.servers.old.deliver(account, firstMessage(account, "old-again"))
        for account in STAYING:
            self.assertEqual(clients[account].readLine(), b"* 2 EXISTS\r\n", account)
            self.assertEqual(clients[account].done()[-1].split()[1:3], [b"OK", b"Idle"], account)
            clients[account].idle()

        samples = metrics(self.proxy)
        self.assertEqual(sample(samples, "mailproxy_sessions_open", protocol="imap", backend="old"), 10)
        self.assertEqual(sample(samples, "mailproxy_sessions_open", protocol="imap", backend="new"), 10)
        self.assertEqual(sample(samples, "mailproxy_logins_total", protocol="imap", backend="new", result="ok"), 10)

        back = self.mailproxy("move", *MOVING, "old")
        self.assertEqual(back.returncode, 0, back.stderr)
        self.assertEqual(back.stdout.count("new -> old"), 10, back.stdout)
        for account in MOVING:
            self.assertEqual(clients[account].untilClosed(), [MOVED_BYE], account)
            clients[account] = self.connect()
            self.assertEqual(clients[account].login(account), f"{account} on old")
        for account in STAYING:
            self.assertEqual(clients[account].done()[-1].split()[1], b"OK", account)

        samples = metrics(self.proxy)
        logins = {
            labels: value for (name, labels), value in samples.items() if name == "mailproxy_logins_total"
        }
        self.assertEqual(
            logins,
            {
                (("backend", "old"), ("protocol", "imap"), ("result", "ok")): 30,
                (("backend", "new"), ("protocol", "imap"), ("result", "ok")): 10,
            },
        )
        self.assertEqual(sample(samples, "mailproxy_sessions_open", protocol="imap", backend="old"), 20)
        self.assertEqual(sample(samples, "mailproxy_sessions_open", protocol="imap", backend="new"), 0)

        ended = [e for e in self.proxy.events() if e.get("event") == "session_end"]
        dropped = [e for e in ended if e["reason"] == "dropped: Your mailbox has moved, please reconnect."]
        self.assertEqual(len(dropped), 20)
        self.assertEqual({e["user"] for e in dropped}, set(MOVING))
        self.assertEqual({e["backend"] for e in dropped if e["bytesOut"] > 0}, {"old", "new"})
        self.assertFalse([e for e in self.proxy.events() if e.get("event") == "login_failed"])


class DomainMoveTests(DrillTestsMixin, SynchronousTestCase):
    """
    A domain whose accounts have entries of their own, moved back.
    """

    def test_domainMoveLeavesNoneBehind(self) -> None:
        """
        Five accounts moved to new with C{--from-file -} get entries of
        their own.  Moving their domain back to old says, in the dry run
        already, that those five would stay on new; with
        C{--include-accounts} (and a hold) they move too: their sessions on
        new get the BYE, and their clients log in to old again.
        """
        accounts = ACCOUNTS[:5]
        moved = self.mailproxy("move", "--from-file", "-", "new", input="# to new\n" + "\n".join(accounts) + "\n")
        self.assertEqual(moved.returncode, 0, moved.stderr)
        self.assertEqual(moved.stdout.count("(no entry) -> new"), 5, moved.stdout)
        clients = {}
        for account in accounts:
            clients[account] = self.connect()
            self.assertEqual(clients[account].login(account), f"{account} on new")
            clients[account].idle()

        dry = self.mailproxy("move", "--domain", "example.org", "--dry-run", "old")
        self.assertEqual(dry.returncode, 0, dry.stderr)
        self.assertEqual(
            dry.stdout,
            "would change: @example.org: (no entry) -> old\n"
            f"not moved: 5 accounts of example.org with their own entry: {', '.join(accounts)} "
            "(--include-accounts moves them too)\n"
            "0 open sessions would be dropped\n",
        )

        back = self.mailproxy("move", "--domain", "example.org", "--include-accounts", "--hold", "1", "old")
        self.assertEqual(back.returncode, 0, back.stderr)
        self.assertEqual(back.stdout.count(" new -> old"), 5, back.stdout)
        self.assertIn("5 open sessions dropped; logins held 1s", back.stdout)
        self.assertNotIn("not moved", back.stdout)
        for account in accounts:
            self.assertEqual(clients[account].untilClosed(), [MOVED_BYE], account)
            again = self.connect()
            self.assertEqual(again.login(account), f"{account} on old")


class ManagementTests(DrillTestsMixin, SynchronousTestCase):
    """
    The management endpoint's guard, health, explain and reload against the
    running proxy.
    """

    def test_token(self) -> None:
        """
        Without a token, or with a wrong one, the endpoint refuses (401);
        with it, it answers.
        """
        self.assertEqual(adminRequest(self.proxy, "/stats", token=None)[0], 401)
        self.assertEqual(adminRequest(self.proxy, "/metrics", token=TOKEN[:-1] + "x")[0], 401)
        status, body = adminRequest(self.proxy, "/stats")
        self.assertEqual(status, 200)
        self.assertIn("sessions", json.loads(body))

    def test_health(self) -> None:
        """
        Health needs no token and finds both servers greeting; without the
        token it says only so, with it it names each backend port.
        """
        status, body = adminRequest(self.proxy, "/health", token=None)
        self.assertEqual((status, json.loads(body)), (200, {"status": "ok"}), body)
        status, body = adminRequest(self.proxy, "/health")
        self.assertEqual(status, 200, body)
        answer = json.loads(body)
        self.assertEqual(answer["status"], "ok")
        self.assertTrue(answer["backends"]["old"]["imap"]["ok"])
        self.assertTrue(answer["backends"]["new"]["imap"]["ok"])

    def test_unauthenticatedBodyRefused(self) -> None:
        """
        A POST without the token that declares a 315 MB body and starts
        sending it is answered 401 over the socket, and the proxy closes
        the connection instead of reading on.
        """
        connection = socket.create_connection(("127.0.0.1", self.proxy.admin), TIMEOUT)
        self.addCleanup(connection.close)
        connection.sendall(
            b"POST /move HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 330301440\r\n\r\n" + b"[" * 65536
        )
        answer = b""
        while True:
            try:
                data = connection.recv(65536)
            except ConnectionResetError:
                break
            if not data:
                break
            answer += data
        self.assertTrue(answer.startswith(b"HTTP/1.1 401 Unauthorized\r\n"), answer)
        self.assertEqual(json.loads(answer.partition(b"\r\n\r\n")[2]), {"error": "a valid bearer token is required"})

    def test_routeExplain(self) -> None:
        """
        C{mailproxy route explain} names the router, rule and backend.
        """
        result = self.mailproxy("route", "explain", "someone@example.org")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(
            result.stdout,
            "account: someone@example.org\nrouter:  static (StaticRouter)\nrule:    default\nbackend: old\n",
        )

    def test_brokenReloadKeepsConfiguration(self) -> None:
        """
        A reload of a broken file (by command and by SIGHUP) keeps the
        running configuration and says why; logins go on; a fixed file
        reloads.
        """
        configPath = self.proxy.proxy.configPath
        configPath.write_text(self.proxy.text + "[limits\n")
        self.addCleanup(configPath.write_text, self.proxy.text)
        result = self.mailproxy("reload")
        self.assertEqual(result.returncode, 1)
        self.assertRegex(
            result.stderr,
            rf"^mailproxy reload: reload failed, the running configuration is kept: {re.escape(str(configPath))}: line \d+, column \d+: Cannot declare ",
        )
        os.kill(self.proxy.proxy.pid, signal.SIGHUP)
        deadline = time.monotonic() + TIMEOUT
        while "reload failed, keeping the running configuration" not in self.proxy.proxy.logText():
            self.assertLess(time.monotonic(), deadline, "no reload failure in the log")
            time.sleep(0.05)
        self.assertEqual(self.connect().login(ACCOUNTS[0]), f"{ACCOUNTS[0]} on old")
        configPath.write_text(self.proxy.text)
        result = mailproxyCommand("reload", "--url", f"http://127.0.0.1:{self.proxy.admin}", "--token-file", str(self.proxy.directory / "admin.token"))
        self.assertEqual((result.returncode, result.stdout), (0, f"reloaded {configPath}\n"), result.stderr)

    def failLogin(self) -> None:
        """
        Log in with a wrong password once (the first time the proxy sees
        one) and wait for the failure in the log.
        """
        if "authentication failed:" in self.proxy.proxy.logText():
            return
        client = self.connect()
        reply = client.command('LOGIN "user00@example.org" "wrong"')
        self.assertIn(b"NO [AUTHENTICATIONFAILED]", reply[-1])
        deadline = time.monotonic() + TIMEOUT
        while "authentication failed:" not in self.proxy.proxy.logText():
            self.assertLess(time.monotonic(), deadline)
            time.sleep(0.05)

    def test_failedLoginLine(self) -> None:
        """
        A wrong password gives the stable failed-login line with the client
        address, in the twistd log and as a JSON event.
        """
        self.failLogin()
        (line,) = [l for l in self.proxy.proxy.logText().splitlines() if "authentication failed:" in l]
        self.assertRegex(
            line,
            r'^\S+ \[mailproxy\.[\w.]+#info\] authentication failed: session=\w+ address=127\.0\.0\.1 '
            r'protocol=imap user="user00@example\.org" attempt=1$',
        )
        (event,) = [e for e in self.proxy.events() if e.get("event") == "login_failed"]
        self.assertEqual((event["address"], event["user"], event["protocol"]), ("127.0.0.1", "user00@example.org", "imap"))

    def test_fail2ban(self) -> None:
        """
        The fail2ban filters in examples/ find the failed login's address,
        in twistd's text log and in the JSON event log.
        """
        requireServer("fail2ban-regex")
        self.failLogin()
        filters = _REPOSITORY / "examples" / "fail2ban" / "filter.d"
        for log, name in (
            (self.proxy.proxy.logPath, "mailproxy.conf"),
            (self.proxy.directory / "events.jsonl", "mailproxy-json.conf"),
        ):
            result = subprocess.run(
                ["fail2ban-regex", "--print-all-matched", "-v", str(log), str(filters / name)],
                capture_output=True,
                text=True,
            )
            self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
            self.assertIn("Failregex: 1 total", result.stdout, name)
            self.assertRegex(result.stdout, r"\|\s+127\.0\.0\.1\s", name)


class Fail2banFilterTests(SynchronousTestCase):
    """
    The fail2ban filters in examples/ against lines written by twistd's own
    text formatter.
    """

    def test_continuationLineIgnored(self) -> None:
        """
        A multi-line entry (a traceback whose message holds a line shaped
        like a failed login, from wherever the text came) continues on
        tab-indented lines: the text filter takes only the genuine line,
        which starts with its time stamp.
        """
        requireServer("fail2ban-regex")
        from twisted.logger import Logger, textFileLogObserver

        from mailproxy._safetext import logQuote

        forged = (
            "[mailproxy.imap._frontend.IMAPFrontend#info] authentication failed: "
            'session=forged address=6.6.6.6 protocol=imap user="x" attempt=1'
        )
        path = Path(self.mktemp())
        with open(path, "w") as f:
            log = Logger(namespace="mailproxy.imap._frontend.IMAPFrontend", observer=textFileLogObserver(f))
            try:
                raise ValueError("bad name: x\n" + forged)
            except ValueError:
                log.failure("imap login handling failed")
            log.info(
                "authentication failed: session={session} address={address} protocol={protocol} user={user} attempt={attempt}",
                session="genuine", address="127.0.0.1", protocol="imap", user=logQuote('a "b"\n' + forged), attempt=1,
            )
        self.assertIn("\n\t" + forged, path.read_text())
        result = subprocess.run(
            ["fail2ban-regex", "-v", str(path), str(_REPOSITORY / "examples" / "fail2ban" / "filter.d" / "mailproxy.conf")],
            capture_output=True,
            text=True,
        )
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn("Failregex: 1 total", result.stdout)
        self.assertEqual(re.findall(r"^\|\s+(\S+)\s+\w{3} \w{3} ", result.stdout, re.M), ["127.0.0.1"])


class CertificateReloadTests(DrillTestsMixin, SynchronousTestCase):
    """
    SIGHUP with new certificate files.
    """

    def servedName(self) -> tuple[str, Any]:
        """
        Connect with TLS; return the common name of the certificate the
        proxy served and the connection (greeting read).
        """
        import ssl

        context = ssl.create_default_context(cafile=self.servers.ca.caPath)
        connection = context.wrap_socket(
            socket.create_connection(("127.0.0.1", self.proxy.imaps), TIMEOUT), server_hostname="localhost"
        )
        self.addCleanup(connection.close)
        subject = dict(item[0] for item in connection.getpeercert()["subject"])
        self.assertTrue(connection.recv(1024).startswith(b"* OK"))
        return subject["commonName"], connection

    def test_sighupNewCertificate(self) -> None:
        """
        After SIGHUP, new connections get the new certificate, while a
        session that was open goes on.
        """
        client = self.connect()
        client.login(ACCOUNTS[0])
        client.idle()
        name, _ = self.servedName()
        self.assertEqual(name, "proxy-one")
        self.proxy.useCertificate("proxy-two")
        self.addCleanup(self.proxy.useCertificate, "proxy-one")
        mark = len(self.proxy.proxy.logText())
        os.kill(self.proxy.proxy.pid, signal.SIGHUP)
        deadline = time.monotonic() + TIMEOUT
        while f"reloaded {self.proxy.proxy.configPath}" not in self.proxy.proxy.logText()[mark:]:
            self.assertLess(time.monotonic(), deadline, "no reload in the log")
            time.sleep(0.05)
        name, _ = self.servedName()
        self.assertEqual(name, "proxy-two")
        self.assertEqual(client.done()[-1].split()[1], b"OK")


class DrainTests(DrillTestsMixin, SynchronousTestCase):
    """
    SIGTERM with sessions open.
    """

    grace = 2.0

    def test_sigterm(self) -> None:
        """
        After SIGTERM the proxy stops accepting at once; an idling session
        goes on until the grace period ends, then gets C{* BYE} and is
        closed, and the proxy exits.
        """
        client = self.connect()
        client.login(ACCOUNTS[0])
        client.idle()
        process = self.proxy.proxy._process
        assert process is not None
        os.kill(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + TIMEOUT
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.proxy.imap), 1).close()
            except ConnectionRefusedError:
                break
            self.assertLess(time.monotonic(), deadline, "still accepting after SIGTERM")
            time.sleep(0.05)
        self.assertIsNone(process.poll())
        self.assertEqual(client.untilClosed(), [b"* BYE Server shutting down.\r\n"])
        # twistd ends with the signal that stopped it.
        self.assertEqual(process.wait(TIMEOUT), -signal.SIGTERM)
        log = self.proxy.proxy.logText()
        self.assertIn("shutting down: 1 sessions open, waiting up to 2s", log)
        self.assertIn("shutting down: closing 1 sessions", log)
