"""
Every configuration in C{examples/} loads, validates and builds a proxy.

Operators copy these files; each is copied here into a temporary directory
beside the files it names (certificates made on the spot, a master password
file, the route tables shipped with it), then checked the way
C{mailproxy check} checks it and built the way C{twistd mailproxy} builds it
(on a memory reactor, so nothing listens).
"""

from __future__ import annotations

import glob
import io
import os
import re
import shutil
import sqlite3
import sys

from attrs import evolve

from twisted.internet.testing import MemoryReactor
from twisted.trial.unittest import SynchronousTestCase

from mailproxy._showconfig import HIDDEN
from mailproxy._tls import makeSelfSigned
from mailproxy.cli import main
from mailproxy.config import loadConfig, parseConfig
from mailproxy.tap import serviceFromConfig

EXAMPLES = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, os.pardir, "examples"))

#: Files the example configurations name that an operator supplies.
_CERTIFICATE_NAMES = re.compile(r'^\s*(?:certificate|ca_file)\s*=\s*"([^"/]+)"', re.MULTILINE)
_KEY_NAMES = re.compile(r'^\s*key\s*=\s*"([^"/]+)"', re.MULTILINE)
_DATABASE_NAMES = re.compile(r'^\s*database\s*=\s*"([^"/]+)"', re.MULTILINE)
_SECRET_NAMES = re.compile(r'^\s*\w+_file\s*=\s*"([^"/]+)"', re.MULTILINE)


def exampleConfigs() -> list[str]:
    """
    The example proxy configurations (TOML files with a C{[[listener]]}).
    """
    found = []
    for path in sorted(glob.glob(os.path.join(EXAMPLES, "*.toml"))):
        with open(path, encoding="utf-8") as f:
            if "[[listener]]" in f.read():
                found.append(path)
    return found


class ExampleConfigTests(SynchronousTestCase):
    """
    The shipped example configurations work as shipped.
    """

    def prepare(self, example: str) -> str:
        """
        Copy the examples next to made-up certificates and secrets; return
        the copied configuration's path.
        """
        directory = self.mktemp()
        shutil.copytree(EXAMPLES, directory)
        with open(example, encoding="utf-8") as f:
            text = f.read()
        certificate, key = makeSelfSigned(directory, names=("mail.example.org",))
        for name in _CERTIFICATE_NAMES.findall(text):
            target = os.path.join(directory, name)
            if not os.path.exists(target):
                shutil.copy(certificate, target)
        for name in _KEY_NAMES.findall(text):
            target = os.path.join(directory, name)
            if not os.path.exists(target):
                shutil.copy(key, target)
        for name in _DATABASE_NAMES.findall(text):
            # As the README makes it: sqlite3 accounts.sqlite < accounts.sql
            with open(os.path.join(directory, "accounts.sql"), encoding="utf-8") as f:
                schema = f.read()
            connection = sqlite3.connect(os.path.join(directory, name))
            connection.executescript(schema)
            connection.close()
        for name in _SECRET_NAMES.findall(text):
            target = os.path.join(directory, name)
            if not os.path.exists(target):
                with open(target, "w") as f:
                    f.write("a-long-random-secret-for-the-example-0123456789\n")
        return os.path.join(directory, os.path.basename(example))

    def test_examplesExist(self) -> None:
        """
        The examples directory holds the migration and legacy-TLS setups.
        """
        names = {os.path.basename(p) for p in exampleConfigs()}
        self.assertTrue({"mailproxy.toml", "legacy-tls.toml"} <= names, names)

    def test_everyExampleBuilds(self) -> None:
        """
        Each example loads without error and builds a service with one
        child per listener (plus the router's).
        """
        for example in exampleConfigs():
            path = self.prepare(example)
            config = loadConfig(path)
            service = serviceFromConfig(config, MemoryReactor())
            names = [child.name for child in service if child.name and child.name.startswith("listener-")]
            self.assertEqual(len(names), len(config.listeners), example)

    def assertContains(self, shown: object, written: object, where: object) -> None:
        """
        C{shown} is C{written}, or a table with every key of it (and the
        defaults that were left out).
        """
        if isinstance(written, str) and not os.path.isabs(written) and isinstance(shown, str) and os.path.isabs(shown):
            # A file name a router reads in a sub-table, shown resolved.
            self.assertEqual(os.path.basename(shown), os.path.basename(written), where)
        elif isinstance(written, dict) and isinstance(shown, dict):
            for name, value in written.items():
                self.assertIn(name, shown, where)
                self.assertContains(shown[name], value, where)
        elif isinstance(written, list) and isinstance(shown, list) and len(written) == len(shown):
            for one, other in zip(shown, written):
                self.assertContains(one, other, where)
        else:
            self.assertEqual(shown, written, where)

    def test_configShowLoadsBack(self) -> None:
        """
        C{mailproxy config show} of each example is TOML that loads back
        into the same configuration (every router kind, chains and caches
        included).
        """
        for example in exampleConfigs():
            path = self.prepare(example)
            out = io.StringIO()
            self.patch(sys, "stdout", out)
            self.assertEqual(main(["config", "show", "--config", path]), 0, example)
            shown, original = parseConfig(out.getvalue(), path), loadConfig(path)
            self.assertEqual(evolve(shown, router=original.router), original, example)
            # The router's options come back but for the hidden secrets
            # (http-router.toml's shared-secret header).
            self.assertEqual(shown.router.type, original.router.type)
            self.assertLessEqual(set(original.router.options), set(shown.router.options))
            for name, value in original.router.options.items():
                if name == "headers":
                    self.assertEqual(shown.router.options[name], {header: HIDDEN for header in value})
                    self.assertNotIn(str(next(iter(value.values()))), out.getvalue())
                else:
                    self.assertContains(shown.router.options[name], value, (example, name))
            # What the router's builder read besides (its defaults) is
            # shown too: shown again, the configuration shows the same.
            again = os.path.join(os.path.dirname(path), "shown.toml")
            with open(again, "w") as f:
                f.write(out.getvalue())
            out2 = io.StringIO()
            self.patch(sys, "stdout", out2)
            self.assertEqual(main(["config", "show", "--config", again]), 0, example)
            self.assertEqual(out2.getvalue().split("\n", 1)[1], out.getvalue().split("\n", 1)[1], example)
