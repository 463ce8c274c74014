"""
nginx's mail proxy as a benchmark subprocess: the reference to compare
mailproxy with.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent
_PR_SET_PDEATHSIG = 1


def _dieWithParent() -> None:
    """
    In a freshly forked child: have Linux send SIGTERM when the benchmark
    dies, so that nothing is left running.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def _freePort() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


class Nginx:
    """
    nginx (Debian's C{nginx} with C{libnginx-mod-mail}) proxying IMAP to one
    backend, with C{auth_http} answered by nginx itself.

    @ivar plain: port of the plain listener (no STARTTLS offered).
    @ivar starttls: port of the listener offering STARTTLS.
    @ivar ssl: port of the implicit TLS listener.
    @ivar pid: the master process id, once started.
    """

    plain: int
    starttls: int
    ssl: int
    pid: int

    def __init__(
        self,
        directory: str,
        backendPort: int,
        certificate: str,
        key: str,
        *,
        workers: int = 1,
        proxyBuffer: str = "4k",
        logLevel: str = "info",
    ) -> None:
        """
        @param directory: where nginx keeps its configuration and log.
        @param backendPort: the plain IMAP port of the backend on 127.0.0.1.
        @param certificate: PEM chain, leaf first.
        @param key: PEM key of C{certificate}.
        @param workers: C{worker_processes}.
        @param proxyBuffer: C{proxy_buffer} (nginx's default is 4k).
        @param logLevel: C{error_log} level; C{info} logs every session as
            mailproxy does.
        """
        self.directory = Path(directory)
        self.backendPort = backendPort
        self.certificate = certificate
        self.key = key
        self.workers = workers
        self.proxyBuffer = proxyBuffer
        self.logLevel = logLevel
        self.configPath = self.directory / "nginx.conf"
        self.logPath = self.directory / "error.log"
        self._process: subprocess.Popen[bytes] | None = None

    def configuration(self, authPort: int) -> str:
        """
        The text of C{nginx.conf}.
        """
        values = {
            "DIR": str(self.directory),
            "WORKERS": str(self.workers),
            "LOG_LEVEL": self.logLevel,
            "AUTH_PORT": str(authPort),
            "BACKEND_PORT": str(self.backendPort),
            "PROXY_BUFFER": self.proxyBuffer,
            "CERT": self.certificate,
            "KEY": self.key,
            "PLAIN_PORT": str(self.plain),
            "STARTTLS_PORT": str(self.starttls),
            "SSL_PORT": str(self.ssl),
        }
        template = (_HERE / "nginx.conf.in").read_text()
        return re.sub(r"@([A-Z0-9_]+)@", lambda match: values[match.group(1)], template)

    def start(self) -> None:
        """
        Write the configuration, start nginx and wait for its listeners.

        @raise RuntimeError: it did not come up; the message has its log.
        """
        binary = shutil.which("nginx", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
        if binary is None:
            raise RuntimeError("nginx is not installed (nginx, libnginx-mod-mail)")
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / "tmp").mkdir(exist_ok=True)
        ports: set[int] = set()
        while len(ports) < 4:
            ports.add(_freePort())
        authPort, self.plain, self.starttls, self.ssl = sorted(ports)
        self.configPath.write_text(self.configuration(authPort))
        with open(self.logPath, "ab") as log:
            self._process = subprocess.Popen(
                [binary, "-p", f"{self.directory}/", "-c", str(self.configPath),
                 "-e", str(self.logPath)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_dieWithParent,
            )  # fmt: skip
        self.pid = self._process.pid
        deadline = time.monotonic() + 20
        for port in (authPort, self.plain, self.starttls, self.ssl):
            while not _accepts(port):
                if self._process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(
                        f"nginx is not listening on {port}; {self.logPath}:\n"
                        + self.logPath.read_text(errors="replace")[-3000:]
                    )
                time.sleep(0.05)

    def stop(self) -> None:
        """
        Stop nginx and wait for it to exit. Doing so twice is harmless.
        """
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
