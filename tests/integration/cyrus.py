"""
A private Cyrus IMAP 3.6 server (Debian's C{cyrus-common} and
C{cyrus-caldav}) as a test fixture: C{master} with an C{lmtpd} and an
C{httpd} carrying JMAP, CalDAV and CardDAV, on free loopback ports, its
state in a temporary directory, passwords in a sasldb file.
"""

from __future__ import annotations

import base64
import getpass
import http.client
import json
import os
import pwd
import shutil
import smtplib
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Mapping, Sequence

from .servers import (
    _HERE,
    _binary,
    _dieWithParent,
    _stopProcess,
    _waitForPorts,
    freePort,
    requireServer,
    startOnFreePorts,
)

#: Where Debian installs the Cyrus services (master finds them there too).
CYRUS_BIN = Path("/usr/lib/cyrus/bin")


class Cyrus:
    """
    Cyrus C{master} on 127.0.0.1 with an LMTP and an HTTP service.

    No IMAP service: Debian's C{cyrus-imapd} conflicts with
    C{dovecot-imapd} (both provide C{imap-server}), which the other tests
    need; C{lmtpd} and C{httpd} come from C{cyrus-common} and
    C{cyrus-caldav}, which install beside Dovecot.

    Cyrus keeps mailboxes, databases and unix sockets in its configuration
    directory, which its services must reach as the C{cyrus} user: the
    state lives in a private directory under the system's temporary
    directory, owned by that user when the tests run as root (C{master}
    switches to it), linked from C{directory/runtime}. Run by another user,
    Cyrus runs as that user (C{CYRUS_USER}).

    The configuration files live there too (C{runtime/imapd.conf},
    C{runtime/cyrus.conf}): every service reads C{imapd.conf}.

    Users log in as C{user@domain} (virtual domains).

    @ivar lmtp: the LMTP port (no authentication), chosen at
        L{start}.
    @ivar http: the HTTP port (plain): C{/jmap/}, C{/dav/}, chosen at
        L{start}.
    @ivar users: login name to password.
    """

    lmtp: int
    http: int
    configPath: Path
    servicesPath: Path

    def __init__(
        self,
        directory: str,
        name: str,
        users: Mapping[str, str],
        reuseProcesses: bool = False,
        jwtKey: bytes | None = None,
    ) -> None:
        """
        @param directory: where this instance keeps its configuration and
            log.
        @param name: a short name, its C{servername} (C{name.example.org},
            the realm of its C{WWW-Authenticate}) and part of file names.
        @param users: login name (C{user@domain}) to password.
        @param reuseProcesses: let a service process serve one connection
            after another (Cyrus's default, for benchmarks) instead of one
            process per connection; see L{provision} for why not by default.
        @param jwtKey: an HMAC key: C{httpd} then also accepts
            C{Authorization: Bearer} with a JWT signed with it (HS256, its
            C{sub} the account).
        """
        self.directory = Path(directory)
        self.name = name
        self.users = dict(users)
        self.reuseProcesses = reuseProcesses
        self.jwtKey = jwtKey
        self.logPath = self.directory / "master.log"
        self._runtime: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def servername(self) -> str:
        """
        The name Cyrus gives itself (its greetings, the HTTP realm).
        """
        return f"{self.name}.example.org"

    def start(self) -> None:
        """
        Write the configuration and the password database, start C{master}
        and wait until both services accept connections.

        @raise RuntimeError: it did not come up; the message ends with the
            tail of its log.
        """
        requireServer(str(CYRUS_BIN / "master"), str(CYRUS_BIN / "lmtpd"), str(CYRUS_BIN / "httpd"), "saslpasswd2")
        self.directory.mkdir(parents=True, exist_ok=True)
        self._runtime = Path(tempfile.mkdtemp(prefix=f"cyrus-{self.name}-"))
        self.configPath = self._runtime / "imapd.conf"
        self.servicesPath = self._runtime / "cyrus.conf"
        try:
            for sub in ("conf", "spool", "sieve", "socket", "jwt"):
                (self._runtime / sub).mkdir()
            if self.jwtKey is not None:
                (self._runtime / "jwt" / "hmac.pem").write_text(
                    f"-----BEGIN HMAC KEY-----\n{base64.b64encode(self.jwtKey).decode()}\n-----END HMAC KEY-----\n"
                )
            (self.directory / "runtime").unlink(missing_ok=True)
            (self.directory / "runtime").symlink_to(self._runtime)
            self._writePasswords()
            self._own()
            startOnFreePorts(self._choosePorts, self._run, self.logPath)
        except BaseException:
            self._removeRuntime()
            raise

    def _writePasswords(self) -> None:
        """
        Write every user's password into the sasldb.
        """
        assert self._runtime is not None
        for user, password in self.users.items():
            # -p reads the password from standard input, -c creates the
            # entry; the realm is the part after "@", as Cyrus asks for it.
            done = subprocess.run(
                [_binary("saslpasswd2"), "-p", "-c", "-f", str(self._runtime / "sasldb2"), user],
                input=password.encode(),
                capture_output=True,
            )
            if done.returncode != 0:
                raise RuntimeError(f"saslpasswd2 {user} failed: {done.stderr.decode(errors='replace')}")

    def _own(self) -> None:
        """
        As root, hand the state to the C{cyrus} user (and the C{mail}
        group), which Cyrus switches to.
        """
        assert self._runtime is not None
        if os.geteuid() != 0:
            return
        account = pwd.getpwnam("cyrus")
        for path in [self._runtime, *self._runtime.rglob("*")]:
            os.chown(path, account.pw_uid, account.pw_gid)
        self._runtime.chmod(0o750)

    def _choosePorts(self) -> None:
        """
        Pick two distinct free ports and write the configuration.
        """
        assert self._runtime is not None
        ports: set[int] = set()
        while len(ports) < 2:
            ports.add(freePort())
        self.lmtp, self.http = sorted(ports)
        values = {
            "RUNTIME": str(self._runtime),
            "SERVERNAME": self.servername,
            "CONFIG": str(self.configPath),
            "LMTP": str(self.lmtp),
            "HTTP": str(self.http),
            "USES": "" if self.reuseProcesses else "-U 1",
            "JWT": f"http_jwt_key_dir: {self._runtime / 'jwt'}" if self.jwtKey is not None else "",
        }
        for template, path in (("cyrus-imapd.conf.in", self.configPath), ("cyrus.conf.in", self.servicesPath)):
            text = (_HERE / template).read_text()
            for key, value in values.items():
                text = text.replace(f"@{key}@", value)
            path.write_text(text)

    def _run(self) -> None:
        """
        Run C{master} in the foreground and wait for its ports.
        """
        environment = dict(os.environ)
        if os.geteuid() != 0:
            environment["CYRUS_USER"] = getpass.getuser()
        with open(self.logPath, "ab") as log:
            # -D: stay a child of the tests. Cyrus logs to syslog; what it
            # prints (fatal errors) lands in the log file.
            self._process = subprocess.Popen(
                [
                    str(CYRUS_BIN / "master"), "-D", "-C", str(self.configPath),
                    "-M", str(self.servicesPath), "-p", str(self.directory / "master.pid"),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=environment,
                preexec_fn=_dieWithParent,
            )
        try:
            _waitForPorts(
                self._process, [self.lmtp, self.http], timeout=30, describe=f"cyrus {self.name}", log=self.logPath
            )
        except RuntimeError:
            _stopProcess(self._process)
            self._process = None
            raise

    def stop(self) -> None:
        """
        Stop C{master} (which stops its services) and remove the state.
        Doing so twice is harmless.
        """
        if self._process is not None:
            _stopProcess(self._process)
            self._process = None
        self._removeRuntime()

    def _removeRuntime(self) -> None:
        if self._runtime is not None:
            shutil.rmtree(self._runtime, ignore_errors=True)
            (self.directory / "runtime").unlink(missing_ok=True)
            self._runtime = None

    def running(self) -> bool:
        """
        Whether C{master} is alive.
        """
        return self._process is not None and self._process.poll() is None

    def baseURL(self) -> str:
        """
        The URL of its HTTP service, without a trailing slash.
        """
        return f"http://127.0.0.1:{self.http}"

    def provision(self, user: str, *messages: bytes, mailboxes: Sequence[str] = ()) -> None:
        """
        Create C{user}'s account with everything Cyrus creates on first use:
        the INBOX (C{messages} delivered over LMTP), C{mailboxes} (JMAP
        C{Mailbox/set}), the calendars and address book (a CalDAV and a
        CardDAV C{PROPFIND}); then wait for the next second.

        Cyrus 3.6 as Debian builds it (without libuuid) names each new
        mailbox with C{rand()}, seeded from the clock's second (C{srand}
        with the time and process id, in each new process): two accounts
        created in the same second get the same mailbox ids, and so share
        one INBOX. One account a second, all made here, avoids that.
        """
        self.deliver(user, *messages)
        if mailboxes:
            create = {f"m{index}": {"name": name, "parentId": None} for index, name in enumerate(mailboxes)}
            call = ["Mailbox/set", {"accountId": user, "create": create}, "c"]
            answer = self._request(user, "POST", "/jmap/", json.dumps(
                {"using": ["urn:ietf:params:jmap:core", "urn:ietf:params:jmap:mail"], "methodCalls": [call]}
            ).encode())
            created = json.loads(answer)["methodResponses"][0][1].get("created", {})
            if len(created) != len(mailboxes):
                raise RuntimeError(f"Mailbox/set for {user}: {answer[:300]!r}")
        self._request(user, "PROPFIND", f"/dav/calendars/user/{user}/")
        self._request(user, "PROPFIND", f"/dav/addressbooks/user/{user}/")
        time.sleep(1 - time.time() % 1 + 0.01)

    def _request(self, user: str, method: str, path: str, body: bytes | None = None) -> bytes:
        """
        One request to C{httpd} as C{user}; the body of its 2xx answer.
        """
        authorization = "Basic " + base64.b64encode(f"{user}:{self.users[user]}".encode()).decode()
        headers = {"Authorization": authorization, "Depth": "1"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        connection = http.client.HTTPConnection("127.0.0.1", self.http, timeout=30)
        try:
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            answer = response.read()
        finally:
            connection.close()
        if not 200 <= response.status < 300:
            raise RuntimeError(f"{method} {path} for {user}: {response.status} {response.reason}")
        return answer

    def deliver(self, user: str, *messages: bytes) -> None:
        """
        Deliver C{messages} (RFC 5322 bytes) to C{user}'s INBOX over LMTP
        (the first delivery creates the account).
        """
        client = smtplib.LMTP("127.0.0.1", self.lmtp, timeout=30)
        try:
            for message in messages:
                refused = client.sendmail("postmaster@example.org", [user], message)
                if refused:
                    raise RuntimeError(f"LMTP delivery to {user} refused: {refused!r}")
            client.quit()
        finally:
            client.close()
