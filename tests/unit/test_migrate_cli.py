"""
Tests for C{mailproxy migrate} (L{mailproxy._migratecli}): the requests it
makes, what it shows while it follows a campaign (bars on a terminal, plain
lines elsewhere) and its exit status, with the HTTP exchange replaced by
canned answers and time by a fake clock.
"""

from __future__ import annotations

import io
import json
import os
import shlex
import subprocess
import sys
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from mailproxy import _migratecli
from mailproxy._adminclient import AdminClient, EndpointUnreachable
from mailproxy._migratecli import ProgressView, formatBytes, formatDuration
from mailproxy.cli import main

from .test_admin_cli import CONFIG, TOKEN

MiB = 1024 * 1024


def account(name: str, state: str = "queued", messages: int = 0, size: int = 0, **more: Any) -> dict[str, Any]:
    """
    One account of a campaign's description.
    """
    return {"account": name, "source": "old", "state": state, "step": None, "messages": messages, "bytes": size,
            "error": None, **more}


def campaign(state: str, accounts: list[dict[str, Any]], **more: Any) -> dict[str, Any]:
    """
    A campaign's description as C{GET /migrations/ID} gives it, its
    figures added up from C{accounts}.
    """
    return {
        "id": "c1", "target": "new", "state": state, "dry_run": False, "concurrency": 2,
        "created": "2026-12-04T08:00:00Z", "total": len(accounts),
        "done": sum(1 for a in accounts if a["state"] == "done"),
        "failed": sum(1 for a in accounts if a["state"] == "failed"),
        "messages": sum(a["messages"] for a in accounts), "bytes": sum(a["bytes"] for a in accounts),
        "rate": 2 * MiB, "eta": 75, "accounts": accounts, **more,
    }


class FakeTime:
    """
    Stands in for the C{time} module: sleeping only moves the clock.
    """

    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds

    def monotonic(self) -> float:
        return self.now


class TerminalOutput(io.StringIO):
    """
    Standard output that says it is a terminal.
    """

    def isatty(self) -> bool:
        return True


class MigrateCommandTests(SynchronousTestCase):
    """
    C{mailproxy migrate} against canned answers.
    """

    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        for name, text in (("routes.toml", 'default = "old"\n'), ("admin.token", TOKEN + "\n"), ("proxy.toml", CONFIG)):
            with open(os.path.join(self.directory, name), "w") as f:
                f.write(text)
        self.config = os.path.join(self.directory, "proxy.toml")
        self.out, self.err = io.StringIO(), io.StringIO()
        self.patch(sys, "stdout", self.out)
        self.patch(sys, "stderr", self.err)
        self.time = FakeTime()
        self.patch(_migratecli, "time", self.time)
        self.requests: list[tuple[str, str, Any]] = []
        self.answers: list[Any] = []

        def request(client: AdminClient, method: str, path: str, body: Any = None) -> tuple[int, Any]:
            self.requests.append((method, path, body))
            answer = self.answers.pop(0)
            if isinstance(answer, BaseException):
                raise answer
            return answer

        self.patch(AdminClient, "request", request)

    def command(self, *arguments: str) -> int:
        """
        Run C{mailproxy migrate ARGUMENTS --config CONFIG}.
        """
        return main(["migrate", *arguments, "--config", self.config])

    def test_startAndFollowPlain(self) -> None:
        """
        C{migrate ACCOUNT... --to BACKEND} posts the campaign, then looks
        at it once a second until it ends; not on a terminal, it prints a
        line each time an account changes state and a campaign line each
        time one ends, then the outcome; every account migrated: exit 0.
        """
        self.answers += [
            (200, campaign("running", [account("a@x"), account("b@x")])),
            (200, campaign("running", [account("a@x", "copying", 10, MiB), account("b@x", "copying", 3, 1000)])),
            (200, campaign("running", [account("a@x", "done", 12, 2 * MiB), account("b@x", "verifying", 5, 3000)])),
            (200, campaign("done", [account("a@x", "done", 12, 2 * MiB), account("b@x", "done", 5, 3000)])),
        ]
        self.assertEqual(self.command("a@x", "b@x", "--to", "new", "--concurrency", "2"), 0, self.err.getvalue())
        self.assertEqual(
            self.requests,
            [("POST", "/migrations", {"accounts": ["a@x", "b@x"], "domain": None, "to": "new", "dry_run": False, "concurrency": 2}),
             ("GET", "/migrations/c1", None), ("GET", "/migrations/c1", None), ("GET", "/migrations/c1", None)],
        )
        self.assertEqual(self.time.slept, [1.0, 1.0, 1.0])
        self.assertEqual(
            self.out.getvalue(),
            "migration c1 to new: 0/2 accounts done, 0 messages, 0 B, 2.0 MiB/s, ETA 1:15\n"
            "a@x: copying (10 messages, 1.0 MiB)\n"
            "b@x: copying (3 messages, 1000 B)\n"
            "a@x: done (12 messages, 2.0 MiB)\n"
            "b@x: verifying (5 messages, 2.9 KiB)\n"
            "migration c1 to new: 1/2 accounts done, 17 messages, 2.0 MiB, 2.0 MiB/s, ETA 1:15\n"
            "b@x: done (5 messages, 2.9 KiB)\n"
            "migration c1 to new: 2/2 accounts done, 17 messages, 2.0 MiB\n"
            "migration c1 done: 2/2 accounts migrated to new; 17 messages, 2.0 MiB\n",
        )

    def test_failedAccount(self) -> None:
        """
        An account that fails is printed with the step and the engine's
        reason (its leading step name said once); the campaign's outcome
        counts it, and the exit status is 1.
        """
        failed = account("b@x", "failed", step="verify", error="verify: INBOX: 2 messages missing on new")
        self.answers += [
            (200, campaign("running", [account("a@x"), account("b@x")])),
            (200, campaign("done", [account("a@x", "done", 1, 10), failed])),
        ]
        self.assertEqual(self.command("a@x", "b@x", "--to", "new"), 1)
        self.assertNotIn("concurrency", self.requests[0][2])
        out = self.out.getvalue()
        self.assertIn("b@x: failed at verify: INBOX: 2 messages missing on new\n", out)
        self.assertTrue(out.endswith("migration c1 done: 1/2 accounts migrated to new, 1 failed; 1 message, 10 B\n"), out)

    def test_terminalBars(self) -> None:
        """
        On a terminal, the campaign is named once; its bar and a bar for
        each account being migrated (filled by its share of the bytes, when
        the engine knows the total) are redrawn in place (cursor up,
        clear); accounts that end stay printed above them; at the end the
        bars give way to the outcome.
        """
        terminal = TerminalOutput()
        self.patch(sys, "stdout", terminal)
        self.answers += [
            (200, campaign("running", [account("a@x"), account("b@x")])),
            (200, campaign("running", [account("a@x", "copying", 10, MiB, total_bytes=4 * MiB), account("b@x", "syncing", 3, 1000)])),
            (200, campaign("done", [account("a@x", "done", 12, 4 * MiB), account("b@x", "done", 3, 1000)])),
        ]
        self.assertEqual(self.command("a@x", "b@x", "--to", "new"), 0)
        screens = terminal.getvalue().split("\x1b[J")
        self.assertEqual(
            screens,
            [
                "migration c1 to new:\n"
                "[..........] 0/2 done, 0 msgs, 0 B, 2.0 MiB/s, ETA 1:15\n"
                "\x1b[1F",
                "[..........] 0/2 done, 13 msgs, 1.0 MiB, 2.0 MiB/s, ETA 1:15\n"
                "  [##........] a@x: copying (10 messages, 1.0 MiB)\n"
                "  [..........] b@x: syncing (3 messages, 1000 B)\n"
                "\x1b[3F",
                "a@x: done (12 messages, 4.0 MiB)\n"
                "b@x: done (3 messages, 1000 B)\n"
                "[##########] 2/2 done, 15 msgs, 4.0 MiB\n"
                "\x1b[1F",
                "migration c1 done: 2/2 accounts migrated to new; 15 messages, 4.0 MiB\n",
            ],
        )

    def test_json(self) -> None:
        """
        With C{--json} no progress is shown: the campaign's last
        description is printed as JSON.
        """
        final = campaign("done", [account("a@x", "done", 1, 10)])
        self.answers += [(200, campaign("running", [account("a@x")])), (200, final)]
        self.assertEqual(self.command("a@x", "--to", "new", "--json"), 0)
        self.assertEqual(json.loads(self.out.getvalue()), final)

    def test_dryRun(self) -> None:
        """
        A dry run prints each account's current backend and the target, or
        why it cannot be migrated.
        """
        self.answers.append(
            (200, campaign("done", [account("a@x", "done"), account("b@x", "failed", error="no route for b@x")], dry_run=True))
        )
        self.assertEqual(self.command("a@x", "b@x", "--to", "new", "--dry-run"), 1)
        self.assertTrue(self.requests[0][2]["dry_run"])
        self.assertEqual(
            self.out.getvalue(),
            "a@x: old -> new\nb@x: cannot migrate: no route for b@x\ndry run c1: 1 account would be migrated to new, 1 cannot\n",
        )

    def test_fromFileAndDomain(self) -> None:
        """
        C{--from-file} adds the file's accounts, C{--domain} is passed on;
        C{--detach} prints the id and returns without following.
        """
        path = os.path.join(self.directory, "accounts.txt")
        with open(path, "w") as f:
            f.write("# batch 1\nb@x\n\nc@x\n")
        self.answers.append((200, campaign("running", [account("a@x"), account("b@x"), account("c@x")])))
        self.assertEqual(self.command("a@x", "--from-file", path, "--domain", "y", "--to", "new", "--detach"), 0)
        self.assertEqual(self.requests[0][2]["accounts"], ["a@x", "b@x", "c@x"])
        self.assertEqual(self.requests[0][2]["domain"], "y")
        self.assertEqual(len(self.requests), 1)
        self.assertEqual(self.out.getvalue(), "migration c1 started: follow it with mailproxy migrate --status c1 --follow\n")

    def test_usageErrors(self) -> None:
        """
        Without C{--to}, without accounts, or with more accounts than one
        request holds, nothing is sent and the command says why; a
        concurrency out of range is a usage error.
        """
        self.assertEqual(self.command("a@x"), 1)
        self.assertEqual(self.command("--to", "new"), 1)
        path = os.path.join(self.directory, "many.txt")
        with open(path, "w") as f:
            f.write("\n".join(f"user{n:05d}@example.org" for n in range(4000)))
        self.assertEqual(self.command("--from-file", path, "--to", "new"), 1)
        self.assertEqual(self.requests, [])
        self.assertEqual(
            self.err.getvalue(),
            "mailproxy migrate: --to BACKEND is required\n"
            "mailproxy migrate: name at least one account (or --from-file, --domain)\n"
            "mailproxy migrate: 4000 accounts are more than one request takes (64 KiB): split the list into several campaigns\n",
        )
        self.assertEqual(self.command("a@x", "--to", "new", "--concurrency", "0"), 2)
        self.assertIn("concurrency must be 1 to 64, not 0", self.err.getvalue())
        self.assertEqual(self.command("--list", "--cancel", "c1"), 2)

    def test_refused(self) -> None:
        """
        A campaign the proxy refuses prints its reason and exits 1.
        """
        self.answers.append((409, {"error": "unknown backend 'nowhere'; configured backends: new, old"}))
        self.assertEqual(self.command("a@x", "--to", "nowhere"), 1)
        self.assertEqual(
            self.err.getvalue(),
            "mailproxy migrate: POST /migrations: 409 unknown backend 'nowhere'; configured backends: new, old\n",
        )

    def test_listStatusCancel(self) -> None:
        """
        C{--list} prints one line per campaign (a dry run says so),
        C{--status ID} the campaign
        and its accounts (exit 1 if it ended with failures), C{--cancel ID}
        cancels it.
        """
        running = campaign("running", [account("a@x", "copying", 2, 20), account("b@x")])
        ended = campaign("done", [account("a@x", "failed", step="copy", error="doveadm: mailbox locked")], id="c2")
        dry = campaign("done", [account("a@x")], id="c3", dry_run=True)
        self.answers += [
            (200, {"count": 3, "migrations": [running, ended, dry]}),
            (200, running),
            (200, ended),
            (200, dict(running, state="cancelled")),
        ]
        self.assertEqual(self.command("--list"), 0)
        self.assertEqual(self.command("--status", "c1"), 0)
        self.assertEqual(self.command("--status", "c2"), 1)
        self.assertEqual(self.command("--cancel", "c1"), 0)
        self.assertEqual(
            [request[:2] for request in self.requests],
            [("GET", "/migrations"), ("GET", "/migrations/c1"), ("GET", "/migrations/c2"), ("DELETE", "/migrations/c1")],
        )
        self.assertEqual(
            self.out.getvalue(),
            "c1 running 2026-12-04T08:00:00Z migration c1 to new: 0/2 accounts done, 2 messages, 20 B, 2.0 MiB/s, ETA 1:15\n"
            "c2 done 2026-12-04T08:00:00Z migration c2 to new: 0/1 accounts done, 1 failed, 0 messages, 0 B\n"
            "c3 done 2026-12-04T08:00:00Z dry run c3 to new: 0/1 accounts done, 0 messages, 0 B\n"
            "3 campaigns\n"
            "migration c1 to new: 0/2 accounts done, 2 messages, 20 B, 2.0 MiB/s, ETA 1:15\n"
            "  a@x: copying (2 messages, 20 B)\n"
            "  b@x: queued\n"
            "migration c2 to new: 0/1 accounts done, 1 failed, 0 messages, 0 B\n"
            "  a@x: failed at copy: doveadm: mailbox locked\n"
            "migration c1: cancelled; migration c1 to new: 0/2 accounts done, 2 messages, 20 B\n",
        )

    def test_statusFollow(self) -> None:
        """
        C{--status ID --follow} follows a campaign someone else started.
        """
        self.answers += [
            (200, campaign("running", [account("a@x", "copying", 1, 10)])),
            (200, campaign("done", [account("a@x", "done", 1, 10)])),
        ]
        self.assertEqual(self.command("--status", "c1", "--follow"), 0)
        self.assertTrue(self.out.getvalue().endswith("migration c1 done: 1/1 accounts migrated to new; 1 message, 10 B\n"))

    def test_endpointAway(self) -> None:
        """
        While the endpoint cannot be reached (the proxy restarting), the
        command says so once and keeps looking; when it answers again the
        command goes on to the end.
        """
        away = EndpointUnreachable("cannot reach the management endpoint at http://127.0.0.1:19443: Connection refused")
        self.answers += [
            (200, campaign("running", [account("a@x")])),
            away, away, away,
            (200, campaign("done", [account("a@x", "done", 1, 10)])),
        ]
        self.assertEqual(self.command("a@x", "--to", "new"), 0)
        self.assertEqual(
            self.err.getvalue(),
            f"mailproxy migrate: {away}; waiting for it to come back\n"
            "mailproxy migrate: the management endpoint is back\n",
        )

    def test_endpointGone(self) -> None:
        """
        An endpoint away for longer than L{_migratecli.RECONNECT_WAIT} ends
        the command with status 1, saying the campaign goes on.
        """
        away = EndpointUnreachable("cannot reach the management endpoint at http://127.0.0.1:19443: Connection refused")
        self.answers += [(200, campaign("running", [account("a@x")]))] + [away] * 200
        self.assertEqual(self.command("a@x", "--to", "new"), 1)
        self.assertTrue(
            self.err.getvalue().endswith(f"mailproxy migrate: {away} for 120s; campaign c1 goes on in the proxy\n"),
            self.err.getvalue(),
        )

    def test_campaignGone(self) -> None:
        """
        A proxy that answers but no longer knows the campaign (404) ends
        the command at once with its reason, without waiting.
        """
        self.answers += [
            (200, campaign("running", [account("a@x")])),
            (404, {"error": "no migration campaign 'c1'"}),
        ]
        self.assertEqual(self.command("a@x", "--to", "new"), 1)
        self.assertEqual(self.err.getvalue(), "mailproxy migrate: GET /migrations/c1: 404 no migration campaign 'c1'\n")
        self.assertEqual(self.time.slept, [1.0])

    def test_interrupted(self) -> None:
        """
        Ctrl-C while following leaves the campaign running and says how to
        look at it again or cancel it; exit status 130.
        """
        self.answers += [(200, campaign("running", [account("a@x")])), KeyboardInterrupt()]
        self.assertEqual(self.command("a@x", "--to", "new"), 130)
        self.assertIn(
            "campaign c1 goes on in the proxy: mailproxy migrate --status c1 --follow; "
            "stop it with mailproxy migrate --cancel c1\n",
            self.err.getvalue(),
        )


class DocumentTests(SynchronousTestCase):
    """
    C{migrate} in the generated man page and bash completion.
    """

    def test_manPage(self) -> None:
        """
        The man page has a section for C{mailproxy migrate} with its usage
        forms and options.
        """
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        self.assertEqual(main(["manpage"]), 0)
        section = out.getvalue().split('.SS "mailproxy migrate"\n', 1)[1].split(".SS ", 1)[0]
        for text in ("\\-\\-to", "\\-\\-from\\-file", "\\-\\-list", "\\-\\-status", "\\-\\-cancel", "\\-\\-concurrency"):
            self.assertIn(text, section)
        self.assertIn("ACCOUNT ... \\-\\-to BACKEND", section)

    def test_completion(self) -> None:
        """
        bash completes C{migrate}'s options, and a file name after
        C{--from-file}.
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        with open(os.path.join(directory, "week3.txt"), "w") as f:
            f.write("a@x\n")
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        self.assertEqual(main(["completion", "bash"]), 0)
        script = os.path.join(directory, "completion.bash")
        with open(script, "w") as f:
            f.write(out.getvalue())

        def complete(*words: str) -> list[str]:
            line = " ".join(shlex.quote(word) for word in words)
            program = (
                f"source {shlex.quote(script)}; COMP_WORDS=({line}); COMP_CWORD=$((${{#COMP_WORDS[@]}} - 1)); "
                'cd "$1"; _mailproxy; printf "%s\\n" "${COMPREPLY[@]}"'
            )
            done = subprocess.run(["bash", "-c", program, "bash", directory], capture_output=True, text=True, check=True)
            return [word for word in done.stdout.splitlines() if word]

        self.assertEqual(complete("mailproxy", "mig"), ["migrate"])
        self.assertEqual(complete("mailproxy", "migrate", "--co"), ["--config", "--concurrency"])
        self.assertEqual(complete("mailproxy", "migrate", "--from-file", "we"), ["week3.txt"])


class FormatTests(SynchronousTestCase):
    """
    The figures as people read them.
    """

    def test_bytes(self) -> None:
        """
        Octets in B, KiB, MiB, GiB with one decimal.
        """
        self.assertEqual(
            [formatBytes(n) for n in (0, 1023, 1024, 1536, 5 * MiB, 3 * 1024 * MiB)],
            ["0 B", "1023 B", "1.0 KiB", "1.5 KiB", "5.0 MiB", "3.0 GiB"],
        )

    def test_duration(self) -> None:
        """
        Seconds as m:ss or h:mm:ss; unknown as ?.
        """
        self.assertEqual([formatDuration(s) for s in (None, 0, 75, 3600 + 61)], ["?", "0:00", "1:15", "1:01:01"])

    def test_noControls(self) -> None:
        """
        An account's name and a failure's reason cannot drive the
        terminal: escapes and line breaks are shown as spaces.
        """
        out = io.StringIO()
        view = ProgressView(out, terminal=False)
        view.update(
            campaign("running", [account("evil\x1b[2J@x", "failed", step="copy", error="copy: doveadm: bad\r\n\x1b]0;owned\x07")])
        )
        self.assertNotIn("\x1b", out.getvalue())
        self.assertIn("evil [2J@x: failed at copy: doveadm: bad ]0;owned\n", out.getvalue())

    def test_linesCutToWidth(self) -> None:
        """
        On a narrow terminal no line is longer than its width (a longer one
        would wrap, and the redraw would leave lines behind).
        """
        out = io.StringIO()
        view = ProgressView(out, terminal=True, width=40)
        view.update(campaign("running", [account("someone.with.a.long.name@example.org", "copying", 5, 50)]))
        lines = out.getvalue().split("\n")
        self.assertTrue(all(len(line) <= 40 for line in lines), lines)
