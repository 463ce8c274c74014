"""
Tests for L{mailproxy.config}.
"""

from __future__ import annotations

import os
import socket

from twisted.trial.unittest import SynchronousTestCase

from mailproxy._tls import CertificateSource
from mailproxy.config import (
    BACKEND_PROTOCOLS,
    LISTENER_PROTOCOLS,
    Config,
    ConfigError,
    Limits,
    Listener,
    RouterConfig,
    formatKey,
    loadConfig,
    parseConfig,
)
from mailproxy.migration import MigrationSettings
from mailproxy.model import Backend

LISTENER = """\
[[listener]]
protocol = "imap"
endpoint = "tcp:1993:interface=127.0.0.1"
tls = "none"
"""

ROUTER = """\
[router]
type = "static"
path = "routes.toml"
"""

BACKEND = """\
[backend.old]
host = "127.0.0.1"
ports = { imap = 143 }
"""


def configText(
    backend: str = "", extra: str = "", listener: str = LISTENER, router: str = ROUTER
) -> str:
    """
    A configuration: C{listener}, C{router}, C{[backend.old]} followed by the
    lines C{backend} (so they belong to that table), then C{extra}.
    """
    return listener + router + BACKEND + backend + extra


class ConfigTestCase(SynchronousTestCase):
    """
    Writes configurations into a fresh directory that also holds the files
    they name: C{routes.toml}, C{cert.pem}, C{key.pem}, C{other.pem},
    C{other.key}, C{ca.pem} and C{master.pw}.
    """

    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.path = os.path.join(self.directory, "mailproxy.toml")
        for name, content in [
            ("routes.toml", 'default = "old"\n'),
            ("cert.pem", "certificate\n"),
            ("key.pem", "key\n"),
            ("other.pem", "certificate\n"),
            ("other.key", "key\n"),
            ("ca.pem", "ca\n"),
            ("master.pw", "t0p-secret\nsecond line\n"),
        ]:
            self.write(name, content)

    def write(self, name: str, content: str | bytes) -> str:
        """
        Write C{content} to C{name} in the test directory; return its path.
        """
        path = os.path.join(self.directory, name)
        with open(path, "wb") as f:
            f.write(content.encode("utf-8") if isinstance(content, str) else content)
        return path

    def parse(self, text: str) -> Config:
        """
        Parse C{text} as if it were the file C{mailproxy.toml} in the test
        directory.
        """
        return parseConfig(text, self.path)

    def assertConfigError(self, text: str, key: str, *fragments: str) -> str:
        """
        Assert that C{text} is refused with a message for C{key} that contains
        every one of C{fragments}.

        @return: the message.
        """
        error = self.assertRaises(ConfigError, self.parse, text)
        message = str(error)
        self.assertTrue(
            message.startswith(f"{self.path}: {key}: "),
            f"{message!r} does not start with {self.path}: {key}: ",
        )
        for fragment in fragments:
            self.assertIn(fragment, message)
        return message


class FormatKeyTests(SynchronousTestCase):
    """
    Tests for L{formatKey}.
    """

    def test_bare(self) -> None:
        """
        Bare keys are joined with dots and indexes written in brackets.
        """
        self.assertEqual(formatKey(("listener", 1, "tls")), "listener[1].tls")

    def test_quoted(self) -> None:
        """
        Keys that are not bare TOML keys are quoted as TOML basic strings.
        """
        self.assertEqual(
            formatKey(("accounts", 'a"b@example.org', "backend")),
            'accounts."a\\"b@example.org".backend',
        )


class DefaultTests(ConfigTestCase):
    """
    What a minimal configuration gives.
    """

    def test_minimal(self) -> None:
        """
        A listener, a router and a backend are enough; everything else has its
        documented default.
        """
        config = self.parse(configText())
        self.assertEqual(
            config,
            Config(
                path=self.path,
                hostname=socket.getfqdn(),
                limits=Limits(),
                tls=None,
                sni=(),
                listeners=(Listener("imap", "tcp:1993:interface=127.0.0.1", "none"),),
                router=RouterConfig("static", {"path": os.path.join(self.directory, "routes.toml")}),
                backends={"old": Backend(name="old", host="127.0.0.1", ports={"imap": 143})},
                migration=MigrationSettings(journal=os.path.join(self.directory, "migrations.json")),
            ),
        )

    def test_limitDefaults(self) -> None:
        """
        The limit defaults are the documented ones.
        """
        self.assertEqual(
            Limits(),
            Limits(
                lineLength=None,
                literalSize=8192,
                preauthTimeout=120,
                connectionsPerAddress=50,
                loginFailures=3,
                failureDelay=1.0,
                idleTimeout=1800,
                backendTimeout=30,
            ),
        )

    def test_backendDefaults(self) -> None:
        """
        A backend verifies certificates, uses no TLS, forwards automatically,
        and has no master user unless told otherwise.
        """
        backend = self.parse(configText()).backends["old"]
        self.assertEqual(
            (
                backend.tls,
                backend.verify,
                backend.caFile,
                backend.serverName,
                backend.forward,
                backend.masterUser,
                backend.masterPassword,
                backend.masterSeparator,
                backend.connectTimeout,
            ),
            ("none", True, None, None, "auto", None, None, "*", 10.0),
        )

    def test_emptyProxyTable(self) -> None:
        """
        An empty C{[proxy]} table also gives the host's name.
        """
        config = self.parse(configText(extra="[proxy]\n"))
        self.assertEqual(config.hostname, socket.getfqdn())

    def test_relativeConfigPath(self) -> None:
        """
        L{Config.path} is absolute even when the path given was relative.
        """
        relative = os.path.relpath(self.path)
        config = parseConfig(configText(), relative)
        self.assertEqual(config.path, self.path)


class FullConfigTests(ConfigTestCase):
    """
    A configuration that sets everything.
    """

    text = """\
[proxy]
hostname = "mail.example.org"

[limits]
line_length = 1024
literal_size = 2048
preauth_timeout = 60
connections_per_address = 0
login_failures = 5
failure_delay = 0.5
idle_timeout = 600.5
backend_timeout = 15

[tls]
certificate = "cert.pem"
key = "key.pem"
[[tls.sni]]
names = ["IMAP.example.net", "*.example.com"]
certificate = "other.pem"
key = "other.key"

[[listener]]
protocol = "imap"
endpoint = "tcp:1993:interface=127.0.0.1"
tls = "implicit"

[[listener]]
protocol = "imap"
endpoint = "tcp:1143:interface=127.0.0.1"
tls = "starttls-required"
proxy_protocol = true
proxy_trusted = ["10.0.0.0/24", "::1"]

[router]
type = "python:some.module.Router"
path = "data/routes.db"
token_file = "/etc/absolute.token"
timeout = 3
servers = ["a", "b"]

[backend.old]
host = "old.internal"
ports = { imap = 143, pop3 = 110, smtp = 587, sieve = 4190 }
tls = "starttls"
verify = false
ca_file = "ca.pem"
server_name = "imap.internal"
forward = "proxy-v2"
master_user = "proxy"
master_password_file = "master.pw"
master_separator = "%"
connect_timeout = 2

[backend."new.store"]
host = "::1"
ports = { imap = 1143 }
tls = "implicit"
"""

    def setUp(self) -> None:
        super().setUp()
        self.config = self.parse(self.text)

    def test_proxy(self) -> None:
        """
        C{[proxy] hostname} is taken as given.
        """
        self.assertEqual(self.config.hostname, "mail.example.org")

    def test_limits(self) -> None:
        """
        Every limit is read; integers given for seconds become floats.
        """
        self.assertEqual(
            self.config.limits,
            Limits(
                lineLength=1024,
                literalSize=2048,
                preauthTimeout=60.0,
                connectionsPerAddress=0,
                loginFailures=5,
                failureDelay=0.5,
                idleTimeout=600.5,
                backendTimeout=15.0,
            ),
        )
        self.assertIsInstance(self.config.limits.preauthTimeout, float)

    def test_tls(self) -> None:
        """
        Certificate paths resolve against the configuration directory; SNI
        names are kept in lower case.
        """
        join = lambda name: os.path.join(self.directory, name)  # noqa: E731
        self.assertEqual(self.config.tls, CertificateSource(join("cert.pem"), join("key.pem")))
        self.assertEqual(
            self.config.sni,
            (
                CertificateSource(
                    join("other.pem"), join("other.key"), ("imap.example.net", "*.example.com")
                ),
            ),
        )

    def test_listeners(self) -> None:
        """
        Listeners keep their order, endpoint strings and TLS modes.
        """
        self.assertEqual(
            self.config.listeners,
            (
                Listener("imap", "tcp:1993:interface=127.0.0.1", "implicit"),
                Listener(
                    "imap",
                    "tcp:1143:interface=127.0.0.1",
                    "starttls-required",
                    proxyProtocol=True,
                    proxyTrusted=("10.0.0.0/24", "::1"),
                ),
            ),
        )

    def test_router(self) -> None:
        """
        Every C{[router]} key but C{type} is an option; C{path} and C{*_file}
        values resolve against the configuration directory (they need not
        exist for a Python router), other values are kept as they are.
        """
        self.assertEqual(
            self.config.router,
            RouterConfig(
                "python:some.module.Router",
                {
                    "path": os.path.join(self.directory, "data", "routes.db"),
                    "token_file": "/etc/absolute.token",
                    "timeout": 3,
                    "servers": ["a", "b"],
                },
            ),
        )

    def test_routerOptionsRepr(self) -> None:
        """
        The repr of the router options names them but does not show their
        values, which may be secrets.
        """
        self.assertNotIn("/etc/absolute.token", repr(self.config.router))
        self.assertIn("token_file", repr(self.config.router))

    def test_backends(self) -> None:
        """
        Every backend key is read; the master password is the first line of
        its file, without the line ending.
        """
        self.assertEqual(
            self.config.backends,
            {
                "old": Backend(
                    name="old",
                    host="old.internal",
                    ports={"imap": 143, "pop3": 110, "smtp": 587, "sieve": 4190},
                    tls="starttls",
                    verify=False,
                    caFile=os.path.join(self.directory, "ca.pem"),
                    serverName="imap.internal",
                    forward="proxy-v2",
                    masterUser="proxy",
                    masterPassword=b"t0p-secret",
                    masterSeparator="%",
                    connectTimeout=2.0,
                ),
                "new.store": Backend(
                    name="new.store", host="::1", ports={"imap": 1143}, tls="implicit"
                ),
            },
        )

    def test_secretNotInRepr(self) -> None:
        """
        The master password does not appear in the configuration's repr.
        """
        self.assertNotIn("t0p-secret", repr(self.config))

    def test_masterPasswordCRLF(self) -> None:
        """
        A master password file with CRLF line endings gives the password
        without the CR.
        """
        self.write("master.pw", b"crlf-secret\r\n")
        self.assertEqual(self.parse(self.text).backends["old"].masterPassword, b"crlf-secret")


class LoadTests(ConfigTestCase):
    """
    Tests for L{loadConfig} and syntax errors.
    """

    def test_load(self) -> None:
        """
        L{loadConfig} reads the file and resolves paths against its directory.
        """
        path = self.write("mailproxy.toml", configText())
        config = loadConfig(path)
        self.assertEqual(config, self.parse(configText()))

    def test_missingFile(self) -> None:
        """
        A configuration file that does not exist is named in the error.
        """
        missing = os.path.join(self.directory, "missing.toml")
        error = self.assertRaises(ConfigError, loadConfig, missing)
        self.assertEqual(str(error), f"{missing}: cannot read: No such file or directory")

    def test_syntaxError(self) -> None:
        """
        A TOML syntax error names the file and the line.
        """
        error = self.assertRaises(ConfigError, self.parse, configText(extra="[limits\n"))
        line = configText().count("\n") + 1
        self.assertTrue(str(error).startswith(f"{self.path}: line {line}, column "), str(error))

    def test_syntaxErrorAtEnd(self) -> None:
        """
        A syntax error at the end of the document names the last line.
        """
        error = self.assertRaises(ConfigError, self.parse, "a = 1\nb = ")
        self.assertEqual(str(error), f"{self.path}: line 2 (end of file): Invalid value")

    def test_notUTF8(self) -> None:
        """
        A file that is not UTF-8 is refused with its name.
        """
        path = self.write("mailproxy.toml", b'a = "\xff"\n')
        error = self.assertRaises(ConfigError, loadConfig, path)
        self.assertEqual(str(error), f"{path}: not UTF-8 text (byte 5)")


class UnknownKeyTests(ConfigTestCase):
    """
    Keys nobody reads are refused at every level, listing the allowed ones.
    """

    def test_topLevel(self) -> None:
        """
        An unknown top-level table is refused.
        """
        self.assertConfigError(
            configText(extra="[listeners]\n"),
            "listeners",
            "unknown key",
            "proxy, limits, tls, listener, router, backend",
        )

    def test_proxy(self) -> None:
        """
        An unknown key in C{[proxy]} is refused.
        """
        self.assertConfigError(
            configText(extra='[proxy]\nhost = "x"\n'), "proxy.host", "allowed keys here: hostname"
        )

    def test_limits(self) -> None:
        """
        A misspelt limit is refused.
        """
        self.assertConfigError(
            configText(extra="[limits]\nline_lenght = 100\n"),
            "limits.line_lenght",
            "line_length, literal_size",
        )

    def test_tls(self) -> None:
        """
        A misspelt key in C{[tls]} is refused before missing keys are
        reported.
        """
        self.assertConfigError(
            configText(extra='[tls]\ncertficate = "cert.pem"\n'),
            "tls.certficate",
            "certificate, key, sni",
        )

    def test_sni(self) -> None:
        """
        An unknown key in a C{[[tls.sni]]} entry is refused with its index.
        """
        self.assertConfigError(
            configText(
                extra='[tls]\ncertificate = "cert.pem"\nkey = "key.pem"\n'
                '[[tls.sni]]\nnames = ["a"]\ncertificate = "cert.pem"\nkey = "key.pem"\n'
                '[[tls.sni]]\nname = "b"\n'
            ),
            "tls.sni[1].name",
            "names, certificate, key",
        )

    def test_listener(self) -> None:
        """
        An unknown key in a listener is refused with its index.
        """
        self.assertConfigError(
            configText(listener=LISTENER + LISTENER.replace("1993", "1994") + "backlog = 5\n"),
            "listener[1].backlog",
            "protocol, endpoint, tls",
        )

    def test_backend(self) -> None:
        """
        An unknown key in a backend is refused.
        """
        self.assertConfigError(
            configText(backend="port = 143\n"), "backend.old.port", "host, ports, tls, verify"
        )

    def test_backendPorts(self) -> None:
        """
        A protocol name that is not known is refused in C{ports}.
        """
        self.assertConfigError(
            configText(extra='[backend.new]\nhost = "h"\nports = { imap = 1, lmtp = 24 }\n'),
            "backend.new.ports.lmtp",
            ", ".join(BACKEND_PROTOCOLS),
        )


class TypeTests(ConfigTestCase):
    """
    Values of the wrong type are refused with their key.
    """

    def test_booleanIsNoNumber(self) -> None:
        """
        TOML C{true} is not an integer, although Python's C{bool} is one.
        """
        self.assertConfigError(
            configText(extra="[limits]\nline_length = true\n"),
            "limits.line_length",
            "must be an integer, not a boolean",
        )

    def test_booleanIsNoFloat(self) -> None:
        """
        TOML C{true} is not a number of seconds either.
        """
        self.assertConfigError(
            configText(extra="[limits]\nidle_timeout = false\n"),
            "limits.idle_timeout",
            "must be a number, not a boolean",
        )

    def test_floatIsNoInteger(self) -> None:
        """
        A float is refused where an integer is needed.
        """
        self.assertConfigError(
            configText(extra="[limits]\nlogin_failures = 3.0\n"),
            "limits.login_failures",
            "must be an integer, not a float",
        )

    def test_stringIsNoNumber(self) -> None:
        """
        A string is refused where a number is needed.
        """
        self.assertConfigError(
            configText(extra='[limits]\nfailure_delay = "1"\n'),
            "limits.failure_delay",
            "must be a number, not a string",
        )

    def test_infinity(self) -> None:
        """
        TOML's C{inf} and C{nan} are no durations.
        """
        self.assertConfigError(
            configText(extra="[limits]\npreauth_timeout = inf\n"),
            "limits.preauth_timeout",
            "finite",
        )
        self.assertConfigError(
            configText(extra="[limits]\nbackend_timeout = nan\n"),
            "limits.backend_timeout",
            "finite",
        )

    def test_stringIsNoBoolean(self) -> None:
        """
        C{verify = "false"} is refused: only TOML C{false} disables
        verification.
        """
        self.assertConfigError(
            configText(backend='verify = "false"\n'),
            "backend.old.verify",
            "must be true or false, not a string",
        )

    def test_integerIsNoBoolean(self) -> None:
        """
        C{verify = 0} is refused too.
        """
        self.assertConfigError(
            configText(backend="verify = 0\n"), "backend.old.verify", "must be true or false"
        )

    def test_numberIsNoString(self) -> None:
        """
        A number is refused where a string is needed.
        """
        self.assertConfigError(
            configText(extra="[proxy]\nhostname = 5\n"),
            "proxy.hostname",
            "must be a string, not an integer",
        )

    def test_emptyString(self) -> None:
        """
        An empty string is refused where a value is needed.
        """
        self.assertConfigError(
            configText(backend='master_separator = ""\n'),
            "backend.old.master_separator",
            "must not be empty",
        )

    def test_tableExpected(self) -> None:
        """
        A value where a table belongs is refused.
        """
        self.assertConfigError("limits = 5\n" + configText(), "limits", "must be a table, not an integer")

    def test_listenerNotArray(self) -> None:
        """
        C{listener} must be an array of tables.
        """
        self.assertConfigError(
            "[listener]\nprotocol = \"imap\"\n" + ROUTER + BACKEND,
            "listener",
            "must be an array of tables ([[listener]])",
        )


class RangeTests(ConfigTestCase):
    """
    Numbers out of their range are refused.
    """

    def test_limits(self) -> None:
        """
        Each limit has a lower bound and some an upper bound.
        """
        for line, key, what in [
            ("line_length = 100", "limits.line_length", "at least 512, not 100"),
            ("line_length = 2000000", "limits.line_length", "at most 1048576"),
            ("literal_size = 0", "limits.literal_size", "at least 1"),
            ("connections_per_address = -1", "limits.connections_per_address", "at least 0"),
            ("login_failures = 0", "limits.login_failures", "at least 1"),
            ("failure_delay = -0.5", "limits.failure_delay", "at least 0"),
            ("preauth_timeout = 0", "limits.preauth_timeout", "greater than 0"),
            ("idle_timeout = -1", "limits.idle_timeout", "greater than 0"),
            ("backend_timeout = 0.0", "limits.backend_timeout", "greater than 0"),
        ]:
            self.assertConfigError(configText(extra=f"[limits]\n{line}\n"), key, what)

    def test_ports(self) -> None:
        """
        Backend ports are 1-65535.
        """
        for port in (0, 65536):
            self.assertConfigError(
                configText(extra=f'[backend.new]\nhost = "h"\nports = {{ imap = {port} }}\n'),
                "backend.new.ports.imap",
                "must be at",
            )

    def test_connectTimeout(self) -> None:
        """
        A backend's connect timeout must be positive.
        """
        self.assertConfigError(
            configText(backend="connect_timeout = 0\n"),
            "backend.old.connect_timeout",
            "greater than 0",
        )


class ProxyTests(ConfigTestCase):
    """
    Tests for C{[proxy]}.
    """

    def test_hostnameWithSpace(self) -> None:
        """
        A host name that would inject text into greetings is refused.
        """
        self.assertConfigError(
            configText(extra='[proxy]\nhostname = "mail.example.org ready"\n'),
            "proxy.hostname",
            "not a host name",
        )

    def test_hostnameWithNewline(self) -> None:
        """
        A line break in the host name is refused.
        """
        self.assertConfigError(
            configText(extra='[proxy]\nhostname = "mail\\r\\n* BYE"\n'),
            "proxy.hostname",
            "not a host name",
        )


class ListenerTests(ConfigTestCase):
    """
    Tests for C{[[listener]]}.
    """

    def listener(self, protocol: str = "imap", endpoint: str = "tcp:1993", tls: str = "none") -> str:
        """
        A listener table.
        """
        return f'[[listener]]\nprotocol = "{protocol}"\nendpoint = "{endpoint}"\ntls = "{tls}"\n'

    def test_documentedMessage(self) -> None:
        """
        A misspelt TLS mode gives exactly the message an operator needs,
        with the closest mode suggested; the missing route table of the same
        file is reported in the same run, on a line of its own.
        """
        text = LISTENER + self.listener(endpoint="tcp:1994", tls="startls") + ROUTER + BACKEND
        error = self.assertRaises(ConfigError, parseConfig, text, "/etc/mp.toml")
        self.assertEqual(
            str(error),
            "/etc/mp.toml: listener[1].tls: must be one of implicit, starttls, "
            "starttls-required, none, not 'startls' (did you mean 'starttls'?)\n"
            "/etc/mp.toml: router.path: cannot read '/etc/routes.toml': No such file or directory",
        )

    def test_none(self) -> None:
        """
        A configuration without listeners is refused.
        """
        self.assertConfigError(ROUTER + BACKEND, "listener", "at least one [[listener]]")

    def test_missingKeys(self) -> None:
        """
        Protocol, endpoint and TLS mode are all required.
        """
        for key in ("protocol", "endpoint", "tls"):
            lines = [line for line in LISTENER.splitlines() if not line.startswith(key)]
            self.assertConfigError(
                configText(listener="\n".join(lines) + "\n"), f"listener[0].{key}", "required"
            )

    def test_protocol(self) -> None:
        """
        A protocol without a front end is refused, listing the ones there are.
        """
        self.assertConfigError(
            configText(listener=self.listener(protocol="nntp")),
            "listener[0].protocol",
            f"must be one of {', '.join(LISTENER_PROTOCOLS)}, not 'nntp'",
        )

    def test_sslEndpoint(self) -> None:
        """
        An C{ssl:} endpoint is refused: TLS is the listener's C{tls} key.
        """
        for endpoint in ("ssl:993", "SSL:993"):
            self.assertConfigError(
                configText(listener=self.listener(endpoint=endpoint)),
                "listener[0].endpoint",
                "must not be an ssl: endpoint",
            )

    def test_unsupportedEndpoint(self) -> None:
        """
        Endpoint types other than TCP are refused, naming the allowed ones.
        """
        for endpoint, kind in [("unix:/tmp/s", "unix"), ("1993", "1993")]:
            self.assertConfigError(
                configText(listener=self.listener(endpoint=endpoint)),
                "listener[0].endpoint",
                f"unsupported endpoint type {kind!r}",
                "use tcp, tcp6, systemd",
            )
        self.assertConfigError(
            configText(listener=self.listener(endpoint="")), "listener[0].endpoint", "must not be empty"
        )

    def test_systemdEndpoint(self) -> None:
        """
        A C{systemd:} endpoint (socket activation) is accepted by index or
        by name, although no socket was passed to the process checking it.
        """
        for endpoint in ("systemd:domain=INET:index=0", "systemd:domain=INET6:name=imaps"):
            config = self.parse(configText(listener=self.listener(endpoint=endpoint)))
            self.assertEqual(config.listeners[0].endpoint, endpoint)

    def test_systemdEndpointRefused(self) -> None:
        """
        A C{systemd:} endpoint must name a TCP socket's domain and exactly
        one of index and name; two listeners cannot take the same socket.
        """
        for endpoint, why in [
            ("systemd:domain=UNIX:index=0", "domain must be INET or INET6"),
            ("systemd:index=0", "domain must be INET or INET6"),
            ("systemd:domain=INET", "give either index=N or name=NAME"),
            ("systemd:domain=INET:index=0:name=imaps", "give either index=N or name=NAME"),
            ("systemd:domain=INET:index=x", "index must be a number"),
            ("systemd:domain=INET:name=", "name must not be empty"),
            ("systemd:INET:0", "expected systemd:domain=INET|INET6:index=N or :name=NAME"),
            ("systemd:domain=INET:port=993", "expected systemd:domain=INET|INET6:index=N or :name=NAME"),
        ]:
            self.assertConfigError(
                configText(listener=self.listener(endpoint=endpoint)), "listener[0].endpoint", why
            )
        self.assertConfigError(
            configText(
                listener=self.listener(endpoint="systemd:domain=INET:name=imap")
                + self.listener(endpoint="systemd:domain=INET6:name=imap")
            ),
            "listener[1].endpoint",
            "listener[0]",
        )

    def test_unparseableEndpoint(self) -> None:
        """
        An endpoint string Twisted cannot parse is refused with the reason.
        """
        for endpoint in ("tcp:abc", "tcp:143:bogus=1"):
            self.assertConfigError(
                configText(listener=self.listener(endpoint=endpoint)),
                "listener[0].endpoint",
                f"cannot parse {endpoint!r}",
            )

    def test_haproxyEndpointRefused(self) -> None:
        """
        Twisted's C{haproxy:} endpoint is refused with a pointer to the
        listener's own PROXY protocol option.
        """
        self.assertConfigError(
            configText(listener=self.listener(endpoint="haproxy:tcp:1143")),
            "listener[0].endpoint",
            "set proxy_protocol = true and proxy_trusted",
        )

    def test_proxyProtocolNeedsTrusted(self) -> None:
        """
        C{proxy_protocol} needs C{proxy_trusted}, which must hold addresses or
        networks and means nothing alone.
        """
        base = self.listener(endpoint="tcp:1143")
        self.assertConfigError(
            configText(listener=base + "proxy_protocol = true\n"), "listener[0].proxy_trusted", "needs the balancers"
        )
        self.assertConfigError(
            configText(listener=base + 'proxy_protocol = true\nproxy_trusted = ["lb.example"]\n'),
            "listener[0].proxy_trusted",
            "'lb.example' is not an address or network",
        )
        self.assertConfigError(
            configText(listener=base + 'proxy_trusted = ["10.0.0.1"]\n'),
            "listener[0].proxy_trusted",
            "only meaningful with proxy_protocol = true",
        )

    def test_unescapedColon(self) -> None:
        """
        An IPv6 interface written without escaping its colons gets a hint.
        """
        self.assertConfigError(
            configText(listener=self.listener(endpoint="tcp:993:interface=::")),
            "listener[0].endpoint",
            "cannot parse 'tcp:993:interface=::'",
            "(write a colon inside a value as \\:, e.g. interface=\\:\\:1)",
        )

    def test_noColonHint(self) -> None:
        """
        Other parse errors get no hint about colons.
        """
        message = self.assertConfigError(
            configText(listener=self.listener(endpoint="tcp:143:interface=127.0.0.1:bogus=1")),
            "listener[0].endpoint",
            "bogus",
        )
        self.assertNotIn("colon", message)

    def test_portRange(self) -> None:
        """
        A listening port above 65535 is refused.
        """
        self.assertConfigError(
            configText(listener=self.listener(endpoint="tcp:99999")),
            "listener[0].endpoint",
            "port must be 0-65535, not 99999",
        )

    def test_endpointForms(self) -> None:
        """
        TCP over IPv4 and IPv6, keyword arguments and a backlog are all
        accepted, and port 0 may repeat.
        """
        listeners = "".join(
            self.listener(endpoint=endpoint)
            for endpoint in (
                "tcp:1993:interface=127.0.0.1:backlog=1024",
                "tcp6:1993:interface=\\\\:\\\\:1",
                "tcp:port=1994:interface=127.0.0.1",
                "tcp:1995",
                "tcp:0",
                "tcp:0",
            )
        )
        config = self.parse(configText(listener=listeners))
        self.assertEqual(len(config.listeners), 6)
        self.assertEqual(config.listeners[1].endpoint, "tcp6:1993:interface=\\:\\:1")

    def test_sameAddress(self) -> None:
        """
        Two listeners on the same address and port are refused.
        """
        text = configText(
            listener=self.listener(endpoint="tcp:1993") + self.listener(endpoint="tcp:1993:backlog=10")
        )
        self.assertConfigError(text, "listener[1].endpoint", "same address and port as listener[0]")

    def test_tlsNeedsCertificate(self) -> None:
        """
        A listener that uses TLS needs C{[tls]}.
        """
        for mode in ("implicit", "starttls", "starttls-required"):
            self.assertConfigError(
                configText(listener=self.listener(tls=mode)),
                "listener[0].tls",
                f"{mode!r} needs a [tls] table",
            )

    def test_noBackendForProtocol(self) -> None:
        """
        A listener whose protocol no backend serves is refused.
        """
        text = configText(listener=LISTENER).replace("ports = { imap = 143 }", "ports = { pop3 = 110 }")
        self.assertConfigError(text, "listener[0].protocol", "no backend serves 'imap'")

    def test_oneBackendForProtocolIsEnough(self) -> None:
        """
        One backend serving the listener's protocol is enough; others may
        serve other protocols only.
        """
        text = configText(extra='[backend.pop]\nhost = "h"\nports = { pop3 = 110 }\n')
        self.assertEqual(sorted(self.parse(text).backends), ["old", "pop"])


class TLSTests(ConfigTestCase):
    """
    Tests for C{[tls]}.
    """

    def test_missingCertificateFile(self) -> None:
        """
        A certificate file that does not exist is named with its key.
        """
        missing = os.path.join(self.directory, "nope.pem")
        self.assertConfigError(
            configText(extra='[tls]\ncertificate = "nope.pem"\nkey = "key.pem"\n'),
            "tls.certificate",
            f"cannot read {missing!r}: No such file or directory",
        )

    def test_unreadableKey(self) -> None:
        """
        A key that is a directory cannot be read.
        """
        os.mkdir(os.path.join(self.directory, "keydir"))
        self.assertConfigError(
            configText(extra='[tls]\ncertificate = "cert.pem"\nkey = "keydir"\n'),
            "tls.key",
            "cannot read",
        )

    def test_missingKey(self) -> None:
        """
        C{[tls]} needs a key.
        """
        self.assertConfigError(
            configText(extra='[tls]\ncertificate = "cert.pem"\n'), "tls.key", "required"
        )

    def test_sniFile(self) -> None:
        """
        A missing SNI certificate is named with its index.
        """
        self.assertConfigError(
            configText(
                extra='[tls]\ncertificate = "cert.pem"\nkey = "key.pem"\n'
                '[[tls.sni]]\nnames = ["a.example"]\ncertificate = "gone.pem"\nkey = "key.pem"\n'
            ),
            "tls.sni[0].certificate",
            "gone.pem",
        )

    def test_sniNames(self) -> None:
        """
        SNI names must be a non-empty array of names.
        """
        base = configText(extra='[tls]\ncertificate = "cert.pem"\nkey = "key.pem"\n[[tls.sni]]\n')
        files = 'certificate = "cert.pem"\nkey = "key.pem"\n'
        self.assertConfigError(base + files, "tls.sni[0].names", "required")
        self.assertConfigError(base + "names = []\n" + files, "tls.sni[0].names", "non-empty array")
        self.assertConfigError(base + 'names = "a"\n' + files, "tls.sni[0].names", "non-empty array")
        self.assertConfigError(base + 'names = [""]\n' + files, "tls.sni[0].names", "item 0")
        self.assertConfigError(base + 'names = ["a b"]\n' + files, "tls.sni[0].names", "not a host name")

    def test_sniDuplicate(self) -> None:
        """
        A name served by two SNI entries is refused, whatever its case.
        """
        entry = '[[tls.sni]]\nnames = ["{}"]\ncertificate = "other.pem"\nkey = "other.key"\n'
        self.assertConfigError(
            configText(
                extra='[tls]\ncertificate = "cert.pem"\nkey = "key.pem"\n'
                + entry.format("imap.example.net")
                + entry.format("IMAP.example.net")
            ),
            "tls.sni[1].names",
            "'IMAP.example.net' is already in tls.sni[0]",
        )


class BackendTests(ConfigTestCase):
    """
    Tests for C{[backend.NAME]}.
    """

    def test_required(self) -> None:
        """
        A backend needs a host and ports.
        """
        self.assertConfigError(
            configText(extra="[backend.new]\nports = { imap = 1 }\n"), "backend.new.host", "required"
        )
        self.assertConfigError(
            configText(extra='[backend.new]\nhost = "h"\n'), "backend.new.ports", "required"
        )

    def test_noPorts(self) -> None:
        """
        An empty C{ports} table is refused.
        """
        self.assertConfigError(
            configText(extra='[backend.new]\nhost = "h"\nports = {}\n'),
            "backend.new.ports",
            "at least one of imap, pop3, smtp, sieve",
        )

    def test_notATable(self) -> None:
        """
        A value directly under C{[backend]} is refused: backends are tables.
        """
        text = LISTENER + ROUTER + '[backend]\nold = "127.0.0.1"\n'
        self.assertConfigError(text, "backend.old", "must be a table, not a string")

    def test_quotedName(self) -> None:
        """
        A backend name that is no bare key is quoted in messages.
        """
        self.assertConfigError(
            configText(extra='[backend."new store"]\nhost = "h"\n'),
            'backend."new store".ports',
            "required",
        )

    def test_host(self) -> None:
        """
        A host with spaces is refused.
        """
        self.assertConfigError(
            configText(extra='[backend.new]\nhost = "a b"\nports = { imap = 1 }\n'),
            "backend.new.host",
            "not a host name or address",
        )

    def test_enumerations(self) -> None:
        """
        C{tls} and C{forward} take only their documented values.
        """
        self.assertConfigError(
            configText(backend='tls = "ssl"\n'),
            "backend.old.tls",
            "must be one of none, starttls, implicit, not 'ssl'",
        )
        self.assertConfigError(
            configText(backend='forward = "xforward"\n'),
            "backend.old.forward",
            "must be one of auto, id, xclient, proxy-v1, proxy-v2, none, not 'xforward'",
        )

    def test_portTLS(self) -> None:
        """
        C{port_tls} sets the TLS mode of single ports; the others keep the
        backend's C{tls}, and a backend without it keeps C{tls} everywhere.
        """
        config = self.parse(
            configText(
                backend='tls = "starttls"\n',
                extra='[backend.store]\nhost = "h"\ntls = "starttls"\n'
                'ports = { imap = 143, smtp = 587, mx = 25 }\nport_tls = { mx = "none" }\n',
            )
        )
        store = config.backends["store"]
        self.assertEqual(store.portTLS, {"mx": "none"})
        self.assertEqual(
            [store.tlsFor(name) for name in ("imap", "smtp", "mx")], ["starttls", "starttls", "none"]
        )
        self.assertEqual(config.backends["old"].tlsFor("imap"), "starttls")
        self.assertEqual(config.backends["old"].portTLS, {})

    def test_portTLSRefused(self) -> None:
        """
        A C{port_tls} value that is no TLS mode, or a key that is not one
        of the backend's ports, is refused naming the key.
        """
        self.assertConfigError(
            configText(backend='port_tls = { imap = "tls" }\n'),
            "backend.old.port_tls.imap",
            "none, starttls, implicit",
        )
        self.assertConfigError(
            configText(backend='port_tls = { mx = "none" }\n'),
            "backend.old.port_tls.mx",
            "not a port of this backend; its ports: imap",
        )
        self.assertConfigError(
            configText(backend='port_tls = "none"\n'), "backend.old.port_tls", "must be a table"
        )

    def test_httpPortNoSTARTTLS(self) -> None:
        """
        A backend's http port cannot be reached with STARTTLS (HTTP has
        none): whether from the backend's C{tls} or its C{port_tls}, the
        configuration is refused, not run in clear; C{port_tls} can give
        the http port its own mode.
        """
        web = '[backend.web]\nhost = "h"\nports = { imap = 143, http = 8080 }\n'
        self.assertConfigError(
            configText(extra=web + 'tls = "starttls"\n'),
            "backend.web.tls",
            'its http port has no STARTTLS: set port_tls = { http = "none" } or "implicit"',
        )
        self.assertConfigError(
            configText(extra=web + 'port_tls = { http = "starttls" }\n'),
            "backend.web.port_tls",
            'http: HTTP has no STARTTLS: "implicit" or "none"',
        )
        config = self.parse(configText(extra=web + 'tls = "starttls"\nport_tls = { http = "none" }\n'))
        self.assertEqual(
            [config.backends["web"].tlsFor(name) for name in ("imap", "http")], ["starttls", "none"]
        )

    def test_caFile(self) -> None:
        """
        A CA file that does not exist is refused.
        """
        self.assertConfigError(
            configText(backend='ca_file = "missing-ca.pem"\n'), "backend.old.ca_file", "missing-ca.pem"
        )

    def test_masterUserWithoutPassword(self) -> None:
        """
        A master user needs a password file.
        """
        self.assertConfigError(
            configText(backend='master_user = "proxy"\n'),
            "backend.old.master_user",
            "needs master_password_file",
        )

    def test_passwordWithoutMasterUser(self) -> None:
        """
        A master password file without a master user is refused.
        """
        self.assertConfigError(
            configText(backend='master_password_file = "master.pw"\n'),
            "backend.old.master_password_file",
            "needs master_user",
        )

    def test_missingPasswordFile(self) -> None:
        """
        A master password file that does not exist is named.
        """
        self.assertConfigError(
            configText(backend='master_user = "proxy"\nmaster_password_file = "gone.pw"\n'),
            "backend.old.master_password_file",
            "gone.pw",
            "No such file",
        )

    def test_emptyPassword(self) -> None:
        """
        A master password file whose first line is empty is refused.
        """
        self.write("empty.pw", "\nsecond\n")
        self.assertConfigError(
            configText(backend='master_user = "proxy"\nmaster_password_file = "empty.pw"\n'),
            "backend.old.master_password_file",
            "is empty",
        )

    def test_passwordNeverInErrors(self) -> None:
        """
        An error about a backend with a master password does not show the
        password.
        """
        message = self.assertConfigError(
            configText(
                backend='master_user = "proxy"\nmaster_password_file = "master.pw"\n'
                "connect_timeout = -1\n"
            ),
            "backend.old.connect_timeout",
        )
        self.assertNotIn("t0p-secret", message)


class RouterTests(ConfigTestCase):
    """
    Tests for C{[router]}.
    """

    def test_missing(self) -> None:
        """
        A configuration without C{[router]} is refused.
        """
        self.assertConfigError(LISTENER + BACKEND, "router", "required")

    def test_typeMissing(self) -> None:
        """
        C{[router]} needs a type.
        """
        self.assertConfigError(
            configText(router='[router]\npath = "routes.toml"\n'), "router.type", "required"
        )

    def test_unknownType(self) -> None:
        """
        A router type that does not exist is refused, listing the choices.
        """
        self.assertConfigError(
            configText(router='[router]\ntype = "ldap2"\n'),
            "router.type",
            "must be one of static, http, ldap, sql, chain, python:package.module.Class, not 'ldap2'",
        )

    def test_pythonName(self) -> None:
        """
        A Python router must be named as C{package.module.Class}.
        """
        for name in ("python:", "python:Class", "python:a..b", "python:a.b-c.D"):
            self.assertConfigError(
                configText(router=f'[router]\ntype = "{name}"\n'),
                "router.type",
                "must be python:package.module.Class",
            )

    def test_staticNeedsPath(self) -> None:
        """
        The static router needs a path.
        """
        self.assertConfigError(
            configText(router='[router]\ntype = "static"\n'), "router.path", "required"
        )

    def test_staticPathMissing(self) -> None:
        """
        The static router's file must exist.
        """
        self.assertConfigError(
            configText(router='[router]\ntype = "static"\npath = "gone.toml"\n'),
            "router.path",
            os.path.join(self.directory, "gone.toml"),
        )

    def test_absolutePath(self) -> None:
        """
        An absolute path is kept as it is.
        """
        elsewhere = os.path.abspath(self.mktemp())
        os.makedirs(elsewhere)
        routes = os.path.join(elsewhere, "r.toml")
        with open(routes, "w") as f:
            f.write("")
        config = self.parse(configText(router=f'[router]\ntype = "static"\npath = "{routes}"\n'))
        self.assertEqual(config.router.options, {"path": routes})


class EveryProblemTests(ConfigTestCase):
    """
    One parse reports every problem of a configuration, each on a line of
    its own naming the file and key, with the closest key or value
    suggested for a misspelt one.
    """

    def test_everyProblemAtOnce(self) -> None:
        """
        Problems in different sections, and several in one listener and one
        backend, are all reported in one L{ConfigError}, in file order.
        """
        text = (
            '[proxy]\nhostnme = "mx"\n'
            "[limits]\nidle_timeout = -1\nlogin_failures = 0\n"
            '[[listener]]\nprotocol = "imapp"\nendpoint = "tcp:imaps"\ntls = "startls"\n'
            + ROUTER
            + '[backend.old]\nhost = "bad host"\nports = { imap = 143 }\ntls = "yes"\n'
        )
        error = self.assertRaises(ConfigError, self.parse, text)
        p = self.path
        expected = [
            f"{p}: proxy.hostnme: unknown key; allowed keys here: hostname, workers (did you mean 'hostname'?)",
            f"{p}: limits.login_failures: must be at least 1, not 0",
            f"{p}: limits.idle_timeout: must be greater than 0, not -1",
            f"{p}: backend.old.host: not a host name or address: 'bad host'",
            f"{p}: backend.old.tls: must be one of none, starttls, implicit, not 'yes'",
            f"{p}: listener[0].protocol: must be one of http, imap, pop3, sieve, smtp, not 'imapp' (did you mean 'imap'?)",
            f"{p}: listener[0].tls: must be one of implicit, starttls, starttls-required, none, "
            "not 'startls' (did you mean 'starttls'?)",
            f"{p}: listener[0].endpoint: cannot parse 'tcp:imaps': port must be a number, not 'imaps'",
        ]
        self.assertEqual(sorted(error.problems), sorted(expected))
        self.assertEqual(str(error), "\n".join(error.problems))

    def test_oneProblemOneLine(self) -> None:
        """
        A single problem is a single line, as before.
        """
        error = self.assertRaises(ConfigError, self.parse, configText(extra="[limits]\nliteral_size = 0\n"))
        self.assertEqual(error.problems, (f"{self.path}: limits.literal_size: must be at least 1, not 0",))
        self.assertEqual(str(error), error.problems[0])

    def test_everyUnknownKey(self) -> None:
        """
        Every unknown key of one table is reported, not only the first.
        """
        error = self.assertRaises(
            ConfigError, self.parse, configText(listener=LISTENER + "endpont = 1\nprotocl = 2\n")
        )
        self.assertEqual(
            [problem.split(": ")[1] for problem in error.problems], ["listener[0].endpont", "listener[0].protocl"]
        )
        self.assertIn("(did you mean 'endpoint'?)", error.problems[0])
        self.assertIn("(did you mean 'protocol'?)", error.problems[1])

    def test_noSuggestionForStrangers(self) -> None:
        """
        A key like none of the allowed ones gets no suggestion.
        """
        message = self.assertConfigError(configText(extra='[proxy]\ncolour = "x"\n'), "proxy.colour")
        self.assertNotIn("did you mean", message)

    def test_badBackendBlamesNoListener(self) -> None:
        """
        When a backend cannot be read, listeners are not also refused for
        having no backend that serves them.
        """
        error = self.assertRaises(
            ConfigError, self.parse, LISTENER + ROUTER + '[backend.old]\nhost = "127.0.0.1"\nports = { imap = "143" }\n'
        )
        self.assertEqual(
            error.problems, (f"{self.path}: backend.old.ports.imap: must be an integer, not a string",)
        )

    def test_everyCertificateProblem(self) -> None:
        """
        In C{[tls]}, a missing key and problems in two SNI entries are all
        reported.
        """
        text = configText(
            extra='[tls]\ncertificate = "cert.pem"\nkey = "absent.pem"\n'
            '[[tls.sni]]\nnames = ["a.example"]\ncertificate = "other.pem"\nkey = "other.key"\n'
            '[[tls.sni]]\nnames = ["A.example"]\ncertificate = "other.pem"\nkey = "other.key"\n'
            '[[tls.sni]]\nnames = ["c.example"]\ncertificate = "nothere.pem"\nkey = "other.key"\n'
        )
        error = self.assertRaises(ConfigError, self.parse, text)
        self.assertEqual(
            [problem.split(": ", 2)[1] for problem in error.problems],
            ["tls.key", "tls.sni[1].names", "tls.sni[2].certificate"],
        )


class EndpointWordsTests(ConfigTestCase):
    """
    Endpoint strings Twisted refuses are explained in terms of the string,
    never in Twisted's own words (its function and argument names).
    """

    def assertEndpoint(self, endpoint: str, words: str) -> None:
        """
        The listener endpoint C{endpoint} is refused with exactly C{words}
        after C{cannot parse 'ENDPOINT': }.
        """
        listener = f'[[listener]]\nprotocol = "imap"\nendpoint = "{endpoint}"\ntls = "none"\n'
        message = self.assertConfigError(configText(listener=listener), "listener[0].endpoint")
        self.assertEqual(message, f"{self.path}: listener[0].endpoint: cannot parse {endpoint!r}: {words}")

    def test_portNotANumber(self) -> None:
        """
        A service name for a port is refused as not a number (Twisted:
        C{invalid literal for int() with base 10}).
        """
        self.assertEndpoint("tcp:imaps", "port must be a number, not 'imaps'")

    def test_interfaceTwice(self) -> None:
        """
        An interface given by position and by name is refused as given
        twice (Twisted: C{got multiple values for argument 'interface'}).
        """
        self.assertEndpoint("tcp:993:127.0.0.1:interface=127.0.0.2", "interface is given twice")

    def test_unknownOption(self) -> None:
        """
        A misspelt option is named with the closest one.
        """
        self.assertEndpoint(
            "tcp:993:interfce=127.0.0.1",
            "unknown option 'interfce' (did you mean 'interface'?); the options are port, interface, backlog",
        )

    def test_backlog(self) -> None:
        """
        A backlog that is not a number is refused in words.
        """
        self.assertEndpoint("tcp:993:backlog=many", "backlog must be a number, not 'many'")

    def test_tooMany(self) -> None:
        """
        More values than a tcp endpoint takes are refused in words.
        """
        self.assertEndpoint("tcp:993:127.0.0.1:50:x", "too many values; the options are port, interface, backlog")

    def test_noPort(self) -> None:
        """
        An endpoint without a port is refused in words.
        """
        self.assertEndpoint("tcp:interface=127.0.0.1", "no port; e.g. tcp:993")
