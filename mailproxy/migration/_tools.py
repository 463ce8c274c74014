"""
The sync tools a migration runs, as subprocesses that never block the
reactor, and what they are given.

Two tools copy an account's mail from its current backend to the target:

  - Dovecot's C{doveadm backup -R -u ACCOUNT imapc:} (its documented
    migration path; INBOX with C{sync -1}, see L{doveadmCommands}), for a
    target that is a Dovecot whose configuration
    this host can read: doveadm runs I{as} the target (C{-c} its
    configuration, which reaches its mail storage and its auth service)
    and reads the source over IMAP (C{imapc}) as the source's master user
    on the account's behalf, so no user password is needed.  Folders,
    subscriptions, flags, keywords, internal dates and UIDs are kept.
    The settings doveadm needs for imapc, the master password among them,
    are in a private configuration file (mode 0600) that includes the
    target's own and is removed after the run: a password on doveadm's
    command line (C{-o imapc_password=...}) would be visible in C{ps}.

    Why not run doveadm elsewhere: C{doveadm backup -S host:port} (a
    doveadm server) and C{doveadm sync tcp:host:port} reach a remote
    Dovecot, but the former runs the command with the I{server's}
    settings: the client's imapc settings, and so the source's address
    and master password, are not passed along (Dovecot 2.3.19 answers
    "Mailbox list driver imapc: missing imapc_host"); they would have to
    be written into the target's configuration for every source.  The
    latter needs a local mail storage and a userdb on the proxy host for
    the other side.  Neither is
    something an operator can run from a proxy host without changing the
    mail servers.  So doveadm is used where the target's configuration is
    local (the proxy on the mail server, or run where the operator runs
    the campaign); every other target gets mbsync.

  - C{mbsync} (Debian's isync) for any other target: it needs only IMAP
    on both sides and logs in to both as their master users
    (C{ACCOUNT<separator>MASTER} with LOGIN).  It keeps folders, flags
    and internal dates (C{CopyArrivalDate}), not UIDs; the engine copies
    the subscriptions itself, which mbsync does not.  Its state (which
    message is which message's copy) is kept per account and pair of
    backends, so that the final delta sync, a retry and a migration back
    transfer only what changed.  Its configuration (with the two master
    passwords) is a private file too.

Every secret given to a tool is removed from what it printed before any of
it reaches a log, an error or an exception: see L{scrub}.
"""

from __future__ import annotations

import os
import shlex
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from typing import Any
from urllib.parse import quote

from attrs import frozen
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

from ..model import Backend

__all__ = [
    "ToolResult",
    "ToolFailed",
    "runProcess",
    "scrub",
    "excerpt",
    "doveadmConfiguration",
    "doveadmCommands",
    "mbsyncConfiguration",
    "mbsyncStateName",
    "mbsyncCommand",
    "PrivateDirectory",
    "TOOLS",
]

#: The sync tools the engine knows.
TOOLS = ("doveadm", "mbsync")

#: How much of a tool's output is kept (its end: where the errors are).
OUTPUT_LIMIT = 64 * 1024

#: How many characters of a tool's error output an error message quotes.
EXCERPT_LIMIT = 600

#: The exit status with which doveadm's sync asks to be run again.
EX_TEMPFAIL = 75

#: How many times a doveadm run that asks for it is run in a row.
TEMPFAIL_RUNS = 3

#: What a secret is replaced with.
HIDDEN = "********"


@frozen
class ToolResult:
    """
    How a tool run ended.

    @ivar code: its exit status, or L{None} if a signal ended it.
    @ivar signal: the signal that ended it, if any.
    @ivar stdout: the end of its standard output.
    @ivar stderr: the end of its standard error.
    """

    code: int | None
    signal: int | None
    stdout: bytes
    stderr: bytes

    @property
    def ok(self) -> bool:
        """
        Whether it exited with status 0.
        """
        return self.code == 0


class ToolFailed(Exception):
    """
    A tool failed; C{str(error)} names it and quotes its error output,
    already scrubbed of secrets.
    """


def scrub(text: str, secrets: Iterable[bytes | str | None]) -> str:
    """
    C{text} with every one of C{secrets} replaced by L{HIDDEN}.
    """
    for secret in secrets:
        if not secret:
            continue
        value = secret.decode("utf-8", "replace") if isinstance(secret, bytes) else secret
        text = text.replace(value, HIDDEN)
    return text


def excerpt(output: bytes, secrets: Iterable[bytes | str | None], limit: int = EXCERPT_LIMIT) -> str:
    """
    The end of a tool's output as one line of text for an error message:
    the last C{limit} characters, secrets removed, lines joined with
    C{" | "}.
    """
    text = scrub(output.decode("utf-8", "replace"), secrets)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    # Dovecot's errors say what went wrong; a panic that may follow them
    # (doveadm 2.3 asserts after a failed imapc login) and its backtrace
    # do not.
    errors = [
        line
        for line in lines
        if ("Error:" in line or "Fatal:" in line) and "Raw backtrace" not in line and "Panic:" not in line
    ]
    if errors:
        lines = errors
    joined = " | ".join(lines)
    if len(joined) > limit:
        joined = "..." + joined[-limit:]
    return joined


class _Collector(ProcessProtocol):
    """
    Keeps the end of a process's output and fires a Deferred with a
    L{ToolResult} when it ends.
    """

    def __init__(self, done: Deferred[ToolResult]) -> None:
        self.done = done
        self.out = bytearray()
        self.err = bytearray()

    def _keep(self, buffer: bytearray, data: bytes) -> None:
        buffer += data
        if len(buffer) > OUTPUT_LIMIT:
            del buffer[: len(buffer) - OUTPUT_LIMIT]

    def outReceived(self, data: bytes) -> None:
        self._keep(self.out, data)

    def errReceived(self, data: bytes) -> None:
        self._keep(self.err, data)

    def processEnded(self, reason: Failure) -> None:
        code: int | None = 0
        signal: int | None = None
        if isinstance(reason.value, ProcessTerminated):
            code = reason.value.exitCode
            signal = reason.value.signal
        elif not reason.check(ProcessDone):
            code = None
        if not self.done.called:
            self.done.callback(ToolResult(code, signal, bytes(self.out), bytes(self.err)))


def runProcess(reactor: Any, argv: Sequence[str], env: dict[str, str], timeout: float) -> Deferred[ToolResult]:
    """
    Run C{argv} as a subprocess (through the reactor: nothing blocks) with
    standard input closed.

    @param env: its whole environment.
    @param timeout: seconds after which it is killed and the Deferred
        fails with L{twisted.internet.defer.TimeoutError}.
    @return: fires with a L{ToolResult} when it ended; cancelling it kills
        the process.
    """
    processes: list[Any] = []

    def kill(_: object) -> None:
        for process in processes:
            try:
                process.signalProcess("KILL")
            except Exception:
                # It ended meanwhile.
                pass

    done: Deferred[ToolResult] = Deferred(kill)
    collector = _Collector(done)
    process = reactor.spawnProcess(collector, argv[0], list(argv), env=env)
    processes.append(process)
    process.closeStdin()
    return done.addTimeout(timeout, reactor)


def _environment() -> dict[str, str]:
    """
    The environment a tool runs with: a search path and the C locale, and
    nothing of the proxy's own environment (which may hold secrets).
    """
    return {"PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"), "LANG": "C", "LC_ALL": "C"}


def _dovecotValue(value: str) -> str:
    """
    C{value} quoted for a Dovecot configuration file; C{%} is doubled so
    that Dovecot does not expand it as a variable.
    """
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%")
    return f'"{escaped}"'


def doveadmConfiguration(source: Backend, targetConfig: str) -> str:
    """
    The text of the private Dovecot configuration doveadm runs with: the
    target's configuration, and the imapc settings to read C{source} as its
    master user.

    doveadm reads this file as the user that starts it, but opens the
    source's CA file (C{ssl_client_ca_file}) after switching to the mail
    user: that file must be readable by the mail user (as C{/etc/ssl} is).

    @raise ValueError: C{source} has no master user or no IMAP port.
    """
    _checkMaster(source)
    assert source.masterUser is not None and source.masterPassword is not None
    if any(c in targetConfig for c in "\r\n"):
        raise ValueError(f"unusable Dovecot configuration path {targetConfig!r}")
    ssl = {"none": "no", "starttls": "starttls", "implicit": "imaps"}[source.tlsFor("imap")]
    lines = [
        "# Written by mailproxy for one migration run; removed after it.",
        # !include takes the path as it is (a quoted path is a glob that
        # matches nothing).
        f"!include {targetConfig}",
        f"imapc_host = {_dovecotValue(source.host)}",
        f"imapc_port = {source.port('imap')}",
        "imapc_user = %u",
        f"imapc_master_user = {_dovecotValue(source.masterUser)}",
        f"imapc_password = {_dovecotValue(source.masterPassword.decode('utf-8', 'surrogateescape'))}",
        f"imapc_ssl = {ssl}",
        f"imapc_ssl_verify = {'yes' if source.verify else 'no'}",
        # The sizes and headers imapc would otherwise fetch one by one, and
        # the modification sequences dsync needs to see flag changes.
        "imapc_features = rfc822.size fetch-headers modseq",
        "mail_prefetch_count = 20",
    ]
    if source.caFile:
        lines.append(f"ssl_client_ca_file = {_dovecotValue(source.caFile)}")
    elif ssl != "no":
        lines.append("ssl_client_ca_dir = /etc/ssl/certs")
    return "\n".join(lines) + "\n"


def doveadmCommands(doveadm: str, configPath: str, account: str) -> list[list[str]]:
    """
    @param doveadm: the command, split like a shell would: it may start
        with a wrapper (C{"sudo -n doveadm"}), as doveadm must run as a user
        that may read the target's configuration and switch to its mail
        user, which the proxy's own user usually may not.

    The command lines of a doveadm copy, run one after the other: the
    target (the local side) is brought to what the source (imapc) has, in
    both the bulk and the delta run.

    Every mailbox but INBOX with C{backup} (an exact copy: mail, flags,
    expunges, folders and subscriptions; a mailbox the target has with
    another UIDVALIDITY is made again).  INBOX with a one-way C{sync -1}:
    the target always has an INBOX already (a rollback, an account that
    once logged in there) and Dovecot 2.3's C{backup} fails on it ("INBOX
    can't be deleted"); the one-way sync brings new mail, flag changes
    and expunges from the source, and leaves a message that only the
    target ever had, which the verify step then reports.
    """
    return [
        [*shlex.split(doveadm), "-c", configPath, "backup", "-R", "-x", "INBOX", "-u", account, "imapc:"],
        [*shlex.split(doveadm), "-c", configPath, "sync", "-1", "-R", "-m", "INBOX", "-u", account, "imapc:"],
    ]


def _mbsyncValue(value: str) -> str:
    """
    C{value} quoted for an mbsync configuration file.
    """
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def _checkMaster(backend: Backend) -> None:
    """
    @raise ValueError: C{backend} has no master user, or one that cannot
        be written on one line of a configuration file (the message does
        not quote it).
    """
    if backend.masterUser is None or backend.masterPassword is None:
        raise ValueError(f"backend {backend.name!r} has no master_user and master_password")
    if any(c in backend.masterUser.encode() + backend.masterPassword for c in b"\r\n\0"):
        raise ValueError(f"the master user or password of backend {backend.name!r} has a line break or NUL")


def _mbsyncAccount(name: str, backend: Backend, account: str) -> list[str]:
    _checkMaster(backend)
    assert backend.masterUser is not None and backend.masterPassword is not None
    mode = {"none": "None", "starttls": "STARTTLS", "implicit": "IMAPS"}[backend.tlsFor("imap")]
    lines = [
        f"IMAPAccount {name}",
        f"Host {backend.host}",
        f"Port {backend.port('imap')}",
        f"User {_mbsyncValue(account + backend.masterSeparator + backend.masterUser)}",
        f"Pass {_mbsyncValue(backend.masterPassword.decode('utf-8', 'surrogateescape'))}",
        f"SSLType {mode}",
        "AuthMechs LOGIN",
    ]
    if backend.caFile:
        lines.append(f"CertificateFile {_mbsyncValue(backend.caFile)}")
    lines += ["", f"IMAPStore {name}", f"Account {name}", ""]
    return lines


def mbsyncStateName(source: Backend, target: Backend) -> str:
    """
    The name of the directory of mbsync's state between two backends, the
    same whichever is the source: a migration back uses the pairs of
    messages that the migration there recorded.
    """
    far, near = sorted((source.name, target.name))
    # Escaped: a backend's name may hold "+" or "/" (no two pairs share a
    # directory, and none is elsewhere).
    return f"{quote(far, safe='')}+{quote(near, safe='')}"


def mbsyncConfiguration(source: Backend, target: Backend, account: str, stateDirectory: str) -> str:
    """
    The text of the private mbsync configuration: one channel that makes
    the target's folders of C{account} a copy of the source's (new
    messages, flags and deletions go from source to target only).

    mbsync's state pairs each message on one side with its copy on the
    other, and a later run copies only what changed since; a message it
    has not paired is copied, even when the other side holds a copy from
    elsewhere.  So the channel has the same two sides whichever way an
    account moves (the backend whose name sorts first is its far side),
    and a migration back, or again after one that failed, syncs the
    other way (C{Push} instead of C{Pull}) with the same state, in
    C{stateDirectory} (see L{mbsyncStateName}).

    @raise ValueError: a backend has no master user or no IMAP port.
    """
    if source.name <= target.name:
        far, near, sync, changed = "source", "target", "Pull", "Near"
    else:
        far, near, sync, changed = "target", "source", "Push", "Far"
    lines = [
        "# Written by mailproxy for one migration; removed after it.",
        "",
        *_mbsyncAccount("source", source, account),
        *_mbsyncAccount("target", target, account),
        "Channel migrate",
        f"Far :{far}:",
        f"Near :{near}:",
        "Patterns *",
        f"Create {changed}",
        f"Remove {changed}",
        f"Expunge {changed}",
        f"Sync {sync}",
        "CopyArrivalDate yes",
        f"SyncState {_mbsyncValue(stateDirectory.rstrip('/') + '/')}",
        "",
    ]
    return "\n".join(lines)


def mbsyncCommand(mbsync: str, configPath: str) -> list[str]:
    """
    The command line of an mbsync copy.
    """
    return [*shlex.split(mbsync), "-c", configPath, "migrate"]


def toolEnvironment(home: str) -> dict[str, str]:
    """
    The environment every tool runs with; C{home} is its C{HOME} (mbsync
    insists on one), the account's private directory.
    """
    return {**_environment(), "HOME": home}


class PrivateDirectory:
    """
    A directory only this user can read, for one account's tool files
    (configurations with passwords, mbsync's state).  Its methods block:
    call them in a thread.
    """

    def __init__(self, parent: str, prefix: str) -> None:
        os.makedirs(parent, mode=0o700, exist_ok=True)
        self.path = tempfile.mkdtemp(prefix=prefix, dir=parent)

    def write(self, name: str, text: str) -> str:
        """
        Write C{text} to a new file C{name} (mode 0600) and return its path.
        """
        path = os.path.join(self.path, name)
        if os.path.exists(path):
            os.unlink(path)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w", encoding="utf-8", errors="surrogateescape") as file:
            file.write(text)
        return path

    def remove(self) -> None:
        """
        Remove the directory and everything in it.
        """
        shutil.rmtree(self.path, ignore_errors=True)
