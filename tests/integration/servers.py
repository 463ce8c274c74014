"""
Real servers as test fixtures: a test CA, private Dovecot instances and the
proxy itself, each a subprocess on loopback with its state in a directory.

Everything here blocks: the integration tests drive real clients against real
processes, so no reactor is involved on the test side.
"""

from __future__ import annotations

import atexit
import ctypes
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
from typing import Callable, Hashable, Protocol, Sequence, TypeVar
from unittest import SkipTest

_HERE = Path(__file__).resolve().parent
_REPOSITORY = _HERE.parent.parent
_SYSTEM_PATH = os.pathsep.join(["/usr/local/sbin", "/usr/sbin", "/sbin"])
_PR_SET_PDEATHSIG = 1


class Stoppable(Protocol):
    """
    A running fixture: something with a C{stop()}.
    """

    def stop(self) -> None:
        """
        Stop it; doing so twice is harmless.
        """


_F = TypeVar("_F", bound=Stoppable)


def freePort(host: str = "127.0.0.1") -> int:
    """
    A TCP port on C{host} that nobody listens on right now.

    The kernel picks it; another process could take it before the caller
    binds it, which callers that start servers handle by retrying.
    """
    with socket.socket(
        socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM
    ) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


#: Sockets bound for L{refusedPort}, open while the tests run.
_refusing: list[socket.socket] = []


def refusedPort(host: str = "127.0.0.1") -> int:
    """
    A TCP port on C{host} where connections are refused for as long as the
    test process runs: a socket is bound there and never listens, so no
    other process can take the port (as one could take a port that
    L{freePort} found free).
    """
    probe = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    probe.bind((host, 0))
    _refusing.append(probe)
    return int(probe.getsockname()[1])


def _which(binary: str) -> str | None:
    """
    The path of C{binary}, also looking in the sbin directories that a
    non-login shell may leave out of C{PATH}.
    """
    return shutil.which(
        binary, path=os.pathsep.join([os.environ.get("PATH", ""), _SYSTEM_PATH])
    )


def requireServer(*binaries: str) -> None:
    """
    Skip the calling test unless every one of C{binaries} is installed.

    In CI (C{CI=true}) a missing server is an error instead: there the test
    command installs the servers, so a skip would hide breakage.

    @raise SkipTest: a binary is missing outside CI.
    @raise RuntimeError: a binary is missing in CI.
    """
    missing = [binary for binary in binaries if _which(binary) is None]
    if not missing:
        return
    reason = f"not installed: {', '.join(missing)} (tests/run installs them)"
    if os.environ.get("CI") == "true":
        raise RuntimeError(reason)
    raise SkipTest(reason)


def _binary(name: str) -> str:
    """
    The path of an installed binary.

    @raise RuntimeError: it is not installed.
    """
    path = _which(name)
    if path is None:
        raise RuntimeError(f"{name} is not installed")
    return path


_prctl: Callable[..., int] | None
try:
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):
    _prctl = None


def _dieWithParent() -> None:
    """
    In a freshly forked child: ask Linux to send SIGTERM when the test
    process dies, so that a killed test run leaves no servers behind.
    """
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _tail(path: Path, lines: int = 40) -> str:
    """
    The last C{lines} lines of the file at C{path}, or a note that it is
    missing.
    """
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return f"({path} does not exist)"
    return "\n".join(text.splitlines()[-lines:])


def _accepts(port: int, host: str = "127.0.0.1") -> bool:
    """
    Whether something accepts TCP connections on C{host}:C{port}.
    """
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def _waitForPorts(
    process: subprocess.Popen[bytes],
    ports: Sequence[int],
    timeout: float,
    describe: str,
    log: Path,
) -> None:
    """
    Block until every port accepts connections.

    @raise RuntimeError: the process exited, or C{timeout} seconds passed;
        the message ends with the tail of C{log}.
    """
    deadline = time.monotonic() + timeout
    waiting = list(ports)
    while waiting:
        if process.poll() is not None:
            raise RuntimeError(
                f"{describe} exited with status {process.returncode} before "
                f"listening on {waiting}; {log}:\n{_tail(log)}"
            )
        if _accepts(waiting[0]):
            waiting.pop(0)
            continue
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"{describe} is not listening on {waiting} after {timeout} s; "
                f"{log}:\n{_tail(log)}"
            )
        time.sleep(0.05)


def _stopProcess(
    process: subprocess.Popen[bytes], pid: int | None = None, timeout: float = 10.0
) -> None:
    """
    Send SIGTERM (to C{pid}, by default the process's own), wait for the
    process to exit, and SIGKILL it after C{timeout} seconds.
    """
    if process.poll() is not None:
        return
    try:
        os.kill(pid if pid is not None else process.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def openDescriptors(pid: int) -> dict[str, str]:
    """
    What each open file descriptor of process C{pid} refers to, as
    C{/proc} names it (C{socket:[inode]}, C{pipe:[inode]}, a path...); a
    descriptor closed while they are read is left out.
    """
    targets = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            targets[fd] = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
    return targets


def startOnFreePorts(
    choosePorts: Callable[[], None],
    start: Callable[[], None],
    log: Path,
    undo: Callable[[], None] | None = None,
) -> None:
    """
    Start a server that must be told its ports. They are free when chosen
    but may be taken before the server binds them: when its log says so
    after a failed start, choose again and start again, three times in all.

    @param choosePorts: chooses the ports and writes the configuration.
    @param start: starts the server and waits until it listens.
    @param log: the server's log; only what a start adds to it is read.
    @param undo: what to do after a failed start before the next one.
    @raise RuntimeError: from C{start}, when it failed for another reason
        or on the last attempt.
    """
    for attempt in range(3):
        choosePorts()
        logged = log.stat().st_size if log.exists() else 0
        try:
            start()
            return
        except RuntimeError:
            try:
                with open(log, "rb") as file:
                    file.seek(logged)
                    said = file.read()
            except FileNotFoundError:
                said = b""
            if attempt == 2 or b"Address already in use" not in said:
                raise
        if undo is not None:
            undo()


class TestCA:
    """
    A certificate authority for tests, made with the C{openssl} command in a
    directory, and the leaf certificates it signs.

    @ivar caPath: the CA certificate (PEM): what clients should trust.
    """

    def __init__(self, directory: str) -> None:
        """
        Make a new CA key and self-signed certificate in C{directory}.
        """
        self._directory = Path(directory)
        self._directory.mkdir(parents=True, exist_ok=True)
        self._key = str(self._directory / "ca.key")
        self.caPath = str(self._directory / "ca.pem")
        self._openssl(
            "req", "-x509", "-new", "-nodes", "-days", "30",
            "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-keyout", self._key, "-out", self.caPath,
            "-subj", f"/CN=mailproxy test CA {self._directory.name}",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        )

    def _openssl(self, *arguments: str) -> None:
        """
        Run C{openssl} with C{arguments}.

        @raise RuntimeError: it failed; the message has its output.
        """
        result = subprocess.run(
            [_binary("openssl"), *arguments],
            stdin=subprocess.DEVNULL,
            capture_output=True,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"openssl {arguments[0]} failed:\n"
                + result.stderr.decode("utf-8", "replace")
            )

    def issue(
        self,
        name: str,
        names: Sequence[str] = ("localhost",),
        ips: Sequence[str] = ("127.0.0.1", "::1"),
    ) -> tuple[str, str]:
        """
        Sign a server certificate for C{names} and C{ips}.

        @param name: the files' base name in the CA's directory, and the
            certificate's common name.
        @return: the path of the certificate followed by the CA certificate
            (PEM, leaf first), and the path of its key.
        """
        base = self._directory / name
        key, request, leaf = (str(base.with_suffix(s)) for s in (".key", ".csr", ".crt"))
        chain = str(base.with_suffix(".pem"))
        extensions = base.with_suffix(".ext")
        alternatives = [f"DNS:{n}" for n in names] + [f"IP:{i}" for i in ips]
        extensions.write_text(
            "basicConstraints = critical, CA:FALSE\n"
            "keyUsage = critical, digitalSignature\n"
            "extendedKeyUsage = serverAuth\n"
            "subjectKeyIdentifier = hash\n"
            "authorityKeyIdentifier = keyid:always\n"
            f"subjectAltName = {', '.join(alternatives)}\n"
        )
        self._openssl(
            "req", "-new", "-nodes",
            "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-keyout", key, "-out", request, "-subj", f"/CN={name}",
        )
        self._openssl(
            "x509", "-req", "-in", request, "-days", "30",
            "-CA", self.caPath, "-CAkey", self._key, "-CAcreateserial",
            "-extfile", str(extensions), "-out", leaf,
        )
        Path(chain).write_bytes(Path(leaf).read_bytes() + Path(self.caPath).read_bytes())
        return chain, key


class Dovecot:
    """
    A private Dovecot instance on loopback.

    The configuration, the certificate and the log live in C{directory}.
    What Dovecot's unprivileged processes must reach (sockets, password
    files, mail) lives in a short-named private directory under the system's
    temporary directory, linked from C{directory/runtime}: unix socket paths
    are limited to about 100 bytes, and the C{mail} and C{dovecot} users
    cannot traverse a directory such as C{/root}.

    The ports are attributes, chosen free at L{start}: C{imap} (plain,
    STARTTLS offered), C{imaps} (implicit TLS), C{imapProxy} (requires a
    PROXY v1/v2 header first), C{pop3}, C{pop3s}, C{pop3Proxy} (PROXY header
    first), C{sieve}, C{sieveProxy} (PROXY header first) and C{lmtp}.
    """

    _instances = 0
    _PORT_NAMES = ("imap", "imaps", "imapProxy", "pop3", "pop3s", "pop3Proxy", "sieve", "sieveProxy", "lmtp")

    imap: int
    imaps: int
    imapProxy: int
    pop3: int
    pop3s: int
    pop3Proxy: int
    sieve: int
    sieveProxy: int
    lmtp: int

    def __init__(
        self,
        directory: str,
        name: str,
        users: dict[str, str],
        *,
        ca: TestCA,
        masterUser: tuple[str, str] | None = ("proxy", "masterpw"),
        extraConfig: str = "",
    ) -> None:
        """
        @param directory: where this instance keeps its files.
        @param name: a short name, part of C{instance_name} and file names.
        @param users: login name (C{user@domain}) to password.
        @param ca: signs the instance's certificate (for C{localhost},
            C{127.0.0.1} and C{::1}).
        @param masterUser: a master user's name and password, or L{None}.
        @param extraConfig: more Dovecot settings, appended to the
            configuration (e.g. C{service imap-login} tuning for benchmarks).
        """
        accounts = [*users.items(), *([masterUser] if masterUser else [])]
        for user, password in accounts:
            # passwd-file separates fields with ":" and entries with newlines.
            if re.search(r"[:\r\n]", user + password):
                raise ValueError(f"unusable test account {user!r}")
        self.directory = Path(directory)
        self.name = name
        self.users = dict(users)
        self._ca = ca
        self._masterUser = masterUser
        self._extraConfig = extraConfig
        self._process: subprocess.Popen[bytes] | None = None
        self._runtime: Path | None = None
        self.configPath = self.directory / "dovecot.conf"
        self.logPath = self.directory / "dovecot.log"

    def start(self) -> None:
        """
        Write the configuration, start Dovecot and wait until every port
        accepts connections.

        @raise RuntimeError: it did not come up; the message ends with the
            tail of its log.
        """
        requireServer("dovecot", "doveadm")
        self.directory.mkdir(parents=True, exist_ok=True)
        Dovecot._instances += 1
        instance = f"mailproxy-test-{os.getpid()}-{Dovecot._instances}-{self.name}"
        self._runtime = Path(tempfile.mkdtemp(prefix=f"dovecot-{self.name}-"))
        try:
            self._runtime.chmod(0o755)
            (self.directory / "runtime").unlink(missing_ok=True)
            (self.directory / "runtime").symlink_to(self._runtime)
            self._writeUsers()
            certificate, key = self._ca.issue(f"dovecot-{self.name}")

            def choosePorts() -> None:
                self._choosePorts()
                self.configPath.write_text(self._configuration(instance, certificate, key))

            startOnFreePorts(choosePorts, self._startProcess, self.logPath)
        except BaseException:
            self._removeRuntime()
            raise

    def ports(self) -> list[int]:
        """
        All the listening ports, once started.
        """
        return [getattr(self, name) for name in self._PORT_NAMES]

    def _choosePorts(self) -> None:
        """
        Pick a distinct free port for every listener.
        """
        ports: set[int] = set()
        while len(ports) < len(self._PORT_NAMES):
            ports.add(freePort())
        for name, port in zip(self._PORT_NAMES, ports):
            setattr(self, name, port)

    def _writeUsers(self) -> None:
        """
        Write the passwd-files of users and master users and create the
        mail directory, owned by Debian's C{mail} user.
        """
        assert self._runtime is not None
        (self._runtime / "passwd").write_text(
            "".join(f"{user}:{{PLAIN}}{password}::::::\n" for user, password in self.users.items())
        )
        masters = ""
        if self._masterUser is not None:
            masters = f"{self._masterUser[0]}:{{PLAIN}}{self._masterUser[1]}\n"
        (self._runtime / "masters").write_text(masters)
        mail = self._runtime / "mail"
        mail.mkdir()
        os.chown(mail, 8, 8)

    def _configuration(self, instance: str, certificate: str, key: str) -> str:
        """
        The text of C{dovecot.conf}: the template with its placeholders
        filled in.
        """
        values = {
            "INSTANCE": instance,
            "RUNTIME": str(self._runtime),
            "LOG": str(self.logPath),
            "CERT": certificate,
            "KEY": key,
            "IMAP": str(self.imap),
            "IMAPS": str(self.imaps),
            "IMAP_PROXY": str(self.imapProxy),
            "POP3": str(self.pop3),
            "POP3S": str(self.pop3s),
            "POP3_PROXY": str(self.pop3Proxy),
            "SIEVE": str(self.sieve),
            "SIEVE_PROXY": str(self.sieveProxy),
            "LMTP": str(self.lmtp),
            "EXTRA": self._extraConfig,
        }
        template = (_HERE / "dovecot.conf.in").read_text()
        return re.sub(r"@([A-Z0-9_]+)@", lambda match: values[match.group(1)], template)

    def _startProcess(self) -> None:
        """
        Run Dovecot in the foreground as a child of the test process and
        wait for its ports.
        """
        # Dovecot's own early errors (a bad configuration) go to standard
        # error, not to log_path.
        with open(self.logPath, "ab") as log:
            self._process = subprocess.Popen(
                [_binary("dovecot"), "-F", "-c", str(self.configPath)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_dieWithParent,
            )
        try:
            _waitForPorts(
                self._process,
                self.ports(),
                timeout=20,
                describe=f"Dovecot {self.name!r}",
                log=self.logPath,
            )
        except RuntimeError:
            _stopProcess(self._process)
            self._process = None
            raise

    def stop(self) -> None:
        """
        Stop Dovecot (by the pid in its C{master.pid}), wait for it to exit
        and remove its runtime directory. Doing so twice is harmless.
        """
        if self._process is not None:
            pid = None
            assert self._runtime is not None
            try:
                pid = int((self._runtime / "run" / "master.pid").read_text().strip())
            except (OSError, ValueError):
                pass
            _stopProcess(self._process, pid)
            self._process = None
        self._removeRuntime()

    def _removeRuntime(self) -> None:
        """
        Remove the runtime directory and the link to it.
        """
        if self._runtime is not None:
            shutil.rmtree(self._runtime, ignore_errors=True)
            self._runtime = None
        (self.directory / "runtime").unlink(missing_ok=True)

    def doveadm(self, *arguments: str, input: bytes = b"") -> bytes:
        """
        Run C{doveadm} against this instance.

        @return: its standard output.
        @raise RuntimeError: it failed; the message has its output.
        """
        result = subprocess.run(
            [_binary("doveadm"), "-c", str(self.configPath), *arguments],
            input=input,
            capture_output=True,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"doveadm {' '.join(arguments)} failed ({result.returncode}):\n"
                + (result.stdout + result.stderr).decode("utf-8", "replace")
            )
        return result.stdout

    def deliver(self, user: str, message: bytes) -> None:
        """
        Store C{message} (RFC 5322 bytes) in C{user}'s INBOX.
        """
        self.doveadm("save", "-u", user, "-m", "INBOX", input=message)

    def indexAll(self) -> None:
        """
        Build every user's mailbox indexes now, so that a first login (in a
        benchmark) is not slowed down by building them.
        """
        self.doveadm("index", "-A", "*")

    def logText(self) -> str:
        """
        The log's text so far (login lines show C{user=<...>}, C{rip=...}).
        """
        try:
            return self.logPath.read_text(errors="replace")
        except FileNotFoundError:
            return ""


class Redis:
    """
    A private C{redis-server} on a free loopback port, its state (no
    persistence: nothing is saved) and log in a directory. It can be
    stopped and started again on the same port, as a Redis that goes away
    and returns.

    @ivar port: its port, once started.
    """

    def __init__(
        self, directory: str, tls: tuple[str, str, str] | None = None, password: str | None = None
    ) -> None:
        """
        @param tls: the certificate (chain), key and CA files: it then
            speaks TLS only (C{rediss://}), on the same port.
        @param password: AUTH is then required.
        """
        self.tls = tls
        self.password = password
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.logPath = self.directory / "redis.log"
        self.pidPath = self.directory / "redis.pid"
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """
        Start it (on a free port the first time, on the same port after
        L{stop}) and wait until it accepts connections.
        """
        if self.port:
            self._start()
            return

        def choosePort() -> None:
            self.port = freePort()

        startOnFreePorts(choosePort, self._start, self.logPath)

    def _start(self) -> None:
        arguments = ["--port", str(self.port)]
        if self.tls is not None:
            certificate, key, ca = self.tls
            arguments = [
                "--port", "0", "--tls-port", str(self.port), "--tls-cert-file", certificate,
                "--tls-key-file", key, "--tls-ca-cert-file", ca, "--tls-auth-clients", "no",
            ]
        if self.password is not None:
            arguments += ["--requirepass", self.password]
        self._process = subprocess.Popen(
            [
                _binary("redis-server"), *arguments, "--bind", "127.0.0.1",
                "--dir", str(self.directory), "--save", "", "--appendonly", "no",
                "--pidfile", str(self.pidPath), "--logfile", str(self.logPath), "--daemonize", "no",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=_dieWithParent,
        )
        try:
            _waitForPorts(self._process, [self.port], timeout=20, describe="redis-server", log=self.logPath)
        except RuntimeError:
            _stopProcess(self._process)
            self._process = None
            raise

    def stop(self) -> None:
        """
        Stop it (by the pid in its pid file) and wait. Doing so twice is
        harmless.
        """
        if self._process is not None:
            pid = None
            try:
                pid = int(self.pidPath.read_text().strip())
            except (OSError, ValueError):
                pass
            _stopProcess(self._process, pid)
            self._process = None

    def cli(self, *arguments: str) -> str:
        """
        Run C{redis-cli} against it; its output.
        """
        options = ["-p", str(self.port)]
        if self.tls is not None:
            options += ["--tls", "--cacert", self.tls[2]]
        if self.password is not None:
            options += ["--no-auth-warning", "-a", self.password]
        return subprocess.run(
            [_binary("redis-cli"), *options, *arguments],
            check=True, capture_output=True, timeout=10,
        ).stdout.decode()


def withOneWorker(text: str) -> str:
    """
    A proxy configuration with C{[proxy] workers = 1} unless it says how
    many workers to run.

    The suite's proxies run as one process (the default would be one
    worker per CPU): what they test is the same code a worker runs, their
    logs come out in order, and a hundred proxies started by the suite
    cost one process each on a small test machine; the tests of worker
    processes (test_workers) say how many they want.
    """
    if re.search(r"^workers\s*=", text, re.MULTILINE):
        return text
    if re.search(r"^\[proxy\]", text, re.MULTILINE):
        return re.sub(r"^\[proxy\][^\n]*\n", lambda m: m.group(0) + "workers = 1\n", text, count=1, flags=re.MULTILINE)
    return "[proxy]\nworkers = 1\n" + text


class Proxy:
    """
    The proxy (C{twistd mailproxy}) as a subprocess, with its configuration,
    log and standard error in a directory.

    Listeners and the management endpoint may listen on port 0: the proxy
    logs the port the kernel chose, and L{start} reads it from the log, so
    no port has to be guessed free beforehand.

    @ivar pid: the process id, once started.
    @ivar ports: the port of each C{[[listener]]}, in order, once started.
    @ivar adminPort: the management endpoint's port, once started, if any.
    @ivar environment: more environment variables for the proxy.
    @ivar passFds: descriptors the proxy inherits (see L{subprocess.Popen}).
    @ivar returncode: its exit status, once stopped.
    """

    pid: int
    ports: list[int]
    adminPort: int | None

    #: The proxy's log line for a listening endpoint.
    _LISTENING = re.compile(r"\] (listener\[(\d+)\]|admin) .*listening on \S+:(\d+)$", re.MULTILINE)

    def __init__(self, directory: str, configText: str) -> None:
        """
        Write C{configText} to C{config.toml} in C{directory}.
        """
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.configPath = self.directory / "config.toml"
        self.configPath.write_text(configText)
        self.logPath = self.directory / "proxy.log"
        self._stderrPath = self.directory / "proxy.stderr"
        self._process: subprocess.Popen[bytes] | None = None
        self.environment: dict[str, str] = {}
        self.passFds: tuple[int, ...] = ()
        self.returncode: int | None = None

    def command(self) -> list[str]:
        """
        The command line that runs the proxy in the foreground: the
        C{twistd} installed next to the running Python.
        """
        twistd = str(Path(sys.executable).parent / "twistd")
        return [
            twistd, "-n", "--pidfile=", f"--logfile={self.logPath}",
            "mailproxy", "--config", str(self.configPath),
        ]

    def startWithAdminPort(self) -> None:
        """
        Start a proxy whose management endpoint is C{tcp:ADMINPORT:...} in
        its configuration, on a free port written there (commands such as
        C{mailproxy move} read the port from the configuration, so it cannot
        be 0), and on another one if that was taken meanwhile.
        """
        chosen = 0

        def choose() -> None:
            nonlocal chosen
            old, chosen = chosen, freePort()
            text = self.configPath.read_text()
            self.configPath.write_text(text.replace(f"tcp:{old or 'ADMINPORT'}:", f"tcp:{chosen}:"))

        choose()
        self.start(choosePorts=choose)

    def start(self, waitPorts: Sequence[int] = (), choosePorts: Callable[[], None] | None = None) -> None:
        """
        Start the proxy, wait until it has logged where each listener (and
        the management endpoint) listens, and until every one of
        C{waitPorts} accepts connections.

        @param choosePorts: for a configuration that names ports (not 0),
            called to choose them again and rewrite the configuration when
            one was taken before the proxy could bind it; the start is then
            tried again, three times in all.
        @raise RuntimeError: it exited or did not listen in time; the
            message ends with the tail of its log and standard error.
        """
        for attempt in range(3 if choosePorts is not None else 1):
            try:
                self._start(waitPorts)
                return
            except RuntimeError as error:
                if choosePorts is None or attempt == 2 or "Address already in use" not in str(error):
                    raise
                choosePorts()

    def _start(self, waitPorts: Sequence[int]) -> None:
        """
        Start the proxy once; see L{start}.
        """
        text = withOneWorker(self.configPath.read_text())
        self.configPath.write_text(text)
        listeners = len(re.findall(r"^\[\[listener\]\]", text, re.MULTILINE))
        admin = re.search(r"^\[admin\]", text, re.MULTILINE) is not None
        logged = self.logPath.stat().st_size if self.logPath.exists() else 0
        environment = dict(os.environ)
        # The checkout's mailproxy and twisted/plugins come first, whether or
        # not the package is installed in this virtualenv.
        environment["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(_REPOSITORY), environment.get("PYTHONPATH")])
        )
        environment.update(self.environment)
        with open(self._stderrPath, "ab") as stderr:
            self._process = subprocess.Popen(
                self.command(),
                cwd=self.directory,
                env=environment,
                pass_fds=self.passFds,
                stdin=subprocess.DEVNULL,
                stdout=stderr,
                stderr=subprocess.STDOUT,
                preexec_fn=_dieWithParent,
            )
        self.pid = self._process.pid
        try:
            self._readPorts(logged, listeners, admin, timeout=30)
            _waitForPorts(
                self._process, waitPorts, timeout=30, describe="the proxy", log=self.logPath
            )
        except RuntimeError as error:
            _stopProcess(self._process)
            raise RuntimeError(
                f"{error}\n{self._stderrPath}:\n{_tail(self._stderrPath)}"
            ) from None

    def _readPorts(self, offset: int, listeners: int, admin: bool, timeout: float) -> None:
        """
        Wait until the log, from C{offset} on, names the port of each of
        C{listeners} listeners (and of the management endpoint if
        C{admin}); set L{ports} and L{adminPort}.

        @raise RuntimeError: the proxy exited, or C{timeout} seconds passed.
        """
        assert self._process is not None
        deadline = time.monotonic() + timeout
        while True:
            try:
                with open(self.logPath, "rb") as log:
                    log.seek(offset)
                    added = log.read().decode("utf-8", "replace")
            except FileNotFoundError:
                added = ""
            found: dict[int, int] = {}
            adminPort = None
            for match in self._LISTENING.finditer(added):
                if match.group(2) is not None:
                    found[int(match.group(2))] = int(match.group(3))
                else:
                    adminPort = int(match.group(3))
            if len(found) == listeners and (adminPort is not None or not admin):
                self.ports = [found[index] for index in range(listeners)]
                self.adminPort = adminPort
                return
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"the proxy exited with status {self._process.returncode} before listening; "
                    f"{self.logPath}:\n{_tail(self.logPath)}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(f"the proxy is not listening after {timeout} s; {self.logPath}:\n{_tail(self.logPath)}")
            time.sleep(0.05)

    def stop(self) -> None:
        """
        Stop the proxy with SIGTERM and wait; SIGKILL it if it has not
        exited after ten seconds. Doing so twice is harmless.
        """
        if self._process is not None:
            _stopProcess(self._process)
            self.returncode = self._process.returncode
            self._process = None

    def running(self) -> bool:
        """
        Whether the proxy process is still alive.
        """
        return self._process is not None and self._process.poll() is None

    def logText(self) -> str:
        """
        The proxy's log so far.
        """
        try:
            return self.logPath.read_text(errors="replace")
        except FileNotFoundError:
            return ""


class _SharedFixtures:
    """
    Fixtures that consecutive tests share, one live fixture per slot.

    Trial has no C{setUpClass}; instead a test asks for a slot's fixture by
    key (e.g. the slot C{"proxy"} keyed by the test class). The fixture is
    made on the first request and handed out while requests carry the same
    key; a request with another key stops it and makes the new one, and the
    last ones are stopped when the test process exits. A fixture that failed
    to start fails every request for its key at once, instead of making
    every test wait for the same failure again.
    """

    def __init__(self) -> None:
        self._live: dict[str, tuple[Hashable, Stoppable | BaseException]] = {}

    def get(self, slot: str, key: Hashable, make: Callable[[], _F]) -> _F:
        """
        The fixture in C{slot} for C{key}, made by C{make()} if needed.
        """
        if slot in self._live and self._live[slot][0] == key:
            fixture = self._live[slot][1]
            if isinstance(fixture, BaseException):
                raise fixture.with_traceback(None)
            return fixture  # type: ignore[return-value]
        self.release(slot)
        try:
            made = make()
        except Exception as error:
            self._live[slot] = (key, error)
            raise
        self._live[slot] = (key, made)
        return made

    def release(self, slot: str) -> None:
        """
        Stop the fixture in C{slot}, if there is one.
        """
        _, fixture = self._live.pop(slot, (None, None))
        if fixture is not None and not isinstance(fixture, BaseException):
            fixture.stop()

    def releaseAll(self) -> None:
        """
        Stop every live fixture, the most recently made first.
        """
        for slot in reversed(list(self._live)):
            self.release(slot)


_shared = _SharedFixtures()
atexit.register(_shared.releaseAll)


def sharedFixture(slot: str, key: Hashable, make: Callable[[], _F]) -> _F:
    """
    A fixture shared by consecutive tests that ask for C{slot} with the same
    C{key}: made by C{make()} on first use, stopped when a test asks for the
    slot with another key, or when the test process exits.
    """
    return _shared.get(slot, key, make)


def fixtureDirectory(name: str) -> str:
    """
    A new directory for a shared fixture's files, under C{fixtures} in the
    working directory (trial's C{_trial_temp}).
    """
    parent = Path("fixtures").resolve()
    parent.mkdir(exist_ok=True)
    return tempfile.mkdtemp(prefix=f"{name}-", dir=parent)
