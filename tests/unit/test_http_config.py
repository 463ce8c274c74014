"""
The configuration HTTP adds: C{protocol = "http"} listeners, backend
C{ports.http}, and the C{[http]} section.
"""

from __future__ import annotations

import os

from twisted.internet.testing import MemoryReactor
from twisted.trial.unittest import SynchronousTestCase

from mailproxy._showconfig import dumpTOML, effectiveConfig
from mailproxy.config import ConfigError, parseConfig
from mailproxy.http import HTTPFrontend
from mailproxy.tap import listenerFactory, serviceFromConfig

LISTENER = '[[listener]]\nprotocol = "http"\nendpoint = "tcp:0"\ntls = "none"\n'
BACKENDS = """\
[router]
type = "static"
path = "routes.toml"

[backend.old]
host = "127.0.0.1"
ports = { imap = 143, http = 8080 }

[backend.mailonly]
host = "127.0.0.1"
ports = { imap = 143 }
"""


class HTTPConfigTests(SynchronousTestCase):
    """
    Loading http listeners and the [http] section.
    """

    def parse(self, text: str, secret: bytes | None = None):
        """
        Parse C{text} beside a route table (and a cookie key file holding
        C{secret}, if given).
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        with open(os.path.join(directory, "routes.toml"), "w") as f:
            f.write('default = "old"\n')
        if secret is not None:
            with open(os.path.join(directory, "cookie.secret"), "wb") as f:
                f.write(secret + b"\n")
        return parseConfig(text, os.path.join(directory, "mailproxy.toml"))

    def assertConfigError(self, text: str, message: str) -> None:
        """
        C{text} is refused with C{message} in the error.
        """
        error = self.assertRaises(ConfigError, self.parse, text)
        self.assertIn(message, str(error))

    def test_settings(self) -> None:
        """
        The [http] section reaches the http listeners: the key file's first
        line, the pins longest first, the limits.
        """
        config = self.parse(
            "[proxy]\nworkers = 1\n" + LISTENER + BACKENDS + '[http]\ncookie_secret_file = "cookie.secret"\n'
            'default_backend = "old"\npins = { "/login" = "old", "/login/admin" = "old" }\n'
            "max_header_size = 8192\nkeepalive_timeout = 5\n",
            secret=b"the key",
        )
        settings = config.listeners[0].http
        self.assertEqual(settings.cookieSecret, b"the key")
        self.assertEqual(settings.defaultBackend, "old")
        self.assertEqual(settings.pins, (("/login/admin", "old"), ("/login", "old")))
        self.assertEqual((settings.maxHeaderSize, settings.keepaliveTimeout, settings.maxHeaders), (8192, 5.0, 100))
        self.assertEqual(config.warnings, ())

    def test_randomKeyWarned(self) -> None:
        """
        Without cookie_secret_file each start signs with a random key; with
        more than one worker the check warns that cookies then fail.
        """
        config = self.parse("[proxy]\nworkers = 2\n" + LISTENER + BACKENDS + '[http]\ndefault_backend = "old"\n')
        self.assertEqual(len(config.listeners[0].http.cookieSecret), 32)
        self.assertIn("http.cookie_secret_file: unset", "\n".join(config.warnings))

    def test_randomKeyNotAChange(self) -> None:
        """
        Read twice without cookie_secret_file, the listeners differ in
        their random keys only, which a reload does not count as a change
        needing a restart; other [http] changes do.
        """
        text = "[proxy]\nworkers = 1\n" + LISTENER + BACKENDS + '[http]\ndefault_backend = "old"\n'
        first, second = self.parse(text), self.parse(text)
        self.assertNotEqual(first.listeners[0].http.cookieSecret, second.listeners[0].http.cookieSecret)
        self.assertEqual(first.listeners, second.listeners)
        self.assertNotEqual(first.listeners, self.parse(text + "keepalive_timeout = 5\n").listeners)

    def test_refusals(self) -> None:
        """
        An http listener needs [http] with a default_backend serving http;
        pins must be paths to such backends; [http] without an http
        listener, and STARTTLS on one, are refused.
        """
        self.assertConfigError(LISTENER + BACKENDS, 'http: required with a protocol = "http" listener')
        self.assertConfigError(LISTENER + BACKENDS + "[http]\n", "http.default_backend: required")
        self.assertConfigError(
            LISTENER + BACKENDS + '[http]\ndefault_backend = "mailonly"\n',
            "http.default_backend: backend 'mailonly' has no ports.http",
        )
        self.assertConfigError(
            LISTENER + BACKENDS + '[http]\ndefault_backend = "olde"\n', "http.default_backend: no [backend.olde]"
        )
        self.assertConfigError(
            LISTENER + BACKENDS + '[http]\ndefault_backend = "old"\npins = { "login" = "old" }\n',
            "http.pins.login: a path prefix starts with /",
        )
        self.assertConfigError(
            LISTENER.replace("imap", "x").replace('protocol = "http"', 'protocol = "imap"') + BACKENDS
            + '[http]\ndefault_backend = "old"\n',
            'http: no [[listener]] has protocol = "http"',
        )
        self.assertConfigError(
            LISTENER.replace('tls = "none"', 'tls = "starttls"') + BACKENDS + '[http]\ndefault_backend = "old"\n',
            'listener[0].tls: HTTP has no STARTTLS: "implicit" or "none"',
        )

    def test_refusedListenerNotUnused(self) -> None:
        """
        An http listener refused because no backend serves http gets that
        one problem; [http] is not also called unused.
        """
        backends = BACKENDS.replace("imap = 143, http = 8080", "imap = 143")
        error = self.assertRaises(
            ConfigError, self.parse, LISTENER + backends + '[http]\ndefault_backend = "old"\n'
        )
        self.assertEqual(
            [problem.split(": ", 1)[1] for problem in error.problems],
            ["listener[0].protocol: no backend serves 'http'; add ports.http to a [backend.NAME] table"],
        )

    def test_listenerBuilt(self) -> None:
        """
        The listener's factory builds the HTTP front end with the section.
        """
        config = self.parse(LISTENER + BACKENDS + '[http]\ndefault_backend = "old"\n')
        service = serviceFromConfig(config, MemoryReactor())
        factory = listenerFactory(service.context, config.listeners[0])
        protocol = factory.buildProtocol(None)
        self.assertIsInstance(protocol, HTTPFrontend)
        self.assertEqual(protocol.settings.defaultBackend, "old")

    def test_shown(self) -> None:
        """
        C{mailproxy show-config} shows the [http] section with the key's
        file, never the key, and what it shows loads as the same settings.
        """
        config = self.parse(
            "[proxy]\nworkers = 1\n" + LISTENER + BACKENDS + '[http]\ncookie_secret_file = "cookie.secret"\n'
            'default_backend = "old"\npins = { "/login" = "old" }\n',
            secret=b"the key",
        )
        text = dumpTOML(effectiveConfig(config, {}))
        self.assertNotIn("the key", text)
        self.assertIn('cookie_secret_file = "' + os.path.dirname(config.path) + '/cookie.secret"', text)
        again = parseConfig(text, config.path)
        self.assertEqual(again.listeners[0].http, config.listeners[0].http)
        self.assertEqual(again.listeners[0].http.cookieSecret, b"the key")
