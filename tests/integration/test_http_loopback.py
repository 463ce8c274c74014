"""
The HTTP front end against real web servers: two nginx instances ("old"
and "new", each serving a page that names it, a WebDAV directory that
takes PUT, and a path behind Basic authentication), the proxy on TLS in
front, and Python's C{http.client} as the client.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import os
import re
import ssl
import subprocess
import sys
import time
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from .common import TIMEOUT, listenerTable, routesText, staticProxyConfig, tomlTable
from .servers import (
    Proxy,
    TestCA,
    _binary,
    _dieWithParent,
    _stopProcess,
    _waitForPorts,
    freePort,
    requireServer,
    startOnFreePorts,
)

PASSWORDS = {"alice@example.org": "alice-pw", "bob@example.org": "bob-pw"}


class NginxWebServer:
    """
    nginx as an HTTP backend: C{/whoami} says its name, C{/dav/} takes PUT
    and serves what was put, C{/private/} asks for Basic credentials
    (realm C{nginx-NAME}); the access log shows the client address and the
    forwarding and credential headers each request arrived with.

    @ivar port: its port, chosen at L{start}.
    """

    port: int

    def __init__(self, directory: Path, name: str) -> None:
        self.directory = directory
        self.name = name
        self.logPath = directory / "error.log"
        self.accessPath = directory / "access.log"
        self._process: subprocess.Popen[bytes] | None = None

    def configuration(self) -> str:
        root = self.directory / "root"
        # Its files are the test's: workers of a root master must stay root
        # to read them (not nobody).
        user = "user root root;\n" if os.geteuid() == 0 else ""
        return (
            user + "daemon off;\nmaster_process on;\nworker_processes 1;\n"
            f"pid {self.directory}/nginx.pid;\nerror_log {self.logPath} info;\n"
            "events { worker_connections 256; }\n"
            "http {\n"
            "  log_format fwd escape=none '$remote_addr|$http_x_forwarded_for|$http_forwarded|$http_x_real_ip|"
            "$http_authorization|$request';\n"
            f"  access_log {self.accessPath} fwd;\n"
            f"  client_body_temp_path {self.directory}/body;\n"
            f"  proxy_temp_path {self.directory}/proxy;\n"
            f"  fastcgi_temp_path {self.directory}/fcgi;\n"
            f"  uwsgi_temp_path {self.directory}/uwsgi;\n"
            f"  scgi_temp_path {self.directory}/scgi;\n"
            "  server {\n"
            f"    listen 127.0.0.1:{self.port};\n"
            f"    root {root};\n"
            "    client_max_body_size 0;\n"
            "    location /dav/ { dav_methods PUT DELETE; create_full_put_path on; }\n"
            f"    location /private/ {{ auth_basic \"nginx-{self.name}\"; auth_basic_user_file {self.directory}/htpasswd; }}\n"
            "  }\n"
            "}\n"
        )

    def start(self) -> None:
        requireServer("nginx")
        root = self.directory / "root"
        (root / "dav").mkdir(parents=True, exist_ok=True)
        (root / "private").mkdir(exist_ok=True)
        (root / "whoami").write_text(self.name + "\n")
        (root / "private" / "index.html").write_text(f"private of {self.name}\n")
        lines = []
        for user, password in PASSWORDS.items():
            hashed = subprocess.run(
                [_binary("openssl"), "passwd", "-apr1", password], capture_output=True, check=True, text=True
            ).stdout.strip()
            lines.append(f"{user}:{hashed}\n")
        (self.directory / "htpasswd").write_text("".join(lines))
        startOnFreePorts(self._choosePort, self._run, self.logPath)

    def _choosePort(self) -> None:
        self.port = freePort()
        (self.directory / "nginx.conf").write_text(self.configuration())

    def _run(self) -> None:
        with open(self.logPath, "ab") as log:
            self._process = subprocess.Popen(
                [_binary("nginx"), "-p", f"{self.directory}/", "-c", str(self.directory / "nginx.conf"), "-e", str(self.logPath)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_dieWithParent,
            )
        try:
            _waitForPorts(self._process, [self.port], timeout=20, describe="nginx", log=self.logPath)
        except RuntimeError:
            _stopProcess(self._process)
            self._process = None
            raise

    def stop(self) -> None:
        if self._process is not None:
            _stopProcess(self._process)
            self._process = None

    def accessLines(self) -> list[str]:
        """
        The access log's lines so far (nginx writes each at once).
        """
        try:
            return self.accessPath.read_text().splitlines()
        except FileNotFoundError:
            return []


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def rss(pid: int) -> int:
    """
    The resident memory of process C{pid}, in octets.
    """
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


class _Pattern:
    """
    A readable stream of C{size} octets of a repeating pattern, hashed as
    it is read, so that the test holds no copy of it either.
    """

    def __init__(self, size: int) -> None:
        self.left = size
        self.digest = hashlib.sha256()
        self.block = bytes(range(256)) * 256

    def read(self, amount: int = 65536) -> bytes:
        data = self.block[: min(amount, self.left, len(self.block))]
        self.left -= len(data)
        self.digest.update(data)
        return data


class HTTPLoopbackTests(SynchronousTestCase):
    """
    The proxy between C{http.client} and two nginx backends.
    """

    def setUp(self) -> None:
        directory = Path(self.mktemp()).resolve()
        directory.mkdir(parents=True)
        self.old = NginxWebServer(directory / "old", "old")
        self.new = NginxWebServer(directory / "new", "new")
        for server in (self.old, self.new):
            server.directory.mkdir()
            server.start()
            self.addCleanup(server.stop)
        ca = TestCA(str(directory / "ca"))
        certificate, key = ca.issue("proxy")
        self.context = ssl.create_default_context(cafile=ca.caPath)
        dead = freePort()
        backends = {
            "old": {"host": "127.0.0.1", "ports": {"http": self.old.port}},
            "new": {"host": "127.0.0.1", "ports": {"http": self.new.port}},
            "dead": {"host": "127.0.0.1", "ports": {"http": dead}},
        }
        config = (
            staticProxyConfig(certificate, key, [listenerTable("http", 0, "implicit")], backends)
            + tomlTable("http", {"default_backend": "old", "pins": {"/login": "old"}})
            + tomlTable("admin", {"endpoint": "tcp:ADMINPORT:interface=127.0.0.1", "token_file": "admin.token"})
        )
        self.proxy = Proxy(str(directory / "proxy"), config)
        token = self.proxy.directory / "admin.token"
        token.write_text("http-test-token-" + "0" * 32 + "\n")
        token.chmod(0o600)
        (self.proxy.directory / "routes.toml").write_text(
            routesText({"default": "old", "accounts": {"bob@example.org": "new", "zed@example.org": "dead"}})
        )
        self.proxy.startWithAdminPort()
        self.addCleanup(self.proxy.stop)

    def client(self) -> http.client.HTTPSConnection:
        connection = http.client.HTTPSConnection("localhost", self.proxy.ports[0], context=self.context, timeout=TIMEOUT)
        self.addCleanup(connection.close)
        return connection

    def get(self, connection: http.client.HTTPSConnection, path: str, **headers: str) -> tuple[int, bytes, http.client.HTTPResponse]:
        connection.request("GET", path, headers=headers)
        response = connection.getresponse()
        return response.status, response.read(), response

    def test_routedByAccount(self) -> None:
        """
        Requests with Basic credentials reach the account's server (bob's on
        new, alice's on old) on one keep-alive connection each; a later
        request with only the cookie follows bob to new; a pinned path and
        a request without anything go to old.
        """
        connection = self.client()
        status, body, response = self.get(connection, "/whoami", Authorization=basic("bob@example.org", "bob-pw"))
        self.assertEqual((status, body), (200, b"new\n"))
        cookie = response.getheader("Set-Cookie")
        self.assertRegex(cookie, r"^mailproxy_backend=[^;]+; Path=/; Secure; HttpOnly; SameSite=Lax$")
        self.assertEqual(self.get(connection, "/private/", Authorization=basic("bob@example.org", "bob-pw"))[:2], (200, b"private of new\n"))
        other = self.client()
        self.assertEqual(self.get(other, "/whoami", Authorization=basic("alice@example.org", "alice-pw"))[:2], (200, b"old\n"))
        browser = self.client()
        self.assertEqual(self.get(browser, "/whoami", Cookie=cookie.split(";")[0])[:2], (200, b"new\n"))
        self.assertEqual(self.get(browser, "/login/whoami", Cookie=cookie.split(";")[0])[:2], (404, self.get(browser, "/login/whoami")[1]))
        self.assertEqual(self.get(self.client(), "/whoami")[:2], (200, b"old\n"))

    def test_backend401AndDead(self) -> None:
        """
        A wrong password gets the backend's own 401 (its realm); an account
        on a backend that does not listen gets 503 with Retry-After.
        """
        status, body, response = self.get(self.client(), "/private/", Authorization=basic("bob@example.org", "wrong"))
        self.assertEqual(status, 401)
        self.assertEqual(response.getheader("WWW-Authenticate"), 'Basic realm="nginx-new"')
        self.assertIn(b"401 Authorization Required", body)
        status, body, response = self.get(self.client(), "/", Authorization=basic("zed@example.org", "pw"))
        self.assertEqual((status, response.getheader("Retry-After")), (503, "5"))

    def test_forwarding(self) -> None:
        """
        The backend sees the client's address the proxy forwarded and none
        of the forwarding headers the client sent.
        """
        self.get(self.client(), "/whoami", **{"X-Forwarded-For": "6.6.6.6", "X-Real-IP": "6.6.6.6", "Forwarded": "for=6.6.6.6"})
        (line,) = [line for line in self.old.accessLines() if "/whoami" in line]
        address, forwardedFor, forwarded, realIP, _, request = line.split("|")
        self.assertEqual((address, forwardedFor, realIP), ("127.0.0.1", "127.0.0.1", ""))
        self.assertRegex(forwarded, r'^for="127\.0\.0\.1:\d+";proto=https;host="localhost:\d+"$')
        self.assertNotIn("6.6.6.6", line)

    def test_bigTransfers(self) -> None:
        """
        A 64 MB upload and its download through the proxy are
        byte-identical, and the proxy's memory grows by less than 20 MB:
        neither body sits in memory.
        """
        size = 64 * 1024 * 1024
        connection = self.client()
        before = rss(self.proxy.pid)
        upload = _Pattern(size)
        connection.request(
            "PUT", "/dav/blob", body=upload, headers={"Content-Length": str(size), "Authorization": basic("bob@example.org", "x")}
        )
        response = connection.getresponse()
        response.read()
        self.assertEqual(response.status, 201)
        self.assertEqual(os.path.getsize(self.new.directory / "root" / "dav" / "blob"), size)
        connection.request("GET", "/dav/blob", headers={"Authorization": basic("bob@example.org", "x")})
        response = connection.getresponse()
        downloaded = hashlib.sha256()
        received = 0
        while chunk := response.read(1 << 20):
            downloaded.update(chunk)
            received += len(chunk)
        self.assertEqual((response.status, received), (200, size))
        self.assertEqual(downloaded.hexdigest(), upload.digest.hexdigest())
        self.assertLess(rss(self.proxy.pid) - before, 20 * 1024 * 1024)

    def test_sessionLogged(self) -> None:
        """
        The proxy's session-end line names the protocol, the account and
        the backend.
        """
        connection = self.client()
        self.get(connection, "/whoami", Authorization=basic("bob@example.org", "bob-pw"))
        self.get(connection, "/whoami", Authorization=basic("bob@example.org", "bob-pw"))
        connection.close()
        deadline = time.monotonic() + TIMEOUT
        pattern = re.compile(r'end: http from 127\.0\.0\.1:\d+ user="bob@example\.org" backend=new result=ok')
        while time.monotonic() < deadline:
            if pattern.search(self.proxy.logPath.read_text()):
                break
            time.sleep(0.05)
        self.assertRegex(self.proxy.logPath.read_text(), pattern)
        self.assertNotIn("bob-pw", self.proxy.logPath.read_text())

    def test_moveDropsStream(self) -> None:
        """
        C{mailproxy move} of an account closes its connection in the middle
        of a long response, and its next request is served by its new home.
        """
        size = 64 * 1024 * 1024
        with open(self.new.directory / "root" / "dav" / "big", "wb") as f:
            f.truncate(size)
        connection = self.client()
        connection.request("GET", "/dav/big", headers={"Authorization": basic("bob@example.org", "x")})
        response = connection.getresponse()
        self.assertEqual(response.status, 200)
        response.read(1 << 20)
        environment = dict(os.environ)
        repository = str(Path(__file__).resolve().parent.parent.parent)
        environment["PYTHONPATH"] = os.pathsep.join(filter(None, [repository, environment.get("PYTHONPATH")]))
        moved = subprocess.run(
            [sys.executable, "-c", "import sys; from mailproxy.cli import main; sys.exit(main(sys.argv[1:]))",
             "move", "bob@example.org", "old", "--config", str(self.proxy.configPath)],
            capture_output=True, text=True, env=environment, timeout=TIMEOUT * 2,
        )
        self.assertEqual(moved.returncode, 0, moved.stderr)
        self.assertIn("1 open session dropped", moved.stdout)
        received = 1 << 20
        try:
            while chunk := response.read(1 << 20):
                received += len(chunk)
        except http.client.IncompleteRead as e:
            received += len(e.partial)
        self.assertLess(received, size)
        status, body, _ = self.get(self.client(), "/whoami", Authorization=basic("bob@example.org", "bob-pw"))
        self.assertEqual((status, body), (200, b"old\n"))
