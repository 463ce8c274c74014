"""
The static type of the transports the proxy's protocols run on.

Twisted types C{Protocol.transport} as an optional L{ITransport}, the least
any transport offers. The proxy's connections are TCP (or TLS over TCP, or
either behind a PROXY header reader), and it relies on more: STARTTLS,
aborting, and the producer/consumer methods the relay's backpressure uses.
Twisted's TCP and TLS transports have all of them without declaring every
interface, so this one is for the type checker only: protocols annotate
C{transport} with it, nothing is adapted to it at run time.
"""

from twisted.internet.interfaces import IConsumer, IPushProducer, ITLSTransport


class IProxyTransport(ITLSTransport, IPushProducer, IConsumer):
    """
    A stream connection as the proxy uses it: TCP with STARTTLS and
    abortConnection (L{ITLSTransport}), pausing and resuming its reading
    (L{IPushProducer}), and a producer registered on its writing side
    (L{IConsumer}).
    """
