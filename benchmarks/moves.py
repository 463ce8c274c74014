"""
How long a bulk move stalls the proxy's event loop.

A proxy is started in this process (its real service: listener, static
router, management endpoint on loopback) with a route table of
C{--entries} accounts, and C{--accounts} of them are moved to the other
backend with one C{POST /move}, as C{mailproxy move --from-file} sends it.
While the move runs, two probes watch the reactor:

 - a C{LoopingCall} every C{--tick} seconds in the reactor records how
   late each call runs (its lateness is how long the reactor could not
   run anything: no relay, no login, no answer);
 - the same call records the CPU time the reactor's thread used since the
   call before: unlike the lateness, this does not count the time other
   processes had the CPU, so it shows the longest piece of work the
   reactor did between two calls even on a busy machine;
 - a thread asks the management endpoint C{GET /stats} over and over
   and times each answer.

The same probes run for C{--idle} seconds before the move.  The table
shows the largest lateness and the slowest C{/stats} answer, idle and
during the move, and the ratio of the slowest answer during the move to
the median idle answer (1 means the move did not delay it).  Run from the
repository root::

    /tmp/venv/bin/python benchmarks/moves.py [--quick] [--entries 20000] [--accounts 1000] [--json out.json]

(C{--quick}: 100 accounts of 2,000, the size the stall was first seen at.)

C{main(argv)} returns the exit status: 1 if the move failed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent
_REPOSITORY = _HERE.parent
if str(_REPOSITORY) not in sys.path:
    sys.path.insert(0, str(_REPOSITORY))

from twisted.internet import reactor  # noqa: E402
from twisted.internet.task import LoopingCall, react  # noqa: E402
from twisted.internet.threads import deferToThread  # noqa: E402

from mailproxy._adminclient import AdminClient  # noqa: E402
from mailproxy.config import loadConfig  # noqa: E402
from mailproxy.tap import serviceFromConfig  # noqa: E402
from tests.integration.servers import freePort  # noqa: E402

TOKEN = b"benchmark-token-0123456789abcdef"
ACCOUNT = "user{}@example.org"


def writeProxy(directory: Path, entries: int) -> tuple[Path, int]:
    """
    Write a configuration with a route table of C{entries} accounts on
    C{old}.

    @return: the configuration's path and the management port.
    """
    routes = ['default = "old"', "", "[domains]", '"example.net" = "old"', "", "[accounts]"]
    routes += [f'"{ACCOUNT.format(i)}" = "old"' for i in range(entries)]
    (directory / "routes.toml").write_text("\n".join(routes) + "\n")
    (directory / "admin.token").write_bytes(TOKEN + b"\n")
    os.chmod(directory / "admin.token", 0o600)
    admin = freePort()
    config = f"""
[[listener]]
protocol = "imap"
endpoint = "tcp:{freePort()}:interface=127.0.0.1"
tls = "none"

[router]
type = "static"
path = "routes.toml"

[backend.old]
host = "127.0.0.1"
ports = {{ imap = {freePort()} }}
tls = "none"

[backend.new]
host = "127.0.0.1"
ports = {{ imap = {freePort()} }}
tls = "none"

[admin]
endpoint = "tcp:{admin}:interface=127.0.0.1"
token_file = "admin.token"
"""
    path = directory / "mailproxy.toml"
    path.write_text(config)
    return path, admin


class Probe:
    """
    A LoopingCall's lateness and the answer times of C{GET /stats} from a
    thread, over one phase.
    """

    def __init__(self, client: AdminClient, tick: float) -> None:
        self.client = client
        self.tick = tick
        self.lateness: list[float] = []
        self.busy: list[float] = []
        self.answers: list[float] = []
        self._stop = threading.Event()
        self._last = 0.0
        self._lastCPU = 0.0
        self._loop = LoopingCall(self._ticked)

    def _ticked(self) -> None:
        now, cpu = time.monotonic(), time.thread_time()
        if self._last:
            self.lateness.append(max(0.0, now - self._last - self.tick))
            self.busy.append(cpu - self._lastCPU)
        self._last, self._lastCPU = now, cpu

    def _ask(self) -> None:
        # In a thread: the time the endpoint takes to answer, as a client
        # would see it.
        while not self._stop.is_set():
            started = time.monotonic()
            self.client.call("GET", "/stats")
            self.answers.append(time.monotonic() - started)
            self._stop.wait(0.005)

    def start(self) -> Any:
        """
        Start both probes; the Deferred fires when L{stop} was called and
        the asking thread has finished.
        """
        self._stop.clear()
        self._last = 0.0
        self._loop.start(self.tick, now=True)
        return deferToThread(self._ask)

    def stop(self) -> None:
        """
        Stop both probes.
        """
        self._stop.set()
        self._loop.stop()

    def summary(self) -> dict[str, float]:
        """
        The phase's figures, in milliseconds.
        """
        return {
            "ticks": len(self.lateness),
            "latenessMaxMs": 1000 * max(self.lateness, default=0.0),
            "loopCPUMaxMs": 1000 * max(self.busy, default=0.0),
            "answers": len(self.answers),
            "statsMedianMs": 1000 * statistics.median(self.answers) if self.answers else 0.0,
            "statsMaxMs": 1000 * max(self.answers, default=0.0),
        }


async def measure(reactor: Any, arguments: argparse.Namespace) -> dict[str, Any]:
    """
    Start the proxy, measure idle, then during the move.
    """
    from twisted.internet.defer import Deferred

    def sleep(seconds: float) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        reactor.callLater(seconds, d.callback, None)
        return d

    directory = Path(tempfile.mkdtemp(prefix="mailproxy-moves-"))
    path, port = writeProxy(directory, arguments.entries)
    started = time.monotonic()
    service = serviceFromConfig(loadConfig(str(path)), reactor)
    service.startService()
    loaded = time.monotonic() - started
    client = AdminClient(f"http://127.0.0.1:{port}", TOKEN, timeout=3600)
    try:
        # The first request with a body imports what twisted.web parses
        # bodies with (some ms, once per process): not the move's cost.
        await deferToThread(client.call, "POST", "/move", {"backend": "new", "accounts": [ACCOUNT.format(0)], "dry_run": True})
        idle = Probe(client, arguments.tick)
        asking = idle.start()
        await sleep(arguments.idle)
        idle.stop()
        await asking

        accounts = [ACCOUNT.format(i) for i in range(0, arguments.entries, max(1, arguments.entries // arguments.accounts))]
        accounts = accounts[: arguments.accounts]
        during = Probe(client, arguments.tick)
        asking = during.start()
        await sleep(0.2)
        moveStarted = time.monotonic()
        result = await deferToThread(client.call, "POST", "/move", {"backend": "new", "accounts": accounts})
        moveSeconds = time.monotonic() - moveStarted
        await sleep(0.2)
        during.stop()
        await asking
    finally:
        await service.stopService()
    quiet, busy = idle.summary(), during.summary()
    return {
        "entries": arguments.entries,
        "accounts": len(accounts),
        "changed": len(result["changes"]),
        "loadSeconds": loaded,
        "moveSeconds": moveSeconds,
        "idle": quiet,
        "move": busy,
        "statsRatio": busy["statsMaxMs"] / quiet["statsMedianMs"] if quiet["statsMedianMs"] else None,
    }


def table(results: dict[str, Any]) -> str:
    """
    The results as a markdown table.
    """
    idle, move = results["idle"], results["move"]
    lines = [
        f"{results['accounts']} accounts moved in a {results['entries']}-entry route table: "
        f"{results['changed']} entries changed in {results['moveSeconds']:.2f} s",
        "",
        "| phase | LoopingCall lateness max | reactor CPU between calls, max | GET /stats median | GET /stats max | answers |",
        "|---|---|---|---|---|---|",
        *(
            f"| {name} | {phase['latenessMaxMs']:.1f} ms | {phase['loopCPUMaxMs']:.1f} ms | {phase['statsMedianMs']:.1f} ms "
            f"| {phase['statsMaxMs']:.1f} ms | {phase['answers']} |"
            for name, phase in (("idle", idle), ("move", move))
        ),
        "",
        f"slowest /stats answer during the move / median idle answer: {results['statsRatio']:.1f}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """
    Run the benchmark; print the table (and write C{--json}).
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1].strip())
    parser.add_argument("--entries", type=int, default=20000, help="accounts in the route table (default: %(default)s)")
    parser.add_argument("--accounts", type=int, default=1000, help="accounts moved (default: %(default)s)")
    parser.add_argument("--tick", type=float, default=0.01, help="the LoopingCall's interval, seconds (default: %(default)s)")
    parser.add_argument("--idle", type=float, default=2.0, help="seconds measured before the move (default: %(default)s)")
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON")
    parser.add_argument("--quick", action="store_true", help="100 accounts of 2,000 entries, 0.5 s idle: a smoke test")
    arguments = parser.parse_args(argv)
    if arguments.quick:
        arguments.entries, arguments.accounts, arguments.idle = 2000, 100, 0.5
    results: dict[str, Any] = {}

    async def run(reactor: Any) -> None:
        results.update(await measure(reactor, arguments))

    try:
        react(run)
    except SystemExit as e:
        if e.code:
            return 1
    print(table(results))
    if arguments.json:
        Path(arguments.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
