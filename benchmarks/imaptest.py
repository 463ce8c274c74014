"""
Dovecot's imaptest script suite through mailproxy's implicit-TLS (IMAPS)
listener, many runs in a row, and once straight to Dovecot's IMAPS port for
comparison.

C{imaptest} is not shipped with this project: build it yourself against
Debian's C{dovecot-dev} (a revision that builds against the installed
Dovecot 2.3) and pass its binary; the scripts are the C{tests} directory
beside it in the build tree (C{src/tests}), or C{--tests DIR}.

Run from the repository root::

    /tmp/venv/bin/python benchmarks/imaptest.py --imaptest ~/imaptest/src/imaptest [--runs 20]
    /tmp/venv/bin/python benchmarks/imaptest.py --imaptest ... --limit line_length=65536

One private Dovecot (the integration tests' fixture) and one mailproxy with
the default C{[limits]} (plus any C{--limit}) serve every run. Each run has
a hard time limit: one that has not finished by then is killed and counted
as a hang. Each run prints its test groups passed and failed, the failed
tests with imaptest's reason, and its duration. The exit status is 1 if any
run failed a test, hung, or the proxy logged an unhandled error.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import attrs

_HERE = Path(__file__).resolve().parent
_REPOSITORY = _HERE.parent
if str(_REPOSITORY) not in sys.path:
    sys.path.insert(0, str(_REPOSITORY))

from benchmarks.run import startMailproxy, stopServers, workDirectory  # noqa: E402
from tests.integration.servers import Dovecot, Proxy, TestCA  # noqa: E402

#: The account imaptest logs in as; its scripts make and delete their own
#: mailboxes in it, so consecutive runs start from the same state.
USER = "imaptest"
PASSWORD = "imaptest-pw"

#: Where Debian's Dovecot keeps libdovecot, which imaptest links against.
DOVECOT_LIBRARIES = "/usr/lib/dovecot"

_SUMMARY = re.compile(r"^(\d+) test groups: (\d+) failed, (\d+) skipped", re.MULTILINE)
_COMMANDS = re.compile(r"^(base protocol|extensions): (\d+)/(\d+) individual commands failed", re.MULTILINE)
#: imaptest's report of one failure: "*** Test NAME command I/N (line L)"
#: then " - failed: REASON", or "*** Test NAME initialization failed: ...".
_FAILURE = re.compile(r"^\*\*\* Test (\S+) (?:command (\d+/\d+) \(line (\d+)\)\n - failed: |initialization failed: )(.*)$", re.MULTILINE)


@attrs.frozen
class Failure:
    """
    One failure imaptest reported.

    @ivar test: the script's name (C{id}, C{fetch-body}, ...).
    @ivar where: C{command I/N (line L)}, or C{initialization}.
    @ivar reason: imaptest's text (the reply it got, or what was missing).
    """

    test: str
    where: str
    reason: str


@attrs.frozen
class RunResult:
    """
    What one imaptest run did.

    @ivar path: C{mailproxy} or C{direct}.
    @ivar index: the run's number (1-based) on its path.
    @ivar seconds: wall-clock time until it exited or was killed.
    @ivar hung: it did not finish within the time limit and was killed.
    @ivar exitStatus: imaptest's exit status (L{None} if it hung).
    @ivar groups: test groups run (L{None} if no summary was printed).
    @ivar failed: test groups that failed.
    @ivar skipped: test groups skipped for a missing capability.
    @ivar commands: for C{base protocol} and C{extensions}, the failed and
        total command counts.
    @ivar failures: each failure imaptest reported.
    @ivar tail: the end of imaptest's standard error, when the run hung or
        ended without its summary.
    @ivar held: for a hung run through the proxy, the proxy's log of the
        sessions that were still open when imaptest was killed.
    """

    path: str
    index: int
    seconds: float
    hung: bool
    exitStatus: int | None
    groups: int | None
    failed: int
    skipped: int
    commands: dict[str, list[int]]
    failures: list[Failure]
    tail: str = ""
    held: list[str] = attrs.field(factory=list)

    @property
    def ok(self) -> bool:
        """
        Whether the run finished with every test group passed.
        """
        return not self.hung and self.groups is not None and self.failed == 0 and self.exitStatus == 0


def parseOutput(stdout: str, stderr: str) -> dict[str, Any]:
    """
    The counts and failures in imaptest's output.

    @return: C{groups} (L{None} without a summary), C{failed}, C{skipped},
        C{commands} and C{failures} as L{RunResult} has them.
    """
    summary = _SUMMARY.search(stdout)
    commands = {m.group(1): [int(m.group(2)), int(m.group(3))] for m in _COMMANDS.finditer(stdout)}
    failures = [
        Failure(m.group(1), f"command {m.group(2)} (line {m.group(3)})" if m.group(2) else "initialization", m.group(4))
        for m in _FAILURE.finditer(stderr)
    ]
    return {
        "groups": int(summary.group(1)) if summary else None,
        "failed": int(summary.group(2)) if summary else 0,
        "skipped": int(summary.group(3)) if summary else 0,
        "commands": commands,
        "failures": failures,
    }


def runOnce(
    imaptest: str, tests: Path, port: int, path: str, index: int, timeout: float, directory: Path
) -> RunResult:
    """
    Run the script suite once over implicit TLS to 127.0.0.1:C{port}.

    @param directory: imaptest's working directory (its output files).
    @param timeout: seconds after which the run is killed as hung.
    """
    environment = dict(os.environ)
    environment["LD_LIBRARY_PATH"] = os.pathsep.join(
        filter(None, [DOVECOT_LIBRARIES, environment.get("LD_LIBRARY_PATH")])
    )
    directory.mkdir(parents=True, exist_ok=True)
    stdoutPath, stderrPath = directory / "stdout", directory / "stderr"
    arguments = [
        imaptest, "host=127.0.0.1", f"port={port}",
        # The proxy's and Dovecot's certificates come from the test CA,
        # which imaptest has no option to trust.
        "ssl=any-cert",
        f"user={USER}", f"pass={PASSWORD}", f"test={tests}",
    ]  # fmt: skip
    started = time.monotonic()
    with open(stdoutPath, "wb") as stdout, open(stderrPath, "wb") as stderr:
        process = subprocess.Popen(
            arguments, cwd=directory, env=environment, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr
        )
        hung = False
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            hung = True
            process.kill()
            process.wait()
    seconds = time.monotonic() - started
    out = stdoutPath.read_text(errors="replace")
    err = stderrPath.read_text(errors="replace")
    parsed = parseOutput(out, err)
    tail = ""
    if hung or parsed["groups"] is None:
        tail = "\n".join((err + out).splitlines()[-15:])
    return RunResult(
        path=path,
        index=index,
        seconds=round(seconds, 2),
        hung=hung,
        exitStatus=None if hung else process.returncode,
        tail=tail,
        **parsed,
    )


def heldSessions(logText: str, minimum: float) -> list[str]:
    """
    The proxy's session-end lines in C{logText} of sessions that lasted at
    least C{minimum} seconds: after a hang, those imaptest's kill closed.
    """
    held = []
    for line in logText.splitlines():
        match = re.search(r" session (\S+) end: .* duration=([0-9.]+)s", line)
        if match and float(match.group(2)) >= minimum:
            held.append(line[match.start() + 1 :])
    return held


def describe(result: RunResult) -> str:
    """
    One line for a run: passed and failed groups, command counts, the failed
    tests, the time; or that it hung.
    """
    label = f"{result.path} run {result.index}"
    if result.hung:
        return f"{label}: HANG (killed after {result.seconds:.1f} s; {len(result.failures)} failures reported before)"
    if result.groups is None:
        return f"{label}: no summary (exit status {result.exitStatus}) after {result.seconds:.1f} s"
    passed = result.groups - result.failed - result.skipped
    commands = ", ".join(
        f"{name} {total - failed}/{total} commands" for name, (failed, total) in result.commands.items()
    )
    failedNames = sorted({failure.test for failure in result.failures})
    failedText = f" ({', '.join(failedNames)})" if failedNames else ""
    return (
        f"{label}: {passed} passed, {result.failed} failed{failedText}, {result.skipped} skipped; "
        f"{commands}; {result.seconds:.1f} s"
    )


def reasons(results: Sequence[RunResult]) -> list[str]:
    """
    Each distinct failure (test, place, reason) over C{results}, with the
    number of runs it happened in, most frequent first.
    """
    counts: dict[tuple[str, Failure], int] = {}
    for result in results:
        for failure in set(result.failures):
            key = (result.path, failure)
            counts[key] = counts.get(key, 0) + 1
    lines = []
    for (path, failure), count in sorted(counts.items(), key=lambda item: -item[1]):
        reason = failure.reason if len(failure.reason) <= 300 else failure.reason[:300] + "..."
        lines.append(f"{path}: {failure.test} {failure.where}, in {count} run(s): {reason}")
    return lines


def buildParser() -> argparse.ArgumentParser:
    """
    The command line parser.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument(
        "--imaptest", default=os.environ.get("IMAPTEST") or shutil.which("imaptest"),
        help="the imaptest binary (default: $IMAPTEST, else imaptest on PATH)",
    )  # fmt: skip
    parser.add_argument("--tests", help="the directory of imaptest's scripts (default: tests/ beside the binary)")
    parser.add_argument("--runs", type=int, default=20, help="runs through mailproxy (20)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds before a run counts as hung (60)")
    parser.add_argument(
        "--limit", action="append", default=[], metavar="NAME=VALUE",
        help="a [limits] setting for mailproxy, VALUE in TOML (repeatable); default: none, the defaults",
    )  # fmt: skip
    parser.add_argument("--no-direct", action="store_true", help="skip the run straight to Dovecot")
    parser.add_argument("--json", help="also write every run's results here")
    parser.add_argument("--keep", help="keep the servers' files, logs and imaptest's output in this directory")
    return parser


def main(argv: list[str] | None = None) -> int:
    """
    Start Dovecot and mailproxy, run the suite, print each run and a summary.
    """
    options = buildParser().parse_args(argv)
    if not options.imaptest or not Path(options.imaptest).is_file():
        print(f"no imaptest binary (--imaptest): {options.imaptest}", file=sys.stderr)
        return 2
    imaptest = str(Path(options.imaptest).resolve())
    tests = Path(options.tests).resolve() if options.tests else Path(imaptest).parent / "tests"
    if not tests.is_dir():
        print(f"no imaptest scripts directory (--tests): {tests}", file=sys.stderr)
        return 2
    limits: dict[str, str] = {}
    for setting in options.limit:
        name, equals, value = setting.partition("=")
        if not equals or not name.strip() or not value.strip():
            print(f"--limit wants NAME=VALUE: {setting!r}", file=sys.stderr)
            return 2
        limits[name.strip()] = value.strip()

    directory, cleanup = workDirectory(options.keep, "mailproxy-imaptest-")

    started = time.monotonic()
    ca = TestCA(str(directory / "ca"))
    dovecot = Dovecot(str(directory / "dovecot"), "imaptest", {USER: PASSWORD}, ca=ca)
    proxy: Proxy | None = None
    results: list[RunResult] = []
    proxyErrors: list[str] = []
    try:
        dovecot.start()
        # Values arrive as TOML text and go into the table as they are.
        proxy, ports = startMailproxy(directory / "mailproxy", "imap", dovecot.imap, ca, limits)

        runs: list[tuple[str, int, int]] = []
        if not options.no_direct:
            runs.append(("direct", 1, dovecot.imaps))
        runs += [("mailproxy", index, ports["implicit"]) for index in range(1, options.runs + 1)]
        for path, index, port in runs:
            mark = len(proxy.logText())
            result = runOnce(
                imaptest, tests, port, path, index, options.timeout, directory / "runs" / f"{path}-{index}"
            )
            if result.hung and path == "mailproxy":
                # Give the proxy a moment to log the sessions the kill ended.
                time.sleep(1.0)
                held = heldSessions(proxy.logText()[mark:], options.timeout / 2)
                result = attrs.evolve(result, held=held)
            results.append(result)
            print(describe(result), flush=True)
            for line in [*result.tail.splitlines(), *(f"held open: {line}" for line in result.held)]:
                print(f"  {line}", flush=True)
        proxyErrors = [
            line for line in proxy.logText().splitlines() if "Unhandled Error" in line or "Traceback" in line
        ]
    finally:
        stopServers([proxy, dovecot], cleanup)

    proxied = [r for r in results if r.path == "mailproxy"]
    hangs = sum(r.hung for r in proxied)
    failedRuns = sum(not r.ok and not r.hung for r in proxied)
    print()
    print(f"limits: {', '.join(f'{k} = {v}' for k, v in limits.items()) or 'the defaults'}")
    print(f"imaptest: {imaptest}, scripts: {tests}")
    for line in reasons(results):
        print(f"- {line}")
    if proxyErrors:
        print(f"- the proxy logged {len(proxyErrors)} unhandled error(s); first: {proxyErrors[0]}")
    durations = sorted(r.seconds for r in proxied if not r.hung)
    if durations:
        print(f"mailproxy run time: median {durations[len(durations) // 2]:.1f} s, max {durations[-1]:.1f} s")
    # The closing line, in the form test summaries have.
    print(f"imaptest runs through mailproxy: {len(proxied) - hangs - failedRuns} passed, {failedRuns} failed, {hangs} hung")
    if options.json:
        document = {
            "imaptest": imaptest,
            "tests": str(tests),
            "limits": limits,
            "timeout": options.timeout,
            "seconds": round(time.monotonic() - started, 1),
            "proxyErrors": proxyErrors,
            "runs": [attrs.asdict(result) for result in results],
        }
        Path(options.json).write_text(json.dumps(document, indent=2) + "\n")
    if any(not r.ok for r in results) or proxyErrors:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
