"""
Tests for L{mailproxy.cli}: the C{mailproxy} command's arguments, C{check}
on good and bad configurations, and C{run}'s refusal of a bad one.
"""

from __future__ import annotations

import io
import os
import sys

from twisted.trial.unittest import SynchronousTestCase

from mailproxy import __version__
from mailproxy._tls import makeSelfSigned
from mailproxy.cli import main
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
    C{mailproxy check CONFIG}.
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
        self.assertEqual(message.count("\n"), 1)

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

    def test_keyDoesNotMatch(self) -> None:
        """
        The check loads the certificates: a key that belongs to another
        certificate exits 1 and names the key file.
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
        self.assertTrue(message.startswith(f"{key}: "), message)
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
