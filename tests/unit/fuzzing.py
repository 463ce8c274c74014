"""
What the property-based (hypothesis) tests share: one settings profile and
strategies for hostile input.

The profile is derandomized and keeps no example database: every run, in
CI and on a developer's machine, tries the same examples in the same bounded
time, and a failure found once is found again by the next run rather than
by chance. C{HYPOTHESIS_PROFILE=explore} (with C{HYPOTHESIS_EXAMPLES=N})
searches fresh random examples instead, for a longer look by hand.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

__all__ = ["chunked", "hostileLines", "rechunk"]

_CHECKS = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]

settings.register_profile(
    "mailproxy",
    max_examples=100,
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=True,
    suppress_health_check=_CHECKS,
)
settings.register_profile(
    "explore",
    max_examples=int(os.environ.get("HYPOTHESIS_EXAMPLES", "2000")),
    database=None,
    deadline=None,
    print_blob=True,
    suppress_health_check=_CHECKS,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "mailproxy"))

#: Line endings a client may send, or none (a line cut short).
_ENDINGS = st.sampled_from([b"\r\n", b"\n", b"\r", b""])


def hostileLines(vocabulary: list[bytes], maxLines: int = 30) -> st.SearchStrategy[bytes]:
    """
    A client's input: lines that are commands of the protocol (from
    C{vocabulary}), random octets, or a long run of one or two octets (past
    every line limit), each with any line ending or none.
    """
    commands = st.sampled_from(vocabulary)
    # Mostly commands, so that examples get past the greeting's state.
    word = st.one_of(
        commands,
        commands,
        commands,
        st.binary(max_size=40),
        st.builds(lambda unit, count: unit * count, st.binary(min_size=1, max_size=2), st.integers(0, 700)),
    )
    line = st.builds(lambda body, ending: body + ending, word, _ENDINGS)
    return st.lists(line, max_size=maxLines).map(b"".join)


def rechunk(data: bytes, sizes: list[int]) -> list[bytes]:
    """
    C{data} cut into chunks of C{sizes} in turn (repeated as needed; a size
    list that is empty gives one chunk).
    """
    if not sizes:
        return [data] if data else []
    chunks, position, index = [], 0, 0
    while position < len(data):
        size = sizes[index % len(sizes)]
        chunks.append(data[position : position + size])
        position += size
        index += 1
    return chunks


#: How to cut input into reads: chunk sizes used in turn.
chunkSizes = st.lists(st.integers(1, 80), max_size=12)


def chunked(data: st.SearchStrategy[bytes]) -> st.SearchStrategy[tuple[bytes, list[bytes]]]:
    """
    Input from C{data} together with one way of cutting it into reads.
    """
    return st.tuples(data, chunkSizes).map(lambda pair: (pair[0], rechunk(*pair)))
