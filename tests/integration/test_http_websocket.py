"""
WebSocket (RFC 6455, and JMAP over WebSocket of RFC 8887) through the HTTP
front end: two backends ("old" and "new", each a C{websockets} server run
by C{wsbackend.py}), the proxy on a plain HTTP listener with the static
router (alice on old), and the C{websockets} client.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect
from websockets.typing import Subprotocol

from .common import TIMEOUT, listenerTable, routesText, tomlTable
from .servers import Proxy, _dieWithParent, _stopProcess, _waitForPorts, freePort, startOnFreePorts

ALICE = "alice@example.org"


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


class WebSocketBackend:
    """
    C{wsbackend.py NAME PORT} as a subprocess.

    @ivar port: its port, chosen at L{start}.
    """

    port: int

    def __init__(self, directory: Path, name: str) -> None:
        self.name = name
        self.logPath = directory / f"{name}.log"
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        startOnFreePorts(self._choosePort, self._run, self.logPath)

    def _choosePort(self) -> None:
        self.port = freePort()

    def _run(self) -> None:
        script = Path(__file__).resolve().parent / "wsbackend.py"
        with open(self.logPath, "ab") as log:
            self._process = subprocess.Popen(
                [sys.executable, str(script), self.name, str(self.port)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_dieWithParent,
            )
        try:
            _waitForPorts(self._process, [self.port], timeout=20, describe=f"wsbackend {self.name}", log=self.logPath)
        except RuntimeError:
            _stopProcess(self._process)
            self._process = None
            raise

    def stop(self) -> None:
        if self._process is not None:
            _stopProcess(self._process)
            self._process = None


class WebSocketTests(SynchronousTestCase):
    """
    The proxy between the C{websockets} client and two C{websockets}
    servers.
    """

    def setUp(self) -> None:
        directory = Path(self.mktemp()).resolve()
        directory.mkdir(parents=True)
        self.old = WebSocketBackend(directory, "old")
        self.new = WebSocketBackend(directory, "new")
        for server in (self.old, self.new):
            server.start()
            self.addCleanup(server.stop)
        backends = {
            "old": {"host": "127.0.0.1", "ports": {"http": self.old.port}},
            "new": {"host": "127.0.0.1", "ports": {"http": self.new.port}},
        }
        config = (
            tomlTable("proxy", {"hostname": "proxy.example.org"})
            + tomlTable("limits", {"failure_delay": 0.1, "backend_timeout": 10})
            + listenerTable("http", 0, "none")
            + tomlTable("http", {"default_backend": "old"})
            + tomlTable("router", {"type": "static", "path": "routes.toml"})
            + "".join(tomlTable(f"backend.{name}", values) for name, values in backends.items())
            + tomlTable("admin", {"endpoint": "tcp:ADMINPORT:interface=127.0.0.1", "token_file": "admin.token"})
        )
        self.proxy = Proxy(str(directory / "proxy"), config)
        token = self.proxy.directory / "admin.token"
        token.write_text("ws-test-token-" + "0" * 32 + "\n")
        token.chmod(0o600)
        (self.proxy.directory / "routes.toml").write_text(routesText({"default": "old", "accounts": {ALICE: "old"}}))
        self.proxy.startWithAdminPort()
        self.addCleanup(self.proxy.stop)

    def connect(self, **headers: str) -> ClientConnection:
        """
        Open alice's JMAP WebSocket through the proxy.
        """
        connection = connect(
            f"ws://127.0.0.1:{self.proxy.ports[0]}/jmap/ws/",
            additional_headers={"Authorization": basic(ALICE, "alice-pw"), **headers},
            subprotocols=[Subprotocol("jmap")],
            max_size=None,
            open_timeout=TIMEOUT,
            close_timeout=TIMEOUT,
        )
        self.addCleanup(connection.close)
        return connection

    def whoami(self, connection: ClientConnection) -> dict[str, Any]:
        """
        The backend's account of the handshake it received.
        """
        connection.send("whoami")
        answer: dict[str, Any] = json.loads(connection.recv(timeout=TIMEOUT))
        return answer

    def test_relayedByteForByte(self) -> None:
        """
        alice's WebSocket reaches old with the subprotocol C{jmap} agreed;
        text, binary and a 1 MB binary message come back from old
        byte-identical behind its prefix; old saw alice's credentials and
        the proxy's X-Forwarded-For (the client's address), not the one the
        client sent.
        """
        connection = self.connect(**{"X-Forwarded-For": "6.6.6.6", "Forwarded": "for=6.6.6.6"})
        self.assertEqual(connection.subprotocol, "jmap")
        seen = self.whoami(connection)
        self.assertEqual((seen["server"], seen["user"], seen["x-forwarded-for"]), ("old", ALICE, ["127.0.0.1"]))
        self.assertNotIn("6.6.6.6", json.dumps(seen))
        connection.send('{"using": ["urn:ietf:params:jmap:core"], "é": "ü"}')
        self.assertEqual(connection.recv(timeout=TIMEOUT), 'old:{"using": ["urn:ietf:params:jmap:core"], "é": "ü"}')
        connection.send(bytes(range(256)))
        self.assertEqual(connection.recv(timeout=TIMEOUT), b"old:" + bytes(range(256)))
        big = os.urandom(1 << 20)
        connection.send(big)
        self.assertEqual(connection.recv(timeout=TIMEOUT), b"old:" + big)

    def test_moveClosesWebSocket(self) -> None:
        """
        C{mailproxy move alice@example.org new} while alice's WebSocket is
        open closes it (the client's next read ends with
        L{ConnectionClosed}), and her next WebSocket lands on new.
        """
        connection = self.connect()
        self.assertEqual(self.whoami(connection)["server"], "old")
        environment = dict(os.environ)
        repository = str(Path(__file__).resolve().parent.parent.parent)
        environment["PYTHONPATH"] = os.pathsep.join(filter(None, [repository, environment.get("PYTHONPATH")]))
        moved = subprocess.run(
            [sys.executable, "-c", "import sys; from mailproxy.cli import main; sys.exit(main(sys.argv[1:]))",
             "move", ALICE, "new", "--config", str(self.proxy.configPath)],
            capture_output=True, text=True, env=environment, timeout=TIMEOUT * 2,
        )
        self.assertEqual(moved.returncode, 0, moved.stderr)
        self.assertIn("1 open session dropped", moved.stdout)
        with self.assertRaises(ConnectionClosed):
            connection.recv(timeout=TIMEOUT)
        again = self.connect()
        self.assertEqual(self.whoami(again)["server"], "new")
        again.send("hello")
        self.assertEqual(again.recv(timeout=TIMEOUT), "new:hello")
