"""
The examples shipped with the package: the repository's C{examples/}
(configurations, route tables, routers, the systemd unit, the fail2ban
filters), installed as C{mailproxy/examples}. C{mailproxy examples DIR}
copies them where an operator can read and edit them.
"""

from __future__ import annotations

import os
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path

__all__ = ["ExamplesError", "exampleFiles", "writeExamples"]


class ExamplesError(Exception):
    """
    The examples cannot be found or written; C{str(error)} says why.
    """


def _root() -> Traversable:
    installed = files("mailproxy").joinpath("examples")
    if installed.is_dir():
        return installed
    # A checkout on sys.path (tests/run's editable install) has them beside
    # the package, where the wheel's build takes them from.
    checkout = Path(__file__).resolve().parent.parent / "examples"
    if checkout.is_dir():
        return checkout
    raise ExamplesError("the examples are not installed with this copy of mailproxy")


def exampleFiles() -> dict[str, Traversable]:
    """
    Every example file by its path relative to the examples directory
    (C{/}-separated, e.g. C{fail2ban/jail.d/mailproxy.local}).

    @raise ExamplesError: the examples are not installed.
    """
    found: dict[str, Traversable] = {}

    def walk(directory: Traversable, prefix: str) -> None:
        for entry in directory.iterdir():
            if entry.name == "__pycache__":
                continue  # compiled by the installer, not an example
            if entry.is_dir():
                walk(entry, prefix + entry.name + "/")
            else:
                found[prefix + entry.name] = entry

    walk(_root(), "")
    return dict(sorted(found.items()))


def writeExamples(directory: str) -> list[str]:
    """
    Copy every example file into C{directory}, keeping the subdirectories,
    and creating what does not exist. Existing files are never replaced: if
    any example would replace one, nothing is written.

    @return: the paths written.
    @raise ExamplesError: the examples are not installed, a file would be
        replaced, or the directory cannot be written.
    """
    examples = exampleFiles()
    targets = {name: os.path.join(directory, *name.split("/")) for name in examples}
    present = [path for path in targets.values() if os.path.lexists(path)]
    if present:
        more = f" (and {len(present) - 1} more)" if len(present) > 1 else ""
        raise ExamplesError(f"{present[0]}{more}: exists already; nothing written")
    written = []
    try:
        for name, resource in examples.items():
            path = targets[name]
            os.makedirs(os.path.dirname(path), exist_ok=True)
            # "x": a file that appeared since the check above is not replaced.
            with open(path, "xb") as f:
                f.write(resource.read_bytes())
            written.append(path)
    except OSError as e:
        raise ExamplesError(f"{e.filename or directory}: {e.strerror or e}") from None
    return written
