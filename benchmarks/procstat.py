"""
CPU time and resident memory of a process and its descendants, read from
C{/proc}.
"""

from __future__ import annotations

import os
from pathlib import Path

import attrs

_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


@attrs.frozen
class Usage:
    """
    Resource usage of a process tree at one moment.

    @ivar cpu: user plus system CPU seconds of the live processes, plus what
        their reaped children used (C{cutime}, C{cstime}), so that processes
        that came and went are counted too.
    @ivar rss: resident set size in bytes, summed over the live processes
        (shared pages count once per process, as C{ps} shows them).
    @ivar processes: how many processes were summed.
    """

    cpu: float
    rss: int
    processes: int


def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name may hold spaces and parentheses: fields start after
    # the last ")", at field 3 (state).
    return text[text.rindex(")") + 2 :].split()


def descendants(root: int) -> list[int]:
    """
    C{root} and every live process below it.
    """
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat(int(entry))
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(entry))
    found = [root]
    index = 0
    while index < len(found):
        found.extend(children.get(found[index], ()))
        index += 1
    return found


def usage(root: int) -> Usage:
    """
    The usage of C{root} and its descendants now.
    """
    cpuTicks = 0
    rssPages = 0
    count = 0
    for pid in descendants(root):
        fields = _stat(pid)
        if fields is None:
            continue
        # Fields (1-based, as in proc(5)): 14 utime, 15 stime, 16 cutime,
        # 17 cstime, 24 rss; the list starts at field 3.
        cpuTicks += sum(int(fields[i - 3]) for i in (14, 15, 16, 17))
        rssPages += int(fields[24 - 3])
        count += 1
    return Usage(cpu=cpuTicks / _TICKS, rss=rssPages * _PAGE, processes=count)


def cpuMsPer(before: Usage | None, after: Usage | None, per: float, digits: int = 4) -> float | None:
    """
    The CPU milliseconds used between two readings per unit of work (a
    login, a megabyte), rounded to C{digits}; L{None} without both readings
    or without work.
    """
    if before is None or after is None or per <= 0:
        return None
    return round((after.cpu - before.cpu) * 1000 / per, digits)
