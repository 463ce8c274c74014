"""
The newcomer's first run: C{mailproxy demo}.

It starts the proxy, with a freshly generated self-signed certificate, in
front of two small built-in IMAP servers ("old" and "new") on loopback
ports, with its management endpoint and a freshly generated token, writes
the configuration it runs from into a directory, and prints how to try it
with real clients and operate it with C{mailproxy move}, C{route explain},
C{sessions} and C{/metrics}. The account C{alice@example.org} is routed
to "old" and C{bob@example.org} to "new"; both servers hold both accounts,
each INBOX seeded with a message that says which server it lives on, so what
a client reads shows where the route table sent it.

The demo servers are a fixture, not a product: Twisted's IMAP server over
in-memory accounts, in L{mailproxy._demoimap} (which says what its quirks
are). This module loads C{twisted.mail} through it, so C{mailproxy} imports
it only to run the demo.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import shutil
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from attrs import define

from twisted.application.service import IService, MultiService
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.interfaces import IListeningPort

from mailproxy._demoimap import DEMO_PASSWORD, DEMO_USERS, DemoStoreFactory, DemoUser
from mailproxy._tls import makeSelfSigned
from mailproxy.config import loadConfig
from mailproxy.tap import listeningPort, serviceFromConfig

DEMO_STORES: tuple[str, ...] = ("old", "new")
"""
The names of the demo servers, as they appear in the generated configuration.
"""

DEMO_INTERFACE = "127.0.0.1"
"""
Where the demo listens: the loopback interface only.
"""

CONFIG_NAME = "mailproxy.toml"
"""
The name of the configuration file the demo writes.
"""

ROUTES_NAME = "routes.toml"
"""
The name of the route table file the demo writes next to it.
"""

TOKEN_NAME = "admin.token"
"""
The name of the file with the management endpoint's token, which the demo
generates on every run.
"""

DEFAULT_ADMIN_PORT = 19443
"""
The demo's management endpoint port unless told another.
"""


def defaultDirectory(environ: Mapping[str, str] = os.environ) -> str:
    """
    Where the demo writes its certificate and configuration by default:
    C{$XDG_STATE_HOME/mailproxy-demo}, that is usually
    C{~/.local/state/mailproxy-demo}.
    """
    state = environ.get("XDG_STATE_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "state"
    )
    return os.path.join(state, "mailproxy-demo")


def _tomlString(text: str) -> str:
    """
    C{text} as a TOML basic string.
    """
    out = []
    for char in text:
        if char in '"\\':
            out.append("\\" + char)
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def _relative(path: str, directory: str) -> str:
    # Relative names keep the written configuration valid when the whole
    # directory is copied elsewhere as a starting point.
    if os.path.dirname(os.path.abspath(path)) == os.path.abspath(directory):
        return os.path.basename(path)
    return os.path.abspath(path)


def demoConfig(
    certificate: str,
    key: str,
    imapsPort: int,
    imapPort: int,
    storePorts: Mapping[str, int],
    adminPort: int = DEFAULT_ADMIN_PORT,
) -> str:
    """
    The text of the demo's configuration file.

    @param certificate: the certificate file, relative to the configuration's
        directory or absolute; likewise C{key}.
    @param storePorts: the port of each demo server by name.
    @param adminPort: the management endpoint's port; its token is
        L{TOKEN_NAME} beside the configuration.
    """
    endpoint = "tcp:{port}:interface=" + DEMO_INTERFACE.replace(":", "\\:")
    parts = [
        "# Written by `mailproxy demo`, which rewrites it on every run: copy the",
        "# directory before you edit it into a real deployment's configuration.",
        "#",
        "#   mailproxy check FILE           validates a configuration",
        "#   mailproxy run --config FILE    runs it (= twistd -n mailproxy --config FILE)",
        "",
        "[proxy]",
        'hostname = "localhost"',
        "",
        "[limits]",
        "# Ctrl-C: open sessions get \"* BYE\" after 2 seconds (the default is 30).",
        "shutdown_grace = 2",
        "",
        "[tls]",
        "# A self-signed certificate for localhost, 127.0.0.1 and ::1, made by the",
        "# demo. A real deployment names its own: full chain (leaf first) and key.",
        f"certificate = {_tomlString(certificate)}",
        f"key = {_tomlString(key)}",
        "",
        "# Implicit TLS, as on port 993.",
        "[[listener]]",
        'protocol = "imap"',
        f"endpoint = {_tomlString(endpoint.format(port=imapsPort))}",
        'tls = "implicit"',
        "",
        "# STARTTLS, as on port 143; LOGIN is refused until TLS is on.",
        "[[listener]]",
        'protocol = "imap"',
        f"endpoint = {_tomlString(endpoint.format(port=imapPort))}",
        'tls = "starttls-required"',
        "",
        "[router]",
        'type = "static"',
        f"path = {_tomlString(ROUTES_NAME)}",
    ]
    parts += [
        "",
        "# The management endpoint: `mailproxy move`, `route`, `sessions`, `stats`",
        "# and `health` find it and its token here (with --config), Prometheus",
        "# scrapes /metrics with the token. The demo makes a new token on every run.",
        "[admin]",
        f"endpoint = {_tomlString(endpoint.format(port=adminPort))}",
        f"token_file = {_tomlString(TOKEN_NAME)}",
        "",
        "# The built-in demo servers: plain IMAP on loopback ports chosen at start.",
        "# They are Twisted's IMAP server, which does not implement IMAP ID, so the",
        '# client\'s address is not forwarded to them ("auto" sends ID only where',
        "# the server advertises it, as Dovecot does).",
    ]
    for name, port in storePorts.items():
        parts += [
            f"[backend.{name}]",
            f"host = {_tomlString(DEMO_INTERFACE)}",
            f"ports = {{ imap = {port} }}",
            'tls = "none"',
            'forward = "none"',
            "",
        ]
    return "\n".join(parts).rstrip("\n") + "\n"


def demoRoutes(users: Iterable[DemoUser] = DEMO_USERS) -> str:
    """
    The text of the demo's route table: each user to its home server.
    """
    parts = [
        "# Which server holds which account. Written by `mailproxy demo`, which",
        "# rewrites it on every run. Logins not named here are refused.",
        "",
        "[accounts]",
    ]
    parts += [f"{_tomlString(user.address)} = {_tomlString(user.home)}" for user in users]
    return "\n".join(parts) + "\n"


def writeToken(directory: str) -> str:
    """
    Write a new random token for the management endpoint into
    C{directory}, readable by its owner only.

    @return: the path of the token file.
    """
    path = os.path.join(directory, TOKEN_NAME)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with open(fd, "w", encoding="ascii") as f:
        # A file left by an older run may have had a wider mode.
        os.fchmod(f.fileno(), 0o600)
        f.write(secrets.token_hex(32) + "\n")
    return path


def writeDemoConfig(
    directory: str,
    certificate: str,
    key: str,
    imapsPort: int,
    imapPort: int,
    storePorts: Mapping[str, int],
    adminPort: int = DEFAULT_ADMIN_PORT,
    configOnly: bool = False,
) -> str:
    """
    Write the demo's configuration, its route table and a new token for
    its management endpoint into C{directory}.

    @param configOnly: write the configuration file alone, keeping the
        route table and the token an earlier call wrote (which the running
        proxy has read).
    @return: the path of the configuration file.
    """
    if not configOnly:
        with open(os.path.join(directory, ROUTES_NAME), "w", encoding="utf-8") as f:
            f.write(demoRoutes())
        writeToken(directory)
    configPath = os.path.join(directory, CONFIG_NAME)
    text = demoConfig(
        _relative(certificate, directory),
        _relative(key, directory),
        imapsPort,
        imapPort,
        storePorts,
        adminPort,
    )
    with open(configPath, "w", encoding="utf-8") as f:
        f.write(text)
    return configPath


@define
class RunningDemo:
    """
    The demo, started: two demo servers and the proxy in front of them.

    @ivar directory: where the certificate and configuration were written.
    @ivar configPath: the configuration file the proxy runs from.
    @ivar certificatePath: the self-signed certificate clients can trust.
    @ivar imapsPort: the proxy's implicit TLS port.
    @ivar imapPort: the proxy's STARTTLS port.
    @ivar adminPort: the port of the proxy's management endpoint.
    @ivar tokenPath: the file with the management endpoint's token.
    @ivar stores: each demo server by name.
    @ivar storePorts: the port of each demo server by name.
    @ivar service: the running proxy.
    """

    directory: str
    configPath: str
    certificatePath: str
    imapsPort: int
    imapPort: int
    adminPort: int
    tokenPath: str
    stores: dict[str, DemoStoreFactory]
    storePorts: dict[str, int]
    service: IService
    _listening: list[IListeningPort]

    def stop(self) -> Deferred[None]:
        """
        Stop the proxy, then the demo servers.

        @return: a L{Deferred} that fires when all have stopped listening.
        """
        stopped = maybeDeferred(self.service.stopService)

        def stores(_: object) -> Deferred[Any]:
            return gatherResults([maybeDeferred(p.stopListening) for p in self._listening])

        return stopped.addCallback(stores).addCallback(lambda _: None)


def _stopStarted(service: MultiService) -> Deferred[Any]:
    # A listener that cannot bind raises out of startService and leaves the
    # listeners after it unstarted; stopping those would fail, so only the
    # ones that started are stopped.
    return gatherResults(
        [maybeDeferred(child.stopService) for child in service if child.running]
    )


async def startDemo(
    reactor: Any,
    directory: str,
    imapsPort: int = 10993,
    imapPort: int = 10143,
    adminPort: int = DEFAULT_ADMIN_PORT,
) -> RunningDemo:
    """
    Start the demo: the demo servers on free loopback ports, a self-signed
    certificate, a token and a configuration in C{directory}, and the proxy
    running from that configuration, its management endpoint included. If
    anything fails, whatever had started is stopped again.

    @param reactor: a reactor with TCP and time (L{IReactorTCP},
        L{IReactorTime}).
    @param imapsPort: the proxy's implicit TLS port; 0 lets the kernel
        choose a free one (the result says which).
    @param imapPort: the proxy's STARTTLS port; 0 likewise.
    @param adminPort: the management endpoint's port; 0 likewise. With
        port 0 the configuration file is written again once the proxy
        listens, with the ports the kernel chose, so that the commands that
        read it (C{mailproxy move --config}) find this proxy.
    @raise mailproxy.tap.ListenError: if a proxy port is taken.
    @raise mailproxy.config.ConfigError: if the written configuration does
        not load.
    @raise OSError: if the directory or its files cannot be written.
    """
    os.makedirs(directory, mode=0o700, exist_ok=True)
    listening: list[IListeningPort] = []
    stores: dict[str, DemoStoreFactory] = {}
    storePorts: dict[str, int] = {}
    service: MultiService | None = None
    try:
        for name in DEMO_STORES:
            factory = DemoStoreFactory(name, reactor)
            port = await TCP4ServerEndpoint(reactor, 0, interface=DEMO_INTERFACE).listen(factory)
            listening.append(port)
            stores[name] = factory
            storePorts[name] = port.getHost().port  # type: ignore[attr-defined]
        certificate, key = makeSelfSigned(
            directory, names=("localhost",), ips=("127.0.0.1", "::1")
        )
        configPath = writeDemoConfig(
            directory, certificate, key, imapsPort, imapPort, storePorts, adminPort
        )
        service = serviceFromConfig(loadConfig(configPath), reactor)
        service.startService()
        requested = (imapsPort, imapPort, adminPort)
        # The listeners are the implicit TLS one, then the STARTTLS one.
        imapsPort = listeningPort(service, 0) or imapsPort
        imapPort = listeningPort(service, 1) or imapPort
        admin = service.getServiceNamed("admin").endpoint.port  # type: ignore[attr-defined]
        adminPort = admin.getHost().port if admin is not None else adminPort
        if (imapsPort, imapPort, adminPort) != requested:
            writeDemoConfig(
                directory,
                certificate,
                key,
                imapsPort,
                imapPort,
                storePorts,
                adminPort,
                configOnly=True,
            )
    except BaseException:
        if service is not None:
            await _stopStarted(service)
        await gatherResults([maybeDeferred(port.stopListening) for port in listening])
        raise
    return RunningDemo(
        directory=directory,
        configPath=configPath,
        certificatePath=str(certificate),
        imapsPort=imapsPort,
        imapPort=imapPort,
        adminPort=adminPort,
        tokenPath=os.path.join(directory, TOKEN_NAME),
        stores=stores,
        storePorts=storePorts,
        service=service,
        listening=listening,
    )


def _pyString(text: str) -> str:
    # A JSON string is a Python string literal, and its double quotes leave
    # the whole program free to go inside single quotes on a shell line.
    return json.dumps(text, ensure_ascii=False)


def clientCommands(demo: RunningDemo) -> list[tuple[str, DemoUser, list[str]]]:
    """
    Commands that read a demo INBOX through the proxy with real clients.

    @return: for each command, what it shows, the account it logs in as,
        and its argument vector.
    """
    host = DEMO_INTERFACE
    alice, bob = DEMO_USERS[0], DEMO_USERS[1]
    python = (
        "import imaplib, ssl; "
        f"c = imaplib.IMAP4_SSL({_pyString(host)}, {demo.imapsPort}, "
        f"ssl_context=ssl.create_default_context(cafile={_pyString(demo.certificatePath)})); "
        f"c.login({_pyString(bob.address)}, {_pyString(DEMO_PASSWORD)}); "
        'c.select("INBOX"); '
        'print(c.fetch("1", "(BODY[TEXT])")[1][0][1].decode())'
    )
    return [
        (
            "implicit TLS",
            alice,
            [
                "curl", "--cacert", demo.certificatePath,
                "--user", f"{alice.address}:{DEMO_PASSWORD}",
                f"imaps://{host}:{demo.imapsPort}/INBOX;UID=1",
            ],
        ),
        (
            "STARTTLS",
            bob,
            [
                "curl", "--ssl-reqd", "--cacert", demo.certificatePath,
                "--user", f"{bob.address}:{DEMO_PASSWORD}",
                f"imap://{host}:{demo.imapPort}/INBOX;UID=1",
            ],
        ),
        ("Python's imaplib", bob, ["python3", "-c", python]),
    ]


def mailproxyCommand(
    executable: str = sys.executable, which: Callable[[str], str | None] = shutil.which
) -> str:
    """
    How to call the C{mailproxy} command that belongs to this Python: just
    C{mailproxy} if that is the one on C{$PATH}, else the script's path
    beside the interpreter (a virtualenv's C{bin}, which is seldom on
    C{$PATH}).

    @param executable: the running Python interpreter.
    @param which: finds a command on C{$PATH}.
    """
    beside = os.path.join(os.path.dirname(os.path.abspath(executable)), "mailproxy")
    if not os.access(beside, os.X_OK) or which("mailproxy") == beside:
        return "mailproxy"
    return beside


def adminCommands(demo: RunningDemo, program: str = "mailproxy") -> list[tuple[str, str]]:
    """
    Shell lines that operate the running demo through its management
    endpoint: the C{mailproxy} operations commands, which find the endpoint
    and its token in the demo's configuration, and C{curl} for C{/metrics}.

    @param program: how to call the C{mailproxy} command.
    @return: for each command, what it shows and its shell line.
    """
    alice = DEMO_USERS[0]
    config = ["--config", demo.configPath]
    token = shlex.quote(demo.tokenPath)
    return [
        ("explain", shlex.join([program, "route", "explain", *config, alice.address])),
        ("sessions", shlex.join([program, "sessions", *config])),
        ("move", shlex.join([program, "move", *config, alice.address, "new"])),
        (
            "metrics",
            f'curl -sS -H "Authorization: Bearer $(cat {token})" '
            f"http://{DEMO_INTERFACE}:{demo.adminPort}/metrics",
        ),
    ]


def _shellLine(argv: Sequence[str]) -> str:
    # curl's lines are long: the URL goes on a continuation line.
    if argv[0] == "curl":
        return f"  {shlex.join(argv[:-1])} \\\n      {shlex.quote(argv[-1])}"
    return f"  {shlex.join(argv)}"


def instructions(demo: RunningDemo, program: str | None = None) -> str:
    """
    What to print once the demo runs: where everything is, the commands
    that try it with real clients and those that operate it.

    @param program: how to call the C{mailproxy} command; by default
        L{mailproxyCommand}'s answer.
    """
    host = DEMO_INTERFACE
    alice = DEMO_USERS[0]
    cert = shlex.quote(demo.certificatePath)
    routes = os.path.join(demo.directory, ROUTES_NAME)
    width = max(len(u.address) for u in DEMO_USERS)
    admin = dict(adminCommands(demo, program or mailproxyCommand()))
    lines = [
        "mailproxy demo is running.",
        "",
        f"  proxy, implicit TLS   {host}:{demo.imapsPort}",
        f"  proxy, STARTTLS       {host}:{demo.imapPort}",
        f"  management endpoint   {host}:{demo.adminPort}  (HTTP, token in {demo.tokenPath})",
    ]
    lines += [
        f"  demo server {name!r:<9} {host}:{port}  (plain IMAP, behind the proxy)"
        for name, port in demo.storePorts.items()
    ]
    lines += ["", f"Accounts (password {DEMO_PASSWORD!r}; each server holds both):"]
    lines += [f"  {user.address:<{width}}  is routed to {user.home!r}" for user in DEMO_USERS]
    lines += ["", "Try it:"]
    lines += [_shellLine(argv) for _, _, argv in clientCommands(demo)]
    lines += [
        # -servername: the certificate's name is checked, and s_client
        # has a name to report (without, it prints "Can't use
        # SSL_get_servername").
        f"  openssl s_client -quiet -crlf -CAfile {cert} -servername localhost"
        f" -connect {host}:{demo.imapsPort}",
        f"      (add -starttls imap for port {demo.imapPort}), then type:",
        f"      a LOGIN {alice.address} {DEMO_PASSWORD}",
        "      b SELECT INBOX",
        "      c FETCH 1 BODY[TEXT]",
        "      d LOGOUT",
        "",
        "Operate it through its management endpoint; these commands find it, and",
        "its token, in the configuration. Which rule sends alice where, and the",
        "open sessions:",
        f"  {admin['explain']}",
        f"  {admin['sessions']}",
        f"Move {alice.address} to 'new' the way a migration does, with one command:",
        "her open sessions get \"* BYE\" and her client reconnects, to 'new' (move",
        "her back the same way):",
        f"  {admin['move']}",
        f"Or edit {routes}",
        f"to say \"{alice.address}\" = \"new\": the proxy re-reads the table within",
        "seconds, no restart. The counters, as Prometheus reads them:",
        f"  {admin['metrics']}",
        "",
        f"The certificate is self-signed: {demo.certificatePath}",
        f"The configuration is a starting point for a real deployment: {demo.configPath}",
        f"(and its route table, {routes}).",
        "",
        "Press Ctrl-C to stop.",
    ]
    return "\n".join(lines) + "\n"
