"""
The C{mailproxy} command.

  - C{mailproxy demo}: the proxy in front of two built-in demo servers, with
    a generated certificate and configuration (L{mailproxy.demo});
  - C{mailproxy check CONFIG}: validate a configuration as the proxy would
    load it, files, route table and certificates included;
  - C{mailproxy run --config FILE}: run the proxy in the foreground, the same
    as C{twistd -n mailproxy --config FILE} without a pid file.

This module is an entry point: it alone picks the global reactor and sets up
logging, and hands both to the library.
"""

from __future__ import annotations

import argparse
import sys
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
from mailproxy._tls import TLSConfigError, serverOptions
from mailproxy.config import ConfigError, loadConfig
from mailproxy.demo import defaultDirectory, instructions, startDemo
from mailproxy.routers import buildRouter

_PROG = "mailproxy"


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
    return parser


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


_COMMANDS = {"demo": _demo, "check": _check, "run": _run}


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
