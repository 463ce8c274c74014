"""
Tests for the packaging: the dependencies setup.cfg declares, the versions
constraints.txt pins for tests/run, the licence, and the wheel, which must
carry the licence and the examples that C{mailproxy examples DIR} copies out.
"""

from __future__ import annotations

import ast
import configparser
import importlib.metadata
import io
import os
import shutil
import sys
import zipfile
from typing import Any

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from twisted.internet.defer import inlineCallbacks
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mailproxy.cli import main

CHECKOUT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLES = os.path.join(CHECKOUT, "examples")


def setupConfig() -> configparser.ConfigParser:
    """
    The checkout's setup.cfg.
    """
    config = configparser.ConfigParser()
    config.read(os.path.join(CHECKOUT, "setup.cfg"), encoding="utf-8")
    return config


def requirements(value: str) -> list[Requirement]:
    """
    The requirements in a multi-line setup.cfg value.
    """
    return [Requirement(line) for line in value.splitlines() if line.strip()]


def installRequires() -> list[Requirement]:
    """
    setup.cfg's C{install_requires}.
    """
    return requirements(setupConfig()["options"]["install_requires"])


def testRequires() -> list[Requirement]:
    """
    setup.cfg's C{test} extras.
    """
    return requirements(setupConfig()["options.extras_require"]["test"])


def constraints() -> dict[str, str]:
    """
    constraints.txt: each distribution's canonical name and pinned version.
    """
    pins = {}
    with open(os.path.join(CHECKOUT, "constraints.txt"), encoding="utf-8") as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line:
                name, sep, version = line.partition("==")
                pins[canonicalize_name(name)] = version if sep else ""
    return pins


def thirdPartyImports() -> dict[str, set[str]]:
    """
    Every top-level module that the package's code imports and that is
    neither in the standard library nor the package itself, with the
    files that import it.
    """
    found: dict[str, set[str]] = {}
    for top in ("mailproxy", os.path.join("twisted", "plugins")):
        for directory, _, names in os.walk(os.path.join(CHECKOUT, top)):
            for name in names:
                if not name.endswith(".py"):
                    continue
                path = os.path.join(directory, name)
                with open(path, encoding="utf-8") as f:
                    tree = ast.parse(f.read(), path)
                for node in ast.walk(tree):
                    if isinstance(node, ast.Import):
                        modules = [alias.name for alias in node.names]
                    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                        modules = [node.module]
                    else:
                        continue
                    for module in modules:
                        first = module.split(".")[0]
                        if first not in sys.stdlib_module_names and first != "mailproxy":
                            found.setdefault(first, set()).add(os.path.relpath(path, CHECKOUT))
    return found


def closure(roots: list[Requirement]) -> set[str]:
    """
    The canonical names of the installed distributions that C{roots} pull
    in, themselves included, following extras and markers.
    """
    extras: dict[str, set[str]] = {}
    todo = list(roots)
    while todo:
        requirement = todo.pop()
        name = canonicalize_name(requirement.name)
        wanted = set(requirement.extras)
        if name in extras and wanted <= extras[name]:
            continue
        extras[name] = extras.get(name, set()) | wanted
        for text in importlib.metadata.distribution(name).requires or []:
            dependency = Requirement(text)
            marker = dependency.marker
            if marker is None or any(
                marker.evaluate({"extra": extra}) for extra in ["", *sorted(extras[name])]
            ):
                todo.append(dependency)
    return set(extras)


class DependencyTests(SynchronousTestCase):
    """
    setup.cfg declares what the code imports; constraints.txt pins all
    that setup.cfg pulls in, and tests/run installs with it.
    """

    def test_importsDeclared(self) -> None:
        """
        Every third-party module the package imports comes from a
        distribution that C{install_requires} names itself, not one that
        only happens to arrive with another.
        """
        declared = {canonicalize_name(r.name) for r in installRequires()}
        providers = importlib.metadata.packages_distributions()
        undeclared = {}
        for module, files in thirdPartyImports().items():
            distributions = {canonicalize_name(d) for d in providers.get(module, [])}
            self.assertTrue(distributions, f"{module} (imported by {sorted(files)}) is not installed")
            if not distributions & declared:
                undeclared[module] = sorted(files)
        self.assertEqual(undeclared, {})

    def test_constraintsPinEverything(self) -> None:
        """
        constraints.txt pins, with C{==}, every distribution that
        C{install_requires} and the C{test} extras pull in, at versions
        that satisfy setup.cfg.
        """
        pins = constraints()
        roots = installRequires() + testRequires()
        for requirement in roots:
            version = pins.get(canonicalize_name(requirement.name))
            self.assertTrue(version, f"{requirement.name} is not pinned")
            self.assertIn(version, requirement.specifier, str(requirement))
        self.assertEqual(sorted(closure(roots) - set(pins)), [])
        self.assertNotIn("mailproxy", pins)

    def test_runUsesConstraints(self) -> None:
        """
        tests/run installs with constraints.txt, and reinstalls when it
        changes: the file is part of the hash it compares.
        """
        with open(os.path.join(CHECKOUT, "tests", "run"), encoding="utf-8") as f:
            script = f.read()
        [hashed] = [line for line in script.splitlines() if line.startswith("metadata=$(sha256sum ")]
        self.assertIn(" constraints.txt ", hashed)
        install = script[script.index('-m pip install'):].split("\n\n", 1)[0]
        self.assertIn("--constraint constraints.txt ", install)
        self.assertIn("-e '.[test]'", install)


class LicenseTests(SynchronousTestCase):
    """
    The licence the metadata names is in the checkout.
    """

    def test_mit(self) -> None:
        """
        LICENSE holds the MIT licence with the project's copyright line,
        and setup.cfg names both the licence and the file.
        """
        with open(os.path.join(CHECKOUT, "LICENSE"), encoding="utf-8") as f:
            text = f.read()
        self.assertTrue(text.startswith("MIT License\n\nCopyright (c) 2026 the mailproxy developers\n"))
        self.assertIn('THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND', text)
        metadata = setupConfig()["metadata"]
        self.assertEqual(metadata["license"], "MIT")
        self.assertEqual(metadata["license_files"].split(), ["LICENSE"])


def checkoutExamples() -> dict[str, bytes]:
    """
    The checkout's examples by their C{/}-separated relative path, without
    byte-compiled files.
    """
    found = {}
    for directory, dirnames, names in os.walk(EXAMPLES):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        for name in names:
            path = os.path.join(directory, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, EXAMPLES).replace(os.sep, "/")] = f.read()
    return found


def writtenFiles(directory: str) -> dict[str, bytes]:
    """
    The files under C{directory} by their C{/}-separated relative path.
    """
    found = {}
    for parent, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(parent, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, directory).replace(os.sep, "/")] = f.read()
    return found


class ExamplesCommandTests(SynchronousTestCase):
    """
    C{mailproxy examples DIR}, here from the checkout.
    """

    def setUp(self) -> None:
        self.out = io.StringIO()
        self.err = io.StringIO()
        self.patch(sys, "stdout", self.out)
        self.patch(sys, "stderr", self.err)
        self.directory = os.path.join(os.path.abspath(self.mktemp()), "new", "dir")

    def test_writesEveryExample(self) -> None:
        """
        Every example is written, byte for byte, subdirectories and all,
        into a directory made for them; each path written is printed.
        """
        self.assertEqual(main(["examples", self.directory]), 0)
        written = writtenFiles(self.directory)
        self.assertEqual(written, checkoutExamples())
        self.assertIn("fail2ban/jail.d/mailproxy.local", written)
        self.assertEqual(
            sorted(self.out.getvalue().splitlines()),
            sorted(os.path.join(self.directory, *name.split("/")) for name in written),
        )
        self.assertEqual(self.err.getvalue(), "")

    def test_neverReplaces(self) -> None:
        """
        If an example would replace a file, nothing is written, the
        existing file is kept, and the command says which and exits 1.
        """
        os.makedirs(self.directory)
        mine = os.path.join(self.directory, "mailproxy.toml")
        with open(mine, "w") as f:
            f.write("# mine\n")
        self.assertEqual(main(["examples", self.directory]), 1)
        self.assertEqual(writtenFiles(self.directory), {"mailproxy.toml": b"# mine\n"})
        self.assertEqual(
            self.err.getvalue(), f"mailproxy examples: {mine}: exists already; nothing written\n"
        )
        self.assertEqual(self.out.getvalue(), "")

    def test_unwritable(self) -> None:
        """
        A directory that cannot be made is reported, not a traceback.
        """
        blocker = os.path.abspath(self.mktemp())
        with open(blocker, "w") as f:
            f.write("a file, not a directory\n")
        self.assertEqual(main(["examples", os.path.join(blocker, "sub")]), 1)
        self.assertTrue(self.err.getvalue().startswith(f"mailproxy examples: {blocker}"), self.err.getvalue())


class WheelTests(TestCase):
    """
    The wheel built from the checkout, installed by unpacking it as pip
    does: what a non-editable install gets.
    """

    timeout = 300

    @inlineCallbacks
    def setUp(self) -> Any:  # type: ignore[override]
        [setuptools] = [r for r in testRequires() if r.name == "setuptools"]
        installed = importlib.metadata.version("setuptools")
        self.assertIn(
            installed, setuptools.specifier,
            f"building the wheel needs {setuptools} (the test extras; tests/run installs them), not {installed}",
        )
        self.work = os.path.abspath(self.mktemp())
        source = os.path.join(self.work, "source")
        for name in ("setup.cfg", "setup.py", "pyproject.toml", "README.md", "LICENSE"):
            os.makedirs(source, exist_ok=True)
            shutil.copy(os.path.join(CHECKOUT, name), source)
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
        for name in ("mailproxy", "twisted", "examples"):
            shutil.copytree(os.path.join(CHECKOUT, name), os.path.join(source, name), ignore=ignore)
        # Left by a test that imported an example: must not be shipped.
        os.makedirs(os.path.join(source, "examples", "__pycache__"))
        with open(os.path.join(source, "examples", "__pycache__", "myrouter.cpython-311.pyc"), "wb") as f:
            f.write(b"compiled")
        dist = os.path.join(self.work, "dist")
        out, err, code = yield getProcessOutputAndValue(
            sys.executable,
            ["-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--no-index", "-w", dist, source],
            env=os.environ,
            path=self.work,
        )
        self.assertEqual(code, 0, err.decode("utf-8", "replace"))
        [name] = os.listdir(dist)
        self.wheel = zipfile.ZipFile(os.path.join(dist, name))
        self.addCleanup(self.wheel.close)

    def test_everyPackageShipped(self) -> None:
        """
        Every module of every package under mailproxy/ is in the wheel (a
        new protocol's package needs no line in the packaging), and so is
        the twistd plugin.
        """
        shipped = set(self.wheel.namelist())
        expected = {"twisted/plugins/mailproxy_plugin.py"}
        for directory, subdirectories, files in os.walk(os.path.join(CHECKOUT, "mailproxy")):
            subdirectories[:] = [name for name in subdirectories if name != "__pycache__"]
            if "__init__.py" in files:
                relative = os.path.relpath(directory, CHECKOUT).replace(os.sep, "/")
                expected.update(f"{relative}/{name}" for name in files if name.endswith(".py"))
        self.assertIn("mailproxy/imap/_frontend.py", expected)
        self.assertEqual(expected - shipped, set())

    def test_license(self) -> None:
        """
        The wheel carries LICENSE in its metadata directory, and its
        metadata says MIT.
        """
        [license] = [n for n in self.wheel.namelist() if n.endswith("/LICENSE")]
        self.assertTrue(license.startswith("mailproxy-0.1.0.dist-info/"), license)
        with open(os.path.join(CHECKOUT, "LICENSE"), "rb") as f:
            self.assertEqual(self.wheel.read(license), f.read())
        metadata = self.wheel.read("mailproxy-0.1.0.dist-info/METADATA").decode("utf-8")
        self.assertIn("\nLicense: MIT\n", metadata)

    def test_requires(self) -> None:
        """
        The wheel's metadata requires every distribution C{install_requires}
        names, C{idna} among them.
        """
        metadata = self.wheel.read("mailproxy-0.1.0.dist-info/METADATA").decode("utf-8")
        required = {
            canonicalize_name(Requirement(line.split(":", 1)[1]).name)
            for line in metadata.splitlines()
            if line.startswith("Requires-Dist:") and "extra ==" not in line
        }
        self.assertEqual(required, {canonicalize_name(r.name) for r in installRequires()})
        self.assertIn("idna", required)

    def test_examplesShipped(self) -> None:
        """
        Every file of examples/ is in the wheel, byte for byte, under
        mailproxy/examples; nothing byte-compiled is.
        """
        prefix = "mailproxy/examples/"
        shipped = {
            name[len(prefix) :]: self.wheel.read(name)
            for name in self.wheel.namelist()
            if name.startswith(prefix)
        }
        self.assertEqual(shipped, checkoutExamples())

    @inlineCallbacks
    def test_examplesCommandInstalled(self) -> Any:
        """
        Installed from the wheel, away from any checkout, C{mailproxy
        examples DIR} writes every example.
        """
        site = os.path.join(self.work, "site-packages")
        self.wheel.extractall(site)
        target = os.path.join(self.work, "copied")
        environment = dict(os.environ, PYTHONPATH=site)
        out, err, code = yield getProcessOutputAndValue(
            sys.executable,
            ["-c", "import sys; from mailproxy.cli import main; sys.exit(main(sys.argv[1:]))", "examples", target],
            env=environment,
            path=self.work,
        )
        self.assertEqual(code, 0, err.decode("utf-8", "replace"))
        self.assertEqual(writtenFiles(target), checkoutExamples())
        self.assertEqual(len(out.splitlines()), len(checkoutExamples()))
        # The code that ran was the wheel's.
        out, err, code = yield getProcessOutputAndValue(
            sys.executable, ["-c", "import mailproxy; print(mailproxy.__file__)"], env=environment, path=self.work
        )
        self.assertEqual(out.decode().strip(), os.path.join(site, "mailproxy", "__init__.py"))
