"""
A private Postfix instance on loopback, as a fixture for the ESMTP tests.

Each instance has four listeners: C{submission} (SASL through a Dovecot
auth socket, STARTTLS offered), C{submissions} (implicit TLS, same SASL),
C{mx} (inbound mail, no AUTH) and C{mxProxy} (inbound mail behind a PROXY
v1/v2 header). Every listener lets 127.0.0.0/8 send XCLIENT. Mail for the
configured domains goes by LMTP to a Dovecot instance; nothing ever leaves
the machine (C{default_transport = error}, no DNS).

What Postfix's processes must reach (configuration, queue, maps) lives in a
short-named directory under the system's temporary directory, which the
C{postfix} user can traverse, linked from the fixture directory as
C{runtime}; the log (C{maillog}) is written there too by C{postlogd}.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Sequence

from .servers import TestCA, _accepts, _binary, _tail, freePort, requireServer, startOnFreePorts

#: The services Postfix needs besides the listeners (Debian's master.cf,
#: without chroot).
_SERVICES = """\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


class Postfix:
    """
    A private Postfix instance.

    The ports are attributes, chosen free at L{start}: C{submission},
    C{submissions}, C{mx} and C{mxProxy}.

    @ivar name: a short name, also the instance's C{myhostname} prefix
        (C{<name>.mx.test}) and C{syslog_name} suffix.
    """

    _PORT_NAMES = ("submission", "submissions", "mx", "mxProxy")

    submission: int
    submissions: int
    mx: int
    mxProxy: int

    def __init__(
        self,
        directory: str,
        name: str,
        *,
        domains: Sequence[str],
        mailboxes: Sequence[str],
        lmtpPort: int,
        saslPath: str,
        ca: TestCA,
        messageSizeLimit: int = 100 * 1024 * 1024,
        inetProtocols: str = "ipv4",
        extraMainCf: str = "",
    ) -> None:
        """
        @param domains: the domains it receives mail for.
        @param mailboxes: the addresses that exist in those domains.
        @param lmtpPort: the LMTP port on 127.0.0.1 that mail is delivered to.
        @param saslPath: the Dovecot auth socket for SASL on submission.
        @param ca: signs its certificate (for C{localhost} and 127.0.0.1).
        @param inetProtocols: its C{inet_protocols}: C{all} makes it take
            IPv6 addresses in XCLIENT (it listens on 127.0.0.1 only).
        @param extraMainCf: more C{main.cf} lines; a setting given again
            here replaces the fixture's (e.g. C{virtual_transport} for a
            benchmark that discards the mail).
        """
        self.directory = Path(directory)
        self.name = name
        self.domains = list(domains)
        self.mailboxes = list(mailboxes)
        self.lmtpPort = lmtpPort
        self.saslPath = saslPath
        self.messageSizeLimit = messageSizeLimit
        self.inetProtocols = inetProtocols
        self.extraMainCf = extraMainCf
        self._ca = ca
        self._runtime: Path | None = None
        self._running = False

    @property
    def hostname(self) -> str:
        """
        The name it greets with.
        """
        return f"{self.name}.mx.test"

    @property
    def logPath(self) -> Path:
        """
        Its log file (a copy in the fixture directory once stopped).
        """
        if self._runtime is None:
            return self.directory / "maillog"
        return self._runtime / "maillog"

    def ports(self) -> list[int]:
        """
        All the listening ports, once started.
        """
        return [getattr(self, name) for name in self._PORT_NAMES]

    def start(self) -> None:
        """
        Write the configuration, start Postfix and wait until every listener
        accepts connections.

        @raise RuntimeError: it did not come up; the message ends with the
            tail of its log.
        """
        requireServer("postfix", "postconf")
        self.directory.mkdir(parents=True, exist_ok=True)
        self._runtime = Path(tempfile.mkdtemp(prefix=f"postfix-{self.name}-"))
        try:
            self._runtime.chmod(0o755)
            (self.directory / "runtime").unlink(missing_ok=True)
            (self.directory / "runtime").symlink_to(self._runtime)
            etc = self._runtime / "etc"
            etc.mkdir()
            (self._runtime / "queue").mkdir()
            data = self._runtime / "data"
            data.mkdir()
            shutil.chown(data, "postfix")
            (etc / "mailboxes").write_text("".join(f"{mailbox} ok\n" for mailbox in self.mailboxes))
            certificate, key = self._ca.issue(f"postfix-{self.name}")
            shutil.copy(certificate, etc / "cert.pem")
            shutil.copy(key, etc / "key.pem")

            def choosePorts() -> None:
                ports: set[int] = set()
                while len(ports) < len(self._PORT_NAMES):
                    ports.add(freePort())
                for name, port in zip(self._PORT_NAMES, sorted(ports)):
                    setattr(self, name, port)
                (etc / "main.cf").write_text(self._mainCf())
                (etc / "master.cf").write_text(self._masterCf())

            def start() -> None:
                self._postfix("start")
                self._running = True
                self._waitForPorts(timeout=30)

            startOnFreePorts(choosePorts, start, self.logPath, undo=self._halt)
        except BaseException:
            self.stop()
            raise

    def _mainCf(self) -> str:
        runtime = self._runtime
        return f"""\
compatibility_level = 3.6
queue_directory = {runtime}/queue
data_directory = {runtime}/data
meta_directory = /etc/postfix
maillog_file = {runtime}/maillog
maillog_file_prefixes = {runtime}
syslog_name = postfix-{self.name}
inet_interfaces = 127.0.0.1
inet_protocols = {self.inetProtocols}
myhostname = {self.hostname}
mydestination =
mynetworks = 127.0.0.1/32
alias_maps =
alias_database =
smtp_dns_support_level = disabled
default_transport = error:this test server sends no mail off the machine
relay_transport = error:this test server relays nothing
virtual_mailbox_domains = {" ".join(self.domains)}
virtual_mailbox_maps = texthash:{runtime}/etc/mailboxes
virtual_transport = lmtp:inet:127.0.0.1:{self.lmtpPort}
message_size_limit = {self.messageSizeLimit}
mailbox_size_limit = 0
virtual_mailbox_limit = 0
smtpd_authorized_xclient_hosts = 127.0.0.0/8
smtpd_relay_restrictions = permit_sasl_authenticated, reject_unauth_destination
smtpd_sasl_type = dovecot
smtpd_sasl_path = {self.saslPath}
smtpd_tls_cert_file = {runtime}/etc/cert.pem
smtpd_tls_key_file = {runtime}/etc/key.pem
smtpd_tls_security_level = may
smtpd_tls_auth_only = no
smtpd_tls_loglevel = 1
""" + self.extraMainCf

    def _masterCf(self) -> str:
        submission = (
            "  -o smtpd_sasl_auth_enable=yes\n"
            "  -o smtpd_recipient_restrictions=permit_sasl_authenticated,reject\n"
        )
        return (
            f"127.0.0.1:{self.submission} inet n - n - - smtpd\n{submission}"
            f"127.0.0.1:{self.submissions} inet n - n - - smtpd\n{submission}"
            "  -o smtpd_tls_wrappermode=yes\n"
            f"127.0.0.1:{self.mx} inet n - n - - smtpd\n"
            f"127.0.0.1:{self.mxProxy} inet n - n - - smtpd\n"
            "  -o smtpd_upstream_proxy_protocol=haproxy\n"
            + _SERVICES
        )

    def _postfix(self, command: str) -> None:
        assert self._runtime is not None
        result = subprocess.run(
            [_binary("postfix"), "-c", str(self._runtime / "etc"), command],
            stdin=subprocess.DEVNULL,
            capture_output=True,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"postfix {command} failed ({result.returncode}):\n"
                + (result.stdout + result.stderr).decode("utf-8", "replace")
                + f"\n{self.logPath}:\n{_tail(self.logPath)}"
            )

    def _waitForPorts(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        waiting = self.ports()
        while waiting:
            if _accepts(waiting[0]):
                waiting.pop(0)
                continue
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"Postfix {self.name!r} is not listening on {waiting} after {timeout} s; "
                    f"{self.logPath}:\n{_tail(self.logPath)}"
                )
            time.sleep(0.05)

    def _masterPid(self) -> int | None:
        assert self._runtime is not None
        try:
            return int((self._runtime / "queue" / "pid" / "master.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def stop(self) -> None:
        """
        Stop Postfix, wait for its master to exit and remove its runtime
        directory. Doing so twice is harmless.
        """
        if self._runtime is None:
            return
        self._halt()
        # The log outlives the instance, for whoever reads a failure.
        if (self._runtime / "maillog").exists():
            shutil.copy(self._runtime / "maillog", self.directory / "maillog")
        shutil.rmtree(self._runtime, ignore_errors=True)
        self._runtime = None
        (self.directory / "runtime").unlink(missing_ok=True)

    def _halt(self) -> None:
        """
        Stop the Postfix processes, if running, and wait for the master to
        exit; the runtime directory stays.
        """
        if not self._running:
            return
        pid = self._masterPid()
        try:
            self._postfix("abort")
        except RuntimeError:
            pass
        deadline = time.monotonic() + 10
        while pid is not None and time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        self._running = False

    def logText(self) -> str:
        """
        The log's text so far.
        """
        try:
            return self.logPath.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def waitForLog(self, pattern: str, timeout: float = 30.0, start: int = 0) -> re.Match[str]:
        """
        Block until the log (from offset C{start}) matches C{pattern}.

        @raise AssertionError: it did not within C{timeout} seconds.
        """
        deadline = time.monotonic() + timeout
        compiled = re.compile(pattern, re.MULTILINE)
        while True:
            match = compiled.search(self.logText(), start)
            if match is not None:
                return match
            if time.monotonic() > deadline:
                raise AssertionError(f"no {pattern!r} in {self.logPath} after {timeout} s:\n{_tail(self.logPath)}")
            time.sleep(0.05)

    def flush(self) -> None:
        """
        Ask the queue manager to try deferred mail now.
        """
        self._postfix("flush")


def dovecotSASLConfig() -> str:
    """
    Dovecot settings (for L{servers.Dovecot}'s C{extraConfig}) that open
    an auth socket Postfix's smtpd can use for SASL: C{run/postfix-auth}
    under the instance's runtime directory.
    """
    return "service auth {\n  unix_listener postfix-auth {\n    mode = 0666\n  }\n}\n"
