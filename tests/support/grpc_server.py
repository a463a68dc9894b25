#!/usr/bin/env python3
"""gRPC test server without generated code: raw-bytes handlers for `mesh.Test/Echo` (unary) and
`mesh.Test/Count` and `mesh.Test/Ticks` (server streaming). Replies name the server, and trailers carry `x-served-by`.

  grpc_server.py NAME PORT
"""
import sys
import time
from concurrent import futures

import grpc

name, port = sys.argv[1], int(sys.argv[2])


def echo(request, context):
    context.set_trailing_metadata((("x-served-by", name),))
    md = dict(context.invocation_metadata())
    return f"{name}:{request.decode()}:rid={md.get('x-request-id', '')}".encode()


def count(request, context):
    context.set_trailing_metadata((("x-served-by", name),))
    n = int(request.decode() or "3")
    for i in range(n):
        yield f"{name}:{i}".encode()


def ticks(request, context):
    """`N:MS`: N replies, MS milliseconds apart (a stream that outlives an agent handover)."""
    context.set_trailing_metadata((("x-served-by", name),))
    n, ms = (int(x) for x in request.decode().split(":"))
    for i in range(n):
        if i:
            time.sleep(ms / 1000)
        yield f"{name}:{i}".encode()


def fail(request, context):
    context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"{name} says no")


handler = grpc.method_handlers_generic_handler("mesh.Test", {
    "Echo": grpc.unary_unary_rpc_method_handler(echo),
    "Count": grpc.unary_stream_rpc_method_handler(count),
    "Ticks": grpc.unary_stream_rpc_method_handler(ticks),
    "Fail": grpc.unary_unary_rpc_method_handler(fail),
})
server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
server.add_generic_rpc_handlers((handler,))
server.add_insecure_port(f"[::]:{port}")
server.start()
print("ready", flush=True)
server.wait_for_termination()
