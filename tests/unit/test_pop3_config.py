"""
The configuration keys POP3 adds: C{protocol = "pop3"} listeners and their
C{digest_auth} switch.
"""

from __future__ import annotations

import os

from twisted.internet.testing import MemoryReactor
from twisted.trial.unittest import SynchronousTestCase

from mailproxy.config import ConfigError, parseConfig
from mailproxy.pop3._frontend import POP3Frontend
from mailproxy.tap import listenerFactory, serviceFromConfig

BACKEND = """\
[router]
type = "static"
path = "routes.toml"

[backend.old]
host = "127.0.0.1"
ports = { imap = 143, pop3 = 110 }
"""


def listener(protocol: str = "pop3", extra: str = "") -> str:
    """
    A plaintext C{[[listener]]} of C{protocol} with C{extra} lines.
    """
    return f'[[listener]]\nprotocol = "{protocol}"\nendpoint = "tcp:0"\ntls = "none"\n{extra}'


class POP3ConfigTests(SynchronousTestCase):
    """
    Loading POP3 listeners.
    """

    def parse(self, text: str):
        """
        Parse C{text} beside a route table.
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        with open(os.path.join(directory, "routes.toml"), "w") as f:
            f.write('default = "old"\n')
        return parseConfig(text, os.path.join(directory, "mailproxy.toml"))

    def test_pop3Listener(self) -> None:
        """
        A pop3 listener loads, without digest mechanisms by default, and
        builds a POP3 front end.
        """
        config = self.parse(listener() + BACKEND)
        [pop3] = config.listeners
        self.assertEqual((pop3.protocol, pop3.digestAuth), ("pop3", False))
        factory = listenerFactory(serviceFromConfig(config, MemoryReactor()).context, pop3)
        self.assertIs(factory.protocolClass, POP3Frontend)

    def test_digestAuth(self) -> None:
        """
        C{digest_auth = true} turns digest mechanisms on.
        """
        [pop3] = self.parse(listener(extra="digest_auth = true\n") + BACKEND).listeners
        self.assertTrue(pop3.digestAuth)

    def test_digestAuthNotBoolean(self) -> None:
        """
        C{digest_auth} must be a boolean.
        """
        error = self.assertRaises(ConfigError, self.parse, listener(extra='digest_auth = "yes"\n') + BACKEND)
        self.assertIn("listener[0].digest_auth: must be true or false", str(error))

    def test_digestAuthOnlyWhereOffered(self) -> None:
        """
        C{digest_auth} on a listener whose protocol has no digest mechanisms
        (ManageSieve) is refused.
        """
        error = self.assertRaises(ConfigError, self.parse, listener("sieve", "digest_auth = true\n") + BACKEND)
        self.assertIn("listener[0].digest_auth: only imap, pop3, smtp listeners offer digest mechanisms", str(error))

    def test_digestAuthOnIMAP(self) -> None:
        """
        C{digest_auth = true} is accepted on an IMAP listener (CRAM-MD5).
        """
        [imap] = self.parse(listener("imap", "digest_auth = true\n") + BACKEND).listeners
        self.assertTrue(imap.digestAuth)

    def test_needsPOP3Backend(self) -> None:
        """
        A pop3 listener needs a backend with a pop3 port.
        """
        text = listener() + BACKEND.replace(", pop3 = 110", "")
        error = self.assertRaises(ConfigError, self.parse, text)
        self.assertIn("no backend serves 'pop3'", str(error))
