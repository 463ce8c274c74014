"""
Server endpoint strings, parsed without searching Twisted's plugins; and a
client connection that logs nothing (L{connectQuietly}).

Twisted finds the parsers of C{tcp6:} and C{systemd:} endpoints by loading
every module in the C{twisted/plugins} directories and rewriting each
directory's C{dropin.cache} that is out of date: a service user may not
write there (C{Unable to write to plugin cache ...: error number 13} on
every start), and the search imports modules the proxy has no use for.
Those two parsers are Twisted's own, so they are taken from where Twisted
defines them.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IProtocol, IStreamClientEndpoint, IStreamServerEndpoint, IStreamServerEndpointStringParser
from twisted.internet.protocol import Factory, Protocol
from twisted.plugins.twisted_core import systemdEndpointParser, tcp6ServerEndpointParser

__all__ = ["connectQuietly", "serverEndpoint", "splitDescription"]

#: The parsers Twisted would look up among its plugins, by endpoint type.
_PLUGIN_PARSERS: dict[str, IStreamServerEndpointStringParser] = {
    "tcp6": tcp6ServerEndpointParser,
    "systemd": systemdEndpointParser,
}


def splitDescription(description: str) -> tuple[list[str], dict[str, str]]:
    """
    Split an endpoint string as Twisted does: parts separated by colons,
    C{key=value} parts as keyword arguments, a backslash taking the next
    character as it is (C{interface=\\:\\:1}).

    @return: the positional parts (the type first) and the keyword ones.
    """
    arguments: list[str] = []
    keywords: dict[str, str] = {}
    key: str | None = None
    current = ""
    characters = iter(description)
    for character in characters:
        if character == "\\":
            current += next(characters, "")
        elif character == "=" and key is None:
            key, current = current, ""
        elif character == ":":
            if key is None:
                arguments.append(current)
            else:
                keywords[key] = current
            key, current = None, ""
        else:
            current += character
    if key is None:
        arguments.append(current)
    else:
        keywords[key] = current
    return arguments, keywords


def serverEndpoint(reactor: Any, description: str) -> IStreamServerEndpoint:
    """
    The server endpoint for C{description}, as
    L{twisted.internet.endpoints.serverFromString} makes it.
    """
    arguments, keywords = splitDescription(description)
    parser = _PLUGIN_PARSERS.get(arguments[0].strip().lower())
    if parser is None:
        return serverFromString(reactor, description)
    endpoint: IStreamServerEndpoint = parser.parseStreamServer(reactor, *arguments[1:], **keywords)
    return endpoint


class _OneProtocol(Factory):
    """
    Hands one protocol to its connection, and logs nothing.
    """

    noisy = False

    def __init__(self, protocol: Protocol) -> None:
        self.connecting = protocol

    def buildProtocol(self, addr: object) -> Protocol:
        return self.connecting


def connectQuietly(endpoint: IStreamClientEndpoint, protocol: Protocol) -> Deferred[IProtocol]:
    """
    Connect C{protocol} through C{endpoint}, as Twisted's
    C{connectProtocol} does, but without its factory's "Starting factory"
    and "Stopping factory" log lines: the health probes connect to every
    backend port at each check and metrics scrape.
    """
    return endpoint.connect(_OneProtocol(protocol))
