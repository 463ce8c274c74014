"""
Debian's nginx mail proxy (C{nginx} with C{libnginx-mod-mail}) as a test
fixture: the reference mailproxy's HTTP router is compared with, asking the
same C{auth_http} server.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

from .servers import _binary, _dieWithParent, _stopProcess, _waitForPorts, freePort, requireServer, startOnFreePorts

MAIL_MODULE = "/usr/lib/nginx/modules/ngx_mail_module.so"


class NginxMailProxy:
    """
    nginx proxying IMAP and POP3 (plain listeners) with C{auth_http}.

    @ivar imap: the IMAP port, chosen at L{start}.
    @ivar pop3: the POP3 port, chosen at L{start}.
    """

    imap: int
    pop3: int

    def __init__(self, directory: str, authURL: str, authHeaders: Mapping[str, str] = {}) -> None:
        """
        @param authURL: nginx's C{auth_http} value, e.g.
            C{127.0.0.1:9000/auth}.
        @param authHeaders: C{auth_http_header} names and values.
        """
        self.directory = Path(directory)
        self.authURL = authURL
        self.authHeaders = dict(authHeaders)
        self.configPath = self.directory / "nginx.conf"
        self.logPath = self.directory / "error.log"
        self._process = None

    def configuration(self) -> str:
        """
        The text of C{nginx.conf}.
        """
        headers = "".join(f"    auth_http_header {name} {value};\n" for name, value in self.authHeaders.items())
        return (
            f"load_module {MAIL_MODULE};\n"
            "daemon off;\n"
            "master_process on;\n"
            "worker_processes 1;\n"
            f"pid {self.directory}/nginx.pid;\n"
            f"error_log {self.logPath} info;\n"
            "events { worker_connections 512; }\n"
            "mail {\n"
            "    server_name mail.example.org;\n"
            f"    auth_http {self.authURL};\n"
            f"{headers}"
            "    auth_http_timeout 10s;\n"
            "    proxy_pass_error_message on;\n"
            "    imap_auth login plain cram-md5;\n"
            "    pop3_auth plain apop;\n"
            f"    server {{ listen 127.0.0.1:{self.imap}; protocol imap; }}\n"
            f"    server {{ listen 127.0.0.1:{self.pop3}; protocol pop3; }}\n"
            "}\n"
        )

    def start(self) -> None:
        """
        Write the configuration, start nginx and wait for its listeners.

        @raise RuntimeError: it did not come up; the message has its log.
        """
        requireServer("nginx")
        if not Path(MAIL_MODULE).exists():
            requireServer("libnginx-mod-mail (ngx_mail_module.so)")
        self.directory.mkdir(parents=True, exist_ok=True)
        startOnFreePorts(self._choosePorts, self._run, self.logPath)

    def _choosePorts(self) -> None:
        """
        Pick two distinct free ports and write the configuration.
        """
        ports: set[int] = set()
        while len(ports) < 2:
            ports.add(freePort())
        self.imap, self.pop3 = sorted(ports)
        self.configPath.write_text(self.configuration())

    def _run(self) -> None:
        """
        Run nginx and wait for its ports.

        @raise RuntimeError: it did not come up; the message has its log.
        """
        import subprocess

        with open(self.logPath, "ab") as log:
            self._process = subprocess.Popen(
                [_binary("nginx"), "-p", f"{self.directory}/", "-c", str(self.configPath), "-e", str(self.logPath)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_dieWithParent,
            )
        try:
            _waitForPorts(self._process, [self.imap, self.pop3], timeout=20, describe="nginx", log=self.logPath)
        except RuntimeError:
            _stopProcess(self._process)
            self._process = None
            raise

    def stop(self) -> None:
        """
        Stop nginx. Doing so twice is harmless.
        """
        if self._process is not None:
            _stopProcess(self._process)
            self._process = None

    def logText(self) -> str:
        """
        The error log so far (logins show as C{client login failed}).
        """
        try:
            return self.logPath.read_text(errors="replace")
        except FileNotFoundError:
            return ""
