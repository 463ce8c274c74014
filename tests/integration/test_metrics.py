"""
C{GET /metrics} of a running proxy after real traffic: a real Dovecot as one
backend and a port that refuses connections as another (a backend that is
down), IMAP clients on a plaintext and an implicit-TLS listener, and
Prometheus's own C{promtool check metrics} on what the endpoint serves; and
the README's alert rules under C{promtool test rules}.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from twisted.trial.unittest import SynchronousTestCase

from mailproxy import __version__

from .servers import Dovecot, Proxy, TestCA, _binary, fixtureDirectory, refusedPort, requireServer, sharedFixture

#: Seconds any single client operation may take before the test fails.
TIMEOUT = 30.0

PASSWORD = "metrics-secret"
TOKEN = "metrics-token-0123456789abcdef0123456789abcdef"
USERS = {"alice@example.org": PASSWORD, "bob@example.org": PASSWORD}

_REPOSITORY = Path(__file__).resolve().parent.parent.parent

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


class MetricsSetup:
    """
    Dovecot as backend C{store}, a refusing port as backend C{down} (where
    the route table sends bob), and the proxy in front: listener 0 is
    plaintext IMAP, listener 1 implicit-TLS IMAP, at most two connections
    per client address, and the management endpoint.
    """

    def __init__(self) -> None:
        directory = fixtureDirectory("metrics")
        self.ca = TestCA(os.path.join(directory, "ca"))
        self.dovecot = Dovecot(os.path.join(directory, "store"), "store", USERS, ca=self.ca)
        self.down = refusedPort()
        self.proxy: Proxy | None = None
        self.directory = directory

    @classmethod
    def start(cls) -> MetricsSetup:
        """
        Start Dovecot, then the proxy.
        """
        requireServer("dovecot", "doveadm", "openssl", "promtool")
        setup = cls()
        try:
            setup.dovecot.start()
            certificate, key = setup.ca.issue("proxy")
            proxy = Proxy(
                os.path.join(setup.directory, "proxy"),
                '[proxy]\nhostname = "proxy.example.org"\n'
                "[limits]\nfailure_delay = 0.1\nconnections_per_address = 2\n"
                f'[tls]\ncertificate = "{certificate}"\nkey = "{key}"\n'
                '[[listener]]\nprotocol = "imap"\nendpoint = "tcp:0:interface=127.0.0.1"\ntls = "none"\n'
                '[[listener]]\nprotocol = "imap"\nendpoint = "tcp:0:interface=127.0.0.1"\ntls = "implicit"\n'
                '[router]\ntype = "static"\npath = "routes.toml"\n'
                f'[backend.store]\nhost = "127.0.0.1"\nports = {{ imap = {setup.dovecot.imap} }}\n'
                f'[backend.down]\nhost = "127.0.0.1"\nports = {{ imap = {setup.down} }}\n'
                '[admin]\nendpoint = "tcp:0:interface=127.0.0.1"\ntoken_file = "admin.token"\n',
            )
            (proxy.directory / "admin.token").write_text(TOKEN + "\n")
            (proxy.directory / "routes.toml").write_text(
                'default = "store"\n\n[accounts]\n"bob@example.org" = "down"\n'
            )
            setup.proxy = proxy
            proxy.start()
        except BaseException:
            setup.stop()
            raise
        return setup

    def stop(self) -> None:
        """
        Stop the proxy and Dovecot.
        """
        if self.proxy is not None:
            self.proxy.stop()
        self.dovecot.stop()


class Client:
    """
    A bare IMAP client on a socket.
    """

    def __init__(self, port: int) -> None:
        self.connection = socket.create_connection(("127.0.0.1", port), TIMEOUT)
        self.buffer = b""

    def readLine(self) -> bytes:
        """
        The next line without its CRLF, or C{b""} once the server closed.
        """
        while b"\r\n" not in self.buffer:
            data = self.connection.recv(65536)
            if not data:
                line, self.buffer = self.buffer, b""
                return line
            self.buffer += data
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line

    def login(self, user: str, password: str) -> bytes:
        """
        Send C{LOGIN} and return its tagged reply.
        """
        self.connection.sendall(f'a LOGIN "{user}" "{password}"\r\n'.encode())
        line = self.readLine()
        while line.startswith(b"* "):
            line = self.readLine()
        return line

    def untilClosed(self) -> bytes:
        """
        Everything the server sends until it closes the connection.
        """
        received = self.buffer
        while True:
            data = self.connection.recv(65536)
            if not data:
                return received
            received += data

    def close(self) -> None:
        """
        Close the socket.
        """
        self.connection.close()


def scrape(proxy: Proxy) -> str:
    """
    C{GET /metrics} with the token.
    """
    request = urllib.request.Request(f"http://127.0.0.1:{proxy.adminPort}/metrics")
    request.add_header("Authorization", "Bearer " + TOKEN)
    with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4"), response.headers
        return response.read().decode("utf-8")


def parse(text: str) -> Samples:
    """
    The samples of C{text}, by name and sorted labels, parsed with
    prometheus_client's own parser.
    """
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def sample(samples: Samples, name: str, **labels: str) -> float | None:
    """
    The value of one sample, L{None} if it is absent.
    """
    return samples.get((name, tuple(sorted(labels.items()))))


class MetricsTests(SynchronousTestCase):
    """
    The metrics a dashboard and alerts are built on, after real logins.
    """

    def setUp(self) -> None:
        self.setup = sharedFixture("mail servers", __name__, MetricsSetup.start)
        assert self.setup.proxy is not None
        self.proxy = self.setup.proxy

    def connect(self, listener: int) -> Client:
        """
        A client of listener C{listener}, closed after the test.
        """
        client = Client(self.proxy.ports[listener])
        self.addCleanup(client.close)
        return client

    def waitFor(self, name: str, **labels: str) -> Samples:
        """
        Scrape until the sample C{name} with C{labels} appears: what a
        closing connection counts is counted once the proxy has seen it
        close, a moment after the client has.
        """
        deadline = time.monotonic() + TIMEOUT
        while True:
            samples = parse(scrape(self.proxy))
            if sample(samples, name, **labels) is not None or time.monotonic() > deadline:
                return samples
            time.sleep(0.05)

    def test_afterRealTraffic(self) -> None:
        """
        After a client that sends no TLS to the implicit-TLS listener, a
        good login, a wrong password, a login routed to a backend that is
        down, and a connection over the per-address limit, C{/metrics}
        counts each with its listener, backend and result; it shows the
        store backend up and the other down, the build and the process;
        and C{promtool check metrics} finds nothing wrong with it.
        """
        garbage = self.connect(1)
        garbage.connection.sendall(b"a LOGIN alice@example.org secret\r\n")
        # The proxy answers with a TLS alert, or nothing, and closes.
        self.assertNotIn(b"LOGIN", garbage.untilClosed())
        garbage.close()
        self.waitFor("mailproxy_tls_handshake_failures_total", listener="1", protocol="imap")

        good = self.connect(0)
        self.assertTrue(good.readLine().startswith(b"* OK"))
        self.assertTrue(good.login("alice@example.org", PASSWORD).startswith(b"a OK"))
        failing = self.connect(0)
        self.assertTrue(failing.readLine().startswith(b"* OK"))
        self.assertTrue(failing.login("alice@example.org", "wrong").startswith(b"a NO [AUTHENTICATIONFAILED]"))
        self.assertTrue(failing.login("bob@example.org", PASSWORD).startswith(b"a NO [UNAVAILABLE]"))
        refused = self.connect(0)
        self.assertEqual(refused.untilClosed(), b"* BYE Too many connections from your address.\r\n")

        text = scrape(self.proxy)
        samples = parse(text)
        imap = {"protocol": "imap"}
        self.assertEqual(sample(samples, "mailproxy_tls_handshake_failures_total", listener="1", **imap), 1)
        self.assertIsNone(sample(samples, "mailproxy_tls_handshake_failures_total", listener="0", **imap))
        self.assertEqual(sample(samples, "mailproxy_connections_accepted_total", listener="1", **imap), 1)
        self.assertEqual(sample(samples, "mailproxy_connections_accepted_total", listener="0", **imap), 2)
        self.assertEqual(
            sample(
                samples, "mailproxy_connections_refused_total", listener="0", reason="connections_per_address", **imap
            ),
            1,
        )
        logins = {labels: value for (name, labels), value in samples.items() if name == "mailproxy_logins_total"}
        self.assertEqual(
            logins,
            {
                (("backend", "store"), ("protocol", "imap"), ("result", "ok")): 1,
                (("backend", "store"), ("protocol", "imap"), ("result", "auth")): 1,
                (("backend", "down"), ("protocol", "imap"), ("result", "unavailable")): 1,
            },
        )
        for result in ("ok", "auth", "unavailable"):
            self.assertEqual(sample(samples, "mailproxy_login_latency_seconds_count", result=result, **imap), 1)
            self.assertEqual(
                sample(samples, "mailproxy_login_latency_seconds_bucket", le="+Inf", result=result, **imap), 1
            )
        for backend, result in (("store", "ok"), ("store", "auth"), ("down", "unavailable")):
            self.assertEqual(
                sample(samples, "mailproxy_backend_login_latency_seconds_count", backend=backend, result=result, **imap),
                1,
            )
        self.assertEqual(sample(samples, "mailproxy_router_latency_seconds_count", router="static"), 3)
        self.assertEqual(sample(samples, "mailproxy_backend_up", backend="store", port="imap"), 1)
        self.assertEqual(sample(samples, "mailproxy_backend_up", backend="down", port="imap"), 0)
        self.assertEqual(sample(samples, "mailproxy_sessions_open", backend="store", **imap), 1)
        (build,) = [dict(labels) for name, labels in samples if name == "mailproxy_build_info"]
        self.assertEqual(build["version"], __version__)
        self.assertGreater(sample(samples, "process_open_fds") or 0, 0)
        self.assertGreater(sample(samples, "process_resident_memory_bytes") or 0, 0)
        self.assertIsNotNone(sample(samples, "process_cpu_seconds_total"))
        self.assertIsNotNone(sample(samples, "process_start_time_seconds"))

        check = subprocess.run(
            [_binary("promtool"), "check", "metrics"],
            input=text,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
        self.assertEqual((check.returncode, check.stdout, check.stderr), (0, "", ""))

    def test_alertRules(self) -> None:
        """
        The README's alert rules (C{examples/prometheus/mailproxy-alerts.yml})
        pass C{promtool check rules}, and in C{promtool test rules} the
        backend-down rule fires for exactly the backend port the running
        proxy reports down, the failure-rate rule for a proxy where a third
        of the logins fail, not for one with as many failures but little
        traffic.
        """
        rules = _REPOSITORY / "examples" / "prometheus" / "mailproxy-alerts.yml"
        self.assertIn(rules.read_text(), (_REPOSITORY / "README.md").read_text())
        promtool = _binary("promtool")
        check = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True, text=True, timeout=TIMEOUT)
        self.assertEqual(check.returncode, 0, check.stdout + check.stderr)

        up = [
            (dict(labels), value)
            for (name, labels), value in parse(scrape(self.proxy)).items()
            if name == "mailproxy_backend_up"
        ]
        self.assertEqual(sorted(value for _, value in up), [0, 1])

        def series(name: str, labels: dict[str, str], values: str) -> dict[str, str]:
            text = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
            return {"series": f"{name}{{{text}}}", "values": values}

        def logins(instance: str, result: str, perMinute: int) -> dict[str, str]:
            labels = {"instance": instance, "protocol": "imap", "backend": "store", "result": result}
            return series("mailproxy_logins_total", labels, f"0+{perMinute}x30")

        test = {
            "rule_files": [str(rules)],
            "evaluation_interval": "1m",
            "tests": [
                {
                    "interval": "1m",
                    "input_series": [
                        *(series("mailproxy_backend_up", {**labels, "instance": "proxy"}, f"{value:g}x5") for labels, value in up),
                        logins("proxy", "ok", 60),
                        logins("proxy", "auth", 30),
                        logins("quiet", "ok", 1),
                        logins("quiet", "auth", 1),
                    ],
                    "alert_rule_test": [
                        {
                            "eval_time": "3m",
                            "alertname": "MailproxyBackendDown",
                            "exp_alerts": [
                                {
                                    "exp_labels": {**labels, "instance": "proxy", "severity": "critical"},
                                    "exp_annotations": {
                                        "summary": f"proxy: backend {labels['backend']} does not greet on its {labels['port']} port"
                                    },
                                }
                                for labels, value in up
                                if value == 0
                            ],
                        },
                        {
                            "eval_time": "20m",
                            "alertname": "MailproxyLoginFailureRate",
                            "exp_alerts": [
                                {
                                    "exp_labels": {"instance": "proxy", "severity": "warning"},
                                    "exp_annotations": {"summary": "proxy: 33.33% of logins fail"},
                                }
                            ],
                        },
                    ],
                }
            ],
        }
        path = os.path.abspath(self.mktemp()) + ".yml"
        # JSON is YAML.
        with open(path, "w") as f:
            json.dump(test, f)
        result = subprocess.run([promtool, "test", "rules", path], capture_output=True, text=True, timeout=TIMEOUT)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
