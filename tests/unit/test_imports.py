"""
The import structure of the C{mailproxy} package, read from its source.

L{importGraph} parses every module of C{mailproxy/} with L{ast} and lists,
for each, the C{mailproxy} modules it imports:

  - every C{import} and C{from ... import} in the module, at its top level,
    in a class body or in a function (a lazy import);
  - C{from package import name} counts as an import of the submodule when
    C{name} is one, else of the package;
  - importing C{a.b.c} also runs the packages C{a.b} and C{a} that enclose
    it, so those count too, except a package that encloses the importing
    module itself (a submodule importing its siblings finds its package
    being set up, which is how packages work, not a cycle);
  - imports under C{if TYPE_CHECKING:} are left out: they never run.

Each edge records whether the import is lazy (inside a function).  Lazy
imports count like the others: a function-level import is how a module
delays loading another (C{mailproxy check} never runs the demo), but it
still means the one needs the other, so it may neither close a cycle nor
let a core module reach C{config} or C{routers}.  Only a module name given
as a string at run time (C{importlib.import_module}, a router type named
in the configuration) is invisible here, as it should be: that is plug-in
loading, not structure.

The layers are read from the table under "The parts" in
C{docs/ARCHITECTURE.md} (L{documentedLayers}), so that the page and the
code cannot drift apart: every module must be in one row, and import only
from its own row and the rows before it.

What C{mailproxy check} loads is measured in a fresh interpreter instead:
what a process holds in C{sys.modules} after running the command.
"""

from __future__ import annotations

import ast
import inspect
import json
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterable, Iterator, Mapping, Sequence

from twisted.trial.unittest import SynchronousTestCase

import mailproxy
from mailproxy._tls import makeSelfSigned

#: The directory that holds the C{mailproxy} package under test.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(mailproxy.__file__)))

#: The session core: none of it may need the configuration parser or the
#: routers.  The protocol packages are added by L{coreModules}, so a new
#: protocol is covered too.
CORE_MODULES = (
    "mailproxy._session",
    "mailproxy._registry",
    "mailproxy._login",
    "mailproxy._commandloop",
    "mailproxy._contract",
    "mailproxy._sasl",
    "mailproxy._backend",
    "mailproxy._relay",
    "mailproxy._guard",
    "mailproxy._routing",
    "mailproxy._outcomes",
    "mailproxy.settings",
    "mailproxy.protocols",
)

#: What the core must not import, directly or through other modules.
FORBIDDEN_FOR_CORE = ("mailproxy.config", "mailproxy.routers")


def moduleFiles(root: str = _ROOT) -> dict[str, str]:
    """
    Every module of the C{mailproxy} package under C{root}, by dotted name
    (a package by its own name, for its C{__init__.py}), with its path.
    """
    modules = {}
    top = os.path.join(root, "mailproxy")
    for directory, subdirectories, files in os.walk(top):
        subdirectories[:] = sorted(d for d in subdirectories if d != "__pycache__")
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            parts = os.path.relpath(os.path.join(directory, name), root)[: -len(".py")].split(os.sep)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = os.path.join(directory, name)
    return modules


def _isTypeChecking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(nodes: Iterable[ast.AST], lazy: bool = False) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
    """
    The import statements in C{nodes} and under them that run, each with
    whether it runs only when a function is called.
    """
    for node in nodes:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, lazy
        elif isinstance(node, ast.If) and _isTypeChecking(node.test):
            yield from _imports(node.orelse, lazy)
        else:
            inFunction = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            yield from _imports(ast.iter_child_nodes(node), lazy or inFunction)


def _targets(node: ast.Import | ast.ImportFrom, module: str, isPackage: bool, known: Mapping[str, str]) -> Iterator[str]:
    """
    The C{mailproxy} modules one import statement of C{module} names.
    """
    if isinstance(node, ast.Import):
        for alias in node.names:
            yield alias.name
        return
    if node.level:
        base = module.split(".") if isPackage else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    for alias in node.names:
        submodule = f"{source}.{alias.name}"
        yield submodule if submodule in known else source


def importGraph(root: str = _ROOT) -> dict[str, dict[str, bool]]:
    """
    The imports among the C{mailproxy} modules under C{root}.

    @return: for each module, the modules it imports, each mapped to
        C{True} when every import of it is lazy (in a function).
    """
    known = moduleFiles(root)
    graph: dict[str, dict[str, bool]] = {}
    for module, path in known.items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        isPackage = path.endswith("__init__.py")
        edges: dict[str, bool] = {}
        for node, lazy in _imports(tree.body):
            for target in _targets(node, module, isPackage, known):
                if target.split(".")[0] != "mailproxy":
                    continue
                parts = target.split(".")
                names = [".".join(parts[:n]) for n in range(2, len(parts) + 1)]
                for name in names:
                    encloses = module == name or module.startswith(name + ".")
                    if name == module or name not in known or (name != target and encloses):
                        continue
                    edges[name] = edges.get(name, True) and lazy
        graph[module] = edges
    return graph


def findCycles(graph: Mapping[str, Mapping[str, bool]]) -> list[list[str]]:
    """
    The import cycles of C{graph}: one per strongly connected group of
    modules, given as the shortest cycle through the group's first module
    (so a report names a path one can follow), sorted.
    """
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    onStack: set[str] = set()
    groups: list[list[str]] = []

    def connect(node: str) -> None:
        # Tarjan's algorithm; the graph has about a hundred nodes.
        index[node] = low[node] = len(index)
        stack.append(node)
        onStack.add(node)
        for target in sorted(graph.get(node, {})):
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in onStack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                onStack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return sorted(_shortestCycle(graph, group) for group in groups)


def _shortestCycle(graph: Mapping[str, Mapping[str, bool]], group: list[str]) -> list[str]:
    start = group[0]
    members = set(group)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for target in sorted(graph.get(node, {})):
                if target == start:
                    return paths[node] + [start]
                if target in members and target not in paths:
                    paths[target] = paths[node] + [target]
                    following.append(target)
        frontier = following
    raise AssertionError(f"no cycle through {start}")


def describeCycle(graph: Mapping[str, Mapping[str, bool]], cycle: list[str]) -> str:
    """
    One line for a cycle: C{a -> b (lazy) -> a}, marking the imports that
    are made in a function.
    """
    out = [cycle[0]]
    for source, target in zip(cycle, cycle[1:]):
        out.append(f"-> {target}{' (lazy)' if graph[source][target] else ''}")
    return " ".join(out)


def reachable(graph: Mapping[str, Mapping[str, bool]], module: str) -> dict[str, list[str]]:
    """
    Every module C{module} imports directly or through others, each with
    the shortest chain of imports that gets there.
    """
    paths = {module: [module]}
    frontier = [module]
    while frontier:
        following = []
        for node in frontier:
            for target in sorted(graph.get(node, {})):
                if target not in paths:
                    paths[target] = paths[node] + [target]
                    following.append(target)
        frontier = following
    del paths[module]
    return paths


def coreModules(graph: Mapping[str, object]) -> list[str]:
    """
    The core modules present under test: those of L{CORE_MODULES} that
    exist, and every module of each protocol package (a package with a
    C{_frontend} module): its front and back ends, parser and the rest.
    """
    protocols = sorted(name.rpartition(".")[0] for name in graph if name.count(".") == 2 and name.endswith("._frontend"))
    found = [name for name in CORE_MODULES if name in graph]
    for package in protocols:
        found += sorted(name for name in graph if name == package or name.startswith(package + "."))
    return found


#: The page whose table of the parts names the layers.
ARCHITECTURE = os.path.join(_ROOT, "docs", "ARCHITECTURE.md")


def documentedLayers(text: str) -> list[tuple[str, list[str]]]:
    """
    The layers of the table under "The parts" in C{text}, bottom first,
    each with its modules as dotted names (C{"mailproxy.imap"} for the
    package C{imap/} and everything in it); files outside C{mailproxy/}
    are left out.
    """
    section = text.split("## The parts", 1)[1].split("\n## ", 1)[0]
    layers = []
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not line.startswith("|") or cells[0] in ("layer", "---"):
            continue
        modules = []
        for name in re.findall(r"`([^`]+)`", cells[1]):
            if "/" in name.rstrip("/"):
                continue
            modules.append("mailproxy." + name.rstrip("/").removesuffix(".py").replace("/", "."))
        layers.append((cells[0], modules))
    return layers


def layerOf(layers: Sequence[tuple[str, list[str]]], module: str) -> int | None:
    """
    The index in C{layers} of the row that holds C{module} (itself, or the
    package it is in), or L{None}.
    """
    for index, (_, modules) in enumerate(layers):
        if any(module == name or module.startswith(name + ".") for name in modules):
            return index
    return None


class GraphTests(SynchronousTestCase):
    """
    L{importGraph}, L{findCycles} and L{reachable} on a made-up package, so
    that the checks below can be trusted to see what they look for.
    """

    def write(self, files: Mapping[str, str]) -> str:
        """
        Write a C{mailproxy} package of C{files} (paths under it, source
        text) into a new directory; return the directory.
        """
        root = os.path.abspath(self.mktemp())
        for name, text in files.items():
            path = os.path.join(root, "mailproxy", name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w", encoding="utf-8") as f:
                f.write(textwrap.dedent(text))
        return root

    def test_edges(self) -> None:
        """
        Absolute and relative imports, C{from package import submodule},
        class-level and lazy imports are edges; imports under
        C{TYPE_CHECKING} and of other packages are not; a module imported
        both at the top and in a function counts as imported at the top.
        """
        root = self.write(
            {
                "__init__.py": "",
                "a.py": """\
                    from __future__ import annotations
                    import os
                    from typing import TYPE_CHECKING
                    from . import b
                    from .pkg import thing
                    if TYPE_CHECKING:
                        from mailproxy import c
                    class K:
                        import mailproxy.d
                    def f():
                        from mailproxy.e import name
                        import mailproxy.b
                    """,
                "b.py": "",
                "c.py": "",
                "d.py": "",
                "e.py": "name = 1\n",
                "pkg/__init__.py": "thing = 1\n",
                "pkg/inner.py": "from . import sibling\nfrom mailproxy.pkg.sibling import x\n",
                "pkg/sibling.py": "x = 1\n",
            }
        )
        graph = importGraph(root)
        self.assertEqual(
            graph["mailproxy.a"],
            {"mailproxy.b": False, "mailproxy.pkg": False, "mailproxy.d": False, "mailproxy.e": True},
        )
        # A submodule importing a sibling does not depend on its package.
        self.assertEqual(graph["mailproxy.pkg.inner"], {"mailproxy.pkg.sibling": False})

    def test_enclosingPackage(self) -> None:
        """
        Importing a submodule from outside its package runs the package:
        a package that imports a module which imports one of the package's
        submodules is a cycle.
        """
        root = self.write(
            {
                "__init__.py": "",
                "pkg/__init__.py": "from mailproxy.outside import y\n",
                "pkg/sub.py": "",
                "outside.py": "from mailproxy.pkg.sub import z\ny = 1\n",
            }
        )
        graph = importGraph(root)
        self.assertEqual(graph["mailproxy.outside"], {"mailproxy.pkg.sub": False, "mailproxy.pkg": False})
        self.assertEqual(findCycles(graph), [["mailproxy.outside", "mailproxy.pkg", "mailproxy.outside"]])

    def test_documentedLayers(self) -> None:
        """
        The layers are read from the parts table of a page: the rows in
        order, modules and packages as dotted names, files outside the
        package and the other sections left out.
        """
        page = textwrap.dedent(
            """\
            # title

            ## The parts

            | layer | modules | what |
            | --- | --- | --- |
            | data | `model.py`, `settings.py` | values (`Route`) |
            | protocols | `imap/` | `_parser.py` |
            | entry | `cli.py`, `twisted/plugins/x.py` | the command |

            ## Next

            | layer | modules | what |
            | --- | --- | --- |
            | other | `nothing.py` | |
            """
        )
        layers = documentedLayers(page)
        self.assertEqual(
            layers,
            [
                ("data", ["mailproxy.model", "mailproxy.settings"]),
                ("protocols", ["mailproxy.imap"]),
                ("entry", ["mailproxy.cli"]),
            ],
        )
        self.assertEqual(layerOf(layers, "mailproxy.imap._frontend"), 1)
        self.assertIsNone(layerOf(layers, "mailproxy.imapx"))

    def test_cyclesAndReach(self) -> None:
        """
        Every group of modules that import each other is reported once, as
        a path to follow, lazy imports marked; what a module reaches comes
        with the chain that reaches it.
        """
        graph = {
            "mailproxy.a": {"mailproxy.b": False},
            "mailproxy.b": {"mailproxy.c": False},
            "mailproxy.c": {"mailproxy.a": True, "mailproxy.d": False},
            "mailproxy.d": {},
            "mailproxy.x": {"mailproxy.y": False},
            "mailproxy.y": {"mailproxy.x": False},
        }
        cycles = findCycles(graph)
        self.assertEqual(
            cycles,
            [["mailproxy.a", "mailproxy.b", "mailproxy.c", "mailproxy.a"], ["mailproxy.x", "mailproxy.y", "mailproxy.x"]],
        )
        self.assertEqual(
            describeCycle(graph, cycles[0]),
            "mailproxy.a -> mailproxy.b -> mailproxy.c -> mailproxy.a (lazy)",
        )
        self.assertEqual(reachable(graph, "mailproxy.b")["mailproxy.d"], ["mailproxy.b", "mailproxy.c", "mailproxy.d"])
        self.assertEqual(findCycles({"mailproxy.d": {}}), [])


class StructureTests(SynchronousTestCase):
    """
    The C{mailproxy} package itself.
    """

    def setUp(self) -> None:
        self.graph = importGraph()

    def test_noCycles(self) -> None:
        """
        No C{mailproxy} module imports itself through others, at load time
        or lazily.  Every cycle found is listed in the failure, one per line.
        """
        cycles = findCycles(self.graph)
        if cycles:
            self.fail(
                f"{len(cycles)} import cycle(s) in mailproxy/:\n"
                + "\n".join("  " + describeCycle(self.graph, cycle) for cycle in cycles)
            )

    def test_coreImportsNeitherConfigNorRouters(self) -> None:
        """
        The session core and the protocols' front and back ends reach
        neither the configuration parser nor the routers, directly or
        through other modules.  Every offending core module is listed in
        the failure with the chain of imports that gets there.
        """
        core = coreModules(self.graph)
        # The list follows the code: a renamed core module must not slip out.
        for name in ("mailproxy._session", "mailproxy._backend", "mailproxy._relay", "mailproxy.imap._frontend"):
            self.assertIn(name, core)
        problems = []
        for module in core:
            paths = reachable(self.graph, module)
            for forbidden in FORBIDDEN_FOR_CORE:
                reached = sorted(name for name in paths if name == forbidden or name.startswith(forbidden + "."))
                if reached:
                    problems.append(f"  {module} reaches {forbidden}: {' -> '.join(paths[reached[0]])}")
        if problems:
            self.fail("core modules that import config or routers:\n" + "\n".join(problems))

    def test_layers(self) -> None:
        """
        Every module is in one row of the parts table of
        C{docs/ARCHITECTURE.md}, and imports only from its own row and
        the rows before it.  The failure lists every module missing from
        the table and every import that goes to a later row.
        """
        with open(ARCHITECTURE, encoding="utf-8") as f:
            layers = documentedLayers(f.read())
        self.assertIn("data", [name for name, _ in layers])
        problems = []
        for module in sorted(self.graph):
            index = layerOf(layers, module)
            if index is None:
                if module != "mailproxy":
                    problems.append(f"  {module} is in no row of the table")
                continue
            for target, lazy in sorted(self.graph[module].items()):
                targetIndex = layerOf(layers, target)
                if targetIndex is not None and targetIndex > index:
                    problems.append(
                        f"  {module} ({layers[index][0]}) imports {target} ({layers[targetIndex][0]})"
                        + (" lazily" if lazy else "")
                    )
        if problems:
            self.fail(f"the layers of {ARCHITECTURE} do not hold:\n" + "\n".join(problems))


_CHECK_CONFIG = """\
[tls]
certificate = "selfsigned.pem"
key = "selfsigned.key"

[[listener]]
protocol = "imap"
endpoint = "tcp:10993:interface=127.0.0.1"
tls = "implicit"

[router]
type = "static"
path = "routes.toml"

[backend.old]
host = "127.0.0.1"
ports = { imap = 143 }
"""

#: Run in a fresh interpreter: C{mailproxy check FILE} through the command's
#: entry point, then what it loaded, as JSON on the last line.
_CHECK_PROGRAM = """\
import json, sys
from mailproxy.cli import main
status = main(["check", sys.argv[1]])
loaded = sorted(name for name in sys.modules if name == "twisted.mail" or name.startswith(("twisted.mail.", "mailproxy.demo", "mailproxy._demo")))
print(json.dumps({"status": status, "loaded": loaded}))
"""


class CheckLoadsTests(SynchronousTestCase):
    """
    What C{mailproxy check} loads: not the demo, and not C{twisted.mail}
    that the demo's IMAP servers are built on.
    """

    def test_checkLoadsNoMail(self) -> None:
        """
        A process that imports L{mailproxy.cli} and runs C{mailproxy check}
        on a configuration with TLS, a static router and a backend has the
        configuration checked (status 0) and has loaded neither the demo
        nor any of C{twisted.mail}.
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        makeSelfSigned(directory)
        with open(os.path.join(directory, "routes.toml"), "w") as f:
            f.write('default = "old"\n')
        path = os.path.join(directory, "mailproxy.toml")
        with open(path, "w") as f:
            f.write(_CHECK_CONFIG)
        environment = dict(os.environ, PYTHONPATH=_ROOT)
        done = subprocess.run(
            [sys.executable, "-c", _CHECK_PROGRAM, path],
            capture_output=True,
            text=True,
            env=environment,
            cwd=directory,
            timeout=60,
        )
        self.assertEqual(done.returncode, 0, done.stderr)
        lines = done.stdout.splitlines()
        self.assertEqual(lines[0], f"{path}: OK (1 listener, 1 backend)")
        self.assertEqual(json.loads(lines[-1]), {"status": 0, "loaded": []})

    def test_demoDefaultsWrittenOut(self) -> None:
        """
        The C{demo} command's port defaults, written out in the parser so
        that it need not import the demo, are the demo's own.
        """
        from mailproxy.cli import buildParser
        from mailproxy.demo import startDemo

        arguments = buildParser().parse_args(["demo"])
        defaults = inspect.signature(startDemo).parameters
        self.assertEqual(
            (arguments.imaps_port, arguments.imap_port, arguments.admin_port),
            (defaults["imapsPort"].default, defaults["imapPort"].default, defaults["adminPort"].default),
        )
