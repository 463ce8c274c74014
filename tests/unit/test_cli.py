"""
Tests for L{mailproxy.cli}: the C{mailproxy} command's arguments, C{check}
on good and bad configurations, and C{run}'s refusal of a bad one.
"""

from __future__ import annotations

import argparse
import io
import os
import shlex
import sqlite3
import subprocess
import sys
import tomllib

from attrs import evolve
from twisted.trial.unittest import SynchronousTestCase

from mailproxy import __version__, cli
from mailproxy._tls import makeSelfSigned
from mailproxy._clidoc import commands
from mailproxy.cli import buildParser, main
from mailproxy.config import loadConfig, parseConfig
from mailproxy.demo import writeDemoConfig

MINIMAL = """\
[[listener]]
protocol = "imap"
endpoint = "tcp:1143:interface=127.0.0.1"
tls = "none"

[router]
type = "static"
path = "routes.toml"

[backend.only]
host = "127.0.0.1"
ports = { imap = 143 }
"""

ROUTES = 'default = "only"\n'


class CommandTestsMixin:
    """
    Run the command with its output captured.
    """

    def setUp(self) -> None:
        self.out = io.StringIO()
        self.err = io.StringIO()
        self.patch(sys, "stdout", self.out)  # type: ignore[attr-defined]
        self.patch(sys, "stderr", self.err)  # type: ignore[attr-defined]
        self.directory = os.path.abspath(self.mktemp())  # type: ignore[attr-defined]
        os.makedirs(self.directory)

    def write(self, name: str, text: str) -> str:
        """
        Write C{text} to the file C{name} in the test's directory.

        @return: the file's path.
        """
        path = os.path.join(self.directory, name)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return path


class CheckTests(CommandTestsMixin, SynchronousTestCase):
    """
    C{mailproxy check FILE}.
    """

    def test_minimal(self) -> None:
        """
        A valid configuration without TLS exits 0 and says it is OK, with its
        counts in the singular.
        """
        self.write("routes.toml", ROUTES)
        path = self.write("proxy.toml", MINIMAL)
        self.assertEqual(main(["check", path]), 0)
        self.assertEqual(self.out.getvalue(), f"{path}: OK (1 listener, 1 backend)\n")
        self.assertEqual(self.err.getvalue(), "")

    def test_demoConfiguration(self) -> None:
        """
        The configuration the demo writes, with its certificate, passes the
        check: two listeners, two backends.
        """
        certificate, key = makeSelfSigned(self.directory)
        path = writeDemoConfig(self.directory, certificate, key, 10993, 10143, {"old": 1, "new": 2})
        self.assertEqual(main(["check", path]), 0)
        self.assertEqual(self.out.getvalue(), f"{path}: OK (2 listeners, 2 backends)\n")
        self.assertEqual(self.err.getvalue(), "")

    def test_badValue(self) -> None:
        """
        A wrong value exits 1 and names the file and the key on stderr;
        nothing goes to stdout.
        """
        self.write("routes.toml", ROUTES)
        path = self.write("proxy.toml", MINIMAL.replace('tls = "none"', 'tls = "sometimes"'))
        self.assertEqual(main(["check", path]), 1)
        self.assertEqual(self.out.getvalue(), "")
        message = self.err.getvalue()
        self.assertTrue(message.startswith(f"{path}: listener[0].tls: "), message)
        self.assertIn("sometimes", message)
        self.assertEqual(message.count("\n"), 2)
        self.assertTrue(message.endswith(f"\n{path}: 1 problem\n"), message)

    def test_badPortTLS(self) -> None:
        """
        A backend's C{port_tls} with a value that is no TLS mode exits 1
        naming the file and the key; a valid one passes.
        """
        self.write("routes.toml", ROUTES)
        ports = "ports = { imap = 143 }\n"
        path = self.write("proxy.toml", MINIMAL.replace(ports, ports + 'port_tls = { imap = "ssl" }\n'))
        self.assertEqual(main(["check", path]), 1)
        message = self.err.getvalue()
        self.assertTrue(message.startswith(f"{path}: backend.only.port_tls.imap: "), message)
        self.assertIn("must be one of none, starttls, implicit", message)

        path = self.write("good.toml", MINIMAL.replace(ports, ports + 'port_tls = { imap = "starttls" }\n'))
        self.assertEqual(main(["check", path]), 0)

    def test_missingFile(self) -> None:
        """
        A configuration file that does not exist exits 1 with its name.
        """
        path = os.path.join(self.directory, "absent.toml")
        self.assertEqual(main(["check", path]), 1)
        self.assertTrue(self.err.getvalue().startswith(f"{path}: "), self.err.getvalue())
        self.assertEqual(self.out.getvalue(), "")

    def test_badRouteTable(self) -> None:
        """
        The check builds the router: a route table that names an unknown
        backend exits 1 with the route table's name.
        """
        routes = self.write("routes.toml", 'default = "elsewhere"\n')
        path = self.write("proxy.toml", MINIMAL)
        self.assertEqual(main(["check", path]), 1)
        message = self.err.getvalue()
        self.assertTrue(message.startswith(f"{routes}: "), message)
        self.assertIn("elsewhere", message)

    def test_certificateClientsRefuse(self) -> None:
        """
        A certificate that does not name the SNI names it is to serve
        passes with a warning naming the file, the setting and the name.
        """
        sni = os.path.join(self.directory, "sni")
        os.makedirs(sni)
        certificate, key = makeSelfSigned(sni, names=("old.example.com",))
        self.write("routes.toml", ROUTES)
        path = self.write(
            "proxy.toml",
            MINIMAL.replace('tls = "none"', 'tls = "implicit"')
            + f'\n[tls]\ncertificate = "{certificate}"\nkey = "{key}"\n'
            + f'[[tls.sni]]\nnames = ["old.example.org"]\ncertificate = "{certificate}"\nkey = "{key}"\n',
        )
        self.assertEqual(main(["check", path]), 0)
        self.assertEqual(
            self.err.getvalue(),
            f"warning: {path}: tls.sni[0].certificate: {certificate} does not name 'old.example.org' "
            "(no subjectAltName covers it), which it is to serve\n",
        )
        path = self.write("proxy.toml", open(path).read().replace('"old.example.org"', '"*.*.example.com"'))
        self.assertEqual(main(["check", path]), 1)
        self.assertIn("tls.sni[0].names: a wildcard is a whole first label", self.err.getvalue())

    def test_keyDoesNotMatch(self) -> None:
        """
        The check loads the certificates: a key that belongs to another
        certificate exits 1 and names the configuration's file and setting,
        and the key file.
        """
        one, two = os.path.join(self.directory, "one"), os.path.join(self.directory, "two")
        os.makedirs(one)
        os.makedirs(two)
        certificate, _ = makeSelfSigned(one)
        _, key = makeSelfSigned(two)
        self.write("routes.toml", ROUTES)
        path = self.write(
            "proxy.toml",
            MINIMAL.replace('tls = "none"', 'tls = "implicit"')
            + f'\n[tls]\ncertificate = "{certificate}"\nkey = "{key}"\n',
        )
        self.assertEqual(main(["check", path]), 1)
        message = self.err.getvalue()
        # The file and the setting first, as for every problem of the file.
        self.assertTrue(message.startswith(f"{path}: tls.key: {key}: "), message)
        self.assertIn("does not match", message)
        self.assertEqual(self.out.getvalue(), "")


class RunTests(CommandTestsMixin, SynchronousTestCase):
    """
    C{mailproxy run --config FILE}, as far as it can be tested without
    running a reactor.
    """

    def test_badConfiguration(self) -> None:
        """
        A configuration that does not load exits 1 with the problem, before
        twistd is involved.
        """
        path = self.write("proxy.toml", "[[listener]]\n")
        self.assertEqual(main(["run", "--config", path]), 1)
        self.assertTrue(self.err.getvalue().startswith(f"{path}: "), self.err.getvalue())

    def test_portTaken(self) -> None:
        """
        A listener whose port is taken stops the start with one line
        naming the file, the listener and why, and exit status 1, not a
        traceback.
        """
        import socket

        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        self.write("routes.toml", 'default = "old"\n')
        path = self.write(
            "proxy.toml",
            f'[[listener]]\nprotocol = "imap"\nendpoint = "tcp:{port}:interface=127.0.0.1"\ntls = "none"\n'
            '[router]\ntype = "static"\npath = "routes.toml"\n'
            '[backend.old]\nhost = "127.0.0.1"\nports = { imap = 143 }\n',
        )
        program = "import sys; from mailproxy.cli import main; sys.exit(main(sys.argv[1:]))"
        done = subprocess.run(
            [sys.executable, "-c", program, "run", "--config", path],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        )
        self.assertEqual(
            (done.returncode, done.stderr),
            (1, f"{path}: listener[0].endpoint: cannot listen on 127.0.0.1:{port}: Address already in use\n"),
        )

    def test_configRequired(self) -> None:
        """
        C{run} without C{--config} is a usage error: exit status 2.
        """
        self.assertEqual(main(["run"]), 2)
        self.assertIn("--config", self.err.getvalue())


class ArgumentTests(CommandTestsMixin, SynchronousTestCase):
    """
    The command line as a whole.
    """

    def test_version(self) -> None:
        """
        C{--version} prints the program name and version and exits 0.
        """
        self.assertEqual(main(["--version"]), 0)
        self.assertEqual(self.out.getvalue(), f"mailproxy {__version__}\n")

    def test_noCommand(self) -> None:
        """
        Without a command the help goes to stderr and the exit status is 2.
        """
        self.assertEqual(main([]), 2)
        self.assertIn("demo", self.err.getvalue())
        self.assertIn("check", self.err.getvalue())

    def test_unknownCommand(self) -> None:
        """
        An unknown command is a usage error.
        """
        self.assertEqual(main(["serve"]), 2)
        self.assertIn("invalid choice", self.err.getvalue())

    def test_demoPortOutOfRange(self) -> None:
        """
        The demo's ports must be TCP ports; anything else is a usage error
        that says why, and nothing is started.
        """
        self.assertEqual(main(["demo", "--imaps-port", "70000"]), 2)
        self.assertIn("port must be 1-65535, not 70000", self.err.getvalue())
        self.assertEqual(main(["demo", "--imap-port", "x"]), 2)
        self.assertIn("not a port number: 'x'", self.err.getvalue())


class CheckEveryProblemTests(CommandTestsMixin, SynchronousTestCase):
    """
    C{mailproxy check} reports every problem in one run, and takes the file
    as C{--config FILE} too.
    """

    def test_configOption(self) -> None:
        """
        C{check --config FILE} is C{check FILE}, as every other command
        takes C{--config}.
        """
        self.write("routes.toml", ROUTES)
        path = self.write("proxy.toml", MINIMAL)
        self.assertEqual(main(["check", "--config", path]), 0)
        self.assertEqual(self.out.getvalue(), f"{path}: OK (1 listener, 1 backend)\n")

    def test_fileOnce(self) -> None:
        """
        Naming two files is a usage error that says how to name one.
        """
        self.assertEqual(main(["check", "a.toml", "--config", "b.toml"]), 2)
        self.assertEqual(
            self.err.getvalue(),
            "mailproxy check: name the configuration file once: check FILE or check --config FILE\n",
        )

    def test_defaultFile(self) -> None:
        """
        Without a file, C{check} checks the one the other commands read by
        default.
        """
        self.patch(cli, "DEFAULT_CONFIG", os.path.join(self.directory, "absent.toml"))
        self.assertEqual(main(["check"]), 1)
        self.assertEqual(
            self.err.getvalue(),
            f"{self.directory}/absent.toml: cannot read: No such file or directory\n"
            f"{self.directory}/absent.toml: 1 problem\n",
        )

    def test_userNeedsProbe(self) -> None:
        """
        C{--user} without C{--probe} is a usage error.
        """
        self.assertEqual(main(["check", "a.toml", "--user", "a@x"]), 2)
        self.assertEqual(self.err.getvalue(), "mailproxy check: --user is for --probe\n")

    def test_everyProblem(self) -> None:
        """
        Several mistakes are each reported on a line naming file and key,
        misspellings with the closest word, then how many there are.
        """
        path = self.write(
            "proxy.toml",
            MINIMAL.replace('tls = "none"', 'tls = "nones"').replace("tcp:1143:", "tcp:imap:")
            + "[limits]\nidle_timout = 5\n",
        )
        self.assertEqual(main(["check", path]), 1)
        self.assertEqual(self.out.getvalue(), "")
        self.assertEqual(
            self.err.getvalue().splitlines(),
            [
                f"{path}: limits.idle_timout: unknown key; allowed keys here: line_length, literal_size, "
                "preauth_timeout, connections_per_address, login_failures, failure_delay, idle_timeout, "
                "backend_timeout, shutdown_grace (did you mean 'idle_timeout'?)",
                f"{path}: listener[0].tls: must be one of implicit, starttls, starttls-required, none, "
                "not 'nones' (did you mean 'none'?)",
                f"{path}: listener[0].endpoint: cannot parse 'tcp:imap:interface=127.0.0.1': "
                "port must be a number, not 'imap'",
                f"{path}: router.path: cannot read '{self.directory}/routes.toml': No such file or directory",
                f"{path}: 4 problems",
            ],
        )

    def test_relativePath(self) -> None:
        """
        A file named relative to the current directory is named absolute on
        every line, the count's included, as the OK line does.
        """
        self.write("routes.toml", ROUTES)
        path = self.write("proxy.toml", MINIMAL.replace('tls = "none"', 'tls = "nones"'))
        self.addCleanup(os.chdir, os.getcwd())
        os.chdir(self.directory)
        self.assertEqual(main(["check", "proxy.toml"]), 1)
        lines = self.err.getvalue().splitlines()
        self.assertEqual([line.split(": ", 1)[0] for line in lines], [path, path], lines)
        self.assertEqual(lines[-1], f"{path}: 1 problem")
        self.write("proxy.toml", MINIMAL)
        self.assertEqual(main(["check", "proxy.toml"]), 0)
        self.assertEqual(self.out.getvalue(), f"{path}: OK (1 listener, 1 backend)\n")

    def test_routeTableAndCertificate(self) -> None:
        """
        A bad route table and a key that does not match its certificate are
        reported in the same run.
        """
        one, two = os.path.join(self.directory, "one"), os.path.join(self.directory, "two")
        os.makedirs(one)
        os.makedirs(two)
        certificate, _ = makeSelfSigned(one)
        _, key = makeSelfSigned(two)
        routes = self.write("routes.toml", 'default = "elsewhere"\n')
        path = self.write(
            "proxy.toml",
            MINIMAL.replace('tls = "none"', 'tls = "implicit"')
            + f'\n[tls]\ncertificate = "{certificate}"\nkey = "{key}"\n',
        )
        self.assertEqual(main(["check", path]), 1)
        lines = self.err.getvalue().splitlines()
        self.assertEqual(len(lines), 3, lines)
        self.assertTrue(lines[0].startswith(f"{routes}: "), lines)
        self.assertTrue(lines[1].startswith(f"{path}: tls.key: {key}: "), lines)
        self.assertEqual(lines[2], f"{path}: 2 problems")

    def test_routerProblemsWithOthers(self) -> None:
        """
        What only building the router finds (a route table naming no
        backend, an SQLite database that does not exist) is reported in the
        same run as the file's own problems, not once they are fixed.
        """
        routes = self.write("routes.toml", 'default = "elsewhere"\n')
        path = self.write("proxy.toml", MINIMAL.replace('tls = "none"', 'tls = "nones"'))
        self.assertEqual(main(["check", path]), 1)
        lines = self.err.getvalue().splitlines()
        self.assertEqual(len(lines), 3, lines)
        self.assertTrue(lines[0].startswith(f"{path}: listener[0].tls: "), lines)
        self.assertTrue(lines[1].startswith(f"{routes}: "), lines)
        self.assertEqual(lines[2], f"{path}: 2 problems")

        router = (
            '[router]\ntype = "sql"\ndriver = "sqlite3"\ndatabase = "accounts.sqlite"\n'
            'query = "SELECT backend FROM accounts WHERE address = :user"\n'
        )
        path = self.write(
            "sql.toml",
            MINIMAL.replace('tls = "none"', 'tls = "nones"').replace(
                '[router]\ntype = "static"\npath = "routes.toml"\n', router
            ),
        )
        self.err.truncate(0)
        self.err.seek(0)
        self.assertEqual(main(["check", path]), 1)
        lines = self.err.getvalue().splitlines()
        self.assertEqual(len(lines), 3, lines)
        self.assertTrue(lines[0].startswith(f"{path}: listener[0].tls: "), lines)
        self.assertTrue(lines[1].startswith(f"{path}: router.database: "), lines)
        self.assertIn("does not exist", lines[1])

    def test_everyRouterProblem(self) -> None:
        """
        Inside a router's options too, one run names every problem: an
        unknown key and a wrong value of the LDAP router; two wrong values
        of the HTTP router.
        """
        self.write("ldap.secret", "service-secret\n")
        ldap = (
            '[router]\ntype = "ldap"\nservers = ["ldap://127.0.0.1:1"]\n'
            'bind_dn = "cn=mailproxy,dc=example,dc=org"\nbind_password_file = "ldap.secret"\n'
            'base = "dc=example,dc=org"\nbackend_atribute = "mailHost"\ndefault_backend = "only"\nauth = "bnd"\n'
        )
        path = self.write("ldap.toml", MINIMAL.replace('[router]\ntype = "static"\npath = "routes.toml"\n', ldap))
        self.assertEqual(main(["check", path]), 1)
        lines = self.err.getvalue().splitlines()
        self.assertEqual([line.split(": ")[1] for line in lines[:-1]], ["router.backend_atribute", "router.auth"], lines)
        self.assertIn("did you mean 'backend_attribute'?", lines[0])
        self.assertIn("must be one of bind, compare, none, not 'bnd'", lines[1])
        self.assertEqual(lines[-1], f"{path}: 2 problems")

        http = '[router]\ntype = "http"\nurl = "http://127.0.0.1:9000/auth"\ntimeout = "x"\nconnections = -1\n'
        path = self.write("http.toml", MINIMAL.replace('[router]\ntype = "static"\npath = "routes.toml"\n', http))
        self.err.truncate(0)
        self.err.seek(0)
        self.assertEqual(main(["check", path]), 1)
        lines = self.err.getvalue().splitlines()
        self.assertEqual([line.split(": ")[1] for line in lines[:-1]], ["router.timeout", "router.connections"], lines)
        self.assertEqual(lines[-1], f"{path}: 2 problems")

    def test_everyChainedRouterProblem(self) -> None:
        """
        A chain's routers are all built, so one run names the problems of
        each: a route table that is missing, then an HTTP router's wrong
        timeout.
        """
        chain = (
            '[router]\ntype = "chain"\n'
            '[[router.routers]]\ntype = "static"\npath = "moved.toml"\n'
            '[[router.routers]]\ntype = "http"\nurl = "http://127.0.0.1:9000/auth"\ntimeout = "x"\n'
        )
        path = self.write("chain.toml", MINIMAL.replace('[router]\ntype = "static"\npath = "routes.toml"\n', chain))
        self.assertEqual(main(["check", path]), 1)
        lines = self.err.getvalue().splitlines()
        self.assertEqual(
            [line.split(": ")[1] for line in lines[:-1]], ["router.routers[0].path", "router.routers[1].timeout"], lines
        )
        self.assertEqual(lines[-1], f"{path}: 2 problems")

    def test_missingSQLiteDatabase(self) -> None:
        """
        An SQLite database that does not exist fails the check (the proxy
        opens it read-only and never creates it: every login would fail).
        """
        router = (
            '[router]\ntype = "sql"\ndriver = "sqlite3"\ndatabase = "accounts.sqlite"\n'
            'query = "SELECT backend FROM accounts WHERE address = :user"\n'
        )
        path = self.write("proxy.toml", MINIMAL.replace('[router]\ntype = "static"\npath = "routes.toml"\n', router))
        self.assertEqual(main(["check", path]), 1)
        database = os.path.join(self.directory, "accounts.sqlite")
        self.assertEqual(
            self.err.getvalue(),
            f"{path}: router.database: {database!r} does not exist; the proxy never creates it, "
            "so every login would fail\n"
            f"{path}: 1 problem\n",
        )
        with open(database, "wb"):
            pass
        self.err.truncate(0)
        self.assertEqual(main(["check", path]), 0)

    def test_tokenFileWarning(self) -> None:
        """
        A token file others can read passes with a warning on stderr.
        """
        self.write("routes.toml", ROUTES)
        token = self.write("admin.token", "t" * 40 + "\n")
        os.chmod(token, 0o644)
        path = self.write("proxy.toml", MINIMAL + '[admin]\ntoken_file = "admin.token"\n')
        self.assertEqual(main(["check", path]), 0)
        self.assertEqual(self.out.getvalue(), f"{path}: OK (1 listener, 1 backend)\n")
        self.assertEqual(
            self.err.getvalue(),
            f"warning: {path}: admin.token_file: {token!r} can be read or written by users other than its "
            f"owner (mode 0644); make it private: chmod 600 {token}\n",
        )
        os.chmod(token, 0o600)
        self.err.truncate(0)
        self.err.seek(0)
        self.assertEqual(main(["check", path]), 0)
        self.assertEqual(self.err.getvalue(), "")


    def test_forwardIDWithoutIMAPWarned(self) -> None:
        """
        C{forward = "id"} on a backend that serves no IMAP passes with a
        warning: its sessions would tell it nothing of the client.
        """
        self.write("routes.toml", ROUTES)
        text = MINIMAL.replace('protocol = "imap"', 'protocol = "pop3"').replace("imap = 143", "pop3 = 110")
        path = self.write("proxy.toml", text + 'forward = "id"\n')
        self.assertEqual(main(["check", path]), 0)
        self.assertEqual(
            self.err.getvalue(),
            f"warning: {path}: backend.only.forward: \"id\" is IMAP's and this backend serves no IMAP: "
            'its sessions tell it nothing of the client (use "auto" or "xclient")\n',
        )
        path = self.write("proxy.toml", MINIMAL + 'forward = "id"\n')
        self.err.truncate(0)
        self.err.seek(0)
        self.assertEqual(main(["check", path]), 0)
        self.assertEqual(self.err.getvalue(), "")


class ConfigShowTests(CommandTestsMixin, SynchronousTestCase):
    """
    C{mailproxy config show}: the effective configuration as TOML.
    """

    def test_defaultsFilled(self) -> None:
        """
        The output is TOML with the defaults filled in and the paths
        absolute, and loads back into the same configuration.
        """
        self.write("routes.toml", ROUTES)
        path = self.write("proxy.toml", MINIMAL.replace("[router]", '[proxy]\nhostname = "mx.example.org"\n[router]'))
        self.assertEqual(main(["config", "show", "--config", path]), 0)
        shown = self.out.getvalue()
        data = tomllib.loads(shown)
        self.assertEqual(data["limits"]["preauth_timeout"], 120.0)
        self.assertEqual(data["backend"]["only"]["ports"], {"imap": 143})
        self.assertEqual(data["backend"]["only"]["forward"], "auto")
        self.assertEqual(data["listener"][0]["digest_auth"], False)
        self.assertEqual(data["router"]["path"], os.path.join(self.directory, "routes.toml"))
        # The router's own defaults, which only its builder knows.
        self.assertEqual(data["router"]["watch_interval"], 2.0)
        self.assertEqual(data["migration"]["journal"], os.path.join(self.directory, "migrations.json"))
        self.assertIn("ports = { imap = 143 }\n", shown)
        original, again = loadConfig(path), parseConfig(shown, path)
        self.assertEqual(evolve(again, router=original.router), original)
        self.assertEqual(again.router.options, {**original.router.options, "watch_interval": 2.0})

    def test_secretsLeftOut(self) -> None:
        """
        Files holding secrets are named, never read out; inline secrets of a
        router (a password in a URL, HTTP headers) are hidden.
        """
        self.write("master.pw", "t0p-secret\n")
        self.write("admin.token", "a" * 40 + "\n")
        router = (
            '[router]\ntype = "http"\nurl = "http://auth:s3cret@127.0.0.1:8080/auth"\n'
            'headers = { X-Auth-Key = "k3y-s3cret" }\n'
        )
        path = self.write(
            "proxy.toml",
            MINIMAL.replace('[router]\ntype = "static"\npath = "routes.toml"\n', router)
            + 'master_user = "proxy"\nmaster_password_file = "master.pw"\n'
            + '[admin]\ntoken_file = "admin.token"\n',
        )
        self.assertEqual(main(["config", "show", "--config", path]), 0)
        shown = self.out.getvalue()
        for secret in ("t0p-secret", "a" * 40, "s3cret", "k3y"):
            self.assertNotIn(secret, shown)
        data = tomllib.loads(shown)
        self.assertEqual(data["backend"]["only"]["master_password_file"], os.path.join(self.directory, "master.pw"))
        self.assertEqual(data["admin"]["token_file"], os.path.join(self.directory, "admin.token"))
        self.assertEqual(data["router"]["url"], "http://auth:***@127.0.0.1:8080/auth")
        self.assertEqual(data["router"]["headers"], {"X-Auth-Key": "(not shown)"})

    def test_attributeNamesShown(self) -> None:
        """
        An option naming a directory attribute is no secret: LDAP's
        C{password_attribute} (here its default, which C{auth = "compare"}
        reads) is shown, so that the output works when loaded back.
        """
        self.write("ldap.secret", "service-s3cret\n")
        router = (
            '[router]\ntype = "ldap"\nservers = ["ldap://127.0.0.1:1"]\n'
            'bind_dn = "cn=mailproxy,dc=example,dc=org"\nbind_password_file = "ldap.secret"\n'
            'base = "dc=example,dc=org"\nfilter = "(mail={user})"\nbackend_attribute = "mailHost"\n'
            'auth = "compare"\n'
        )
        path = self.write("proxy.toml", MINIMAL.replace('[router]\ntype = "static"\npath = "routes.toml"\n', router))
        self.assertEqual(main(["config", "show", "--config", path]), 0)
        shown = self.out.getvalue()
        self.assertNotIn("service-s3cret", shown)
        self.assertEqual(tomllib.loads(shown)["router"]["password_attribute"], "userPassword")

    def test_backendDefaultsShown(self) -> None:
        """
        A router's C{backend_defaults} are shown with their defaults, also
        when the file leaves the table out, and its C{ports} whole (the
        standard ports where the file names only some).
        """
        sqlite3.connect(os.path.join(self.directory, "accounts.sqlite")).close()
        router = (
            '[router]\ntype = "sql"\ndriver = "sqlite3"\ndatabase = "accounts.sqlite"\n'
            'query = "SELECT backend FROM accounts WHERE address = :user"\n'
        )
        text = MINIMAL.replace('[router]\ntype = "static"\npath = "routes.toml"\n', router)
        path = self.write("proxy.toml", text)
        self.assertEqual(main(["config", "show", "--config", path]), 0)
        defaults = tomllib.loads(self.out.getvalue())["router"]["backend_defaults"]
        self.assertEqual(
            (defaults["tls"], defaults["forward"], defaults["connect_timeout"], defaults["ports"]["imap"]),
            ("none", "auto", 10.0, 143),
        )
        path = self.write("proxy.toml", text + '[router.backend_defaults]\nports = { imap = 1143 }\n')
        self.out.truncate(0)
        self.out.seek(0)
        self.assertEqual(main(["config", "show", "--config", path]), 0)
        ports = tomllib.loads(self.out.getvalue())["router"]["backend_defaults"]["ports"]
        self.assertEqual((ports["imap"], ports["pop3"], ports["sieve"]), (1143, 110, 4190))

    def test_routerThatCannotBeBuilt(self) -> None:
        """
        A router that cannot be built (its SQLite database missing) is
        shown as written: no default of what its builder read before it
        stopped.
        """
        router = (
            '[router]\ntype = "sql"\ndriver = "sqlite3"\ndatabase = "accounts.sqlite"\n'
            'query = "SELECT backend FROM accounts WHERE address = :user"\n'
        )
        path = self.write("proxy.toml", MINIMAL.replace('[router]\ntype = "static"\npath = "routes.toml"\n', router))
        self.assertEqual(main(["config", "show", "--config", path]), 0)
        shown = tomllib.loads(self.out.getvalue())["router"]
        self.assertEqual(
            shown,
            {
                "type": "sql",
                "driver": "sqlite3",
                "database": "accounts.sqlite",
                "query": "SELECT backend FROM accounts WHERE address = :user",
            },
        )

    def test_broken(self) -> None:
        """
        A configuration that does not load exits 1 with its problems.
        """
        path = self.write("proxy.toml", MINIMAL.replace("imap = 143", "imap = 0"))
        self.assertEqual(main(["config", "show", "--config", path]), 1)
        self.assertEqual(self.out.getvalue(), "")
        self.assertIn(f"{path}: backend.only.ports.imap: must be at least 1, not 0\n", self.err.getvalue())


class GeneratedDocumentTests(CommandTestsMixin, SynchronousTestCase):
    """
    The bash completion script and the man page, made from the parser.
    """

    def test_manPageHasEveryCommand(self) -> None:
        """
        The man page has a section for every command and names every option
        of each.
        """
        self.assertEqual(main(["manpage"]), 0)
        page = self.out.getvalue()
        self.assertTrue(page.startswith(f'.TH MAILPROXY 1 "" "mailproxy {__version__}"'), page[:80])
        for path, _, command in commands(buildParser()):
            if path and not any(isinstance(a, argparse._SubParsersAction) for a in command._actions):
                self.assertIn(f'.SS "mailproxy {" ".join(path)}"\n', page)
                section = page.split(f'.SS "mailproxy {" ".join(path)}"\n', 1)[1].split(".SS ", 1)[0]
                for action in command._actions:
                    for option in action.option_strings:
                        self.assertIn(option.replace("-", "\\-"), section)
        for name in ("check", "config show", "route explain", "sessions", "stats", "completion", "manpage"):
            self.assertIn(f'.SS "mailproxy {name}"\n', page)

    def test_manPageRenders(self) -> None:
        """
        C{man} renders the page without warnings.
        """
        self.assertEqual(main(["manpage"]), 0)
        page = os.path.join(self.directory, "mailproxy.1")
        with open(page, "w") as f:
            f.write(self.out.getvalue())
        rendered = subprocess.run(
            ["man", "--warnings", "-l", page], capture_output=True, text=True, env={**os.environ, "MANWIDTH": "100"}
        )
        self.assertEqual(rendered.stderr, "")
        self.assertIn("mailproxy check", rendered.stdout)

    def test_readerGone(self) -> None:
        """
        Output piped into a reader that stopped early (C{| head -1}) ends
        the command with status 1 and without a traceback.
        """
        reader, writer = os.pipe()
        os.close(reader)
        stdout = os.fdopen(writer, "w")
        self.addCleanup(stdout.close)
        self.patch(sys, "stdout", stdout)
        self.assertEqual(main(["manpage"]), 1)
        self.assertEqual(self.err.getvalue(), "")

    def complete(self, *words: str) -> list[str]:
        """
        What bash completes the last of C{words} to, with the script loaded.
        """
        self.out.truncate(0)
        self.out.seek(0)
        self.assertEqual(main(["completion", "bash"]), 0)
        script = os.path.join(self.directory, "completion.bash")
        with open(script, "w") as f:
            f.write(self.out.getvalue())
        line = " ".join(shlex.quote(word) for word in words)
        program = (
            f"source {shlex.quote(script)}; COMP_WORDS=({line}); COMP_CWORD=$((${{#COMP_WORDS[@]}} - 1)); "
            'cd "$1"; _mailproxy; printf "%s\\n" "${COMPREPLY[@]}"'
        )
        done = subprocess.run(["bash", "-c", program, "bash", self.directory], capture_output=True, text=True, check=True)
        return [word for word in done.stdout.splitlines() if word]

    def test_completion(self) -> None:
        """
        bash completes commands, subcommands, each command's own options,
        and file names after an option that takes a file.
        """
        self.assertEqual(self.complete("mailproxy", "ch"), ["check"])
        self.assertEqual(self.complete("mailproxy", "route", ""), ["explain", "list", "set", "delete"])
        self.assertEqual(self.complete("mailproxy", "sessions", "--j"), ["--json"])
        self.assertEqual(self.complete("mailproxy", "check", "--p"), ["--probe"])
        self.write("proxy.toml", "")
        self.assertEqual(self.complete("mailproxy", "check", "--config", "pro"), ["proxy.toml"])
