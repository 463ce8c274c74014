"""
Tests for C{[cluster]}: the Redis server a fleet of proxies shares.
"""

from __future__ import annotations

import socket

from mailproxy._showconfig import effectiveConfig

from .test_config import ConfigTestCase, configText


#: One process (any number of workers would do).
ONE = "[proxy]\nworkers = 1\n"


class ClusterConfigTests(ConfigTestCase):
    """
    Tests for the C{[cluster]} table.
    """

    def test_absent(self) -> None:
        """
        Without C{[cluster]} the proxy keeps its state to itself.
        """
        self.assertIsNone(self.parse(configText()).cluster)

    def test_defaults(self) -> None:
        """
        A bare C{redis://HOST} URL means port 6379, database 0, no TLS, no
        password, the C{mailproxy:} key prefix and this host's name.
        """
        cluster = self.parse(configText(extra=ONE + '[cluster]\nredis = "redis://redis.example.net"\n')).cluster
        assert cluster is not None
        self.assertEqual(
            (cluster.host, cluster.port, cluster.db, cluster.tls, cluster.password, cluster.keyPrefix, cluster.name),
            ("redis.example.net", 6379, 0, False, None, "mailproxy:", socket.gethostname()),
        )
        self.assertEqual((cluster.connectTimeout, cluster.timeout, cluster.heartbeat), (5.0, 2.0, 10.0))

    def test_everything(self) -> None:
        """
        C{rediss://} with port and database, a CA file, a password file (its
        first line), a key prefix, a name and the timeouts are all read.
        """
        cluster = self.parse(
            configText(
                extra=ONE + '[cluster]\nredis = "rediss://[::1]:6380/3"\nca_file = "ca.pem"\npassword_file = "master.pw"\n'
                'key_prefix = "fleet1:"\nname = "proxy-a"\nconnect_timeout = 1\ntimeout = 0.5\nheartbeat = 2\n'
            )
        ).cluster
        assert cluster is not None
        self.assertEqual((cluster.host, cluster.port, cluster.db, cluster.tls), ("::1", 6380, 3, True))
        self.assertEqual(cluster.caFile, f"{self.directory}/ca.pem")
        self.assertEqual(cluster.password, b"t0p-secret")
        self.assertEqual((cluster.keyPrefix, cluster.name), ("fleet1:", "proxy-a"))
        self.assertEqual((cluster.connectTimeout, cluster.timeout, cluster.heartbeat), (1.0, 0.5, 2.0))

    def test_withWorkers(self) -> None:
        """
        C{[cluster]} goes with any number of workers (the parent is the
        machine's member of the fleet).
        """
        config = self.parse(configText(extra='[proxy]\nworkers = 2\n[cluster]\nredis = "redis://redis"\n'))
        self.assertEqual((config.workers, config.cluster is not None), (2, True))

    def test_notAURL(self) -> None:
        """
        Another scheme, or a user and password in the URL (they belong in
        C{password_file}), is refused with the forms allowed.
        """
        for url in ("http://redis:6379", "redis://user:pw@redis", "redis://redis:6379/db", "redis://"):
            message = self.assertConfigError(
                configText(extra=ONE + f'[cluster]\nredis = "{url}"\n'), "cluster.redis", "redis://HOST[:PORT][/DB]"
            )
            self.assertNotIn("pw@", message.split("not ", 1)[0])

    def test_badPort(self) -> None:
        """
        A port beyond 65535 is refused.
        """
        self.assertConfigError(configText(extra=ONE + '[cluster]\nredis = "redis://redis:70000"\n'), "cluster.redis", "port")

    def test_caFileWithoutTLS(self) -> None:
        """
        C{ca_file} without C{rediss://} is refused: it would check nothing.
        """
        self.assertConfigError(
            configText(extra=ONE + '[cluster]\nredis = "redis://redis"\nca_file = "ca.pem"\n'), "cluster.ca_file", "rediss://"
        )

    def test_missingPasswordFile(self) -> None:
        """
        A password file that cannot be read is refused, naming the key.
        """
        self.assertConfigError(
            configText(extra=ONE + '[cluster]\nredis = "redis://redis"\npassword_file = "nope.pw"\n'),
            "cluster.password_file",
            "nope.pw",
        )

    def test_badName(self) -> None:
        """
        A proxy name with a space is refused.
        """
        self.assertConfigError(
            configText(extra=ONE + '[cluster]\nredis = "redis://redis"\nname = "proxy a"\n'), "cluster.name", "without spaces"
        )

    def test_unknownKey(self) -> None:
        """
        A misspelt key is refused with the allowed ones.
        """
        self.assertConfigError(
            configText(extra=ONE + '[cluster]\nredis = "redis://redis"\nkeyprefix = "x"\n'), "cluster.keyprefix", "key_prefix"
        )

    def test_showConfigLeavesPasswordOut(self) -> None:
        """
        C{mailproxy show-config} shows the cluster's URL and password file,
        never the password.
        """
        config = self.parse(
            configText(extra=ONE + '[cluster]\nredis = "redis://10.0.0.5/2"\npassword_file = "master.pw"\nname = "a"\n')
        )
        shown = effectiveConfig(config, {})["cluster"]
        self.assertEqual(shown["redis"], "redis://10.0.0.5:6379/2")
        self.assertEqual(shown["password_file"], f"{self.directory}/master.pw")
        self.assertNotIn("t0p-secret", repr(shown) + repr(config))
