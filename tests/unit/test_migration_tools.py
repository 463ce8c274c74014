"""
Tests for the pieces of a migration below the manager: what the sync
tools are given (L{mailproxy.migration._tools}), how their runs end, how
their errors are quoted without secrets, how the verify compares folders,
and how the IMAP answers are read (L{mailproxy.migration._clients}).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import TimeoutError
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from mailproxy.migration import _clients, _tools
from mailproxy.migration._manager import compareFolders
from mailproxy.testing import makeBackend

SECRET = 'pa"ss\\w%rd'


def backend(name: str = "old", **kwargs: Any) -> Any:
    """
    A backend with a master user whose password needs quoting everywhere.
    """
    kwargs.setdefault("masterUser", "proxy")
    kwargs.setdefault("masterPassword", SECRET.encode())
    return makeBackend(name, **kwargs)


class ConfigurationTests(SynchronousTestCase):
    """
    The private configuration files of the tools.
    """

    def test_doveadmConfiguration(self) -> None:
        """
        doveadm's file includes the target's configuration and reads the
        source over imapc as its master user, the password quoted with
        Dovecot's escapes and C{%} doubled (else a variable); STARTTLS and
        the CA file come from the source's settings.
        """
        text = _tools.doveadmConfiguration(
            backend(host="old.example.net", ports={"imap": 1143}, tls="starttls", caFile="/etc/ca.pem"),
            "/etc/dovecot/dovecot.conf",
        )
        lines = text.splitlines()
        self.assertEqual(lines[1], "!include /etc/dovecot/dovecot.conf")
        for line in [
            'imapc_host = "old.example.net"',
            "imapc_port = 1143",
            "imapc_user = %u",
            'imapc_master_user = "proxy"',
            'imapc_password = "pa\\"ss\\\\w%%rd"',
            "imapc_ssl = starttls",
            "imapc_ssl_verify = yes",
            'ssl_client_ca_file = "/etc/ca.pem"',
        ]:
            self.assertIn(line, lines)

    def test_doveadmWithoutMaster(self) -> None:
        """
        A source without a master user cannot be read by imapc.
        """
        with self.assertRaises(ValueError) as caught:
            _tools.doveadmConfiguration(makeBackend("old"), "/etc/dovecot/dovecot.conf")
        self.assertEqual(str(caught.exception), "backend 'old' has no master_user and master_password")

    def test_lineBreakInPassword(self) -> None:
        """
        A master password with a line break cannot be written into a
        configuration line: refused, without quoting it.
        """
        for build in (
            lambda b: _tools.doveadmConfiguration(b, "/etc/dovecot/dovecot.conf"),
            lambda b: _tools.mbsyncConfiguration(b, backend("new"), "a@example.org", "/s"),
        ):
            with self.assertRaises(ValueError) as caught:
                build(backend(masterPassword=b"one\ntwo"))
            self.assertEqual(str(caught.exception), "the master user or password of backend 'old' has a line break or NUL")

    def test_mbsyncConfiguration(self) -> None:
        """
        mbsync's file logs in to each side as ACCOUNT<separator>MASTER with
        that side's password (quoted), in that side's TLS mode, and copies
        from source to target with arrival dates and a state directory;
        the channel's sides are the same whichever way the account moves
        (the name that sorts first is far), so that one state serves both
        ways.
        """
        text = _tools.mbsyncConfiguration(
            backend("old", ports={"imap": 993}, tls="implicit"),
            backend("new", ports={"imap": 143}, masterSeparator="%", masterPassword=b"other"),
            "alice@example.org",
            "/var/lib/state",
        )
        self.assertIn('User "alice@example.org*proxy"\nPass "pa\\"ss\\\\w%rd"\nSSLType IMAPS\n', text)
        self.assertIn('User "alice@example.org%proxy"\nPass "other"\nSSLType None\n', text)
        self.assertIn("Far :target:\nNear :source:\n", text)
        self.assertIn("Create Far\nRemove Far\nExpunge Far\nSync Push\nCopyArrivalDate yes\n", text)
        self.assertIn('SyncState "/var/lib/state/"\n', text)
        back = _tools.mbsyncConfiguration(backend("new"), backend("old"), "alice@example.org", "/var/lib/state")
        self.assertIn("Far :source:\nNear :target:\n", back)
        self.assertIn("Create Near\nRemove Near\nExpunge Near\nSync Pull\n", back)
        self.assertEqual(_tools.mbsyncStateName(backend("old"), backend("new")), "new+old")
        self.assertEqual(_tools.mbsyncStateName(backend("new"), backend("old")), "new+old")
        self.assertNotEqual(
            _tools.mbsyncStateName(backend("a+b"), backend("c")), _tools.mbsyncStateName(backend("a"), backend("b+c"))
        )
        self.assertEqual(_tools.mbsyncStateName(backend("../x"), backend("y")), "..%2Fx+y")

    def test_commandWithWrapper(self) -> None:
        """
        The tool setting is split like a shell would, so that doveadm can
        run under sudo.
        """
        [first, _] = _tools.doveadmCommands("sudo -n '/usr/bin/doveadm'", "/tmp/c", "a@example.org")
        self.assertEqual(first[:5], ["sudo", "-n", "/usr/bin/doveadm", "-c", "/tmp/c"])

    def test_commandsHaveNoSecret(self) -> None:
        """
        The command lines name only the configuration file.
        """
        for argv in [
            *_tools.doveadmCommands("doveadm", "/tmp/x/dovecot.conf", "alice@example.org"),
            _tools.mbsyncCommand("mbsync", "/tmp/x/mbsyncrc"),
        ]:
            self.assertNotIn(SECRET, " ".join(argv))
            self.assertEqual(argv[1:3], ["-c", argv[2]])


class ExcerptTests(SynchronousTestCase):
    """
    L{_tools.scrub} and L{_tools.excerpt}.
    """

    def test_scrub(self) -> None:
        """
        Every secret is replaced, bytes or text; empty ones are ignored.
        """
        self.assertEqual(
            _tools.scrub(f"a {SECRET} b other c", [SECRET.encode(), "other", None, b""]),
            "a ******** b ******** c",
        )

    def test_excerptPrefersErrors(self) -> None:
        """
        Dovecot's Error and Fatal lines are quoted, not the Info lines, the
        panic or its backtrace.
        """
        output = (
            b"dsync(a): Info: connected\n"
            b"dsync(a): Error: login failed\n"
            b"dsync(a): Panic: assertion failed\n"
            b"dsync(a): Error: Raw backtrace: #0 x\n"
            b"doveconf: Fatal: bad line\n"
        )
        self.assertEqual(_tools.excerpt(output, []), "dsync(a): Error: login failed | doveconf: Fatal: bad line")

    def test_excerptKeepsTheEnd(self) -> None:
        """
        Without error lines, the last lines are quoted, cut at the limit
        from the end.
        """
        output = b"".join(b"line %d\n" % n for n in range(100))
        excerpt = _tools.excerpt(output, [], limit=20)
        self.assertTrue(excerpt.startswith("...") and excerpt.endswith("line 98 | line 99"), excerpt)
        self.assertEqual(len(excerpt), 23)


class FakeProcess:
    """
    What C{spawnProcess} returns: records signals and stdin closing.
    """

    def __init__(self) -> None:
        self.signals: list[str] = []
        self.stdinClosed = False

    def signalProcess(self, name: str) -> None:
        self.signals.append(name)

    def closeStdin(self) -> None:
        self.stdinClosed = True


class FakeProcessReactor(Clock):
    """
    A clock that records spawned processes.
    """

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[tuple[Any, str, list[str], dict[str, str]]] = []
        self.process = FakeProcess()

    def spawnProcess(self, protocol: Any, executable: str, args: list[str], env: dict[str, str]) -> FakeProcess:
        self.spawned.append((protocol, executable, args, env))
        protocol.makeConnection(self.process)
        return self.process


class RunProcessTests(SynchronousTestCase):
    """
    L{_tools.runProcess}.
    """

    def test_exitStatusAndOutput(self) -> None:
        """
        The result has the exit status and the end of each output stream
        (at most L{_tools.OUTPUT_LIMIT} bytes); standard input is closed.
        """
        reactor = FakeProcessReactor()
        done = _tools.runProcess(reactor, ["doveadm", "-c", "x"], {"PATH": "/bin"}, 10)
        protocol, executable, args, env = reactor.spawned[0]
        self.assertEqual((executable, args, env), ("doveadm", ["doveadm", "-c", "x"], {"PATH": "/bin"}))
        self.assertTrue(reactor.process.stdinClosed)
        protocol.outReceived(b"out")
        protocol.errReceived(b"a" * _tools.OUTPUT_LIMIT)
        protocol.errReceived(b"end")
        protocol.processEnded(Failure(ProcessTerminated(exitCode=65)))
        result = self.successResultOf(done)
        self.assertEqual((result.code, result.signal, result.stdout, result.ok), (65, None, b"out", False))
        self.assertEqual((len(result.stderr), result.stderr[-3:]), (_tools.OUTPUT_LIMIT, b"end"))

    def test_success(self) -> None:
        """
        A clean exit is status 0.
        """
        reactor = FakeProcessReactor()
        done = _tools.runProcess(reactor, ["mbsync"], {}, 10)
        reactor.spawned[0][0].processEnded(Failure(ProcessDone(0)))
        self.assertTrue(self.successResultOf(done).ok)

    def test_timeoutKills(self) -> None:
        """
        A process still running at its timeout is killed and the run fails
        with L{TimeoutError}.
        """
        reactor = FakeProcessReactor()
        done = _tools.runProcess(reactor, ["doveadm"], {}, 10)
        reactor.advance(10)
        self.assertEqual(reactor.process.signals, ["KILL"])
        self.failureResultOf(done, TimeoutError)
        # Its end comes later and changes nothing.
        reactor.spawned[0][0].processEnded(Failure(ProcessTerminated(signal=9)))


class CompareTests(SynchronousTestCase):
    """
    L{compareFolders}.
    """

    def test_equal(self) -> None:
        """
        The same messages (in another order) with the same flags: no
        difference.
        """
        folder = [("id:<a>", 1, "\\seen"), ("id:<b>", 2, "")]
        self.assertEqual(compareFolders({"INBOX": folder}, {"INBOX": folder[::-1]}), [])

    def test_differences(self) -> None:
        """
        Each differing folder is named with what differs and the counts:
        a folder missing, one only on the target, messages missing, only
        on the target or copied twice there, and other flags.
        """
        source = {
            "INBOX": [("id:<a>", 1, ""), ("id:<b>", 1, "")],
            "Gone": [("id:<c>", 1, "")],
            "Work/Sub": [("id:<d>", 1, "")],
            "Flags": [("id:<e>", 1, "\\seen")],
            "Twice": [("id:<f>", 1, "")],
        }
        target = {
            "INBOX": [("id:<a>", 1, ""), ("id:<a>", 1, "")],
            "Extra": [],
            "Twice": [("id:<f>", 1, ""), ("id:<f>", 1, ""), ("id:<g>", 1, "")],
            "Work/Sub": [("id:<d>", 1, "")],
            "Flags": [("id:<e>", 1, "")],
        }
        self.assertEqual(
            compareFolders(source, target),
            [
                "folder 'Extra': only on the target (0 messages)",
                "folder 'Flags': 1 with other flags on the target (source 1, target 1 messages)",
                "folder 'Gone': missing on the target (1 messages)",
                "folder 'INBOX': 1 missing on the target, 1 copied twice on the target (source 2, target 2 messages)",
                "folder 'Twice': 1 only on the target, 1 copied twice on the target (source 1, target 3 messages)",
            ],
        )


class FakeIMAP:
    """
    Answers like C{imaplib.IMAP4} for L{_clients.fingerprints}.
    """

    def __init__(self, folders: dict[bytes, list[Any]], listing: list[Any]) -> None:
        self.folders = folders
        self.listing = listing
        self.selected: list[str] = []

    def list(self) -> tuple[str, list[Any]]:
        return "OK", self.listing

    def select(self, name: str, readonly: bool = False) -> tuple[str, list[bytes]]:
        self.selected.append(name)
        raw = name[1:-1].replace('\\"', '"').encode()
        return "OK", [str(len(self.folders[raw])).encode()]

    def uid(self, command: str, sequence: str, items: str) -> tuple[str, list[Any]]:
        name = self.selected[-1][1:-1].replace('\\"', '"').encode()
        return "OK", self.folders[name]

    def logout(self) -> None:
        pass


class FingerprintTests(SynchronousTestCase):
    """
    L{_clients.fingerprints} reads LIST and FETCH answers.
    """

    def test_fingerprints(self) -> None:
        """
        Folders are named with C{/} between levels whatever the server's
        delimiter (a name may come as a literal); a folder that cannot be
        selected is left out; a message is known by its Message-ID, or by
        size and internal date without one, with its system flags only.
        """
        connection = FakeIMAP(
            {
                b"INBOX": [
                    (b'1 (UID 7 FLAGS (\\Seen $Label1 \\Flagged) RFC822.SIZE 120 INTERNALDATE "01-Dec-2026 10:00:00 +0000" BODY[HEADER.FIELDS (MESSAGE-ID)] {22}', b"Message-ID: <a@x>\r\n\r\n"),
                    b")",
                    (b'2 (UID 9 FLAGS () RFC822.SIZE 7 INTERNALDATE "02-Dec-2026 10:00:00 +0000" BODY[HEADER.FIELDS (MESSAGE-ID)] {2}', b"\r\n"),
                    b")",
                ],
                b'Work.My "Sub"': [],
            },
            [
                b'(\\HasChildren) "." INBOX',
                b'(\\Noselect \\HasChildren) "." "Work"',
                (b'(\\HasNoChildren) "." {13}', b'Work.My "Sub"'),
            ],
        )
        self.patch(_clients, "_imap", lambda backend, account, timeout: connection)
        found = _clients.fingerprints(backend(), "alice@example.org", 10)
        self.assertEqual(
            found,
            {
                "INBOX": [("id:<a@x>", 120, "\\flagged \\seen"), ("size:7 date:02-Dec-2026 10:00:00 +0000", 7, "")],
                'Work/My "Sub"': [],
            },
        )
        self.assertEqual(connection.selected, ['"INBOX"', '"Work.My \\"Sub\\""'])


class ScriptedSieveServer:
    """
    One ManageSieve server connection on a socket pair, answering the
    client's lines from a script in a thread; records what it received.
    """

    def __init__(self, script: list[tuple[bytes, bytes]]) -> None:
        """
        @param script: the greeting's reply first (expected prefix C{b""}),
            then for each client line, the prefix it must start with and
            the reply.
        """
        import socket
        import threading

        self.client, self.server = socket.socketpair()
        self.received: list[bytes] = []
        self.thread = threading.Thread(target=self._serve, args=(script,), daemon=True)
        self.thread.start()

    def _serve(self, script: list[tuple[bytes, bytes]]) -> None:
        buffer = b""
        try:
            for expected, reply in script:
                if expected:
                    while b"\r\n" not in buffer:
                        buffer += self.server.recv(65536)
                    line, buffer = buffer.split(b"\r\n", 1)
                    if line.endswith(b"+}"):
                        size = int(line[line.rindex(b"{") + 1 : -2])
                        while len(buffer) < size + 2:
                            buffer += self.server.recv(65536)
                        line, buffer = line + b"\r\n" + buffer[:size], buffer[size + 2 :]
                    self.received.append(line)
                    if not line.startswith(expected):
                        reply = b'NO "unexpected"\r\n'
                self.server.sendall(reply)
        finally:
            self.server.close()


class SieveCopyTests(SynchronousTestCase):
    """
    L{_clients.copySieve} against scripted ManageSieve servers.
    """

    def connectTo(self, *servers: ScriptedSieveServer) -> None:
        """
        Make the client's connections go to C{servers}, in order.
        """
        queue = list(servers)
        self.patch(_clients.socket, "create_connection", lambda address, timeout: queue.pop(0).client)

    def test_copiesAndActivates(self) -> None:
        """
        Every script on the source (names as quoted strings or literals)
        is read and put on the target; the one active on the source is
        activated there.  The login is SASL PLAIN as the master user for
        the account.
        """
        greeting = b'"IMPLEMENTATION" "test"\r\n"SASL" "PLAIN"\r\nOK "ready"\r\n'
        reader = ScriptedSieveServer(
            [
                (b"", greeting),
                (b"AUTHENTICATE", b'OK "Logged in."\r\n'),
                (b"LISTSCRIPTS", b'"filters" ACTIVE\r\n{5}\r\nspam \r\nOK\r\n'),
                (b'GETSCRIPT "filters"', b'{11}\r\nkeep;\r\nstop\r\nOK\r\n'),
                (b'GETSCRIPT "spam "', b'"discard;"\r\nOK\r\n'),
                (b"LOGOUT", b""),
            ]
        )
        writer = ScriptedSieveServer(
            [
                (b"", greeting),
                (b"AUTHENTICATE", b'OK "Logged in."\r\n'),
                (b'PUTSCRIPT "filters" {11+}', b"OK\r\n"),
                (b'PUTSCRIPT "spam " {8+}', b"OK\r\n"),
                (b'SETACTIVE "filters"', b"OK\r\n"),
                (b"LOGOUT", b""),
            ]
        )
        self.connectTo(reader, writer)
        copied = _clients.copySieve(backend("old"), backend("new"), "alice@example.org", 10)
        reader.thread.join(10)
        writer.thread.join(10)
        self.assertEqual(copied, 2)
        import base64

        plain = base64.b64encode(b"alice@example.org\0proxy\0" + SECRET.encode())
        self.assertEqual(reader.received[0], b'AUTHENTICATE "PLAIN" "' + plain + b'"')
        self.assertEqual(
            writer.received[1:4],
            [b'PUTSCRIPT "filters" {11+}\r\nkeep;\r\nstop', b'PUTSCRIPT "spam " {8+}\r\ndiscard;', b'SETACTIVE "filters"'],
        )

    def test_refusedLoginWithoutSecret(self) -> None:
        """
        A refused login says so and which server, without the password or
        the SASL exchange that carries it.
        """
        server = ScriptedSieveServer(
            [(b"", b'"IMPLEMENTATION" "test"\r\nOK\r\n'), (b"AUTHENTICATE", b'NO "Authentication failed."\r\n')]
        )
        self.connectTo(server)
        with self.assertRaises(_clients.ClientError) as caught:
            _clients.copySieve(backend("old"), backend("new"), "alice@example.org", 10)
        server.thread.join(10)
        message = str(caught.exception)
        self.assertEqual(
            message,
            'ManageSieve on old (192.0.2.1:4190) for alice@example.org: AUTHENTICATE refused: NO "Authentication failed."',
        )
