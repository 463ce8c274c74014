"""
The C{mailproxy} command.

  - C{mailproxy demo}: the proxy in front of two built-in demo servers, with
    a generated certificate and configuration (L{mailproxy.demo});
  - C{mailproxy check [--config] FILE [--probe]}: validate a configuration
    as the proxy would load it, files, route table and certificates
    included, reporting every problem at once; C{--probe} also asks the
    router and every backend port;
  - C{mailproxy config show}: the effective configuration, defaults filled
    in, as TOML;
  - C{mailproxy run --config FILE}: run the proxy in the foreground, the same
    as C{twistd -n mailproxy --config FILE} without a pid file, without
    scanning Twisted's plugins (so it never writes their C{dropin.cache}),
    logging to standard output in the journal's way under systemd;
  - C{mailproxy examples DIR}: copy the examples shipped with the package
    into DIR (L{mailproxy._examples});
  - C{mailproxy move}, C{migrate}, C{route}, C{sessions}, C{reload},
    C{stats}, C{health}:
    operate the running proxy through its management endpoint (C{[admin]}),
    see L{mailproxy.admin}; C{mailproxy reload --pid PID} needs no
    management endpoint: it sends SIGHUP and reads the outcome the proxy
    records under C{$RUNTIME_DIRECTORY} (L{mailproxy._systemd});
  - C{mailproxy completion bash}, C{mailproxy manpage}: a bash completion
    script and a man page, both made from this module's parser
    (L{mailproxy._clidoc}).

This module is an entry point: it alone picks the global reactor and sets up
logging, and hands both to the library.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from urllib.parse import quote
from collections.abc import Sequence
from typing import Any, TextIO

from attrs import Factory, define

from twisted.application.service import IServiceMaker
from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError
from twisted.internet.task import react
from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
    textFileLogObserver,
)
from twisted.scripts.twistd import ServerOptions, runApp

from mailproxy import __version__
from mailproxy._adminclient import AdminClient, AdminError, clientFromConfig, quoteKey
from mailproxy._clidoc import bashCompletion, manPage
from mailproxy._examples import ExamplesError, writeExamples
from mailproxy._lifecycle import _startRouter, _stopRouter
from mailproxy._routing import explainRoute
from mailproxy._migratecli import addMigrateCommand, migrate
from mailproxy._showconfig import dumpTOML, effectiveConfig
from mailproxy._stats import routerChain
from mailproxy._logs import processLogObserver
from mailproxy._systemd import ReloadError, reloadBySignal
from mailproxy.admin import MAX_BODY
from mailproxy._tls import TLSConfigError, certificateWarnings, serverOptions
from mailproxy.admin import HealthChecker
from mailproxy.config import Config, ConfigError, loadConfig, readTOML, recordingReads, tokenFilePermissions
from mailproxy.routers import buildRouter, buildRouterFrom, closeRouter

_PROG = "mailproxy"

#: Where the operations commands look for the running proxy's configuration.
DEFAULT_CONFIG = "/etc/mailproxy/mailproxy.toml"


def _port(text: str) -> int:
    """
    An argparse type: a TCP port number 1-65535.
    """
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 1-65535, not {value}")
    return value


def buildParser() -> argparse.ArgumentParser:
    """
    The argument parser of the C{mailproxy} command.
    """
    parser = argparse.ArgumentParser(
        prog=_PROG,
        description="A routing, TLS-terminating mail proxy.",
    )
    parser.add_argument("--version", action="version", version=f"{_PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = commands.add_parser(
        "demo",
        help="run the proxy in front of two built-in demo IMAP servers",
        description=(
            "Start the proxy with a self-signed certificate in front of two small "
            "built-in IMAP servers on loopback ports, with its management endpoint "
            "and a new token, and print how to try and operate it. Runs until Ctrl-C."
        ),
    )
    # The demo's own defaults (mailproxy.demo.startDemo's), written out: the
    # parser must not import the demo, which loads twisted.mail.
    demo.add_argument(
        "--imaps-port", type=_port, default=10993, metavar="N",
        help="the proxy's implicit TLS port (default: %(default)s)",
    )
    demo.add_argument(
        "--imap-port", type=_port, default=10143, metavar="N",
        help="the proxy's STARTTLS port (default: %(default)s)",
    )
    demo.add_argument(
        "--admin-port", type=_port, default=19443, metavar="N",
        help="the port of the proxy's management endpoint (default: %(default)s)",
    )
    demo.add_argument(
        "--directory", metavar="D", default=None,
        help=(
            "where to write the certificate and configuration "
            "(default: $XDG_STATE_HOME/mailproxy-demo, i.e. ~/.local/state/mailproxy-demo)"
        ),
    )

    check = commands.add_parser(
        "check",
        usage="%(prog)s [-h] [[--config] FILE] [--probe [--user ACCOUNT]]",
        help="validate a configuration file (and, with --probe, the router and backends)",
        description=(
            "Load a configuration as the proxy would: the file, the files it names, "
            "the router and its route table, and the TLS certificates; every problem "
            "is reported, one per line. With --probe, also ask the router and connect "
            "to every backend port. Exit status 0 if it is usable, 1 if not."
        ),
    )
    check.add_argument(
        "config", nargs="?", metavar="FILE", help=f"the configuration file (default: {DEFAULT_CONFIG})"
    )
    check.add_argument(
        "--config", dest="configOption", metavar="FILE", help="the configuration file (the same as FILE)"
    )
    check.add_argument(
        "--probe", action="store_true",
        help="also ask the router and read every backend port's greeting",
    )
    check.add_argument(
        "--user", metavar="ACCOUNT",
        help="with --probe: the account to ask the router about (default: a made-up one)",
    )

    config = commands.add_parser(
        "config", help="show the configuration", description="Show the configuration."
    )
    configActions = config.add_subparsers(dest="action", metavar="ACTION", required=True)
    show = configActions.add_parser(
        "show",
        help="the effective configuration as TOML, defaults filled in, secrets left out",
        description=(
            "Print the effective configuration as TOML: every default filled in, paths "
            "made absolute, secrets left out (files holding secrets are named, not read out)."
        ),
    )
    show.add_argument(
        "--config", default=DEFAULT_CONFIG, metavar="FILE",
        help="the configuration file (default: %(default)s)",
    )

    run = commands.add_parser(
        "run",
        help="run the proxy in the foreground",
        description=(
            "Run the proxy in the foreground, logging to standard output: the same as "
            "`twistd -n mailproxy --config FILE`, but without writing a pid file or "
            "Twisted's plugin cache. With [log] path = \"-\" standard output has only "
            "the [log] format; on the journal, lines carry their syslog priority."
        ),
    )
    run.add_argument("--config", required=True, metavar="FILE", help="the configuration file")

    examples = commands.add_parser(
        "examples",
        help="copy the example configurations and files into a directory",
        description=(
            "Copy the examples shipped with mailproxy (configurations, route tables, "
            "routers, the systemd unit, fail2ban filters) into DIRECTORY, creating it "
            "if need be. Existing files are never replaced: if any would be, nothing "
            "is written."
        ),
    )
    examples.add_argument("directory", metavar="DIRECTORY")
    _addOperations(commands)

    completion = commands.add_parser(
        "completion", help="print a shell completion script",
        description="Print a completion script for SHELL; e.g. mailproxy completion bash > /etc/bash_completion.d/mailproxy",
    )
    completion.add_argument("shell", choices=["bash"], metavar="SHELL", help="the shell: bash")
    commands.add_parser(
        "manpage", help="print the manual page (roff)",
        description="Print the manual page, in roff; e.g. mailproxy manpage > mailproxy.1",
    )
    return parser


def _hold(text: str) -> float:
    """
    An argparse type: seconds to hold logins, 0 to 60.
    """
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 <= value <= 60:
        raise argparse.ArgumentTypeError(f"hold must be 0 to 60 seconds, not {text}")
    return value


def _addOperations(commands: Any) -> None:
    """
    The commands that talk to a running proxy's management endpoint.
    """
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config", default=DEFAULT_CONFIG, metavar="FILE",
        help="the running proxy's configuration, for its [admin] endpoint and token (default: %(default)s)",
    )
    common.add_argument("--url", metavar="URL", help="the management endpoint, e.g. http://127.0.0.1:9443")
    common.add_argument("--token-file", metavar="FILE", help="a file whose first line is the token")

    move = commands.add_parser(
        "move", parents=[common],
        usage="%(prog)s [options] [ACCOUNT ...] BACKEND",
        help="move accounts (or a domain) to another backend",
        description=(
            "Route the accounts (and/or the domain) to BACKEND in the running proxy's route "
            "table, forget cached routes, and drop their open sessions on other backends so "
            "that their clients reconnect to the new home. Rollback: move them back."
        ),
    )
    # One positional list, since the backend comes last; named like the
    # usage line so that argparse's own errors speak of BACKEND too.
    move.add_argument("targets", nargs="+", metavar="BACKEND", help="the accounts to move (ACCOUNT ...), then BACKEND")
    move.add_argument(
        "--from-file", metavar="FILE",
        help="also move the accounts listed in FILE, one per line (- for standard input; blank lines and # comments are skipped)",
    )
    move.add_argument("--domain", metavar="DOMAIN", help="also move every account of DOMAIN without an entry of its own")
    move.add_argument(
        "--include-accounts", action="store_true",
        help="with --domain, also move the domain's accounts that have an entry of their own",
    )
    move.add_argument("--dry-run", action="store_true", help="only show what would change")
    move.add_argument(
        "--hold", type=_hold, default=0.0, metavar="SECONDS",
        help="hold new logins of these accounts this long while the move happens (default: 0)",
    )
    move.add_argument("--no-drop", action="store_true", help="leave open sessions alone")
    addMigrateCommand(commands, common)

    route = commands.add_parser("route", help="read or change the route table", description="Read or change the route table.")
    actions = route.add_subparsers(dest="action", metavar="ACTION", required=True)
    explain = actions.add_parser(
        "explain", parents=[common], help="which router, rule and backend decide an account's route",
        description="Say which router, rule and backend decide ACCOUNT's route, without logging in.",
    )
    explain.add_argument("account", metavar="ACCOUNT")
    explain.add_argument("--json", action="store_true", help="print the answer as JSON")
    actions.add_parser("list", parents=[common], help="list the entries", description="List the route table's entries.")
    setRoute = actions.add_parser(
        "set", parents=[common], help="set one entry (no sessions are dropped; see move)",
        description="Route KEY (an account, @domain, or * for the default) to BACKEND.",
    )
    setRoute.add_argument("key", metavar="KEY")
    setRoute.add_argument("backend", metavar="BACKEND")
    delete = actions.add_parser("delete", parents=[common], help="delete one entry", description="Delete KEY's entry.")
    delete.add_argument("key", metavar="KEY")

    sessions = commands.add_parser(
        "sessions", parents=[common], help="list (or drop) open sessions",
        description="List the running proxy's open sessions, optionally filtered; --drop ends them.",
    )
    sessions.add_argument("--account", metavar="ACCOUNT", help="only the sessions logged in as ACCOUNT")
    sessions.add_argument("--backend", metavar="BACKEND", help="only the sessions relayed to BACKEND")
    sessions.add_argument("--drop", action="store_true", help="drop the matching sessions (needs a filter)")
    sessions.add_argument("--json", action="store_true", help="print the answer as JSON")

    parsers = {}
    for name, text in (
        ("reload", "reload the configuration, route table and certificates (like SIGHUP)"),
        ("stats", "show the counters, one NAME VALUE per line"),
        ("health", "check the proxy and every backend (exit status 1 if unhealthy)"),
    ):
        parsers[name] = commands.add_parser(
            name, parents=[common], help=text, description=text[0].upper() + text[1:] + "."
        )
    parsers["reload"].add_argument(
        "--pid", type=int, metavar="PID",
        help=(
            "send SIGHUP to the proxy PID and wait for the outcome it records in "
            "$RUNTIME_DIRECTORY, without the management endpoint (systemd: --pid $MAINPID)"
        ),
    )
    parsers["reload"].add_argument(
        "--timeout", type=float, default=60.0, metavar="SECONDS",
        help="with --pid: how long to wait for the outcome (default: %(default)s)",
    )
    parsers["stats"].add_argument("--json", action="store_true", help="print the counters as JSON")


def _globalReactor() -> Any:
    # Imported on use: importing it installs the default reactor, which
    # parsing arguments (or a test importing this module) has no need of.
    from twisted.internet import reactor

    return reactor


def _problem(error: BaseException) -> str:
    # ConfigError and TLSConfigError already read "<file>: <key>: <why>".
    return str(error) or type(error).__name__


@define
class CheckReport:
    """
    What C{mailproxy check} found.

    @ivar path: the file, made absolute as in every problem's text.
    @ivar config: the configuration, if it loads.
    @ivar router: the router built from it, if it could be built.
    @ivar problems: what makes it unusable, each C{"<file>: <key>: <why>"}.
    @ivar warnings: what works but should be fixed, in the same form.
    """

    path: str
    config: Config | None = None
    router: Any = None
    problems: list[str] = Factory(list)
    warnings: list[str] = Factory(list)

    @property
    def summary(self) -> str:
        """
        The one line that says the configuration is usable.
        """
        assert self.config is not None
        listeners = len(self.config.listeners)
        backends = len(self.config.backends)
        return (
            f"{self.path}: OK ({listeners} listener{'s' if listeners != 1 else ''}, "
            f"{backends} backend{'s' if backends != 1 else ''})"
        )


def checkConfig(path: str, reactor: Any) -> CheckReport:
    """
    Load the configuration at C{path} and build everything the proxy would
    build from it before listening: the router (and its route table) and the
    TLS options (and their certificates and keys), collecting every problem.

    @param reactor: given to the router; nothing is started on it.
    """
    report = CheckReport(os.path.abspath(path))
    try:
        config = loadConfig(path)
    except ConfigError as e:
        report.problems.extend(e.problems)
        report.warnings.extend(e.warnings)
        if e.routerParts is not None:
            # The router's own problems (a file it reads, its database) in
            # this run too, not only once the rest is fixed.
            router, backends = e.routerParts
            try:
                built = buildRouterFrom(report.path, router, backends, reactor)
            except ConfigError as routerError:
                report.problems.extend(routerError.problems)
            else:
                closeRouter(built)
        return report
    report.config = config
    report.warnings.extend(config.warnings)
    try:
        report.router = buildRouter(config, reactor)
    except ConfigError as e:
        report.problems.extend(e.problems)
    certificates = []
    if config.tls is not None:
        certificates.append((config.tls, config.sni))
    if config.admin is not None and config.admin.tls is not None:
        certificates.append((config.admin.tls, ()))
    for default, sni in certificates:
        try:
            serverOptions(default, sni)
        except TLSConfigError as e:
            report.problems.append(_problem(e))
        else:
            # What clients will refuse, which the proxy serves anyway.
            report.warnings.extend(certificateWarnings(default, sni))
    return report


def _check(arguments: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    if arguments.config is not None and arguments.configOption is not None:
        print(f"{_PROG} check: name the configuration file once: check FILE or check --config FILE", file=err)
        return 2
    if arguments.user is not None and not arguments.probe:
        print(f"{_PROG} check: --user is for --probe", file=err)
        return 2
    report = checkConfig(arguments.config or arguments.configOption or DEFAULT_CONFIG, _globalReactor())
    for warning in report.warnings:
        print(f"warning: {warning}", file=err)
    for problem in report.problems:
        print(problem, file=err)
    if report.problems:
        closeRouter(report.router)
        count = len(report.problems)
        print(f"{report.path}: {count} problem{'s' if count != 1 else ''}", file=err)
        return 1
    print(report.summary, file=out)
    if not arguments.probe:
        closeRouter(report.router)
        return 0
    return _probe(report, arguments.user, out, err)


#: The account C{check --probe} asks the router about without C{--user}:
#: in a reserved domain (RFC 2606), so it exists nowhere.
PROBE_ACCOUNT = "mailproxy-check@example.invalid"


def _probe(report: CheckReport, user: str | None, out: TextIO, err: TextIO) -> int:
    """
    Ask the router about one account and read every backend port's
    greeting, printing one line for each; 1 if any failed.
    """
    config, router = report.config, report.router
    assert config is not None
    failures = 0

    async def main(reactor: Any) -> None:
        nonlocal failures
        _startRouter(router)
        try:
            line, ok = await _probeRouter(router, config.router.type, user)
            print(line, file=out)
            failures += not ok
            checker = HealthChecker(reactor, lambda: config.backends, timeout=_PROBE_TIMEOUT, hostname=config.hostname)
            states = await checker.check()
            for name, backend in sorted(config.backends.items()):
                for protocol, port in sorted(backend.ports.items()):
                    state = states[name][protocol]
                    where = f"backend {name} {protocol} {backend.host}:{port}"
                    if state["ok"]:
                        print(f"{where}: OK, greeting in {state['seconds']:.3f}s", file=out)
                    else:
                        failures += 1
                        print(f"{where}: FAILED: {state['error']}", file=out)
        finally:
            _stopRouter(router)
            closeRouter(router)

    try:
        react(lambda reactor: Deferred.fromCoroutine(main(reactor)))
    except SystemExit as e:
        # react() always exits; only the probes' outcome decides here.
        if e.code:
            failures += 1
    if failures:
        print(f"{report.path}: {failures} probe{'s' if failures != 1 else ''} failed", file=err)
        return 1
    return 0


#: Seconds each probe of C{check --probe} may take.
_PROBE_TIMEOUT = 5.0


async def _probeRouter(router: Any, routerName: str, user: str | None) -> tuple[str, bool]:
    """
    Ask the router which backend holds C{user} (or L{PROBE_ACCOUNT}),
    without a password, as C{mailproxy route explain} does.

    @return: the line to print, and whether the router answered.
    """
    account = user or PROBE_ACCOUNT
    try:
        answer = await explainRoute(router, routerName, account)
    except Exception as e:
        return f"router {routerName}: FAILED asking about {account}: {_problem(e)}", False
    if not answer["explained"]:
        # A router that decides only at login may still show that it can
        # reach its directory or auth server.
        for member in routerChain(router):
            probe = getattr(member, "probe", None)
            if callable(probe):
                try:
                    said = await probe(account)
                except Exception as e:
                    return f"router {routerName}: FAILED: {_problem(e)}", False
                return f"router {routerName}: OK, {said} (it routes only at login, with the password)", True
        return (
            f"router {routerName}: not asked: it decides only at login, with the password",
            True,
        )
    if answer["backend"] is None:
        verdict = "no rule matches (its login would be refused)"
    else:
        verdict = f"{answer['backend']} (rule: {answer['rule']})"
    return f"router {routerName}: OK, {account} -> {verdict}", True


class _RunOptions(ServerOptions):
    """
    twistd's options, knowing of no plugin but mailproxy's: looking for the
    others would scan Twisted's plugin directories and try to rewrite their
    C{dropin.cache}, which a service user may not (C{Unable to write to
    plugin cache}).
    """

    @staticmethod
    def _getPlugins(interface: Any, package: Any = None) -> list[Any]:
        from twisted.plugins.mailproxy_plugin import mailproxy

        return [mailproxy] if interface is IServiceMaker else []


def _run(arguments: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    # twistd would report a bad file as a usage error with a traceback
    # around it; say it the way `mailproxy check` does.
    try:
        config = loadConfig(arguments.config)
    except ConfigError as e:
        print(_problem(e), file=err)
        return 1
    options = _RunOptions()
    options.parseOptions(["--nodaemon", "--pidfile=", "mailproxy", "--config", arguments.config])
    # One writer on standard output, in the [log] format if path is "-".
    options["logger"] = lambda: processLogObserver(config.log)
    options.subOptions["eventLogOnStandardOutput"] = True
    try:
        runApp(options)
    except ConfigError as e:
        # What only starting finds: a port taken, say.
        print(_problem(e), file=err)
        return 1
    return 0


def _configShow(arguments: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    try:
        config = loadConfig(arguments.config)
        data = readTOML(config.path)
    except ConfigError as e:
        print(_problem(e), file=err)
        return 1
    base = os.path.dirname(config.path)
    masterPasswordFiles = {
        name: os.path.normpath(os.path.join(base, os.path.expanduser(table["master_password_file"])))
        for name, table in data.get("backend", {}).items()
        if "master_password_file" in table
    }
    # The router's defaults are known only to its builder: build it (as
    # check does; nothing is started) and note what it read. One that
    # cannot be built is shown as written (check names the problem).
    with recordingReads() as routerReads:
        try:
            router = buildRouter(config, _globalReactor())
        except ConfigError:
            router = None
            routerReads.clear()
    closeRouter(router)
    out.write(f"# {config.path}: the effective configuration (mailproxy {__version__})\n")
    out.write(dumpTOML(effectiveConfig(config, masterPasswordFiles, routerReads)))
    return 0


def _examples(arguments: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    try:
        written = writeExamples(arguments.directory)
    except ExamplesError as e:
        print(f"{_PROG} examples: {e}", file=err)
        return 1
    for path in written:
        print(path, file=out)
    return 0


def _startLogging(stream: TextIO) -> None:
    """
    Send log events of level info and above to C{stream}, as text.
    """
    globalLogBeginner.beginLoggingTo(
        [
            FilteringLogObserver(
                textFileLogObserver(stream),
                [LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)],
            )
        ],
        redirectStandardIO=False,
    )


def _demo(arguments: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    # Imported here: no other command needs the demo's IMAP servers.
    from mailproxy.demo import defaultDirectory, instructions, startDemo
    from mailproxy.tap import ListenError

    directory = arguments.directory or defaultDirectory()

    async def main(reactor: Any) -> None:
        try:
            demo = await startDemo(
                reactor,
                directory,
                imapsPort=arguments.imaps_port,
                imapPort=arguments.imap_port,
                adminPort=arguments.admin_port,
            )
        except (CannotListenError, ListenError) as e:
            print(f"{_PROG} demo: {_problem(e)}", file=err)
            print(
                f"{_PROG} demo: choose other ports with --imaps-port, --imap-port and --admin-port",
                file=err,
            )
            raise SystemExit(1) from None
        except (ConfigError, TLSConfigError, OSError) as e:
            print(f"{_PROG} demo: {_problem(e)}", file=err)
            raise SystemExit(1) from None
        reactor.addSystemEventTrigger("before", "shutdown", demo.stop)
        out.write(instructions(demo))
        out.flush()
        # Until Ctrl-C stops the reactor; the trigger above stops the demo.
        await Deferred()

    _startLogging(err)
    try:
        react(main)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    return 0


def _client(arguments: argparse.Namespace, err: TextIO) -> AdminClient:
    """
    The management client the arguments ask for; a warning on C{err} if
    the token file given is open to others.

    @raise AdminError: no endpoint or token can be found.
    """
    token = None
    if arguments.token_file:
        loose = tokenFilePermissions(arguments.token_file)
        if loose:
            print(f"warning: --token-file: {loose}", file=err)
        try:
            with open(arguments.token_file, "rb") as f:
                token = f.readline().strip()
        except OSError as e:
            raise AdminError(f"{arguments.token_file}: cannot read: {e.strerror or e}") from None
    if arguments.url and token:
        return AdminClient(arguments.url, token)
    return clientFromConfig(arguments.config, arguments.url, token)


def _printMove(result: dict[str, Any], out: TextIO, domain: str | None = None) -> None:
    verb = "would change" if result["dryRun"] else "changed"
    if not result["changes"]:
        print(f"route table: nothing to change, already on {result['backend']}", file=out)
    for change in result["changes"]:
        print(f"{verb}: {change['key']}: {change['from'] or '(no entry)'} -> {change['to']}", file=out)
    kept = result.get("keptAccounts", [])
    if kept:
        shown = ", ".join(kept[:10]) + (f" and {len(kept) - 10} more" if len(kept) > 10 else "")
        print(
            f"not moved: {len(kept)} account{'s' if len(kept) != 1 else ''} of {domain} with their own entry: "
            f"{shown} (--include-accounts moves them too)",
            file=out,
        )
    count = result["sessions"]
    sessions = f"{count} open session{'s' if count != 1 else ''}"
    if result["dryRun"]:
        print(f"{sessions} would be dropped" + (f" ({', '.join(result['accounts'])})" if count else ""), file=out)
    else:
        print(f"{sessions} dropped" + (f"; logins held {result['held']:g}s" if result["held"] else ""), file=out)


def _readAccounts(path: str) -> list[str]:
    """
    The accounts listed in C{path} (C{-}: standard input), one per line;
    blank lines and C{#} comments are skipped.
    """
    try:
        if path == "-":
            text = sys.stdin.read()
        else:
            with open(path, encoding="utf-8") as f:
                text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise AdminError(f"{path}: cannot read: {getattr(e, 'strerror', None) or e}") from None
    accounts = []
    for line in text.splitlines():
        account = line.split("#", 1)[0].strip()
        if account:
            accounts.append(account)
    return accounts


def _batches(accounts: list[str], limit: int) -> list[list[str]]:
    """
    C{accounts} in runs whose JSON fits in C{limit} bytes (one run, unless
    the list is longer than the management endpoint takes in one body).
    """
    batches: list[list[str]] = [[]]
    size = 0
    for account in accounts:
        length = len(json.dumps(account).encode("utf-8")) + 2
        if batches[-1] and size + length > limit:
            batches.append([])
            size = 0
        batches[-1].append(account)
        size += length
    return batches


def _move(arguments: argparse.Namespace, client: AdminClient, out: TextIO) -> int:
    *accounts, backend = arguments.targets
    if arguments.from_file is not None:
        accounts += _readAccounts(arguments.from_file)
    if arguments.include_accounts and not arguments.domain:
        raise AdminError("--include-accounts needs --domain")
    # Room for the other fields of the body.
    batches = _batches(accounts, MAX_BODY - 1024)
    total: dict[str, Any] | None = None
    moved = 0
    for index, batch in enumerate(batches):
        first = index == 0
        try:
            result = client.call(
                "POST", "/move",
                {
                    "backend": backend,
                    "accounts": batch,
                    "domain": arguments.domain if first else None,
                    "include_accounts": arguments.include_accounts and first,
                    "dry_run": arguments.dry_run,
                    "hold": arguments.hold,
                    "drop": not arguments.no_drop,
                },
            )
        except AdminError as e:
            if total is None:
                raise
            _printMove(total, out, arguments.domain)
            raise AdminError(f"{e} (the first {moved} of {len(accounts)} accounts were moved; move the rest again)") from None
        moved += len(batch)
        if total is None:
            total = result
        else:
            total["changes"] += result["changes"]
            total["sessions"] += result["sessions"]
            total["accounts"] += result["accounts"]
    assert total is not None
    _printMove(total, out, arguments.domain)
    return 0


def _migrate(arguments: argparse.Namespace, client: AdminClient, out: TextIO) -> int:
    return migrate(arguments, client, out, sys.stderr, _readAccounts, MAX_BODY)


def _route(arguments: argparse.Namespace, client: AdminClient, out: TextIO) -> int:
    if arguments.action == "explain":
        answer = client.call("GET", "/explain?account=" + quote(arguments.account, safe="@"))
        if arguments.json:
            _printJSON(answer, out)
            return 0
        chain = " -> ".join(answer["chain"])
        print(f"account: {answer['account']}", file=out)
        print(f"router:  {answer['router']} ({chain})", file=out)
        if not answer["explained"]:
            print("rule:    (the router decides only at login, with the password)", file=out)
        else:
            print(f"rule:    {answer['rule'] or '(none: the login is refused)'}", file=out)
            print(f"backend: {answer['backend'] or '-'}", file=out)
    elif arguments.action == "list":
        for key, backend in client.call("GET", "/routes")["routes"].items():
            print(f"{key} {backend}", file=out)
    elif arguments.action == "set":
        client.call("PUT", "/routes/" + quoteKey(arguments.key), {"backend": arguments.backend})
        print(f"{arguments.key} -> {arguments.backend}", file=out)
    else:
        client.call("DELETE", "/routes/" + quoteKey(arguments.key))
        print(f"{arguments.key}: deleted", file=out)
    return 0


def _sessions(arguments: argparse.Namespace, client: AdminClient, out: TextIO) -> int:
    if arguments.drop:
        if not arguments.account and not arguments.backend:
            raise AdminError("--drop needs --account or --backend")
        result = client.call("POST", "/sessions/drop", {"account": arguments.account, "backend": arguments.backend})
        if arguments.json:
            _printJSON(result, out)
            return 0
        print(f"{result['dropped']} session{'s' if result['dropped'] != 1 else ''} dropped", file=out)
        return 0
    query = "&".join(
        f"{name}={quote(value, safe='@')}"
        for name, value in (("account", arguments.account), ("backend", arguments.backend))
        if value
    )
    answer = client.call("GET", "/sessions" + ("?" + query if query else ""))
    if arguments.json:
        _printJSON(answer, out)
        return 0
    for session in answer["sessions"]:
        # In a fleet, another proxy's session has its proxy, and no byte
        # counts (only its own proxy has them).
        print(
            f"{session['session']} {session['protocol']} {session['state']} "
            f"{session['account'] or '-'} {session['backend'] or '-'} "
            f"{session['address']}:{session['port']} {session['seconds']:.0f}s "
            f"in={_orDash(session['bytesFromClient'])} out={_orDash(session['bytesFromBackend'])}"
            + (f" proxy={session['proxy']}" if "proxy" in session else ""),
            file=out,
        )
    print(f"{answer['count']} session{'s' if answer['count'] != 1 else ''}", file=out)
    return 0


def _orDash(value: Any) -> str:
    return "-" if value is None else str(value)


def _reload(arguments: argparse.Namespace, client: AdminClient, out: TextIO) -> int:
    status, outcome = client.request("POST", "/reload")
    if status != 200:
        raise AdminError(f"reload failed, the running configuration is kept: {outcome.get('error', outcome)}")
    _printReloaded(outcome, out)
    return 0


def _reloadBySignal(arguments: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    try:
        outcome = reloadBySignal(arguments.pid, os.environ.get("RUNTIME_DIRECTORY"), arguments.timeout)
    except ReloadError as e:
        print(f"{_PROG} reload: {e}", file=err)
        return 1
    if not outcome["ok"]:
        print(f"{_PROG} reload: reload failed, the running configuration is kept: {outcome['error']}", file=err)
        return 1
    _printReloaded(outcome, out)
    return 0


def _printReloaded(outcome: dict[str, Any], out: TextIO) -> None:
    print(f"reloaded {outcome['path']}", file=out)
    if outcome["restartNeeded"]:
        print(f"these changes need a restart: {', '.join(outcome['restartNeeded'])}", file=out)


def _stats(arguments: argparse.Namespace, client: AdminClient, out: TextIO) -> int:
    answer = client.call("GET", "/stats")
    if arguments.json:
        _printJSON(answer, out)
    else:
        for name, value in _flatten(answer):
            print(f"{name} {value}", file=out)
    return 0


def _flatten(value: Any, prefix: str = "") -> list[tuple[str, str]]:
    """
    JSON data as C{(dotted.name, value)} pairs, one per number or string
    (C{sessions.open 3}); an empty object or array gives none, an empty
    key is written C{-} (the sessions not yet at a backend).
    """
    if isinstance(value, dict):
        return [
            pair
            for key, item in value.items()
            for pair in _flatten(item, f"{prefix}.{key or '-'}" if prefix else str(key or "-"))
        ]
    if isinstance(value, list):
        return [pair for index, item in enumerate(value) for pair in _flatten(item, f"{prefix}[{index}]")]
    return [(prefix, json.dumps(value) if value is None or isinstance(value, bool) else str(value))]


def _printJSON(answer: Any, out: TextIO) -> None:
    print(json.dumps(answer, indent=2), file=out)


def _health(arguments: argparse.Namespace, client: AdminClient, out: TextIO) -> int:
    status, answer = client.request("GET", "/health")
    _printJSON(answer, out)
    return 0 if status == 200 else 1


_OPERATIONS = {
    "move": _move,
    "migrate": _migrate,
    "route": _route,
    "sessions": _sessions,
    "reload": _reload,
    "stats": _stats,
    "health": _health,
}


def _operate(arguments: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    try:
        return _OPERATIONS[arguments.command](arguments, _client(arguments, err), out)
    except AdminError as e:
        print(f"{_PROG} {arguments.command}: {e}", file=err)
        return 1


def _completion(arguments: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    out.write(bashCompletion(buildParser()))
    return 0


def _manpage(arguments: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    out.write(manPage(buildParser()))
    return 0


def _reloadCommand(arguments: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    if arguments.pid is not None:
        return _reloadBySignal(arguments, out, err)
    return _operate(arguments, out, err)


_COMMANDS = {
    "demo": _demo,
    "check": _check,
    "config": _configShow,
    "run": _run,
    "completion": _completion,
    "manpage": _manpage,
    "examples": _examples,
    **{name: _operate for name in _OPERATIONS},
    "reload": _reloadCommand,
}


def main(argv: Sequence[str] | None = None) -> int:
    """
    Run the C{mailproxy} command.

    @param argv: the arguments after the program name; default C{sys.argv[1:]}.
    @return: the exit status: 0 for success, 1 for a failure, 2 for wrong
        usage.
    """
    parser = buildParser()
    try:
        arguments = parser.parse_args(argv)
    except SystemExit as e:
        # --help, --version and usage errors: argparse has already printed.
        return e.code if isinstance(e.code, int) else 2
    if arguments.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        status = _COMMANDS[arguments.command](arguments, sys.stdout, sys.stderr)
        sys.stdout.flush()
    except BrokenPipeError:
        # The output's reader stopped early (| head): end quietly, as
        # other commands do; what is left to flush at exit goes nowhere.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 1
    return status
