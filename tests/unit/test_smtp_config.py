"""
The configuration and routing SMTP adds: C{protocol = "smtp"} listeners with
their C{mode}, backend C{ports.mx}, and the static router's answers for
recipients (MX).
"""

from __future__ import annotations

import os

from twisted.internet.testing import MemoryReactor
from twisted.trial.unittest import SynchronousTestCase

from mailproxy.config import ConfigError, parseConfig
from mailproxy.model import Backend, ClientInfo, Rejection, Route, RouteRequest
from mailproxy.routers.static import StaticRouter
from mailproxy.smtp import MXFrontend, SubmissionFrontend
from mailproxy.tap import listenerFactory, serviceFromConfig

BACKEND = """\
[router]
type = "static"
path = "routes.toml"

[backend.old]
host = "127.0.0.1"
ports = { smtp = 587, mx = 25 }
"""


def listener(mode: str | None = "submission", extra: str = "") -> str:
    """
    A plaintext smtp C{[[listener]]} in C{mode} with C{extra} lines.
    """
    text = '[[listener]]\nprotocol = "smtp"\nendpoint = "tcp:0"\ntls = "none"\n'
    if mode is not None:
        text += f'mode = "{mode}"\n'
    return text + extra


class SMTPConfigTests(SynchronousTestCase):
    """
    Loading smtp listeners.
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

    def assertConfigError(self, text: str, message: str) -> None:
        """
        C{text} is refused with C{message} in the error.
        """
        error = self.assertRaises(ConfigError, self.parse, text)
        self.assertIn(message, str(error))

    def test_localDomains(self) -> None:
        """
        An MX listener's C{local_domains} are kept in lower case and
        A-labels; another listener, an address or a non-name is refused
        naming the key.
        """
        config = self.parse(listener("mx", 'local_domains = ["Example.ORG", "bücher.example."]\n') + BACKEND)
        self.assertEqual(config.listeners[0].localDomains, {"example.org", "xn--bcher-kva.example"})
        self.assertEqual(self.parse(listener("mx") + BACKEND).listeners[0].localDomains, frozenset())
        self.assertConfigError(
            listener("submission", 'local_domains = ["example.org"]\n') + BACKEND,
            'listener[0].local_domains: only smtp listeners in mode "mx" receive mail for domains',
        )
        self.assertConfigError(
            listener("mx", 'local_domains = ["a@example.org"]\n') + BACKEND,
            "listener[0].local_domains: 'a@example.org' must be a domain name, without @",
        )
        self.assertConfigError(
            listener("mx", 'local_domains = ["exa mple.org"]\n') + BACKEND,
            "listener[0].local_domains: 'exa mple.org' is not a domain name",
        )

    def test_modes(self) -> None:
        """
        Submission and MX listeners load, connect to ports.smtp and ports.mx,
        and build their front ends.
        """
        config = self.parse(listener("submission") + listener("mx") + BACKEND)
        submission, mx = config.listeners
        self.assertEqual((submission.mode, submission.portName), ("submission", "smtp"))
        self.assertEqual((mx.mode, mx.portName), ("mx", "mx"))
        context = serviceFromConfig(config, MemoryReactor()).context
        self.assertEqual(set(context.backends), {"old"})
        self.assertIsInstance(listenerFactory(context, submission).buildProtocol(None), SubmissionFrontend)
        self.assertIsInstance(listenerFactory(context, mx).buildProtocol(None), MXFrontend)

    def test_modeRequired(self) -> None:
        """
        An smtp listener must say which kind it is.
        """
        self.assertConfigError(listener(None) + BACKEND, "listener[0].mode: required for smtp listeners: submission or mx")

    def test_modeChoices(self) -> None:
        """
        Only submission and mx are modes.
        """
        self.assertConfigError(listener("relay") + BACKEND, "listener[0].mode: must be one of submission, mx, not 'relay'")

    def test_modeOnlyForSMTP(self) -> None:
        """
        Other protocols have no mode.
        """
        text = '[[listener]]\nprotocol = "imap"\nendpoint = "tcp:0"\ntls = "none"\nmode = "mx"\n'
        self.assertConfigError(text + BACKEND.replace("smtp = 587", "imap = 143"), "listener[0].mode: only smtp listeners have a mode")

    def test_mxNeedsMXPort(self) -> None:
        """
        An MX listener needs a backend with ports.mx; submission one with
        ports.smtp.
        """
        self.assertConfigError(
            listener("mx") + BACKEND.replace(", mx = 25", ""),
            "listener[0].protocol: no backend serves 'smtp' in mode 'mx'; add ports.mx to a [backend.NAME] table",
        )
        self.assertConfigError(
            listener("submission") + BACKEND.replace("smtp = 587, ", ""),
            "listener[0].protocol: no backend serves 'smtp' in mode 'submission'; add ports.smtp",
        )

    def test_digestAuth(self) -> None:
        """
        Submission listeners may offer CRAM-MD5; MX listeners take no
        logins.
        """
        [submission] = self.parse(listener("submission", "digest_auth = true\n") + BACKEND).listeners
        self.assertTrue(submission.digestAuth)
        self.assertConfigError(listener("mx", "digest_auth = true\n") + BACKEND, "listener[0].digest_auth: mx listeners take no logins")


OLD = Backend(name="old", host="127.0.0.1", ports={"smtp": 587, "mx": 25})
NEW = Backend(name="new", host="127.0.0.1", ports={"smtp": 587, "mx": 25})
SUBMISSION_ONLY = Backend(name="subonly", host="127.0.0.1", ports={"smtp": 587})

TABLE = """\
default = "old"

[domains]
"example.org" = "old"
"nomx.example" = "subonly"

[accounts]
"Bob@Example.org" = "new"
"carol@example.net" = { backend = "new", password = "s3cret" }
"""


class StaticRecipientTests(SynchronousTestCase):
    """
    The static router's answers for recipients: account, then domain, never
    the default.
    """

    def setUp(self) -> None:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(TABLE)
        self.router = StaticRouter(path, {b.name: b for b in (OLD, NEW, SUBMISSION_ONLY)})

    def route(self, recipient: str) -> Route | Rejection:
        """
        Ask about mail for C{recipient}.
        """
        client = ClientInfo(sessionId="t", address="192.0.2.10", port=1, localAddress="192.0.2.1", localPort=25)
        return self.router.route(
            RouteRequest(protocol="smtp", credentials=None, client=client, helo="mta", mailFrom="s@x", rcptTo=recipient)
        )

    def test_accountThenDomain(self) -> None:
        """
        An account entry wins over its domain's; names compare without case;
        a password on the account does not matter for mail to it.
        """
        self.assertEqual(self.route("bob@example.ORG"), Route(NEW, rule="accounts['Bob@Example.org'] -> new"))
        self.assertEqual(self.route("alice@example.org"), Route(OLD, rule="domains['example.org'] -> old"))
        self.assertEqual(self.route("carol@example.net").backend, NEW)

    def test_unknownUser(self) -> None:
        """
        Another address in a domain known only by its accounts is an unknown
        user.
        """
        self.assertEqual(self.route("dave@example.net"), Rejection(message="Recipient refused.", unknown=True, reason="unknown-user"))

    def test_notLocal(self) -> None:
        """
        A domain in neither table is refused as not local, whatever the
        default says: the proxy never relays.
        """
        for recipient in ("x@elsewhere.example", "postmaster"):
            self.assertEqual(self.route(recipient), Rejection(message="Recipient refused.", unknown=True, reason="not-local"))

    def test_backendWithoutMX(self) -> None:
        """
        A route to a backend without ports.mx is a temporary failure (an
        operator's mistake, logged), never a relay.
        """
        answer = self.route("x@nomx.example")
        assert isinstance(answer, Rejection)
        self.assertTrue(answer.temporary)
        self.flushLoggedErrors()
