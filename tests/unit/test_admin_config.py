"""
Tests for the operations part of L{mailproxy.config}: C{[admin]}, C{[log]}
and C{[limits] shutdown_grace}.
"""

from __future__ import annotations

import os

from twisted.trial.unittest import SynchronousTestCase

from mailproxy._tls import CertificateSource
from mailproxy.config import AdminConfig, ConfigError, LogConfig, parseConfig

BASE = """\
[[listener]]
protocol = "imap"
endpoint = "tcp:1993:interface=127.0.0.1"
tls = "none"

[router]
type = "static"
path = "routes.toml"

[backend.old]
host = "127.0.0.1"
ports = { imap = 143 }
"""

TOKEN = "0123456789abcdef0123456789abcdef"


class OperationsConfigTests(SynchronousTestCase):
    """
    The C{[admin]} and C{[log]} tables and the shutdown grace period.
    """

    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.path = os.path.join(self.directory, "mailproxy.toml")
        self.write("routes.toml", 'default = "old"\n')
        self.write("admin.token", TOKEN + "\n")
        self.write("cert.pem", "certificate\n")
        self.write("key.pem", "key\n")

    def write(self, name: str, text: str) -> str:
        """
        Write C{text} to C{name} in the test directory; return its path.
        """
        path = os.path.join(self.directory, name)
        with open(path, "w") as f:
            f.write(text)
        return path

    def parse(self, extra: str):
        """
        Parse the base configuration followed by C{extra}.
        """
        return parseConfig(BASE + extra, self.path)

    def assertRefused(self, extra: str, message: str) -> None:
        """
        C{extra} is refused with exactly C{message} after the file name.
        """
        error = self.assertRaises(ConfigError, self.parse, extra)
        self.assertEqual(str(error), f"{self.path}: {message}")

    def test_noAdmin(self) -> None:
        """
        Without C{[admin]} there is no management endpoint; without C{[log]}
        logging is left to twistd in text; the grace period is 30 seconds.
        """
        config = self.parse("")
        self.assertIsNone(config.admin)
        self.assertEqual(config.log, LogConfig(format="text", path=None))
        self.assertEqual(config.limits.shutdownGrace, 30.0)

    def test_adminDefaults(self) -> None:
        """
        A bare C{[admin]} with a token file listens on loopback port 9443;
        the token is read from the file without its line end.
        """
        config = self.parse('[admin]\ntoken_file = "admin.token"\n')
        self.assertEqual(
            config.admin,
            AdminConfig(
                endpoint="tcp:9443:interface=127.0.0.1",
                token=TOKEN.encode("ascii"),
                tokenFile=os.path.join(self.directory, "admin.token"),
            ),
        )

    def test_loopbackByDefault(self) -> None:
        """
        An endpoint without an interface is bound to loopback, IPv4 or IPv6.
        """
        config = self.parse('[admin]\nendpoint = "tcp:8000"\ntoken_file = "admin.token"\n')
        self.assertEqual(config.admin.endpoint, "tcp:8000:interface=127.0.0.1")
        config = self.parse('[admin]\nendpoint = "tcp6:8000"\ntoken_file = "admin.token"\n')
        self.assertEqual(config.admin.endpoint, "tcp6:8000:interface=\\:\\:1")

    def test_tokenNotInRepr(self) -> None:
        """
        The token never shows in the configuration's repr.
        """
        config = self.parse('[admin]\ntoken_file = "admin.token"\n')
        self.assertNotIn(TOKEN, repr(config))

    def test_shortToken(self) -> None:
        """
        A token shorter than 32 characters is refused, with the file named
        and the token not shown.
        """
        path = self.write("short.token", "abc123\n")
        self.assertRefused(
            '[admin]\ntoken_file = "short.token"\n',
            f"admin.token_file: the token in {path!r} has 6 characters; at least 32 "
            "are required (make one with: openssl rand -hex 32)",
        )

    def test_tokenFileRequired(self) -> None:
        """
        C{[admin]} needs C{token_file}.
        """
        self.assertRefused("[admin]\n", "admin.token_file: required")

    def test_missingTokenFile(self) -> None:
        """
        A token file that cannot be read is named.
        """
        path = os.path.join(self.directory, "absent")
        self.assertRefused(
            '[admin]\ntoken_file = "absent"\n',
            f"admin.token_file: cannot read {path!r}: No such file or directory",
        )

    def test_beyondLoopbackNeedsTLS(self) -> None:
        """
        A management endpoint reachable from other hosts must use TLS: the
        token would otherwise cross the network in clear.
        """
        self.assertRefused(
            '[admin]\nendpoint = "tcp:9443:interface=0.0.0.0"\ntoken_file = "admin.token"\n',
            "admin.endpoint: listens on '0.0.0.0', beyond loopback, without TLS: "
            "add certificate and key, or use interface=127.0.0.1",
        )

    def test_tls(self) -> None:
        """
        With a certificate and key, the endpoint may listen beyond loopback.
        """
        config = self.parse(
            '[admin]\nendpoint = "tcp:9443:interface=0.0.0.0"\ntoken_file = "admin.token"\n'
            'certificate = "cert.pem"\nkey = "key.pem"\n'
        )
        self.assertEqual(
            config.admin.tls,
            CertificateSource(
                certificate=os.path.join(self.directory, "cert.pem"),
                key=os.path.join(self.directory, "key.pem"),
            ),
        )

    def test_certificateNeedsKey(self) -> None:
        """
        A certificate without its key is refused.
        """
        self.assertRefused(
            '[admin]\ntoken_file = "admin.token"\ncertificate = "cert.pem"\n', "admin.key: required"
        )

    def test_sameAddressAsListener(self) -> None:
        """
        The endpoint may not take a listener's address and port.
        """
        self.assertRefused(
            '[admin]\nendpoint = "tcp:1993:interface=127.0.0.1"\ntoken_file = "admin.token"\n',
            "admin.endpoint: same address and port as listener[0]",
        )

    def test_notTCP(self) -> None:
        """
        Only TCP endpoints are accepted.
        """
        self.assertRefused(
            '[admin]\nendpoint = "unix:/run/mailproxy.sock"\ntoken_file = "admin.token"\n',
            "admin.endpoint: must be a tcp: or tcp6: endpoint, not 'unix:/run/mailproxy.sock'",
        )

    def test_unknownAdminKey(self) -> None:
        """
        Unknown keys in C{[admin]} are refused with the allowed ones listed
        and the closest one suggested.
        """
        self.assertRefused(
            '[admin]\ntoken_file = "admin.token"\ntoken = "x"\n',
            "admin.token: unknown key; allowed keys here: endpoint, token_file, certificate, key, health_details"
            " (did you mean 'token_file'?)",
        )

    def test_healthDetails(self) -> None:
        """
        C{health_details} is off unless set (C{GET /health} without the
        token says only its status), and must be true or false.
        """
        self.assertFalse(self.parse('[admin]\ntoken_file = "admin.token"\n').admin.healthDetails)
        config = self.parse('[admin]\ntoken_file = "admin.token"\nhealth_details = true\n')
        self.assertTrue(config.admin.healthDetails)
        self.assertRefused(
            '[admin]\ntoken_file = "admin.token"\nhealth_details = "yes"\n',
            "admin.health_details: must be true or false, not a string",
        )

    def test_log(self) -> None:
        """
        C{[log]} takes a format and a path relative to the configuration, or
        C{-} for standard output.
        """
        config = self.parse('[log]\nformat = "json"\npath = "events.jsonl"\n')
        self.assertEqual(config.log, LogConfig("json", os.path.join(self.directory, "events.jsonl")))
        config = self.parse('[log]\npath = "-"\n')
        self.assertEqual(config.log, LogConfig("text", "-"))

    def test_logFormat(self) -> None:
        """
        The format is text or json.
        """
        self.assertRefused('[log]\nformat = "xml"\n', "log.format: must be one of text, json, not 'xml'")

    def test_logDirectoryMissing(self) -> None:
        """
        A log file in a directory that does not exist is refused at load
        time, not at the first event.
        """
        directory = os.path.join(self.directory, "nowhere")
        self.assertRefused(
            '[log]\npath = "nowhere/events.log"\n',
            f"log.path: the directory {directory!r} does not exist",
        )

    def test_shutdownGrace(self) -> None:
        """
        C{shutdown_grace} is a number of seconds, 0 or more.
        """
        self.assertEqual(self.parse("[limits]\nshutdown_grace = 5\n").limits.shutdownGrace, 5.0)
        self.assertEqual(self.parse("[limits]\nshutdown_grace = 0\n").limits.shutdownGrace, 0.0)
        self.assertRefused("[limits]\nshutdown_grace = -1\n", "limits.shutdown_grace: must be at least 0, not -1")


class TokenFileModeTests(SynchronousTestCase):
    """
    A management token file that others may read works, with a warning.
    """

    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.path = os.path.join(self.directory, "mailproxy.toml")
        with open(os.path.join(self.directory, "routes.toml"), "w") as f:
            f.write('default = "old"\n')
        self.token = os.path.join(self.directory, "admin.token")
        with open(self.token, "w") as f:
            f.write(TOKEN + "\n")

    def test_private(self) -> None:
        """
        A token file only its owner may read gives no warning.
        """
        os.chmod(self.token, 0o600)
        config = parseConfig(BASE + '[admin]\ntoken_file = "admin.token"\n', self.path)
        self.assertEqual(config.warnings, ())

    def test_readableByOthers(self) -> None:
        """
        A token file others may read is accepted with a warning naming the
        file, its mode and the fix.
        """
        os.chmod(self.token, 0o644)
        config = parseConfig(BASE + '[admin]\ntoken_file = "admin.token"\n', self.path)
        self.assertEqual(config.admin.token, TOKEN.encode())
        self.assertEqual(
            config.warnings,
            (
                f"{self.path}: admin.token_file: {self.token!r} can be read or written by users other than "
                f"its owner (mode 0644); make it private: chmod 600 {self.token}",
            ),
        )
