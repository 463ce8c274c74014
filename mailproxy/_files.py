"""
Replacing a file atomically and durably, for the files the proxy itself
rewrites while it runs (the static route table, the migration journal).

Blocking: callers run it in a thread.
"""

from __future__ import annotations

import os
import stat
import tempfile

__all__ = ["replaceFile"]


def replaceFile(path: str, text: str, newMode: int | None = None) -> None:
    """
    Replace the file at C{path} (following symbolic links) with C{text},
    atomically and durably: a new file beside it with the same mode and
    owner, written and flushed to disk, renamed over the old one, and the
    directory flushed too.  Readers see the old file or the new one, never
    a part.

    @param newMode: the mode of the file when there is none yet (its
        directory is made too); without it, a missing file is an error
        (C{FileNotFoundError}), as a route table that vanished must not be
        made anew.
    """
    target = os.path.realpath(path)
    directory, name = os.path.split(target)
    try:
        info = os.stat(target)
    except FileNotFoundError:
        if newMode is None:
            raise
        os.makedirs(directory, exist_ok=True)
        mode, owner = newMode, None
    else:
        mode, owner = stat.S_IMODE(info.st_mode), (info.st_uid, info.st_gid)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    try:
        os.fchmod(descriptor, mode)
        if owner is not None:
            try:
                os.fchown(descriptor, *owner)
            except PermissionError:
                # Not root: the file stays ours, as it would with any editor.
                pass
        with os.fdopen(descriptor, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, target)
    except BaseException:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        raise
    directoryDescriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directoryDescriptor)
    finally:
        os.close(directoryDescriptor)
