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


#: The access log line of L{NginxWeb}: what the proxy told it about the
#: client, in the headers a reverse proxy sets.
WEB_LOG_FORMAT = (
    'remote=$remote_addr user="$remote_user" request="$request" status=$status '
    'xff="$http_x_forwarded_for" forwarded="$http_forwarded" '
    'proto="$http_x_forwarded_proto" host="$http_x_forwarded_host" real="$http_x_real_ip" '
    'proxied="$proxy_protocol_addr:$proxy_protocol_port"'
)


class NginxWeb:
    """
    nginx as an HTTP backend on loopback, as sites put it in front of their
    mail server's web services:

      - C{/jmap/eventsource/}: an endless-looking C{text/event-stream}
        (JMAP push, RFC 8620 section 7.3) whose events name this instance:
        a long file sent at a few octets a second. Debian's Cyrus 3.6 is
        built without wslay, and then answers its own event source with
        204 and offers no WebSocket: this stands in for the push a server
        built with it sends, as a real server's long-lived response;
      - C{/files/}: a WebDAV C{PUT}/C{GET}/C{DELETE} directory, bodies of
        any size;
      - everything else passed to C{upstream} (a Cyrus C{httpd}) when given,
        else 404.

    Its access log prints the forwarding headers each request carried, and
    on L{proxyPort} (which requires a PROXY protocol header first) the
    address that header gave.

    @ivar port: the port, chosen at L{start}.
    @ivar proxyPort: the same server behind a PROXY header, chosen at
        L{start}.
    @ivar filesPath: the directory behind C{/files/}.
    """

    port: int
    proxyPort: int

    def __init__(self, directory: str, name: str, upstream: int | None = None) -> None:
        """
        @param name: what its events and its C{X-Backend} header say.
        @param upstream: the port on 127.0.0.1 of the HTTP server behind
            it, if any.
        """
        self.directory = Path(directory)
        self.name = name
        self.upstream = upstream
        self.configPath = self.directory / "nginx.conf"
        self.logPath = self.directory / "error.log"
        self.accessLogPath = self.directory / "access.log"
        self.filesPath = self.directory / "files"
        self._process = None

    def configuration(self) -> str:
        """
        The text of C{nginx.conf}.
        """
        import os

        temporary = "".join(
            f"    {kind}_temp_path {self.directory}/tmp/{kind};\n"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        if self.upstream is not None:
            rest = (
                f"            proxy_pass http://127.0.0.1:{self.upstream};\n"
                "            proxy_http_version 1.1;\n"
                "            proxy_set_header Connection \"\";\n"
                "            proxy_set_header Host $http_host;\n"
                "            proxy_buffering off;\n"
                "            proxy_request_buffering off;\n"
            )
        else:
            rest = "            return 404;\n"
        return (
            # As root, the workers stay root: they read and write the
            # fixture's directory.
            ("user root root;\n" if os.geteuid() == 0 else "")
            + "daemon off;\n"
            "master_process on;\n"
            "worker_processes 1;\n"
            f"pid {self.directory}/nginx.pid;\n"
            f"error_log {self.logPath} info;\n"
            "events { worker_connections 512; }\n"
            "http {\n"
            f"    log_format forwarded '{WEB_LOG_FORMAT}';\n"
            f"    access_log {self.accessLogPath} forwarded;\n"
            + temporary
            + "    client_max_body_size 0;\n"
            "    sendfile off;\n"
            "    server {\n"
            f"        listen 127.0.0.1:{self.port};\n"
            f"        listen 127.0.0.1:{self.proxyPort} proxy_protocol;\n"
            f"        add_header X-Backend {self.name} always;\n"
            "        location ^~ /jmap/eventsource/ {\n"
            f"            root {self.directory};\n"
            "            try_files /events =404;\n"
            "            types { }\n"
            "            default_type text/event-stream;\n"
            # The headers and the first events at once, then a trickle.
            "            limit_rate_after 1k;\n"
            "            limit_rate 16;\n"
            "        }\n"
            "        location ^~ /files/ {\n"
            f"            root {self.directory};\n"
            "            dav_methods PUT DELETE;\n"
            "            create_full_put_path on;\n"
            "            types { }\n"
            "            default_type application/octet-stream;\n"
            "        }\n"
            "        location / {\n"
            + rest
            + "        }\n"
            "    }\n"
            "}\n"
        )

    def start(self) -> None:
        """
        Write the configuration and the event stream, start nginx and wait
        for its port.

        @raise RuntimeError: it did not come up; the message has its log.
        """
        requireServer("nginx")
        self.directory.mkdir(parents=True, exist_ok=True)
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (self.directory / "tmp" / kind).mkdir(parents=True, exist_ok=True)
        self.filesPath.mkdir(exist_ok=True)
        event = f'event: state\ndata: {{"@type":"StateChange","changed":{{}},"server":"{self.name}"}}\n\n'
        (self.directory / "events").write_text(event * 100000)
        startOnFreePorts(self._choosePort, self._run, self.logPath)

    def _choosePort(self) -> None:
        ports: set[int] = set()
        while len(ports) < 2:
            ports.add(freePort())
        self.port, self.proxyPort = sorted(ports)
        self.configPath.write_text(self.configuration())

    def _run(self) -> None:
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
            _waitForPorts(self._process, [self.port, self.proxyPort], timeout=20, describe="nginx", log=self.logPath)
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

    def accessLog(self) -> str:
        """
        The access log so far, one line per request (see
        L{WEB_LOG_FORMAT}).
        """
        try:
            return self.accessLogPath.read_text(errors="replace")
        except FileNotFoundError:
            return ""
