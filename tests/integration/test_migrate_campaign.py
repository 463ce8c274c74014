"""
Migration campaigns end to end: two real Dovecot servers ("old" and "new",
each with its own Postfix delivering by LMTP), the proxy as a subprocess
with its management endpoint, and the C{mailproxy migrate} command copying,
verifying and moving accounts with C{doveadm backup} while real clients
work: IMAP IDLE sessions, POP3 and submission logins, and MX deliveries to
the very accounts being migrated.

Every account starts on old with folders (nested), flags, subscriptions,
a Sieve script and a large message; new starts empty.  After a campaign
the test reads both servers directly (C{doveadm fetch}) and compares
Message-IDs per folder, flags and scripts.

The scale is small enough for CI; C{MAILPROXY_CAMPAIGN_ACCOUNTS} and
C{MAILPROXY_CAMPAIGN_BIG} (octets of the largest message; each account has
one of 1x, 3x or 10x that size) run the same test at the issue's full size
by hand.
"""

from __future__ import annotations

import json
import os
import poplib
import re
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from pathlib import Path
from typing import Any, Callable

from prometheus_client.parser import text_string_to_metric_families
from twisted.trial.unittest import SynchronousTestCase

from .postfix import Postfix, dovecotSASLConfig
from .servers import Dovecot, Proxy, TestCA, _binary, fixtureDirectory, freePort, requireServer, sharedFixture
from .test_migration import MOVED_BYE, IMAPClient, sample

#: Seconds any single client operation (or a wait for a server) may take.
TIMEOUT = 60.0

#: Accounts the campaign migrates with its load running.
CAMPAIGN = [f"camp{n:02d}@example.org" for n in range(int(os.environ.get("MAILPROXY_CAMPAIGN_ACCOUNTS", "8")))]
#: Accounts migrated by the campaign whose proxy is killed.
KILLED = [f"kill{n:02d}@example.org" for n in range(6)]
#: An account migrated when it logs in.
ROAMING = "roam@example.org"
#: An account migrated to new and back.
RETURNING = "back@example.org"
#: An account nobody migrates: its mail and route stay on old.
STAYING = "stay@example.org"
#: Accounts migrated by a proxy with two worker processes.
WORKED = [f"work{n:02d}@example.org" for n in range(4)]
ACCOUNTS = [*CAMPAIGN, *KILLED, ROAMING, RETURNING, STAYING, *WORKED]
PASSWORD = "campaign-secret"
MASTER = ("proxy", "campaign-master")
TOKEN = "campaign-token-0123456789abcdef0123456789abcdef"

#: The largest message's base size (each account has one of 1x, 3x, 10x).
BIG = int(os.environ.get("MAILPROXY_CAMPAIGN_BIG", str(256 * 1024)))

#: Each account's folders (Dovecot's separator is ".") and how many small
#: messages each holds at the start.
FOLDERS = {"INBOX": 4, "Archive": 1, "Archive.2024": 2, "Work": 1, "Work.Projects": 1}

_REPOSITORY = Path(__file__).resolve().parent.parent.parent


def message(messageId: str, subject: str, size: int = 0) -> bytes:
    """
    An RFC 5322 message with C{messageId}, padded to about C{size} octets.
    """
    body = b"Hello.\r\n"
    if size:
        line = b"x" * 76 + b"\r\n"
        body += line * (size // len(line))
    return (
        f"From: sender@example.com\r\nTo: someone@example.org\r\nSubject: {subject}\r\n"
        f"Message-ID: {messageId}\r\nDate: Fri, 04 Dec 2026 08:00:00 +0000\r\n\r\n"
    ).encode() + body


def seed(dovecot: Dovecot, account: str, index: int) -> None:
    """
    Give C{account} on C{dovecot} its folders, subscriptions, messages
    (one large), flags and an active Sieve script.
    """
    folders = [folder for folder in FOLDERS if folder != "INBOX"]
    dovecot.doveadm("mailbox", "create", "-s", "-u", account, *folders)
    for folder, count in FOLDERS.items():
        for n in range(count):
            dovecot.doveadm("save", "-u", account, "-m", folder, input=message(f"<{account}.{folder}.{n}@seed.test>", f"{folder} {n}"))
    size = BIG * (1, 3, 10)[index % 3]
    dovecot.doveadm("save", "-u", account, "-m", "Archive.2024", input=message(f"<{account}.big@seed.test>", "big", size))
    dovecot.doveadm("flags", "add", "-u", account, "\\Seen \\Flagged", "mailbox", "INBOX", "uid", "1")
    dovecot.doveadm("flags", "add", "-u", account, "\\Answered $Label1", "mailbox", "Archive", "uid", "1")
    script = f'require "fileinto";\n# {account}\nif header :contains "subject" "project" {{ fileinto "Work.Projects"; }}\n'
    dovecot.doveadm("sieve", "put", "-u", account, "-a", "filter", input=script.encode())


def mailbox(dovecot: Dovecot, account: str) -> dict[str, list[tuple[str, frozenset[str]]]]:
    """
    C{account}'s folders on C{dovecot}, read by doveadm: per folder, each
    message's Message-ID and flags (C{\\Recent} left out: it is per
    session).
    """
    output = dovecot.doveadm("-f", "tab", "fetch", "-u", account, "mailbox hdr.message-id flags", "all").decode()
    folders: dict[str, list[tuple[str, frozenset[str]]]] = {}
    for name in dovecot.doveadm("-f", "tab", "mailbox", "list", "-u", account).decode().split()[1:]:
        folders[name] = []
    for line in output.splitlines()[1:]:
        folder, messageId, flags = line.split("\t")
        folders.setdefault(folder, []).append((messageId.strip(), frozenset(flags.split()) - {"\\Recent"}))
    return folders


def subscriptions(dovecot: Dovecot, account: str) -> set[str]:
    """
    C{account}'s subscribed folders on C{dovecot}.
    """
    return set(dovecot.doveadm("-f", "tab", "mailbox", "list", "-s", "-u", account).decode().split()[1:])


def sieveScripts(dovecot: Dovecot, account: str) -> tuple[str, str]:
    """
    C{account}'s script list on C{dovecot} (C{NAME ACTIVE}) and the active
    script's text.
    """
    listing = dovecot.doveadm("sieve", "list", "-u", account).decode().strip()
    return listing, dovecot.doveadm("sieve", "get", "-u", account, "filter").decode()


class CampaignServers:
    """
    Old and new Dovecot, each with a Postfix in front (MX and submission),
    and every account's mail on old.
    """

    def __init__(self, directory: str) -> None:
        self.ca = TestCA(os.path.join(directory, "ca"))
        users = {account: PASSWORD for account in ACCOUNTS}
        self.dovecots = {
            name: Dovecot(
                os.path.join(directory, f"dovecot-{name}"), name, users, ca=self.ca, masterUser=MASTER,
                extraConfig=dovecotSASLConfig(),
            )
            for name in ("old", "new")
        }
        self.postfixes: dict[str, Postfix] = {}
        self.directory = directory

    @classmethod
    def start(cls) -> CampaignServers:
        """
        Start the servers and put every account's mail on old.
        """
        requireServer("dovecot", "doveadm", "postfix", "openssl")
        servers = cls(fixtureDirectory("campaign-servers"))
        try:
            for name, dovecot in servers.dovecots.items():
                dovecot.start()
                postfix = Postfix(
                    os.path.join(servers.directory, f"postfix-{name}"),
                    name,
                    domains=["example.org"],
                    mailboxes=ACCOUNTS,
                    lmtpPort=dovecot.lmtp,
                    saslPath=os.path.join(os.path.realpath(dovecot.directory / "runtime"), "run", "postfix-auth"),
                    ca=servers.ca,
                )
                servers.postfixes[name] = postfix
                postfix.start()
            for index, account in enumerate(ACCOUNTS):
                seed(servers.dovecots["old"], account, index)
        except BaseException:
            servers.stop()
            raise
        return servers

    def stop(self) -> None:
        """
        Stop every server.
        """
        for postfix in self.postfixes.values():
            postfix.stop()
        for dovecot in self.dovecots.values():
            dovecot.stop()


class CampaignProxy:
    """
    The proxy: IMAP and POP3 (plain), submission (implicit TLS) and MX
    listeners, the static router, both backends with their master user,
    the management endpoint, the JSON event log, and C{[migration]} with
    doveadm for both Dovecots (their configurations are on this host).
    """

    def __init__(self, servers: CampaignServers, name: str, migration: str = "", workers: int = 1) -> None:
        directory = fixtureDirectory(name)
        self.admin = freePort()
        self.caPath = servers.ca.caPath
        certificate, key = servers.ca.issue("campaign-proxy")
        backends = ""
        for backend in ("old", "new"):
            dovecot, postfix = servers.dovecots[backend], servers.postfixes[backend]
            backends += (
                f'[backend.{backend}]\nhost = "127.0.0.1"\n'
                f"ports = {{ imap = {dovecot.imap}, pop3 = {dovecot.pop3}, sieve = {dovecot.sieve}, "
                f"smtp = {postfix.submission}, mx = {postfix.mx} }}\n"
                f'master_user = "{MASTER[0]}"\nmaster_password_file = "master.pw"\n'
            )
        doveadmConfig = ", ".join(f'{backend} = "{servers.dovecots[backend].configPath}"' for backend in ("old", "new"))
        self.text = (
            f'[proxy]\nhostname = "proxy.example.org"\nworkers = {workers}\n'
            "[limits]\nfailure_delay = 0.1\nshutdown_grace = 0\nbackend_timeout = 20\n"
            f'[tls]\ncertificate = "{certificate}"\nkey = "{key}"\n'
            '[[listener]]\nprotocol = "imap"\nendpoint = "tcp:0:interface=127.0.0.1"\ntls = "none"\n'
            '[[listener]]\nprotocol = "pop3"\nendpoint = "tcp:0:interface=127.0.0.1"\ntls = "none"\n'
            '[[listener]]\nprotocol = "smtp"\nmode = "submission"\nendpoint = "tcp:0:interface=127.0.0.1"\ntls = "implicit"\n'
            '[[listener]]\nprotocol = "smtp"\nmode = "mx"\nendpoint = "tcp:0:interface=127.0.0.1"\ntls = "none"\n'
            'local_domains = ["example.org"]\n'
            '[router]\ntype = "static"\npath = "routes.toml"\n'
            + backends
            + f'[admin]\nendpoint = "tcp:{self.admin}:interface=127.0.0.1"\ntoken_file = "admin.token"\n'
            '[log]\nformat = "json"\npath = "events.jsonl"\n'
            f"[migration]\ndoveadm_config = {{ {doveadmConfig} }}\nsession_poll = 0.2\n" + migration
        )
        self.proxy = Proxy(directory, self.text)
        self.directory = self.proxy.directory
        (self.directory / "admin.token").write_text(TOKEN + "\n")
        (self.directory / "master.pw").write_text(MASTER[1] + "\n")
        (self.directory / "routes.toml").write_text(
            '# Everyone starts on old.\n[domains]\n"example.org" = "old"\n\n[accounts]\n'
        )

    def start(self) -> None:
        """
        Start the proxy (again, after a kill: same configuration, same
        management port) and learn its listeners' ports.
        """
        self.proxy.start(choosePorts=self.chooseAdminPort)
        self.imap, self.pop3, self.submission, self.mx = self.proxy.ports

    def chooseAdminPort(self) -> None:
        """
        Move the management endpoint to another free port.
        """
        old, self.admin = self.admin, freePort()
        self.text = self.text.replace(f'"tcp:{old}:', f'"tcp:{self.admin}:')
        self.proxy.configPath.write_text(self.text)

    def stop(self) -> None:
        """
        Stop the proxy.
        """
        self.proxy.stop()

    def kill(self) -> None:
        """
        SIGKILL the proxy and wait for it to be gone.
        """
        process = self.proxy._process
        assert process is not None
        os.kill(process.pid, signal.SIGKILL)
        process.wait(TIMEOUT)
        self.proxy._process = None

    def events(self) -> list[dict[str, Any]]:
        """
        The JSON events the proxy wrote so far (all its runs).
        """
        path = self.directory / "events.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []

    def routes(self) -> str:
        """
        The route table's text.
        """
        return (self.directory / "routes.toml").read_text()

    def command(self, *arguments: str) -> list[str]:
        """
        The command line of C{mailproxy ARGUMENTS} for this proxy.
        """
        return [
            sys.executable, "-c", "import sys; from mailproxy.cli import main; sys.exit(main(sys.argv[1:]))",
            *arguments, "--config", str(self.proxy.configPath),
        ]

    def run(self, *arguments: str) -> subprocess.CompletedProcess[str]:
        """
        Run C{mailproxy ARGUMENTS} to its end.
        """
        return subprocess.run(self.command(*arguments), capture_output=True, text=True, env=_environment(), timeout=600)

    def campaign(self, campaignId: str) -> dict[str, Any]:
        """
        C{GET /migrations/ID}.
        """
        status, body = adminRequest(self, f"/migrations/{campaignId}")
        assert status == 200, body
        return json.loads(body)  # type: ignore[no-any-return]


def adminRequest(proxy: CampaignProxy, path: str) -> tuple[int, bytes]:
    """
    GET C{path} from the proxy's management endpoint, with its token.
    """
    request = urllib.request.Request(f"http://127.0.0.1:{proxy.admin}{path}", headers={"Authorization": "Bearer " + TOKEN})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except urllib.error.URLError:
        return 0, b""


def metrics(proxy: CampaignProxy) -> tuple[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]:
    """
    Scrape C{/metrics}: its text, and its samples parsed by
    prometheus_client's own parser.
    """
    _, body = adminRequest(proxy, "/metrics")
    text = body.decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for one in family.samples:
            samples[one.name, tuple(sorted(one.labels.items()))] = one.value
    return text, samples


def _environment() -> dict[str, str]:
    environment = dict(os.environ)
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_REPOSITORY), environment.get("PYTHONPATH")]))
    return environment


class Load:
    """
    Real clients using the proxy while a campaign runs, each in a thread:
    an IMAP client idling per account (reconnecting when its session is
    dropped), POP3 and submission logins in turn, and MX deliveries with
    unique Message-IDs (retried on a temporary refusal, as an MTA does).

    @ivar failures: what went wrong that a user would call an error: a
        login refused or broken, a session that ended other than by the
        proxy's C{moved} goodbye, a message refused for good.
    @ivar drops: sessions the proxy dropped with its C{moved} goodbye, by
        protocol (C{"... login"}: while they were logging in).
    @ivar cut: accounts whose submission session ended without a reply
        after its login (the goodbye lost to a reset), one entry a session.
    @ivar logins: successful logins, by protocol.
    @ivar delivered: Message-IDs accepted by MX, by account.
    @ivar times: when each protocol's logins succeeded, and MX deliveries
        were accepted (C{"mx"}), in L{time.monotonic} seconds.
    """

    def __init__(self, proxy: CampaignProxy, accounts: list[str]) -> None:
        self.proxy = proxy
        self.accounts = accounts
        self.failures: list[str] = []
        self.drops: Counter[str] = Counter()
        self.cut: list[str] = []
        self.logins: Counter[str] = Counter()
        self.delivered: dict[str, list[str]] = {account: [] for account in accounts}
        self.times: dict[str, list[float]] = {"imap": [], "pop3": [], "submission": [], "mx": []}
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._clients: list[IMAPClient] = []
        self._lock = threading.Lock()

    def start(self) -> None:
        """
        Start every client.
        """
        for account in self.accounts:
            self._spawn(self._idle, account)
        self._spawn(self._pop3)
        self._spawn(self._submission)
        self._spawn(self._mx)

    def _spawn(self, run: Callable[..., None], *arguments: Any) -> None:
        thread = threading.Thread(target=self._guarded, args=(run, *arguments), daemon=True)
        self._threads.append(thread)
        thread.start()

    def _guarded(self, run: Callable[..., None], *arguments: Any) -> None:
        try:
            run(*arguments)
        except Exception as e:
            self._fail(f"{run.__name__}{arguments}: {type(e).__name__}: {e}")

    def _count(self, protocol: str) -> None:
        with self._lock:
            self.logins[protocol] += 1
            self.times[protocol].append(time.monotonic())

    def during(self, start: float, end: float) -> dict[str, int]:
        """
        How many logins of each protocol (and MX deliveries) succeeded
        between C{start} and C{end}.
        """
        with self._lock:
            return {kind: sum(1 for t in times if start <= t <= end) for kind, times in self.times.items()}

    def _refusedAtHold(self, protocol: str, account: str, answer: str) -> bool:
        """
        A login was refused or cut: with the proxy's C{moved} goodbye, it
        was under way when its account's hold began and did not finish
        within C{backend_timeout} (the hold then drops it; one that
        finishes gets its OK and the goodbye after it), which counts as a
        drop; anything else is a failure.

        @return: whether it was the hold's.
        """
        if "moved" in answer.lower():
            with self._lock:
                self.drops[f"{protocol} login"] += 1
            return True
        self._fail(f"{protocol} login of {account}: {answer}")
        return False

    def _fail(self, text: str) -> None:
        with self._lock:
            self.failures.append(text)

    def stop(self) -> None:
        """
        Stop every client and wait for them.
        """
        self._stop.set()
        with self._lock:
            for client in self._clients:
                try:
                    client.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        for thread in self._threads:
            thread.join(TIMEOUT)

    def _idle(self, account: str) -> None:
        while not self._stop.is_set():
            client = IMAPClient(self.proxy.imap)
            with self._lock:
                self._clients.append(client)
            try:
                client.connection.sendall(f'l LOGIN "{account}" "{PASSWORD}"\r\n'.encode())
                reply = []
                try:
                    while not reply or not reply[-1].startswith(b"l "):
                        reply.append(client.readLine())
                except EOFError:
                    if self._refusedAtHold("imap", account, repr(reply)):
                        continue
                    return
                if reply[-1].split()[1] != b"OK":
                    self._fail(f"IMAP login of {account}: {reply[-1]!r}")
                    return
                self._count("imap")
                client.command("SELECT INBOX")
                client.idle()
                lines = client.untilClosed()
            except OSError:
                if self._stop.is_set():
                    return
                raise
            finally:
                client.close()
            if self._stop.is_set():
                return
            if lines[-1:] != [MOVED_BYE]:
                self._fail(f"IMAP session of {account} ended without the moved goodbye: {lines[-3:]!r}")
                return
            self.drops["imap"] += 1

    def _pop3(self) -> None:
        while not self._stop.is_set():
            for account in self.accounts:
                if self._stop.is_set():
                    return
                client = poplib.POP3("127.0.0.1", self.proxy.pop3, timeout=TIMEOUT)
                try:
                    client.user(account)
                    client.pass_(PASSWORD)
                except poplib.error_proto as e:
                    client.close()
                    if self._refusedAtHold("pop3", account, str(e)):
                        continue
                    return
                self._count("pop3")
                try:
                    client.stat()
                    client.quit()
                except (poplib.error_proto, OSError) as e:
                    if "moved" not in str(e).lower():
                        self._fail(f"POP3 session of {account}: {e}")
                        return
                    self.drops["pop3"] += 1
                finally:
                    client.close()
                self._stop.wait(0.05)

    def _submission(self) -> None:
        context = ssl.create_default_context(cafile=self.proxy.caPath)
        while not self._stop.is_set():
            for account in self.accounts:
                if self._stop.is_set():
                    return
                client = smtplib.SMTP_SSL("127.0.0.1", self.proxy.submission, timeout=TIMEOUT, context=context)
                # One AUTH PLAIN (smtplib's login() would try the next
                # mechanism after a refusal, on a closed connection).
                client.user, client.password = account, PASSWORD
                try:
                    client.ehlo()
                    client.auth("PLAIN", client.auth_plain)
                except smtplib.SMTPResponseException as e:
                    client.close()
                    if self._refusedAtHold("submission", account, f"{e.smtp_code} {e.smtp_error!r}"):
                        continue
                    return
                self._count("submission")
                try:
                    code, text = client.noop()
                    if code == 421:
                        raise smtplib.SMTPResponseException(code, text)
                    client.quit()
                except (smtplib.SMTPException, OSError) as e:
                    if "moved" in str(e).lower():
                        self.drops["submission"] += 1
                    elif isinstance(e, (smtplib.SMTPServerDisconnected, ConnectionError)):
                        # The proxy's goodbye can be lost: the client writes
                        # after the proxy closed, and the reset that answers
                        # discards what the client had not read yet. The
                        # proxy's session-end event says whether it was the
                        # hold's drop (checked after the campaign).
                        with self._lock:
                            self.cut.append(account)
                    else:
                        self._fail(f"submission session of {account}: {e}")
                        return
                finally:
                    client.close()
                self._stop.wait(0.05)

    def _mx(self) -> None:
        number = 0
        while not self._stop.is_set():
            account = self.accounts[number % len(self.accounts)]
            number += 1
            messageId = f"<mx.{uuid.uuid4().hex}@example.com>"
            text = message(messageId, f"mid-campaign {number}")
            while True:
                try:
                    with smtplib.SMTP("127.0.0.1", self.proxy.mx, timeout=TIMEOUT) as client:
                        client.sendmail("sender@example.com", [account], text)
                    break
                except smtplib.SMTPResponseException as e:
                    if 400 <= e.smtp_code < 500:
                        # A temporary refusal: an MTA tries again.
                        self._stop.wait(0.2)
                        continue
                    self._fail(f"MX delivery to {account}: {e.smtp_code} {e.smtp_error!r}")
                    return
                except smtplib.SMTPRecipientsRefused as e:
                    codes = [code for code, _ in e.recipients.values()]
                    if all(400 <= code < 500 for code in codes):
                        self._stop.wait(0.2)
                        continue
                    self._fail(f"MX delivery to {account}: {e.recipients}")
                    return
            with self._lock:
                self.delivered[account].append(messageId)
                self.times["mx"].append(time.monotonic())
            self._stop.wait(0.1)


def waitFor(what: str, ready: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    """
    Poll C{ready} until it is true.

    @raise AssertionError: it was not within C{timeout} seconds.
    """
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


class CampaignTestsMixin:
    """
    The shared servers, and a proxy for each test class.
    """

    name = "campaign-proxy"
    migration = ""
    workers = 1

    def setUp(self) -> None:
        self.servers = sharedFixture("campaign servers", __name__, CampaignServers.start)
        self.proxy = sharedFixture("campaign proxy", type(self).__qualname__, self._startProxy)
        self.old, self.new = self.servers.dovecots["old"], self.servers.dovecots["new"]

    def _startProxy(self) -> CampaignProxy:
        proxy = CampaignProxy(self.servers, self.name, self.migration, self.workers)
        proxy.start()
        return proxy

    def assertMigrated(self: Any, account: str, before: dict[str, list[tuple[str, frozenset[str]]]], extra: list[str] = ()) -> None:
        """
        C{account} is routed to new, and new holds exactly what old held
        before (per folder, Message-IDs with their flags) plus the
        messages in C{extra} (delivered to its INBOX meanwhile), each once;
        old has nothing that new lacks; subscriptions and the Sieve script
        are on new too.
        """
        self.assertIn(f'"{account}" = "new"', self.proxy.routes())
        after = mailbox(self.new, account)
        self.assertEqual(set(after), set(before), account)
        for folder, messages in before.items():
            ids = Counter(messageId for messageId, _ in after[folder])
            expected = Counter(messageId for messageId, _ in messages)
            if folder == "INBOX":
                expected.update(extra)
            self.assertEqual(ids, expected, (account, folder))
            self.assertEqual(
                {m: f for m, f in after[folder] if m in dict(messages)}, dict(messages), (account, folder, "flags")
            )
        left = mailbox(self.old, account)
        for folder, messages in left.items():
            self.assertLessEqual({m for m, _ in messages}, {m for m, _ in after[folder]}, (account, folder, "left on old"))
        self.assertEqual(subscriptions(self.new, account), subscriptions(self.old, account), account)
        self.assertEqual(sieveScripts(self.new, account), sieveScripts(self.old, account), account)
        self.assertEqual(sieveScripts(self.new, account)[0], "filter ACTIVE")


class CampaignUnderLoadTests(CampaignTestsMixin, SynchronousTestCase):
    """
    A campaign with real clients working on the accounts it migrates.
    """

    def test_campaign(self) -> None:
        """
        C{mailproxy migrate ... --to new --concurrency 4}, while every
        account idles in IMAP and gets POP3 and submission logins and MX
        deliveries: every account ends on new with the same folders,
        messages (mail delivered mid-campaign included, each once), flags,
        subscriptions and active Sieve script; no login fails (sessions
        dropped at the hold reconnect and land on new); the command's plain
        output follows each account and ends with the outcome; the JSON
        log has each step of each account; C{/metrics} counts the
        campaign and passes C{promtool check metrics}.
        """
        before = {account: mailbox(self.old, account) for account in CAMPAIGN}
        load = Load(self.proxy, CAMPAIGN)
        load.start()
        self.addCleanup(load.stop)
        waitFor("every IMAP client to idle", lambda: load.failures or load.logins["imap"] >= len(CAMPAIGN))
        waitFor(
            "POP3, submission and MX traffic",
            lambda: load.failures or (load.logins["pop3"] and load.logins["submission"] and any(load.delivered.values())),
        )
        self.assertEqual(load.failures, [])
        started = time.monotonic()
        result = self.proxy.run("migrate", *CAMPAIGN, "--to", "new", "--concurrency", "4")
        finished = time.monotonic()
        seconds = finished - started
        # A little traffic after the flips, to the new home.
        time.sleep(1)
        load.stop()
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertEqual(load.failures, [])
        # A submission session cut without its goodbye was dropped by its
        # account's hold: the proxy ended one of the account's submission
        # sessions with the moved goodbye for each.
        dropped = Counter(
            event["user"]
            for event in self.proxy.events()
            if event.get("event") == "session_end" and event.get("protocol") == "smtp"
            and "moved" in str(event.get("reason", "")).lower()
        )
        for account, cuts in Counter(load.cut).items():
            self.assertGreaterEqual(dropped[account], cuts, (account, dict(dropped)))
        (self.proxy.directory / "campaign-output.txt").write_text(result.stdout)
        lines = result.stdout.splitlines()
        # The command looks once a second: a fast account may go from queued
        # to done between two looks; the first ones are seen copying, of
        # the totals counted on old once the engine has them.
        self.assertTrue(
            any(re.fullmatch(rf"{re.escape(CAMPAIGN[0])}: copying \((\d+/)?[\d,]+ messages, [\d.]+ \w?i?B(/[\d.]+ \w?i?B)?\)", l) for l in lines),
            lines,
        )
        for account in CAMPAIGN:
            self.assertTrue(any(re.fullmatch(rf"{re.escape(account)}: done \(\d+ messages, [\d.]+ \w?i?B\)", l) for l in lines), lines)
        self.assertRegex(lines[-1], rf"^migration \w+ done: {len(CAMPAIGN)}/{len(CAMPAIGN)} accounts migrated to new; \d+ messages, ")
        self.assertGreaterEqual(load.drops["imap"], len(CAMPAIGN))
        # The clients did work while the campaign ran: logins of each kind
        # and deliveries happened between its start and its end.
        during = load.during(started, finished)
        self.assertTrue(all(during.values()), during)

        # Every message MX accepted reached the account's mailbox: wait for
        # the Postfixes' queues, then compare.
        for postfix in self.servers.postfixes.values():
            postfix.flush()
        for account in CAMPAIGN:
            waitFor(
                f"{account}'s mail on new",
                lambda: set(load.delivered[account]) <= {m for m, _ in mailbox(self.new, account)["INBOX"]},
            )
            self.assertMigrated(account, before[account], load.delivered[account])

        events = [e for e in self.proxy.events() if e.get("event") in ("migration_step", "migration_account")]
        for account in CAMPAIGN:
            steps = [(e["step"], e["result"]) for e in events if e["account"] == account and e["event"] == "migration_step"]
            for step in ("copy", "hold", "sync", "verify", "flip"):
                self.assertIn((step, "ok"), steps, account)
            (end,) = [e for e in events if e["account"] == account and e["event"] == "migration_account"]
            self.assertEqual((end["result"], end["source"], end["target"], end["tool"]), ("done", "old", "new", "doveadm"))
        text, samples = metrics(self.proxy)
        self.assertEqual(sample(samples, "mailproxy_migrations_total", result="done"), len(CAMPAIGN))
        self.assertEqual(sample(samples, "mailproxy_migrations_in_flight"), 0)
        self.assertGreater(sample(samples, "mailproxy_migration_bytes_total"), BIG * len(CAMPAIGN))
        check = subprocess.run([_binary("promtool"), "check", "metrics"], input=text, capture_output=True, text=True)
        self.assertEqual((check.returncode, check.stdout, check.stderr), (0, "", ""))
        (self.proxy.directory / "campaign-figures.txt").write_text(
            f"accounts={len(CAMPAIGN)} big={BIG} seconds={seconds:.1f} logins={dict(load.logins)} during={during} "
            f"drops={dict(load.drops)} mx={sum(len(v) for v in load.delivered.values())} "
            f"bytes={sample(samples, 'mailproxy_migration_bytes_total')}\n"
        )


class KilledCampaignTests(CampaignTestsMixin, SynchronousTestCase):
    """
    A campaign whose proxy is killed (SIGKILL) half way.
    """

    name = "campaign-killed-proxy"

    def test_sigkill(self) -> None:
        """
        With some accounts migrated and others not, the proxy is killed and
        started again: it resumes from its journal, and the command that
        followed the campaign waits for the endpoint to come back and ends
        with every account migrated; no account was flipped twice (one
        move each in the log of both runs), none is left held (each logs
        in at once), and each holds its mail on new.
        """
        before = {account: mailbox(self.old, account) for account in KILLED}
        following = subprocess.Popen(
            self.proxy.command("migrate", *KILLED, "--to", "new", "--concurrency", "2"),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_environment(),
        )
        self.addCleanup(lambda: following.poll() is None and following.kill())
        campaignId: list[str] = []

        def someDone() -> bool:
            status, body = adminRequest(self.proxy, "/migrations")
            campaigns = json.loads(body)["migrations"] if status == 200 else []
            if not campaigns:
                return False
            campaignId[:] = [campaigns[-1]["id"]]
            return campaigns[-1]["done"] >= 1

        waitFor("a first account migrated", someDone, timeout=120)
        self.proxy.kill()
        flippedBeforeKill = self.proxy.routes().count('= "new"')
        self.assertLess(flippedBeforeKill, len(KILLED), "the campaign finished before the kill; nothing to resume")
        # Down for longer than the command's look at the campaign (every
        # second), as a restart by a service manager would be.
        time.sleep(2.5)
        self.proxy.start()
        out, err = following.communicate(timeout=300)
        self.assertEqual(following.returncode, 0, out + err)
        self.assertIn("waiting for it to come back", err)
        self.assertIn("the management endpoint is back", err)
        self.assertRegex(out.splitlines()[-1], rf"^migration {campaignId[0]} done: {len(KILLED)}/{len(KILLED)} accounts migrated")

        moves = [e for e in self.proxy.events() if e.get("event") == "move"]
        flips = Counter(key for e in moves for key in e["keys"])
        self.assertEqual(flips, Counter({account: 1 for account in KILLED}))
        resumed = [e for e in self.proxy.events() if "resuming" in e.get("message", "")]
        self.assertTrue(resumed, "the restarted proxy resumed nothing")
        for account in KILLED:
            client = IMAPClient(self.proxy.imap)
            self.addCleanup(client.close)
            client.connection.settimeout(5)
            self.assertEqual(client.command(f'LOGIN "{account}" "{PASSWORD}"')[-1].split()[1], b"OK", account)
            self.assertMigrated(account, before[account])
        self.assertEqual(self.proxy.campaign(campaignId[0])["state"], "done")


class RollbackTests(CampaignTestsMixin, SynchronousTestCase):
    """
    Rollback: the same command with the old backend as target.
    """

    name = "campaign-rollback-proxy"

    def test_back(self) -> None:
        """
        An account migrated to new, which gets mail and a flag change
        there, migrated back to old: old then has what new had (the new
        message, the flag), the route names old again, and a login lands on
        old.
        """
        before = mailbox(self.old, RETURNING)
        there = self.proxy.run("migrate", RETURNING, "--to", "new")
        self.assertEqual(there.returncode, 0, there.stdout + there.stderr)
        self.assertMigrated(RETURNING, before)
        self.new.doveadm("save", "-u", RETURNING, "-m", "INBOX", input=message("<while-on-new@example.com>", "on new"))
        self.new.doveadm("flags", "add", "-u", RETURNING, "\\Deleted", "mailbox", "Work", "uid", "1")
        back = self.proxy.run("migrate", RETURNING, "--to", "old")
        self.assertEqual(back.returncode, 0, back.stdout + back.stderr)
        self.assertRegex(back.stdout.splitlines()[-1], r"^migration \w+ done: 1/1 accounts migrated to old; ")
        self.assertIn(f'"{RETURNING}" = "old"', self.proxy.routes())
        self.assertEqual(mailbox(self.old, RETURNING), mailbox(self.new, RETURNING))
        (work,) = mailbox(self.old, RETURNING)["Work"]
        self.assertIn("\\Deleted", work[1])
        self.assertIn("<while-on-new@example.com>", [m for m, _ in mailbox(self.old, RETURNING)["INBOX"]])
        client = IMAPClient(self.proxy.imap)
        self.addCleanup(client.close)
        self.assertEqual(client.command(f'LOGIN "{RETURNING}" "{PASSWORD}"')[-1].split()[1], b"OK")
        _, body = adminRequest(self.proxy, f"/sessions?account={RETURNING}")
        self.assertEqual([s["backend"] for s in json.loads(body)["sessions"]], ["old"])


class OnLoginTests(CampaignTestsMixin, SynchronousTestCase):
    """
    C{[migration] on_login = "new"}.
    """

    name = "campaign-on-login-proxy"
    migration = 'on_login = "new"\n'

    def test_migratedAfterSessionCloses(self) -> None:
        """
        A login of an account on old starts its copy while the user works
        on: the session goes on without an error while the account waits
        for it to close; after LOGOUT the account is held, synced,
        verified and flipped, and the next login lands on new with the
        same mailbox.
        """
        before = mailbox(self.old, ROAMING)
        client = IMAPClient(self.proxy.imap)
        self.addCleanup(client.close)
        self.assertEqual(client.command(f'LOGIN "{ROAMING}" "{PASSWORD}"')[-1].split()[1], b"OK")

        def copied() -> bool:
            status, body = adminRequest(self.proxy, "/migrations/on-login-new")
            if status != 200:
                return False
            (job,) = json.loads(body)["accounts"]
            return job["state"] == "holding" or any(
                e.get("event") == "migration_step" and e["step"] == "copy" and e["result"] == "ok" for e in self.proxy.events()
            )

        waitFor("the copy while the user works", copied)
        # The user keeps working on old meanwhile, and sees no error.
        for command in ("SELECT INBOX", "UID FETCH 1:* (FLAGS)", "NOOP"):
            self.assertEqual(client.command(command)[-1].split()[1], b"OK", command)
        self.assertNotIn(f'"{ROAMING}" = "new"', self.proxy.routes())
        self.assertEqual(client.command("LOGOUT")[-1].split()[1], b"OK")
        client.close()
        waitFor("the flip", lambda: self.proxy.campaign("on-login-new")["accounts"][0]["state"] == "done")
        self.assertMigrated(ROAMING, before)
        again = IMAPClient(self.proxy.imap)
        self.addCleanup(again.close)
        self.assertEqual(again.command(f'LOGIN "{ROAMING}" "{PASSWORD}"')[-1].split()[1], b"OK")
        status, body = adminRequest(self.proxy, f"/sessions?account={ROAMING}")
        self.assertEqual([s["backend"] for s in json.loads(body)["sessions"]], ["new"])
        # An account nobody logs in as stays where it is.
        self.assertNotIn(STAYING, self.proxy.routes())
        self.assertEqual([e for e in self.proxy.events() if e.get("event") == "login_failed"], [])


class WorkersCampaignTests(CampaignTestsMixin, SynchronousTestCase):
    """
    A campaign run by a proxy with two worker processes: the parent runs
    it, and asks the workers which sessions each account has.
    """

    name = "campaign-workers-proxy"
    workers = 2

    def test_campaignWithSessionsInWorkers(self) -> None:
        """
        C{mailproxy migrate} of accounts idling in IMAP through the
        workers: at the hold each client gets the goodbye of a move, and
        every account ends on new with its mailbox.
        """
        before = {account: mailbox(self.old, account) for account in WORKED}
        clients = {}
        for account in WORKED:
            client = IMAPClient(self.proxy.imap)
            self.addCleanup(client.close)
            self.assertEqual(client.command(f'LOGIN "{account}" "{PASSWORD}"')[-1].split()[1], b"OK")
            client.idle()
            clients[account] = client
        _, body = adminRequest(self.proxy, "/sessions")
        self.assertEqual(sorted(s["account"] for s in json.loads(body)["sessions"]), sorted(WORKED))
        result = self.proxy.run("migrate", *WORKED, "--to", "new")
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertRegex(result.stdout.splitlines()[-1], rf"^migration \w+ done: {len(WORKED)}/{len(WORKED)} accounts migrated to new; ")
        for account, client in clients.items():
            self.assertEqual(client.untilClosed(), [MOVED_BYE], account)
            self.assertMigrated(account, before[account])
