"""
A WebSocket backend for the integration tests: C{python wsbackend.py NAME
PORT} listens on 127.0.0.1:PORT, offers the subprotocol C{jmap}, and
echoes each message prefixed with C{NAME:} (text stays text, binary stays
binary). A first message C{whoami} is answered instead with a JSON object
naming the server, the user of the C{Authorization: Basic} header of the
handshake, and the C{X-Forwarded-For} and C{Forwarded} headers it saw.
"""

from __future__ import annotations

import asyncio
import base64
import json
import sys

from websockets.asyncio.server import ServerConnection, serve
from websockets.typing import Subprotocol


def handshakeUser(authorization: str | None) -> str | None:
    """
    The user name of a C{Basic} C{Authorization} header, or L{None}.
    """
    if authorization is None or not authorization.startswith("Basic "):
        return None
    return base64.b64decode(authorization[len("Basic ") :]).decode().partition(":")[0]


async def main(name: str, port: int) -> None:
    async def handler(connection: ServerConnection) -> None:
        first = True
        async for message in connection:
            if first and message == "whoami":
                # Set once the handshake is done, as it is in the handler.
                assert connection.request is not None
                headers = connection.request.headers
                await connection.send(
                    json.dumps(
                        {
                            "server": name,
                            "user": handshakeUser(headers.get("Authorization")),
                            "x-forwarded-for": headers.get_all("X-Forwarded-For"),
                            "forwarded": headers.get_all("Forwarded"),
                        }
                    )
                )
            elif isinstance(message, bytes):
                await connection.send(name.encode() + b":" + message)
            else:
                await connection.send(name + ":" + message)
            first = False

    async with serve(handler, "127.0.0.1", port, subprotocols=[Subprotocol("jmap")], max_size=None):
        print(f"listening on {port}", flush=True)
        await asyncio.Future()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
