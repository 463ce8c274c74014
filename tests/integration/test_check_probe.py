"""
C{mailproxy check --probe} against a real Dovecot: the command, run as an
operator runs it, asks the configured router (an SQLite database) about an
account and reads every backend port's greeting, plain and implicit TLS,
reporting a port where nothing listens.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import ssl
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from .common import tomlValue
from .servers import Dovecot, TestCA, fixtureDirectory, refusedPort, requireServer, sharedFixture
from .slapd import SERVICE_DN, Account, Slapd

_REPOSITORY = Path(__file__).resolve().parent.parent.parent


class Store:
    """
    One Dovecot with one account, and the CA of its certificate.
    """

    def __init__(self) -> None:
        requireServer("dovecot", "doveadm", "openssl")
        directory = fixtureDirectory("check-probe")
        self.ca = TestCA(os.path.join(directory, "ca"))
        self.dovecot = Dovecot(
            os.path.join(directory, "store"), "probe", {"alice@example.org": "alice secret"}, ca=self.ca, masterUser=None
        )
        self.dovecot.start()

    def stop(self) -> None:
        """
        Stop the Dovecot.
        """
        self.dovecot.stop()


class ProbeMixin:
    """
    A configuration directory with an SQLite route database, the shared
    Dovecot, and the C{mailproxy} command run as a subprocess.
    """

    # Provided by SynchronousTestCase.
    mktemp: Callable[[], str]

    def setUp(self) -> None:
        self.store = sharedFixture("mail servers", __name__, Store)
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        database = os.path.join(self.directory, "accounts.sqlite")
        with sqlite3.connect(database) as connection:
            connection.execute("CREATE TABLE accounts (address TEXT PRIMARY KEY, backend TEXT)")
            connection.execute("INSERT INTO accounts VALUES ('alice@example.org', 'store')")
        connection.close()
        self.deadPort = refusedPort()

    def writeConfig(self, dead: bool, router: str = "") -> str:
        """
        A configuration routing with SQLite to the Dovecot's IMAP (plain)
        and POP3S (implicit TLS, verified) ports, and with C{dead} a second
        backend whose port refuses connections.

        @return: its path.
        """
        dovecot = self.store.dovecot
        backends = {
            "store": {
                "host": "127.0.0.1",
                "ports": {"imap": dovecot.imap, "pop3": dovecot.pop3s},
                "port_tls": {"pop3": "implicit"},
                "ca_file": self.store.ca.caPath,
                "server_name": "localhost",
            },
        }
        if dead:
            backends["dead"] = {"host": "127.0.0.1", "ports": {"imap": self.deadPort}, "connect_timeout": 5}
        text = (
            '[[listener]]\nprotocol = "imap"\nendpoint = "tcp:0:interface=127.0.0.1"\ntls = "none"\n'
            '[[listener]]\nprotocol = "pop3"\nendpoint = "tcp:0:interface=127.0.0.1"\ntls = "none"\n'
        ) + (
            router
            or '[router]\ntype = "sql"\ndriver = "sqlite3"\ndatabase = "accounts.sqlite"\n'
            'query = "SELECT backend FROM accounts WHERE address = :user"\n'
        )
        for name, table in backends.items():
            text += f"[backend.{name}]\n" + "".join(f"{key} = {tomlValue(value)}\n" for key, value in table.items())
        path = os.path.join(self.directory, "mailproxy.toml")
        with open(path, "w") as f:
            f.write(text)
        return path

    def mailproxy(self, *arguments: str) -> subprocess.CompletedProcess[str]:
        """
        Run C{mailproxy ARGUMENTS} from this checkout.
        """
        environment = dict(os.environ)
        environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_REPOSITORY), environment.get("PYTHONPATH")]))
        return subprocess.run(
            [sys.executable, "-c", "import sys; from mailproxy.cli import main; sys.exit(main())", *arguments],
            env=environment,
            capture_output=True,
            text=True,
            timeout=60,
        )


class CheckProbeTests(ProbeMixin, SynchronousTestCase):
    """
    C{mailproxy check --probe} with an SQLite router.
    """

    def test_everythingAnswers(self) -> None:
        """
        The router routes the account given with C{--user}; each backend
        port greets, through TLS where configured: exit status 0, a line
        for each.
        """
        path = self.writeConfig(dead=False)
        done = self.mailproxy("check", "--config", path, "--probe", "--user", "alice@example.org")
        dovecot = self.store.dovecot
        lines = done.stdout.splitlines()
        self.assertEqual((done.returncode, done.stderr), (0, ""), done.stdout)
        self.assertEqual(len(lines), 4, lines)
        self.assertEqual(lines[0], f"{path}: OK (2 listeners, 1 backend)")
        self.assertEqual(lines[1], "router sql: OK, alice@example.org -> store (rule: sql)")
        self.assertRegex(lines[2], rf"^backend store imap 127\.0\.0\.1:{dovecot.imap}: OK, greeting in \d+\.\d{{3}}s$")
        self.assertRegex(lines[3], rf"^backend store pop3 127\.0\.0\.1:{dovecot.pop3s}: OK, greeting in \d+\.\d{{3}}s$")

    def test_deadBackendAndUnknownAccount(self) -> None:
        """
        A backend port where nothing listens fails the probe (exit status 1)
        with the reason; an account the database does not know is reported
        as refused, the store answering all the same.
        """
        path = self.writeConfig(dead=True)
        done = self.mailproxy("check", path, "--probe")
        lines = done.stdout.splitlines()
        self.assertEqual(done.returncode, 1, done.stdout + done.stderr)
        self.assertEqual(
            lines[1], "router sql: OK, mailproxy-check@example.invalid -> no rule matches (its login would be refused)"
        )
        self.assertTrue(lines[2].startswith(f"backend dead imap 127.0.0.1:{self.deadPort}: FAILED: "), lines)
        self.assertIn("onnection refused", lines[2])
        self.assertTrue(lines[3].startswith("backend store imap "), lines)
        self.assertIn(": OK, greeting in ", lines[3])
        self.assertEqual(done.stderr, f"{path}: 1 probe failed\n")

    def test_startTLSChecked(self) -> None:
        """
        A backend reached with STARTTLS is probed through it: Dovecot's
        IMAP, POP3 and ManageSieve go TLS and their certificate is
        verified; against another CA each fails as every login would.
        """
        dovecot = self.store.dovecot
        path = self.writeConfig(dead=False)
        backend = (
            "[backend.tls]\nhost = \"127.0.0.1\"\n"
            f"ports = {{ imap = {dovecot.imap}, pop3 = {dovecot.pop3}, sieve = {dovecot.sieve} }}\n"
            'tls = "starttls"\nserver_name = "localhost"\nca_file = CA\n'
        )
        with open(path) as f:
            text = f.read()
        with open(path, "w") as f:
            f.write(text + backend.replace("CA", json.dumps(self.store.ca.caPath)))
        done = self.mailproxy("check", path, "--probe")
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
        lines = [line for line in done.stdout.splitlines() if line.startswith("backend tls ")]
        self.assertEqual(len(lines), 3, done.stdout)
        for line in lines:
            self.assertIn(": OK, greeting in ", line)

        other = TestCA(os.path.join(self.directory, "other-ca"))
        with open(path, "w") as f:
            f.write(text + backend.replace("CA", json.dumps(other.caPath)))
        done = self.mailproxy("check", path, "--probe")
        self.assertEqual(done.returncode, 1, done.stdout + done.stderr)
        lines = [line for line in done.stdout.splitlines() if line.startswith("backend tls ")]
        self.assertEqual(len(lines), 3, done.stdout)
        for line in lines:
            self.assertIn(": FAILED: TLS handshake failed: ", line)
            self.assertIn("certificate verify failed", line)
        self.assertEqual(done.stderr, f"{path}: 3 probes failed\n")

    def test_databaseGone(self) -> None:
        """
        Without --probe, a missing SQLite database already fails the check.
        """
        path = self.writeConfig(dead=False)
        os.unlink(os.path.join(self.directory, "accounts.sqlite"))
        done = self.mailproxy("check", path)
        self.assertEqual(done.returncode, 1)
        self.assertIn("router.database: ", done.stderr)
        self.assertIn("does not exist; the proxy never creates it", done.stderr)


class RouterProbeTests(ProbeMixin, SynchronousTestCase):
    """
    C{check --probe} with routers that decide only at login: it shows that
    they reach their directory or auth server, asking no password.
    """

    def slapd(self) -> Slapd:
        """
        A directory with alice, routed to C{store}.
        """

        def start() -> Slapd:
            slapd = Slapd(
                fixtureDirectory("check-probe-slapd"),
                {"alice": Account("alice@example.org", "alice", "alice secret", "store")},
            )
            slapd.start()
            return slapd

        return sharedFixture("check-probe-slapd", __name__, start)

    def ldapRouter(self, url: str, servicePassword: str) -> str:
        """
        The C{[router]} table of an LDAP router on C{url}.
        """
        with open(os.path.join(self.directory, "ldap.secret"), "w") as f:
            f.write(servicePassword + "\n")
        return (
            '[router]\ntype = "ldap"\n'
            f"servers = [{json.dumps(url)}]\n"
            f'bind_dn = "{SERVICE_DN}"\nbind_password_file = "ldap.secret"\n'
            'base = "ou=people,dc=example,dc=org"\n'
            'filter = "(&(objectClass=inetLocalMailRecipient)(mail={user}))"\n'
            'backend_attribute = "mailHost"\nauth = "bind"\nconnect_timeout = 2\ntimeout = 2\n'
        )

    def test_ldapSearches(self) -> None:
        """
        The LDAP router binds as its service account and searches the
        account's entry: one entry for alice, none for a made-up account.
        """
        slapd = self.slapd()
        path = self.writeConfig(dead=False, router=self.ldapRouter(slapd.url, slapd.servicePassword))
        done = self.mailproxy("check", path, "--probe", "--user", "alice@example.org")
        lines = done.stdout.splitlines()
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
        self.assertEqual(
            lines[1],
            "router ldap: OK, the directory answers: 1 entry for alice@example.org "
            "(it routes only at login, with the password)",
        )
        done = self.mailproxy("check", path, "--probe")
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
        self.assertIn("the directory answers: 0 entries for mailproxy-check@example.invalid", done.stdout)

    def test_ldapLocatesOnly(self) -> None:
        """
        With C{auth = "none"} the entry alone routes: the probe shows
        alice's route as C{route explain} does, found in the directory.
        """
        slapd = self.slapd()
        router = self.ldapRouter(slapd.url, slapd.servicePassword).replace('auth = "bind"', 'auth = "none"')
        path = self.writeConfig(dead=False, router=router)
        done = self.mailproxy("check", path, "--probe", "--user", "alice@example.org")
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
        self.assertEqual(
            done.stdout.splitlines()[1],
            "router ldap: OK, alice@example.org -> store (rule: ldap uid=alice,ou=people,dc=example,dc=org)",
        )

    def test_ldapWrongServicePassword(self) -> None:
        """
        A service password the directory refuses fails the probe, saying
        the bind failed.
        """
        slapd = self.slapd()
        path = self.writeConfig(dead=False, router=self.ldapRouter(slapd.url, "not-the-password"))
        done = self.mailproxy("check", path, "--probe")
        self.assertEqual(done.returncode, 1, done.stdout + done.stderr)
        line = done.stdout.splitlines()[1]
        self.assertTrue(line.startswith("router ldap: FAILED: "), line)
        self.assertIn(f"service bind as '{SERVICE_DN}' failed: invalidCredentials", line)
        self.assertNotIn("not-the-password", done.stdout + done.stderr)
        self.assertEqual(done.stderr, f"{path}: 1 probe failed\n")

    def test_httpConnects(self) -> None:
        """
        The HTTP router connects to its auth server (here a listening
        socket that is never read from) and asks nothing; a URL where
        nothing listens fails the probe.
        """
        listening = socket.socket()
        self.addCleanup(listening.close)
        listening.bind(("127.0.0.1", 0))
        listening.listen(5)
        port = listening.getsockname()[1]
        router = f'[router]\ntype = "http"\nurl = "http://127.0.0.1:{port}/auth"\ntimeout = 3\n'
        path = self.writeConfig(dead=False, router=router)
        done = self.mailproxy("check", path, "--probe")
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
        self.assertEqual(
            done.stdout.splitlines()[1],
            f"router http: OK, the auth server accepts connections at 127.0.0.1:{port} "
            "(it routes only at login, with the password)",
        )
        connection, _ = listening.accept()
        self.addCleanup(connection.close)
        connection.settimeout(5)
        self.assertEqual(connection.recv(100), b"")

        dead = refusedPort()
        path = self.writeConfig(dead=False, router=router.replace(str(port), str(dead)))
        done = self.mailproxy("check", path, "--probe")
        self.assertEqual(done.returncode, 1, done.stdout + done.stderr)
        line = done.stdout.splitlines()[1]
        self.assertTrue(line.startswith("router http: FAILED: "), line)
        self.assertIn("refused", line)

    def test_httpsHandshakes(self) -> None:
        """
        Over https the probe completes the TLS handshake and checks the
        auth server's certificate as a question would: with the CA that
        signed it, OK; with another, the probe fails as every login would.
        """
        certificate, key = self.store.ca.issue("authserver")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(certificate, key)
        listening = socket.socket()
        self.addCleanup(listening.close)
        listening.bind(("127.0.0.1", 0))
        listening.listen(5)
        listening.settimeout(30)
        port = listening.getsockname()[1]
        handshakes: list[str] = []

        def serve() -> None:
            for _ in range(2):
                try:
                    connection, _ = listening.accept()
                except OSError:
                    return
                with connection:
                    try:
                        with context.wrap_socket(connection, server_side=True):
                            handshakes.append("done")
                    except (ssl.SSLError, OSError) as e:
                        handshakes.append(type(e).__name__)

        server = threading.Thread(target=serve, daemon=True)
        server.start()
        router = (
            f'[router]\ntype = "http"\nurl = "https://localhost:{port}/auth"\ntimeout = 3\n'
            f"ca_file = {json.dumps(self.store.ca.caPath)}\n"
        )
        path = self.writeConfig(dead=False, router=router)
        done = self.mailproxy("check", path, "--probe")
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
        self.assertEqual(
            done.stdout.splitlines()[1],
            f"router http: OK, the auth server accepts TLS connections at localhost:{port} "
            "(it routes only at login, with the password)",
        )

        other = TestCA(os.path.join(self.directory, "other-ca"))
        path = self.writeConfig(dead=False, router=router.replace(self.store.ca.caPath, other.caPath))
        done = self.mailproxy("check", path, "--probe")
        self.assertEqual(done.returncode, 1, done.stdout + done.stderr)
        line = done.stdout.splitlines()[1]
        self.assertTrue(line.startswith("router http: FAILED: "), line)
        self.assertIn("certificate verify failed", line)
        server.join(30)
        self.assertEqual(handshakes[0], "done")
        self.assertEqual(len(handshakes), 2)
