"""
The proxy under systemd, with the real process and what systemd would hand
it: the notification socket (C{Type=notify}), sockets passed by socket
activation, the journal on standard output, and C{mailproxy reload --pid}
as C{ExecReload=}; also the example unit, checked by C{systemd-analyze
verify}, and Twisted's plugin cache in a read-only directory.

No systemd runs here: the tests play its part with the same environment
variables and descriptors.
"""

from __future__ import annotations

import imaplib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from .common import TIMEOUT, listenerTable, routesText, tomlTable
from .servers import Proxy, _REPOSITORY, requireServer, sharedFixture
from .test_imap import MailServers, closeIMAP
from .test_migration import mailproxyCommand
from .test_routers import imapFailedLogin

#: Debian's Python, where fail2ban and python3-systemd live.
_SYSTEM_PYTHON = "/usr/bin/python3"

#: Runs a command with a listening socket as descriptor 3 and LISTEN_PID
#: set to its own pid, as systemd does between fork and exec.
_ACTIVATE = (
    "import os, sys; fd = int(sys.argv[1]); os.dup2(fd, 3); fd != 3 and os.close(fd); "
    "os.environ['LISTEN_PID'] = str(os.getpid()); os.execv(sys.argv[2], sys.argv[2:])"
)


class RunProxy(Proxy):
    """
    The proxy as the example unit runs it, C{mailproxy run}: its log is
    what it writes to standard output.
    """

    def __init__(self, directory: str, configText: str) -> None:
        super().__init__(directory, configText)
        self._stderrPath = self.logPath
        self.logPath.touch()

    def command(self) -> list[str]:
        return [
            sys.executable, "-c", "import sys; from mailproxy.cli import main; sys.exit(main(sys.argv[1:]))",
            "run", "--config", str(self.configPath),
        ]


class ActivatedProxy(RunProxy):
    """
    C{mailproxy run} with one listening socket passed as systemd passes it.
    """

    def __init__(self, directory: str, configText: str, listening: socket.socket, name: str) -> None:
        super().__init__(directory, configText)
        self.passFds = (listening.fileno(),)
        self.environment = {"LISTEN_FDS": "1", "LISTEN_FDNAMES": name}

    def command(self) -> list[str]:
        return [sys.executable, "-c", _ACTIVATE, str(self.passFds[0]), *super().command()]


def proxyConfig(backendPort: int, endpoint: str = "tcp:0:interface=127.0.0.1", log: dict[str, str] | None = None) -> str:
    """
    A proxy with one plaintext IMAP listener on C{endpoint}, routing every
    account to a plaintext backend on C{backendPort}.
    """
    listener = listenerTable("imap", 0, "none", endpoint=endpoint)
    return (
        tomlTable("proxy", {"hostname": "proxy.example.org"})
        + tomlTable("limits", {"failure_delay": 0.1, "shutdown_grace": 0})
        + listener
        + tomlTable("router", {"type": "static", "path": "routes.toml"})
        + tomlTable("backend.old", {"host": "127.0.0.1", "ports": {"imap": backendPort}, "tls": "none"})
        + (tomlTable("log", log) if log is not None else "")
    )


def startProxy(test: SynchronousTestCase, proxy: Proxy) -> Proxy:
    """
    Write the route table beside C{proxy}'s configuration, start it, and
    stop it after C{test}.
    """
    (proxy.directory / "routes.toml").write_text(routesText({"default": "old"}))
    test.addCleanup(proxy.stop)
    proxy.start()
    return proxy


def greeting(port: int, host: str = "127.0.0.1") -> bytes:
    """
    The first line the proxy's IMAP listener on C{port} sends.
    """
    with socket.create_connection((host, port), timeout=TIMEOUT) as connection:
        return connection.makefile("rb").readline()


class Notifications:
    """
    The notification socket, as systemd binds it: an abstract C{AF_UNIX}
    datagram socket named in C{$NOTIFY_SOCKET}.
    """

    def __init__(self, test: SynchronousTestCase) -> None:
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.name = f"mailproxy-test-{os.getpid()}-{id(self)}"
        self.socket.bind("\0" + self.name)
        self.socket.settimeout(TIMEOUT)
        test.addCleanup(self.socket.close)

    @property
    def address(self) -> str:
        """
        The value of C{$NOTIFY_SOCKET}.
        """
        return "@" + self.name

    def next(self) -> dict[str, str]:
        """
        The next notification, as its C{KEY=value} lines.
        """
        message = self.socket.recv(4096).decode()
        return dict(line.split("=", 1) for line in message.split("\n"))


class NotifyTests(SynchronousTestCase):
    """
    What C{Type=notify} hears from the proxy: ready once it listens,
    reloading then ready around a reload (whether it is applied or
    refused), stopping on SIGTERM, with status text each time.
    """

    def test_lifecycle(self) -> None:
        """
        C{READY=1} comes once the listener accepts; SIGHUP brings
        C{RELOADING=1} with C{MONOTONIC_USEC}, then C{READY=1} with the
        reload's outcome as C{STATUS} (also for a broken file, which the
        proxy refuses while it serves on); SIGTERM brings C{STOPPING=1}.
        """
        notifications = Notifications(self)
        directory = tempfile.mkdtemp(dir=os.getcwd())
        proxy = RunProxy(directory, proxyConfig(1))
        proxy.environment = {"NOTIFY_SOCKET": notifications.address}
        startProxy(self, proxy)

        ready = notifications.next()
        self.assertEqual(ready, {"READY": "1", "STATUS": "serving: 1 listener, router static"})
        self.assertTrue(greeting(proxy.ports[0]).startswith(b"* OK"))

        os.kill(proxy.pid, signal.SIGHUP)
        reloading = notifications.next()
        self.assertEqual(reloading.pop("RELOADING"), "1")
        self.assertRegex(reloading.pop("MONOTONIC_USEC"), r"^[1-9][0-9]*$")
        self.assertEqual(reloading, {"STATUS": f"reloading {proxy.configPath}"})
        self.assertEqual(notifications.next(), {"READY": "1", "STATUS": f"reloaded {proxy.configPath}"})

        proxy.configPath.write_text(proxy.configPath.read_text() + "[router]\n")
        os.kill(proxy.pid, signal.SIGHUP)
        self.assertEqual(notifications.next()["RELOADING"], "1")
        refused = notifications.next()
        self.assertEqual(refused["READY"], "1")
        self.assertRegex(
            refused["STATUS"],
            rf"^reload failed, keeping the running configuration: {re.escape(str(proxy.configPath))}: .*router",
        )
        self.assertTrue(greeting(proxy.ports[0]).startswith(b"* OK"))

        # Both greeted clients have gone: the proxy has seen them close.
        deadline = time.monotonic() + TIMEOUT
        while proxy.logText().count(" end: imap from ") < 2:
            self.assertLess(time.monotonic(), deadline, proxy.logText())
            time.sleep(0.05)
        proxy.stop()
        self.assertEqual(notifications.next(), {"STOPPING": "1", "STATUS": "stopping: 0 sessions open"})
        # twistd ends by the signal, which systemd counts as a clean exit.
        self.assertEqual(proxy.returncode, -signal.SIGTERM)


class ReloadCommandTests(SynchronousTestCase):
    """
    C{mailproxy reload --pid PID}, the example unit's C{ExecReload=}: it
    sends SIGHUP and exits with the outcome, without C{[admin]}.
    """

    def setUp(self) -> None:
        """
        Start a proxy without a management endpoint, with a runtime
        directory as C{RuntimeDirectory=} gives it.
        """
        self.runtime = tempfile.mkdtemp(dir=os.getcwd())
        self.proxy = RunProxy(tempfile.mkdtemp(dir=os.getcwd()), proxyConfig(1))
        self.proxy.environment = {"RUNTIME_DIRECTORY": os.path.abspath(self.runtime)}
        startProxy(self, self.proxy)

    def reload(self) -> subprocess.CompletedProcess[str]:
        """
        Run C{mailproxy reload --pid} as systemd would, in the same runtime
        directory.
        """
        os.environ["RUNTIME_DIRECTORY"] = os.path.abspath(self.runtime)
        try:
            return mailproxyCommand("reload", "--pid", str(self.proxy.pid))
        finally:
            del os.environ["RUNTIME_DIRECTORY"]

    def test_applied(self) -> None:
        """
        A reload the proxy applies: exit status 0, and what it reloaded.
        """
        result = self.reload()
        self.assertEqual((result.returncode, result.stdout, result.stderr), (0, f"reloaded {self.proxy.configPath}\n", ""))

    def test_refused(self) -> None:
        """
        A broken file: the command exits with status 1 and says why, and
        the proxy serves on with the configuration it had; once the file
        is mended, a reload succeeds again.
        """
        good = self.proxy.configPath.read_text()
        self.proxy.configPath.write_text(good + "[router]\n")
        result = self.reload()
        self.assertEqual(result.returncode, 1)
        self.assertEqual(result.stdout, "")
        self.assertRegex(
            result.stderr,
            rf"^mailproxy reload: reload failed, the running configuration is kept: "
            rf"{re.escape(str(self.proxy.configPath))}: .*router",
        )
        self.assertTrue(self.proxy.running())
        self.assertTrue(greeting(self.proxy.ports[0]).startswith(b"* OK"))
        self.proxy.configPath.write_text(good)
        self.assertEqual(self.reload().returncode, 0)

    def test_otherProcess(self) -> None:
        """
        For a pid that did not write the runtime directory's record, the
        command sends no signal and exits with status 1, saying why.
        """
        other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        self.addCleanup(other.wait)
        self.addCleanup(other.kill)
        os.environ["RUNTIME_DIRECTORY"] = os.path.abspath(self.runtime)
        try:
            result = mailproxyCommand("reload", "--pid", str(other.pid))
        finally:
            del os.environ["RUNTIME_DIRECTORY"]
        self.assertEqual(result.returncode, 1)
        self.assertIn(f"is not written by process {other.pid}", result.stderr)
        self.assertIsNone(other.poll())


class SocketActivationTests(SynchronousTestCase):
    """
    Listeners on sockets systemd passes (C{ListenStream=} in a socket
    unit): C{systemd:domain=INET:name=NAME} endpoints.
    """

    def test_passedSocket(self) -> None:
        """
        The proxy serves on the socket passed as descriptor 3 (by its name
        in C{LISTEN_FDNAMES}), even a client that connected before the proxy
        started: it logs in through it to the Dovecot behind.
        """
        servers = sharedFixture("mail servers", MailServers.__module__, MailServers.start)
        listening = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(listening.close)
        listening.bind(("127.0.0.1", 0))
        listening.listen(16)
        port = listening.getsockname()[1]
        early = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        self.addCleanup(early.close)

        proxy = ActivatedProxy(
            tempfile.mkdtemp(dir=os.getcwd()), proxyConfig(servers.old.imap, "systemd:domain=INET:name=imap"), listening, "imap"
        )
        startProxy(self, proxy)
        listening.close()
        self.assertEqual(proxy.ports, [port])
        self.assertTrue(early.makefile("rb").readline().startswith(b"* OK"))

        client = imaplib.IMAP4("127.0.0.1", port, timeout=TIMEOUT)
        self.addCleanup(closeIMAP, client)
        self.assertEqual(client.login("alice@example.org", "alice secret")[0], "OK")
        status, data = client.select("INBOX")
        self.assertEqual((status, data), ("OK", [b"1"]))

    def test_noSocket(self) -> None:
        """
        A listener whose socket systemd did not pass stops the start with a
        message naming it.
        """
        proxy = RunProxy(tempfile.mkdtemp(dir=os.getcwd()), proxyConfig(1, "systemd:domain=INET:name=imaps"))
        proxy.environment = {"LISTEN_FDNAMES": ""}
        (proxy.directory / "routes.toml").write_text(routesText({"default": "old"}))
        self.addCleanup(proxy.stop)
        with self.assertRaises(RuntimeError) as caught:
            proxy.start()
        self.assertIn(
            f"{proxy.configPath}: listener[0]: endpoint: systemd passed no such socket", str(caught.exception)
        )
        self.assertIn("'systemd:domain=INET:name=imaps'", str(caught.exception))


class JournalTests(SynchronousTestCase):
    """
    Standard output as the journal: lines carry their syslog priority, and
    with C{[log] path = "-"} there is one format.
    """

    def startOnJournal(self, proxy: RunProxy) -> None:
        """
        Start C{proxy} with its standard output named in
        C{$JOURNAL_STREAM}, as systemd does with C{StandardOutput=journal}.
        """
        status = os.stat(proxy.logPath)
        proxy.environment = {"JOURNAL_STREAM": f"{status.st_dev}:{status.st_ino}"}
        startProxy(self, proxy)

    def test_priorities(self) -> None:
        """
        Each line starts with the priority of its event: C{<6>} for info,
        C{<3>} for the error of a refused reload; without the journal, no
        line does.
        """
        proxy = RunProxy(tempfile.mkdtemp(dir=os.getcwd()), proxyConfig(1))
        self.startOnJournal(proxy)
        proxy.configPath.write_text(proxy.configPath.read_text() + "[router]\n")
        os.kill(proxy.pid, signal.SIGHUP)
        deadline = time.monotonic() + TIMEOUT
        while "reload failed" not in proxy.logText():
            self.assertLess(time.monotonic(), deadline, proxy.logText())
            time.sleep(0.05)
        lines = proxy.logText().splitlines()
        self.assertEqual([line for line in lines if not re.match(r"<[2-7]>", line)], [])
        self.assertIn("<6>", [line[:3] for line in lines if "listener[0] (imap, tls=none) listening on" in line])
        self.assertEqual(
            [line[:3] for line in lines if "reload failed, keeping the running configuration" in line], ["<3>"]
        )

        plain = RunProxy(tempfile.mkdtemp(dir=os.getcwd()), proxyConfig(1))
        startProxy(self, plain)
        self.assertEqual([line for line in plain.logText().splitlines() if line.startswith("<")], [])

    def test_jsonOnStandardOutput(self) -> None:
        """
        With C{[log] path = "-"} and C{format = "json"}, every line on
        standard output is one JSON object, twistd's own lines included
        (after the priority for the journal).
        """
        proxy = RunProxy(tempfile.mkdtemp(dir=os.getcwd()), proxyConfig(1, log={"path": "-", "format": "json"}))
        proxy._LISTENING = re.compile(r'"message": "(listener\[(\d+)\]|admin) [^"]*listening on [^"\s]+:(\d+)"')
        self.startOnJournal(proxy)
        self.assertTrue(greeting(proxy.ports[0]).startswith(b"* OK"))
        proxy.stop()
        lines = proxy.logText().splitlines()
        events = [json.loads(line[3:]) for line in lines]
        self.assertEqual([line[:3] for line in lines], ["<6>"] * len(lines))
        messages = [event["message"] for event in events]
        self.assertIn(f"listener[0] (imap, tls=none) listening on 127.0.0.1:{proxy.ports[0]}", messages)
        self.assertTrue(any(message.startswith("twistd ") for message in messages), messages)
        self.assertEqual(len([event for event in events if event["event"] == "session_end"]), 1)

    def test_fail2banJournal(self) -> None:
        """
        With C{backend = systemd}, fail2ban's own code, reading the journal
        entries journald makes of the proxy's standard output, finds with
        each filter in examples/ (the text one, and the JSON one for
        C{[log] path = "-"}) the real client's address once per failed
        login (a wrong password, and names forged to add an entry shaped
        like a failed login from another address, in either format), and no
        other address: neither in an entry that continues a traceback (it
        starts with a tab), nor in one another program wrote under the
        proxy's name.
        """
        requireServer("fail2ban-regex", _SYSTEM_PYTHON)
        servers = sharedFixture("mail servers", MailServers.__module__, MailServers.start)
        filters = _REPOSITORY / "examples" / "fail2ban" / "filter.d"
        for name, log in (("mailproxy.conf", None), ("mailproxy-json.conf", {"path": "-", "format": "json"})):
            proxy = RunProxy(tempfile.mkdtemp(dir=os.getcwd()), proxyConfig(servers.old.imap, log=log))
            if log is not None:
                proxy._LISTENING = re.compile(r'"message": "(listener\[(\d+)\]|admin) [^"]*listening on [^"\s]+:(\d+)"')
            self.startOnJournal(proxy)
            # fail2ban's line for an entry: "host mailproxy[pid]: " then
            # the message.
            entryPrefix = f"{socket.gethostname()} mailproxy[{proxy.pid}]: "
            forgedText = (
                b"2026-01-01T00:00:00+0000 [mailproxy.imap._frontend.IMAPFrontend#info] authentication failed: "
                b'session=forged address=6.6.6.6 protocol=imap user="x" attempt=1'
            )
            forgedJSON = json.dumps(
                {
                    "time": "2026-01-01T00:00:00.000Z",
                    "level": "info",
                    "namespace": "mailproxy.imap._frontend.IMAPFrontend",
                    "event": "login_failed",
                    "message": 'authentication failed: session=forged address=6.6.6.7 protocol=imap user="x" attempt=1',
                }
            ).encode()
            replies = [
                imapFailedLogin(proxy.ports[0], b"x@example.org\n" + forgedText, b"secret"),
                imapFailedLogin(proxy.ports[0], b"y@example.org\r\x00\x1b[2J\n" + forgedJSON, b"secret", sasl=True),
                imapFailedLogin(proxy.ports[0], b"alice@example.org", b"not-alices-password"),
            ]
            proxy.stop()
            self.assertEqual([reply[:5] for reply in replies], [b"a NO "] * 3)
            entries = journalEntries(proxy)
            failures = [entry for entry in entries if "address=127.0.0.1 protocol=imap" in entry["MESSAGE"]]
            self.assertTrue(failures, entries)
            others = [
                # A traceback's continuation line that quotes a log line.
                {**failures[-1], "MESSAGE": "\t" + failures[-1]["MESSAGE"].replace("127.0.0.1", "6.6.6.8")},
                # logger -t mailproxy, by any local user.
                {
                    **failures[-1],
                    "MESSAGE": failures[-1]["MESSAGE"].replace("127.0.0.1", "6.6.6.9"),
                    "_TRANSPORT": "syslog",
                    "_COMM": "logger",
                    "_PID": "1",
                    "_SYSTEMD_UNIT": "session-1.scope",
                },
                # The entry a forged name would have made, were it not
                # quoted: the filter takes it.
                {**failures[-1], "MESSAGE": (forgedText if log is None else forgedJSON).decode()},
            ]
            result = subprocess.run(
                [_SYSTEM_PYTHON, str(Path(__file__).with_name("fail2ban_journal.py"))],
                input=json.dumps({"filter": str(filters / name), "entries": entries + others}),
                capture_output=True,
                text=True,
                timeout=TIMEOUT,
            )
            self.assertEqual(result.returncode, 0, result.stderr)
            found = json.loads(result.stdout)
            ofProxy, ofOthers = found[: len(entries)], found[len(entries) :]
            self.assertEqual(
                [(item["line"][: len(entryPrefix)], item["addresses"]) for item in ofProxy if item["addresses"]],
                [(entryPrefix, ["127.0.0.1"])] * len(replies),
                name,
            )
            self.assertEqual(
                [(item["selected"], item["addresses"]) for item in ofOthers],
                [(True, []), (False, []), (True, ["6.6.6.6" if log is None else "6.6.6.7"])],
                name,
            )


def journalEntries(proxy: RunProxy) -> list[dict[str, str]]:
    """
    The entries journald makes of C{proxy}'s standard output under the
    example unit (C{SyslogLevelPrefix=yes}): one per line, its C{<N>}
    priority taken off into C{PRIORITY}, with the fields journald adds to
    an entry from a service's standard output.
    """
    entries = []
    for line in proxy.logText().splitlines():
        match = re.fullmatch(r"<([0-7])>(.*)", line)
        assert match is not None, line
        entries.append(
            {
                "MESSAGE": match.group(2),
                "PRIORITY": match.group(1),
                "SYSLOG_FACILITY": "3",
                "SYSLOG_IDENTIFIER": "mailproxy",
                "_TRANSPORT": "stdout",
                "_PID": str(proxy.pid),
                "_COMM": "mailproxy",
                "_SYSTEMD_UNIT": "mailproxy.service",
                "_HOSTNAME": socket.gethostname(),
            }
        )
    return entries


class PluginCacheTests(SynchronousTestCase):
    """
    Twisted's plugin cache (C{dropin.cache}) beside the installed plugins,
    which the service user may not write.
    """

    def test_readOnlyPluginDirectory(self) -> None:
        """
        C{mailproxy run} starts without C{Unable to write to plugin cache}
        and writes no cache, even with a plugin directory it may not write
        that holds a plugin without a cache (as after installing mailproxy
        beside Twisted), and a C{tcp6:} listener, whose parser Twisted keeps
        among its plugins.
        """
        plugins = Path(tempfile.mkdtemp(dir=os.getcwd())).resolve() / "twisted" / "plugins"
        plugins.mkdir(parents=True)
        (plugins / "another_plugin.py").write_text("")
        plugins.chmod(0o555)
        self.addCleanup(plugins.chmod, 0o755)
        proxy = RunProxy(tempfile.mkdtemp(dir=os.getcwd()), proxyConfig(1, "tcp6:0:interface=\\:\\:1"))
        proxy.environment = {"PYTHONPATH": os.pathsep.join([str(_REPOSITORY), str(plugins.parent.parent)])}
        if os.geteuid() == 0:
            # Root writes anywhere: without these capabilities, as the
            # service user would.
            requireServer("setpriv")
            command = proxy.command()
            drop = "-dac_override,-dac_read_search"
            proxy.command = lambda: ["setpriv", f"--inh-caps={drop}", f"--bounding-set={drop}", "--", *command]  # type: ignore[method-assign]
        startProxy(self, proxy)
        self.assertTrue(greeting(proxy.ports[0], "::1").startswith(b"* OK"))
        self.assertNotIn("plugin cache", proxy.logText())
        self.assertEqual(os.listdir(plugins), ["another_plugin.py"])


class UnitFileTests(SynchronousTestCase):
    """
    The example unit, C{examples/mailproxy.service}.
    """

    def test_settings(self) -> None:
        """
        It runs C{mailproxy run} as C{Type=notify}, reloads with C{mailproxy
        reload --pid}, keeps state in C{/var/lib/mailproxy} and the reload
        outcome in C{/run/mailproxy}, and leaves C{/etc/mailproxy}
        read-only.
        """
        text = (_REPOSITORY / "examples" / "mailproxy.service").read_text()
        settings: dict[str, list[str]] = {}
        for line in text.splitlines():
            if "=" in line and not line.startswith(("#", "[")):
                key, value = line.split("=", 1)
                settings.setdefault(key, []).append(value)
        self.assertEqual(settings["Type"], ["notify"])
        self.assertEqual(
            settings["ExecStart"], ["/opt/mailproxy/bin/mailproxy run --config /etc/mailproxy/mailproxy.toml"]
        )
        self.assertEqual(settings["ExecReload"], ["/opt/mailproxy/bin/mailproxy reload --pid $MAINPID"])
        self.assertEqual((settings["StateDirectory"], settings["RuntimeDirectory"]), (["mailproxy"], ["mailproxy"]))
        self.assertEqual(settings["ProtectSystem"], ["strict"])
        self.assertNotIn("ReadWritePaths", settings)

    def test_verify(self) -> None:
        """
        C{systemd-analyze verify} finds nothing wrong with it, its commands
        pointed at this Python's scripts.
        """
        requireServer("systemd-analyze")
        text = (_REPOSITORY / "examples" / "mailproxy.service").read_text()
        self.assertIn("/opt/mailproxy/bin/", text)
        directory = tempfile.mkdtemp(dir=os.getcwd())
        unit = Path(directory, "mailproxy.service")
        unit.write_text(text.replace("/opt/mailproxy/bin/", str(Path(sys.executable).parent) + "/"))
        result = subprocess.run(
            ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=TIMEOUT
        )
        self.assertEqual((result.returncode, result.stderr), (0, ""))


class WorkersUnderSystemdTests(SynchronousTestCase):
    """
    The example unit's ways with a proxy of two worker processes: the
    socket systemd passes is served by the workers, the parent alone
    notifies, C{mailproxy reload --pid $MAINPID} reloads every worker or
    none, SIGTERM stops them all.
    """

    def test_unit(self) -> None:
        """
        C{READY=1} names the workers once both serve on the passed socket;
        logins go through; a broken file's reload fails (status 1, every
        worker serving on), a good one succeeds; SIGTERM brings
        C{STOPPING=1} and ends the workers with the parent.
        """
        servers = sharedFixture("mail servers", MailServers.__module__, MailServers.start)
        listening = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(listening.close)
        listening.bind(("127.0.0.1", 0))
        listening.listen(16)
        port = listening.getsockname()[1]
        text = proxyConfig(servers.old.imap, "systemd:domain=INET:name=imap")
        self.assertIn("[proxy]\n", text)
        text = text.replace("[proxy]\n", "[proxy]\nworkers = 2\n", 1)
        notifications = Notifications(self)
        runtime = os.path.abspath(tempfile.mkdtemp(dir=os.getcwd()))
        proxy = ActivatedProxy(tempfile.mkdtemp(dir=os.getcwd()), text, listening, "imap")
        proxy.environment.update({"NOTIFY_SOCKET": notifications.address, "RUNTIME_DIRECTORY": runtime})
        startProxy(self, proxy)
        listening.close()
        self.assertEqual(notifications.next(), {"READY": "1", "STATUS": "serving: 1 listener, 2 workers, router static"})
        workers = re.findall(r"worker \d \(pid (\d+)\) serving", proxy.logText())
        self.assertEqual(len(workers), 2, proxy.logText())

        for _ in range(4):
            client = imaplib.IMAP4("127.0.0.1", port, timeout=TIMEOUT)
            self.assertEqual(client.login("alice@example.org", "alice secret")[0], "OK")
            closeIMAP(client)

        def reload() -> subprocess.CompletedProcess[str]:
            os.environ["RUNTIME_DIRECTORY"] = runtime
            try:
                return mailproxyCommand("reload", "--pid", str(proxy.pid))
            finally:
                del os.environ["RUNTIME_DIRECTORY"]

        good = proxy.configPath.read_text()
        proxy.configPath.write_text(good + "[router]\n")
        refused = reload()
        self.assertEqual(refused.returncode, 1, refused.stderr)
        self.assertIn("reload failed, the running configuration is kept", refused.stderr)
        self.assertNotIn("] reloaded", proxy.logText())
        proxy.configPath.write_text(good)
        applied = reload()
        self.assertEqual((applied.returncode, applied.stdout), (0, f"reloaded {proxy.configPath}\n"), applied.stderr)
        deadline = time.monotonic() + TIMEOUT
        while proxy.logText().count("] reloaded ") < 3:
            self.assertLess(time.monotonic(), deadline, proxy.logText())
            time.sleep(0.05)
        self.assertTrue(greeting(port).startswith(b"* OK"))

        proxy.stop()
        # The reloads' own notifications come first.
        notice = notifications.next()
        while "STOPPING" not in notice:
            notice = notifications.next()
        self.assertEqual(notice, {"STOPPING": "1", "STATUS": "stopping: 2 workers draining"})
        for pid in workers:
            self.assertFalse(os.path.exists(f"/proc/{pid}"), pid)
