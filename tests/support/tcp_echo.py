#!/usr/bin/env python3
"""A TCP echo server for many mostly idle connections (one process, asyncio): tcp_echo.py PORT.

Prints `ready` once it listens. Raises its own open-file soft limit to the hard limit so that it
can hold as many connections as the agent in front of it."""
import asyncio
import resource
import sys


async def echo(reader, writer):
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


async def main(port):
    server = await asyncio.start_server(echo, "0.0.0.0", port, backlog=4096)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    asyncio.run(main(int(sys.argv[1])))
