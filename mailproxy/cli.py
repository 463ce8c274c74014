"""
The C{mailproxy} command.

  - C{mailproxy demo}: the proxy in front of two built-in demo servers, with
    a generated certificate and configuration (L{mailproxy.demo});
  - C{mailproxy check CONFIG}: validate a configuration as the proxy would
    load it, files, route table and certificates included;
  - C{mailproxy run --config FILE}: run the proxy in the foreground, the same
    as C{twistd -n mailproxy --config FILE} without a pid file;
  - C{mailproxy move}, C{route}, C{sessions}, C{reload}, C{stats}, C{health}:
    operate the running proxy through its management endpoint (C{[admin]}),
    see L{mailproxy.admin}.

This module is an entry point: it alone picks the global reactor and sets up
logging, and hands both to the library.
"""

from __future__ import annotations

import argparse
import json
import sys
from urllib.parse import quote
from collections.abc import Sequence
from typing import Any, TextIO

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
from mailproxy.admin import MAX_BODY
from mailproxy._tls import TLSConfigError, serverOptions
from mailproxy.config import ConfigError, loadConfig
from mailproxy.demo import defaultDirectory, instructions, startDemo
from mailproxy.routers import buildRouter

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
            "built-in IMAP servers on loopback ports, and print how to try it. "
            "Runs until Ctrl-C."
        ),
    )
    demo.add_argument(
        "--imaps-port", type=_port, default=10993, metavar="N",
        help="the proxy's implicit TLS port (default: %(default)s)",
    )
    demo.add_argument(
        "--imap-port", type=_port, default=10143, metavar="N",
        help="the proxy's STARTTLS port (default: %(default)s)",
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
        help="validate a configuration file",
        description=(
            "Load a configuration as the proxy would: the file, the files it names, "
            "the router and its route table, and the TLS certificates. "
            "Exit status 0 if it is usable, 1 if not."
        ),
    )
    check.add_argument("config", metavar="CONFIG", help="the configuration file")

    run = commands.add_parser(
        "run",
        help="run the proxy in the foreground",
        description=(
            "Run the proxy in the foreground, logging to standard output: the same as "
            "`twistd -n mailproxy --config FILE`, but without writing a pid file."
        ),
    )
    run.add_argument("--config", required=True, metavar="FILE", help="the configuration file")
    _addOperations(commands)
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
    move.add_argument("targets", nargs="+", metavar="TARGET", help="the accounts to move, then the backend")
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

    route = commands.add_parser("route", help="read or change the route table", description="Read or change the route table.")
    actions = route.add_subparsers(dest="action", metavar="ACTION", required=True)
    explain = actions.add_parser(
        "explain", parents=[common], help="which router, rule and backend decide an account's route",
        description="Say which router, rule and backend decide ACCOUNT's route, without logging in.",
    )
    explain.add_argument("account", metavar="ACCOUNT")
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

    for name, text in (
        ("reload", "reload the configuration, route table and certificates (like SIGHUP)"),
        ("stats", "show the counters as JSON"),
        ("health", "check the proxy and every backend (exit status 1 if unhealthy)"),
    ):
        commands.add_parser(name, parents=[common], help=text, description=text[0].upper() + text[1:] + ".")


def _globalReactor() -> Any:
    # Imported on use: importing it installs the default reactor, which
    # parsing arguments (or a test importing this module) has no need of.
    from twisted.internet import reactor

    return reactor


def _problem(error: BaseException) -> str:
    # ConfigError and TLSConfigError already read "<file>: <key>: <why>".
    return str(error) or type(error).__name__


def checkConfig(path: str, reactor: Any) -> str:
    """
    Load the configuration at C{path} and build everything the proxy would
    build from it before listening: the router (and its route table) and the
    TLS options (and their certificates and keys).

    @param reactor: given to the router; nothing is started on it.
    @return: a one-line summary for the operator.
    @raise mailproxy.config.ConfigError: if the configuration is wrong.
    @raise mailproxy._tls.TLSConfigError: if a certificate or key is unusable.
    """
    config = loadConfig(path)
    buildRouter(config, reactor)
    if config.tls is not None:
        serverOptions(config.tls, config.sni)
    listeners = len(config.listeners)
    backends = len(config.backends)
    return (
        f"{path}: OK ({listeners} listener{'s' if listeners != 1 else ''}, "
        f"{backends} backend{'s' if backends != 1 else ''})"
    )


def _check(arguments: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    try:
        summary = checkConfig(arguments.config, _globalReactor())
    except (ConfigError, TLSConfigError) as e:
        print(_problem(e), file=err)
        return 1
    print(summary, file=out)
    return 0


def _run(arguments: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    # twistd would report a bad file as a usage error with a traceback
    # around it; say it the way `mailproxy check` does.
    try:
        loadConfig(arguments.config)
    except ConfigError as e:
        print(_problem(e), file=err)
        return 1
    options = ServerOptions()
    options.parseOptions(["--nodaemon", "--pidfile=", "mailproxy", "--config", arguments.config])
    runApp(options)
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
    directory = arguments.directory or defaultDirectory()

    async def main(reactor: Any) -> None:
        try:
            demo = await startDemo(
                reactor, directory, imapsPort=arguments.imaps_port, imapPort=arguments.imap_port
            )
        except CannotListenError as e:
            print(f"{_PROG} demo: {_problem(e)}", file=err)
            print(f"{_PROG} demo: choose other ports with --imaps-port and --imap-port", file=err)
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


def _client(arguments: argparse.Namespace) -> AdminClient:
    """
    The management client the arguments ask for.

    @raise AdminError: no endpoint or token can be found.
    """
    token = None
    if arguments.token_file:
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


def _route(arguments: argparse.Namespace, client: AdminClient, out: TextIO) -> int:
    if arguments.action == "explain":
        answer = client.call("GET", "/explain?account=" + quote(arguments.account, safe="@"))
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
        print(f"{result['dropped']} session{'s' if result['dropped'] != 1 else ''} dropped", file=out)
        return 0
    query = "&".join(
        f"{name}={quote(value, safe='@')}"
        for name, value in (("account", arguments.account), ("backend", arguments.backend))
        if value
    )
    answer = client.call("GET", "/sessions" + ("?" + query if query else ""))
    for session in answer["sessions"]:
        print(
            f"{session['session']} {session['protocol']} {session['state']} "
            f"{session['account'] or '-'} {session['backend'] or '-'} "
            f"{session['address']}:{session['port']} {session['seconds']:.0f}s "
            f"in={session['bytesFromClient']} out={session['bytesFromBackend']}",
            file=out,
        )
    print(f"{answer['count']} session{'s' if answer['count'] != 1 else ''}", file=out)
    return 0


def _reload(arguments: argparse.Namespace, client: AdminClient, out: TextIO) -> int:
    status, outcome = client.request("POST", "/reload")
    if status != 200:
        raise AdminError(f"reload failed, the running configuration is kept: {outcome.get('error', outcome)}")
    print(f"reloaded {outcome['path']}", file=out)
    if outcome["restartNeeded"]:
        print(f"these changes need a restart: {', '.join(outcome['restartNeeded'])}", file=out)
    return 0


def _stats(arguments: argparse.Namespace, client: AdminClient, out: TextIO) -> int:
    print(json.dumps(client.call("GET", "/stats"), indent=2), file=out)
    return 0


def _health(arguments: argparse.Namespace, client: AdminClient, out: TextIO) -> int:
    status, answer = client.request("GET", "/health")
    print(json.dumps(answer, indent=2), file=out)
    return 0 if status == 200 else 1


_OPERATIONS = {
    "move": _move,
    "route": _route,
    "sessions": _sessions,
    "reload": _reload,
    "stats": _stats,
    "health": _health,
}


def _operate(arguments: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    try:
        return _OPERATIONS[arguments.command](arguments, _client(arguments), out)
    except AdminError as e:
        print(f"{_PROG} {arguments.command}: {e}", file=err)
        return 1


_COMMANDS = {"demo": _demo, "check": _check, "run": _run, **{name: _operate for name in _OPERATIONS}}


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
    return _COMMANDS[arguments.command](arguments, sys.stdout, sys.stderr)
