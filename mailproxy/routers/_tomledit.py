"""
Change one entry of a TOML route table in place, and replace the file safely.

An operator's route table has comments, order and blank lines worth keeping,
so an entry is changed by editing its own line, not by writing the whole
table anew.  Every edit is checked: the new text is parsed and must hold
exactly the old data with the one change; an entry written in a form this
module does not edit (a dotted key, a value over several lines) is refused
with L{EditError}, leaving the file alone.

The forms edited are the ones C{examples/routes.toml} uses::

    default = "old"
    [domains]
    "example.org" = "old"
    [accounts]
    "alice@example.org" = "new"
    "carol@example.org" = { backend = "new", password = "s3cret" }
    [accounts."dave@example.org"]
    backend = "new"
"""

from __future__ import annotations

import copy
import json
import re
import tomllib
from collections.abc import Iterable
from typing import Any

__all__ = ["EditError", "setEntry", "setEntries", "deleteEntry"]

_KEY = r'"(?:[^"\\]|\\.)*"|\'[^\']*\'|[A-Za-z0-9_-]+'
_STRING = r'"(?:[^"\\]|\\.)*"|\'[^\']*\''
_KEY_VALUE = re.compile(rf"^(?P<indent>\s*)(?P<key>{_KEY})(?P<equals>\s*=\s*)(?P<value>.*?)(?P<rest>\s*(?:#.*)?)$")
_HEADER = re.compile(rf"^\s*\[(?!\[)\s*(?P<path>(?:{_KEY})(?:\s*\.\s*(?:{_KEY}))*)\s*\]\s*(?:#.*)?$")
_ARRAY_HEADER = re.compile(r"^\s*\[\[")
_STRING_VALUE = re.compile(rf"^(?:{_STRING})$")
_INLINE_TABLE = re.compile(r"^\{.*\}$")
_BACKEND_IN_TABLE = re.compile(rf"(?P<lead>(?:^|[{{,])\s*backend\s*=\s*)(?P<value>{_STRING})")
_PATH_PART = re.compile(rf"\s*(?P<key>{_KEY})\s*(?:\.|$)")


class EditError(Exception):
    """
    The entry cannot be changed as asked, or not by editing its line.
    """


def _unquote(token: str) -> str | None:
    """
    The key that TOML key token C{token} stands for, or L{None} if this
    module cannot read it.
    """
    if token.startswith('"'):
        try:
            value = json.loads(token)
        except ValueError:
            return None
        return value if isinstance(value, str) else None
    if token.startswith("'"):
        return token[1:-1]
    return token


def _headerPath(line: str) -> tuple[str, ...] | None:
    """
    The key path of a C{[table]} header line, or L{None} if C{line} is no
    such header.
    """
    match = _HEADER.match(line)
    if match is None:
        return None
    parts = []
    for part in _PATH_PART.finditer(match.group("path")):
        key = _unquote(part.group("key"))
        if key is None:
            return None
        parts.append(key)
    return tuple(parts)


def _quote(text: str) -> str:
    """
    C{text} as a TOML basic string.
    """
    return json.dumps(text, ensure_ascii=False)


def _sections(lines: list[str]) -> list[tuple[tuple[str, ...] | None, int, int]]:
    """
    The file's sections: C{(header path, first line, end)}; the top level
    has the path C{()}, an array-of-tables section L{None}.
    """
    sections: list[tuple[tuple[str, ...] | None, int, int]] = []
    path: tuple[str, ...] | None = ()
    start = 0
    for index, line in enumerate(lines):
        header = _headerPath(line)
        if header is None and not _ARRAY_HEADER.match(line):
            continue
        sections.append((path, start, index))
        path, start = header, index
    sections.append((path, start, len(lines)))
    return sections


def _findKey(lines: list[str], start: int, end: int, key: str) -> int | None:
    """
    The line in C{lines[start:end]} that assigns C{key}, if one does.
    """
    for index in range(start, end):
        match = _KEY_VALUE.match(lines[index])
        if match is not None and _unquote(match.group("key")) == key:
            return index
    return None


def _replaceValue(line: str, backend: str) -> str | None:
    """
    C{line} (a key/value line) with its backend changed: the value itself
    if it is a string, the C{backend} key if it is an inline table.
    """
    match = _KEY_VALUE.match(line)
    assert match is not None
    value = match.group("value")
    if _STRING_VALUE.match(value):
        value = _quote(backend)
    elif _INLINE_TABLE.match(value):
        value, count = _BACKEND_IN_TABLE.subn(lambda m: m.group("lead") + _quote(backend), value, count=1)
        if not count:
            return None
    else:
        return None
    return match.group("indent") + match.group("key") + match.group("equals") + value + match.group("rest")


def _existingKey(data: dict[str, Any], key: str) -> str | None:
    """
    The key of C{data} that equals C{key} without case, if any.
    """
    folded = key.lower()
    for existing in data:
        if existing.lower() == folded:
            return existing
    return None


def _lastEntryLine(lines: list[str], start: int, end: int) -> int:
    """
    The index after the last key/value (or header) line of a section, so
    that trailing comments and blank lines stay with what follows.
    """
    last = start
    for index in range(start, end):
        stripped = lines[index].strip()
        if stripped and not stripped.startswith("#"):
            last = index
    return last + 1


def _splitLines(text: str) -> list[str]:
    return text.split("\n")


def _check(text: str, expected: dict[str, Any], what: str) -> str:
    """
    Return C{text} if it parses to C{expected}, else refuse the edit.
    """
    return _checked(text, expected, what)[0]


def _checked(text: str, expected: dict[str, Any], what: str) -> tuple[str, dict[str, Any]]:
    """
    Like L{_check}, also returning what C{text} parses to.
    """
    try:
        parsed = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        parsed = None
    if parsed is None or _withoutEmptyTables(parsed) != _withoutEmptyTables(expected):
        raise EditError(
            f"cannot change {what} by editing its line (it is written in a form this "
            "tool does not rewrite, e.g. a dotted key); change it by hand"
        )
    return text, parsed


def _withoutEmptyTables(data: dict[str, Any]) -> dict[str, Any]:
    # Removing a table's last entry may remove the table itself.
    return {key: value for key, value in data.items() if value != {}}


def setEntry(text: str, table: str | None, key: str, backend: str) -> str:
    """
    Route C{key} in C{table} to C{backend}, editing as little as possible.

    @param table: C{"accounts"} or C{"domains"}; L{None} for the top-level
        C{default}.
    @param key: the account or domain (matched without case; a new entry is
        written as given).
    @return: the new text.
    @raise EditError: the text does not parse, or the entry cannot be edited
        in place.
    """
    return setEntries(text, [(table, key, backend)])[0]


def setEntries(text: str, edits: Iterable[tuple[str | None, str, str]]) -> tuple[str, dict[str, Any]]:
    """
    Make several edits like L{setEntry} at once: the text is parsed once,
    each entry's line is found in an index of the file's lines, and the
    result is checked once, however many entries change.  All of the edits
    happen or none does.

    @param edits: C{(table, key, backend)} like L{setEntry}'s arguments;
        of two edits of the same entry (keys compared without case), the
        last wins.
    @return: the new text and what it parses to.
    @raise EditError: the text does not parse, or an entry cannot be edited
        in place.
    """
    data = _parse(text)
    expected = copy.deepcopy(data)
    lines = _splitLines(text)
    sections = _sections(lines)
    # Keyed without case, as the route table matches entries.
    wanted: dict[tuple[str | None, str], tuple[str, str]] = {}
    for table, key, backend in edits:
        wanted[table, "" if table is None else key.lower()] = (key, backend)
    # Lines are replaced in place; new lines are inserted at the end, from
    # the bottom up, so that the indexes of the lines stay right meanwhile.
    replaced: dict[int, str] = {}
    inserted: dict[str | None, list[str]] = {}
    unedited: list[str] = []
    existingKeys: dict[str, dict[str, str]] = {}
    keyLines: dict[tuple[str, ...], dict[str, int]] = {}

    def findKey(path: tuple[str, ...], key: str) -> int | None:
        if path not in keyLines:
            found: dict[str, int] = {}
            for sectionPath, start, end in sections:
                if sectionPath == path:
                    for index in range(start, end):
                        match = _KEY_VALUE.match(lines[index])
                        if match is not None:
                            name = _unquote(match.group("key"))
                            if name is not None:
                                found.setdefault(name, index)
                    break
            keyLines[path] = found
        return keyLines[path].get(key)

    def replace(index: int | None, backend: str, what: str) -> None:
        line = None if index is None else _replaceValue(lines[index], backend)
        if index is None or line is None:
            unedited.append(what)
        else:
            replaced[index] = line

    for (table, _), (key, backend) in wanted.items():
        if table is None:
            expected["default"] = backend
            index = _findKey(lines, *_topLevel(lines), "default")
            if index is None:
                inserted.setdefault(None, []).append("default = " + _quote(backend))
            else:
                replace(index, backend, "default")
            continue
        entries = expected.setdefault(table, {})
        if not isinstance(entries, dict):
            raise EditError(f"{table} is not a table")
        if table not in existingKeys:
            existingKeys[table] = {name.lower(): name for name in entries}
        existing = existingKeys[table].get(key.lower())
        if existing is None:
            entries[key] = backend
            existingKeys[table][key.lower()] = key
            inserted.setdefault(table, []).append(_quote(key) + " = " + _quote(backend))
            continue
        what = f"{table}[{existing!r}]"
        value = entries[existing]
        if isinstance(value, dict):
            value["backend"] = backend
        else:
            entries[existing] = backend
        index = findKey((table,), existing)
        if index is None:
            index = findKey((table, existing), "backend")
        replace(index, backend, what)

    for index, line in replaced.items():
        lines[index] = line
    appended: list[str] = []
    at: list[tuple[int, list[str]]] = []
    for table, new in inserted.items():
        if table is None:
            # Inserted alone below: the top level's place depends on its lines.
            continue
        for path, start, end in sections:
            if path == (table,):
                at.append((_lastEntryLine(lines, start, end), new))
                break
        else:
            appended += ["", f"[{table}]", *new]
    for index, new in sorted(at, key=lambda item: item[0], reverse=True):
        lines[index:index] = new
    if appended:
        if lines[-1] == "":
            lines.pop()
        lines += appended + [""]
    if None in inserted:
        lines = _insertTopLevel(lines, inserted[None][0])
    if unedited:
        what = unedited[0]
    elif len(wanted) == 1:
        # One entry: the refusal names it, as it always did.
        ((table, _), (key, _)), = wanted.items()
        what = "default" if table is None else f"{table}[{existingKeys[table][key.lower()]!r}]"
    else:
        what = "the route table"
    return _checked("\n".join(lines), expected, what)


def deleteEntry(text: str, table: str | None, key: str) -> str:
    """
    Remove the entry for C{key} from C{table} (L{None}: the C{default}).

    @return: the new text.
    @raise EditError: there is no such entry, or it cannot be removed in
        place.
    """
    data = _parse(text)
    expected = copy.deepcopy(data)
    lines = _splitLines(text)
    if table is None:
        if "default" not in expected:
            raise EditError("there is no default")
        del expected["default"]
        index = _findKey(lines, *_topLevel(lines), "default")
        if index is None:
            return _check(text, expected, "default")
        return _check("\n".join(lines[:index] + lines[index + 1 :]), expected, "default")
    entries = expected.get(table)
    if not isinstance(entries, dict):
        entries = {}  # no such table, so no such entry
    existing = _existingKey(entries, key)
    if existing is None:
        raise EditError(f"there is no entry {key!r} in {table}")
    what = f"{table}[{existing!r}]"
    del entries[existing]
    for path, start, end in _sections(lines):
        if path == (table,):
            index = _findKey(lines, start, end, existing)
            if index is not None:
                return _check("\n".join(lines[:index] + lines[index + 1 :]), expected, what)
        if path == (table, existing):
            return _check("\n".join(lines[:start] + lines[_lastEntryLine(lines, start, end) :]), expected, what)
    return _check(text, expected, what)


def _parse(text: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise EditError(f"the route table does not parse: {e}") from None


def _topLevel(lines: list[str]) -> tuple[int, int]:
    """
    The line range of the top-level section (before the first header).
    """
    path, start, end = _sections(lines)[0]
    return start, end


def _insertTopLevel(lines: list[str], line: str) -> list[str]:
    """
    C{lines} with C{line} added to the top level: after its last key/value
    line, or before the comments that lead into the first table.
    """
    start, end = _topLevel(lines)
    last = None
    for index in range(start, end):
        if _KEY_VALUE.match(lines[index]) and not lines[index].lstrip().startswith("#"):
            last = index
    if last is not None:
        at = last + 1
    else:
        at = end
        while at > start and lines[at - 1].lstrip().startswith("#"):
            at -= 1
    return lines[:at] + [line] + lines[at:]


def _edited(lines: list[str], index: int, backend: str, expected: dict[str, Any], what: str) -> str:
    line = _replaceValue(lines[index], backend)
    if line is None:
        return _check("\n".join(lines), expected, what)
    return _check("\n".join(lines[:index] + [line] + lines[index + 1 :]), expected, what)
