"""
Tests for the operations commands of L{mailproxy.cli} (C{move}, C{route},
C{sessions}, C{reload}, C{stats}, C{health}) and L{mailproxy._adminclient}:
the requests the commands make and what they print, with the HTTP exchange
replaced by canned answers.
"""

from __future__ import annotations

import io
import json
import os
import sys
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from mailproxy._adminclient import AdminClient, AdminError, adminFromFile, endpointURL
from mailproxy.admin import MAX_BODY
from mailproxy.cli import main

CONFIG = """\
[[listener]]
protocol = "imap"
endpoint = "tcp:1143:interface=127.0.0.1"
tls = "none"

[router]
type = "static"
path = "routes.toml"

[backend.old]
host = "127.0.0.1"
ports = { imap = 143 }

[admin]
endpoint = "tcp:19443"
token_file = "admin.token"
"""

TOKEN = "s" * 40


class EndpointURLTests(SynchronousTestCase):
    """
    L{endpointURL}.
    """

    def test_forms(self) -> None:
        """
        The URL reaches the endpoint from this machine: named interfaces as
        they are, all-interfaces addresses as loopback, IPv6 in brackets.
        """
        self.assertEqual(endpointURL("tcp:9443:interface=127.0.0.1", False), "http://127.0.0.1:9443")
        self.assertEqual(endpointURL("tcp:9443:interface=0.0.0.0", True), "https://127.0.0.1:9443")
        self.assertEqual(endpointURL("tcp6:9443:interface=\\:\\:1", False), "http://[::1]:9443")
        self.assertEqual(endpointURL("tcp6:port=9443:interface=\\:\\:", True), "https://[::1]:9443")


class CommandTests(SynchronousTestCase):
    """
    The commands, against canned answers.
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
        self.requests: list[tuple[str, str, str, Any]] = []
        self.answers: list[tuple[int, Any]] = []

        def request(client: AdminClient, method: str, path: str, body: Any = None) -> tuple[int, Any]:
            self.requests.append((client.url, method, path, body))
            return self.answers.pop(0)

        self.patch(AdminClient, "request", request)

    def command(self, *arguments: str) -> int:
        """
        Run C{mailproxy ARGUMENTS --config CONFIG}.
        """
        return main([*arguments, "--config", self.config])

    def test_move(self) -> None:
        """
        C{move ACCOUNT... BACKEND} posts the move to the endpoint named in
        the configuration and prints each change and the dropped sessions.
        """
        self.answers.append(
            (200, {"backend": "new", "dryRun": False, "held": 0.0, "sessions": 2, "accounts": ["a@x", "b@x"],
                   "changes": [{"key": "a@x", "from": "old", "to": "new"}, {"key": "b@x", "from": None, "to": "new"}]})
        )
        self.assertEqual(self.command("move", "a@x", "b@x", "new"), 0)
        self.assertEqual(
            self.requests,
            [("http://127.0.0.1:19443", "POST", "/move",
              {"backend": "new", "accounts": ["a@x", "b@x"], "domain": None, "include_accounts": False,
               "dry_run": False, "hold": 0.0, "drop": True})],
        )
        self.assertEqual(
            self.out.getvalue(),
            "changed: a@x: old -> new\nchanged: b@x: (no entry) -> new\n2 open sessions dropped\n",
        )

    def test_moveDryRunDomainHold(self) -> None:
        """
        The options reach the request; a dry run says what would happen.
        """
        self.answers.append(
            (200, {"backend": "new", "dryRun": True, "held": 0.0, "sessions": 1, "accounts": ["e@x"],
                   "changes": [{"key": "@x", "from": "old", "to": "new"}]})
        )
        self.assertEqual(self.command("move", "--domain", "x", "--dry-run", "--hold", "5", "--no-drop", "new"), 0)
        self.assertEqual(
            self.requests[0][3],
            {"backend": "new", "accounts": [], "domain": "x", "include_accounts": False, "dry_run": True, "hold": 5.0,
             "drop": False},
        )
        self.assertEqual(self.out.getvalue(), "would change: @x: old -> new\n1 open session would be dropped (e@x)\n")

    def test_moveDomainReportsKept(self) -> None:
        """
        A domain move whose accounts keep an entry of their own says how
        many do not move, names some, and points to C{--include-accounts}.
        """
        kept = [f"u{i}@bulk.example" for i in range(12)]
        self.answers.append(
            (200, {"backend": "old", "dryRun": True, "held": 0.0, "sessions": 0, "accounts": [],
                   "changes": [{"key": "@bulk.example", "from": None, "to": "old"}], "kept": 12, "keptAccounts": kept})
        )
        self.assertEqual(self.command("move", "--domain", "bulk.example", "--dry-run", "old"), 0)
        self.assertEqual(
            self.out.getvalue(),
            "would change: @bulk.example: (no entry) -> old\n"
            "not moved: 12 accounts of bulk.example with their own entry: "
            + ", ".join(kept[:10])
            + " and 2 more (--include-accounts moves them too)\n"
            "0 open sessions would be dropped\n",
        )

    def test_moveIncludeAccounts(self) -> None:
        """
        C{--include-accounts} asks for the domain's own entries to move
        too; without C{--domain} it is refused before any request.
        """
        self.answers.append((200, {"backend": "old", "dryRun": False, "held": 0.0, "sessions": 0, "accounts": [],
                                   "changes": [], "kept": 0, "keptAccounts": []}))
        self.assertEqual(self.command("move", "--domain", "bulk.example", "--include-accounts", "old"), 0)
        self.assertTrue(self.requests[0][3]["include_accounts"])
        self.assertEqual(self.command("move", "--include-accounts", "a@x", "old"), 1)
        self.assertEqual(len(self.requests), 1)
        self.assertEqual(self.err.getvalue(), "mailproxy move: --include-accounts needs --domain\n")

    def test_moveFromFile(self) -> None:
        """
        C{--from-file FILE} adds the accounts listed in FILE (blank lines
        and comments skipped) to those on the command line, in one request.
        """
        path = os.path.join(self.directory, "accounts.txt")
        with open(path, "w") as f:
            f.write("# week 3\nb@x\n\n  c@x   # the boss\n")
        self.answers.append((200, {"backend": "new", "dryRun": False, "held": 0.0, "sessions": 0, "accounts": [],
                                   "changes": []}))
        self.assertEqual(self.command("move", "--from-file", path, "a@x", "new"), 0)
        self.assertEqual([r[3]["accounts"] for r in self.requests], [["a@x", "b@x", "c@x"]])

    def test_moveFromStandardInput(self) -> None:
        """
        C{--from-file -} reads the accounts from standard input.
        """
        self.patch(sys, "stdin", io.StringIO("a@x\nb@x\n"))
        self.answers.append((200, {"backend": "new", "dryRun": False, "held": 0.0, "sessions": 0, "accounts": [],
                                   "changes": []}))
        self.assertEqual(self.command("move", "--from-file", "-", "new"), 0)
        self.assertEqual(self.requests[0][3]["accounts"], ["a@x", "b@x"])

    def test_moveFromFileUnreadable(self) -> None:
        """
        A file that cannot be read is named in the error; nothing is sent.
        """
        missing = os.path.join(self.directory, "missing.txt")
        self.assertEqual(self.command("move", "--from-file", missing, "new"), 1)
        self.assertEqual(self.requests, [])
        self.assertEqual(self.err.getvalue(), f"mailproxy move: {missing}: cannot read: No such file or directory\n")

    def test_moveLargerThanOneBody(self) -> None:
        """
        More accounts than one request body of the endpoint holds are sent
        in as few requests as fit (each within the endpoint's limit), the
        domain with the first; the output adds them up.
        """
        accounts = [f"user{i:05}@example.org" for i in range(6000)]
        path = os.path.join(self.directory, "accounts.txt")
        with open(path, "w") as f:
            f.write("\n".join(accounts) + "\n")

        def answer(count: int) -> tuple[int, Any]:
            return 200, {"backend": "new", "dryRun": False, "held": 0.0, "sessions": 1, "accounts": ["a@x"],
                         "changes": [{"key": "k", "from": "old", "to": "new"}] * count}

        self.answers += [answer(1), answer(2), answer(3)]
        self.assertEqual(self.command("move", "--from-file", path, "--domain", "x", "new"), 0)
        bodies = [request[3] for request in self.requests]
        self.assertEqual(len(bodies), 3)
        self.assertEqual(sum((body["accounts"] for body in bodies), []), accounts)
        self.assertEqual([body["domain"] for body in bodies], ["x", None, None])
        for body in bodies:
            self.assertLessEqual(len(json.dumps(body).encode()), MAX_BODY)
        self.assertEqual(self.out.getvalue().count("changed: k: old -> new\n"), 6)
        self.assertTrue(self.out.getvalue().endswith("3 open sessions dropped\n"))

    def test_moveRefused(self) -> None:
        """
        A refused move prints the endpoint's reason and exits 1.
        """
        self.answers.append((409, {"error": "unknown backend 'nowhere'; configured backends: new, old"}))
        self.assertEqual(self.command("move", "a@x", "nowhere"), 1)
        self.assertEqual(
            self.err.getvalue(),
            "mailproxy move: POST /move: 409 unknown backend 'nowhere'; configured backends: new, old\n",
        )

    def test_holdBounded(self) -> None:
        """
        A hold beyond a minute is a usage error.
        """
        self.assertEqual(self.command("move", "--hold", "120", "a@x", "new"), 2)
        self.assertIn("hold must be 0 to 60 seconds, not 120", self.err.getvalue())

    def test_routeExplain(self) -> None:
        """
        C{route explain ACCOUNT} prints router, rule and backend.
        """
        self.answers.append(
            (200, {"account": "a@x", "router": "static", "chain": ["StaticRouter"], "rule": "domains['x']",
                   "backend": "old", "explained": True})
        )
        self.assertEqual(self.command("route", "explain", "a@x"), 0)
        self.assertEqual(self.requests[0][1:3], ("GET", "/explain?account=a@x"))
        self.assertEqual(
            self.out.getvalue(),
            "account: a@x\nrouter:  static (StaticRouter)\nrule:    domains['x']\nbackend: old\n",
        )

    def test_routeListSetDelete(self) -> None:
        """
        C{route list}, C{set} and C{delete} use C{/routes}.
        """
        self.answers += [(200, {"routes": {"*": "old", "a@x": "new"}}), (200, {}), (200, {})]
        self.assertEqual(self.command("route", "list"), 0)
        self.assertEqual(self.command("route", "set", "@x y", "new"), 0)
        self.assertEqual(self.command("route", "delete", "a@x"), 0)
        self.assertEqual(
            [r[1:] for r in self.requests],
            [("GET", "/routes", None), ("PUT", "/routes/@x%20y", {"backend": "new"}), ("DELETE", "/routes/a@x", None)],
        )
        self.assertEqual(self.out.getvalue(), "* old\na@x new\n@x y -> new\na@x: deleted\n")

    def test_sessions(self) -> None:
        """
        C{sessions} lists with filters; C{--drop} drops and needs one.
        """
        self.answers += [
            (200, {"count": 1, "sessions": [{"session": "s1", "protocol": "imap", "state": "relay", "account": "a@x",
                                              "backend": "old", "address": "192.0.2.1", "port": 5000, "seconds": 12.3,
                                              "bytesFromClient": 10, "bytesFromBackend": 20}]}),
            (200, {"dropped": 1, "sessions": ["s1"]}),
        ]
        self.assertEqual(self.command("sessions", "--backend", "old"), 0)
        self.assertEqual(self.command("sessions", "--account", "a@x", "--drop"), 0)
        self.assertEqual(self.command("sessions", "--drop"), 1)
        self.assertEqual(
            [r[1:] for r in self.requests],
            [("GET", "/sessions?backend=old", None), ("POST", "/sessions/drop", {"account": "a@x", "backend": None})],
        )
        self.assertEqual(
            self.out.getvalue(),
            "s1 imap relay a@x old 192.0.2.1:5000 12s in=10 out=20\n1 session\n1 session dropped\n",
        )
        self.assertEqual(self.err.getvalue(), "mailproxy sessions: --drop needs --account or --backend\n")

    def test_sessionsOfAFleet(self) -> None:
        """
        In a fleet, each session is listed with its proxy; another proxy's
        session, whose byte counts only that proxy knows, shows none.
        """
        common = {"protocol": "imap", "state": "relay", "backend": "old", "address": "192.0.2.1", "port": 5000, "seconds": 3}
        self.answers.append(
            (200, {"count": 2, "sessions": [
                {**common, "session": "s1", "account": "a@x", "bytesFromClient": 10, "bytesFromBackend": 20, "proxy": "pa"},
                {**common, "session": "s2", "account": "b@x", "bytesFromClient": None, "bytesFromBackend": None, "proxy": "pb"},
            ]})
        )
        self.assertEqual(self.command("sessions"), 0)
        self.assertEqual(
            self.out.getvalue(),
            "s1 imap relay a@x old 192.0.2.1:5000 3s in=10 out=20 proxy=pa\n"
            "s2 imap relay b@x old 192.0.2.1:5000 3s in=- out=- proxy=pb\n2 sessions\n",
        )

    def test_reload(self) -> None:
        """
        C{reload} says what happened; a refused reload exits 1 with why.
        """
        self.answers += [
            (200, {"ok": True, "path": "/p.toml", "restartNeeded": ["listener"]}),
            (409, {"ok": False, "path": "/p.toml", "error": "/p.toml: line 3: Expected ']'"}),
        ]
        self.assertEqual(self.command("reload"), 0)
        self.assertEqual(self.command("reload"), 1)
        self.assertEqual(self.out.getvalue(), "reloaded /p.toml\nthese changes need a restart: listener\n")
        self.assertEqual(
            self.err.getvalue(),
            "mailproxy reload: reload failed, the running configuration is kept: /p.toml: line 3: Expected ']'\n",
        )

    def test_health(self) -> None:
        """
        C{health} exits 1 when the proxy reports trouble.
        """
        self.answers += [(200, {"status": "ok"}), (503, {"status": "degraded"})]
        self.assertEqual(self.command("health"), 0)
        self.assertEqual(self.command("health"), 1)

    def test_noAdmin(self) -> None:
        """
        A configuration without C{[admin]} is an error that says so.
        """
        with open(self.config, "w") as f:
            f.write(CONFIG.split("[admin]")[0])
        self.assertEqual(self.command("stats"), 1)
        self.assertEqual(
            self.err.getvalue(), f"mailproxy stats: {self.config}: no [admin] table: the proxy has no management endpoint\n"
        )

    def test_urlAndTokenFile(self) -> None:
        """
        C{--url} and C{--token-file} need no configuration.
        """
        self.answers.append((200, {"uptime": 1}))
        token = os.path.join(self.directory, "admin.token")
        self.assertEqual(main(["stats", "--url", "http://[::1]:8000", "--token-file", token]), 0)
        self.assertEqual(self.requests[0][:3], ("http://[::1]:8000", "GET", "/stats"))

    def test_tokenFileOpenToOthers(self) -> None:
        """
        A C{--token-file} others can read is used, with a warning; a
        private one gives none.
        """
        token = os.path.join(self.directory, "admin.token")
        os.chmod(token, 0o640)
        self.answers += [(200, {"uptime": 1}), (200, {"uptime": 1})]
        self.assertEqual(main(["stats", "--url", "http://[::1]:8000", "--token-file", token]), 0)
        self.assertEqual(
            self.err.getvalue(),
            f"warning: --token-file: {token!r} can be read or written by users other than its owner "
            f"(mode 0640); make it private: chmod 600 {token}\n",
        )
        os.chmod(token, 0o600)
        self.assertEqual(main(["stats", "--url", "http://[::1]:8000", "--token-file", token]), 0)
        self.assertEqual(self.err.getvalue().count("warning"), 1)

    def test_statsLines(self) -> None:
        """
        C{stats} prints one C{NAME VALUE} line per counter, nested names
        joined with dots; C{--json} prints the answer as it came.
        """
        answer = {
            "uptime": 12.5,
            "sessions": {"open": 3, "byBackend": {"imap": {"": 1, "old": 2}}},
            "router": {"averageSeconds": None, "cache": None},
            "draining": False,
            "backends": {},
        }
        self.answers += [(200, answer), (200, answer)]
        self.assertEqual(self.command("stats"), 0)
        self.assertEqual(
            self.out.getvalue(),
            "uptime 12.5\nsessions.open 3\nsessions.byBackend.imap.- 1\nsessions.byBackend.imap.old 2\n"
            "router.averageSeconds null\nrouter.cache null\ndraining false\n",
        )
        self.out.truncate(0)
        self.out.seek(0)
        self.assertEqual(self.command("stats", "--json"), 0)
        self.assertEqual(json.loads(self.out.getvalue()), answer)

    def test_sessionsJSON(self) -> None:
        """
        C{sessions --json} (and with C{--drop}) prints the endpoint's answer
        as JSON.
        """
        answer = {"count": 1, "sessions": [{"session": "s1", "protocol": "imap", "account": "a@x"}]}
        self.answers.append((200, answer))
        self.assertEqual(self.command("sessions", "--account", "a@x", "--json"), 0)
        self.assertEqual(self.requests[0][1:3], ("GET", "/sessions?account=a@x"))
        self.assertEqual(json.loads(self.out.getvalue()), answer)
        self.out.truncate(0)
        self.out.seek(0)
        self.answers.append((200, {"dropped": 1, "sessions": ["s1"]}))
        self.assertEqual(self.command("sessions", "--account", "a@x", "--drop", "--json"), 0)
        self.assertEqual(json.loads(self.out.getvalue()), {"dropped": 1, "sessions": ["s1"]})

    def test_routeExplainJSON(self) -> None:
        """
        C{route explain --json} prints the endpoint's answer as JSON.
        """
        answer = {"account": "a@x", "router": "ldap", "chain": ["LDAPRouter"], "rule": None, "backend": None,
                  "explained": False}
        self.answers.append((200, answer))
        self.assertEqual(self.command("route", "explain", "a@x", "--json"), 0)
        self.assertEqual(json.loads(self.out.getvalue()), answer)

    def test_moveNamesBackend(self) -> None:
        """
        C{move} without arguments is a usage error that names BACKEND, as
        its usage line does (not TARGET).
        """
        self.assertEqual(self.command("move"), 2)
        error = self.err.getvalue()
        self.assertIn("usage: mailproxy move [options] [ACCOUNT ...] BACKEND\n", error)
        self.assertIn("error: the following arguments are required: BACKEND\n", error)
        self.assertNotIn("TARGET", error)


class UnreachableTests(SynchronousTestCase):
    """
    L{AdminClient} when nothing listens.
    """

    def test_refused(self) -> None:
        """
        A refused connection is an L{AdminError} naming the URL.
        """
        import socket

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        client = AdminClient(f"http://127.0.0.1:{port}", b"t" * 32, timeout=5)
        error = self.assertRaises(AdminError, client.request, "GET", "/stats")
        self.assertIn(f"cannot reach the management endpoint at http://127.0.0.1:{port}", str(error))


class BrokenConfigurationTests(SynchronousTestCase):
    """
    L{adminFromFile}: the endpoint of a proxy whose configuration file is
    broken elsewhere, which is when an operator asks it to reload.
    """

    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        with open(os.path.join(self.directory, "admin.token"), "w") as f:
            f.write(TOKEN + "\n")
        self.path = os.path.join(self.directory, "proxy.toml")

    def load(self, text: str):
        """
        Write C{text} as the configuration and read its C{[admin]}.
        """
        with open(self.path, "w") as f:
            f.write(text)
        return adminFromFile(self.path)

    def test_syntaxError(self) -> None:
        """
        A file that is not TOML still yields its C{[admin]} table's
        endpoint and token, with the reason the file does not load.
        """
        admin, problem = self.load(CONFIG + "[limits\n")
        self.assertEqual((admin.endpoint, admin.token), ("tcp:19443:interface=127.0.0.1", TOKEN.encode()))
        self.assertTrue(problem.startswith(f"{self.path}: line "), problem)

    def test_invalidElsewhere(self) -> None:
        """
        A file that parses but is invalid elsewhere (no route table) yields
        its endpoint too.
        """
        admin, problem = self.load(CONFIG.replace('path = "routes.toml"', 'path = "absent.toml"'))
        self.assertEqual(admin.endpoint, "tcp:19443:interface=127.0.0.1")
        self.assertIn("absent.toml", problem)

    def test_adminBroken(self) -> None:
        """
        A broken C{[admin]} table itself is an error.
        """
        self.assertRaises(AdminError, self.load, CONFIG.replace('token_file = "admin.token"', 'token_file = "admin.token'))

    def test_fine(self) -> None:
        """
        A good file loads whole.
        """
        with open(os.path.join(self.directory, "routes.toml"), "w") as f:
            f.write('default = "old"\n')
        admin, problem = self.load(CONFIG)
        self.assertIsNone(problem)
        self.assertEqual(admin.endpoint, "tcp:19443:interface=127.0.0.1")
