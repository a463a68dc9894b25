#!/usr/bin/env python3
"""gRPC test client: calls one method and prints a JSON line with the replies, the status code,
the details and the trailing metadata.

  grpc_client.py TARGET METHOD PAYLOAD [TIMEOUT_S]    (METHOD: Echo, Count, Ticks or Fail)
"""
import json, sys

import grpc

target, method, payload = sys.argv[1], sys.argv[2], sys.argv[3].encode()
timeout = float(sys.argv[4]) if len(sys.argv) > 4 else 10
out = {"replies": [], "code": None, "details": None, "trailers": {}}
with grpc.insecure_channel(target) as ch:
    path = f"/mesh.Test/{method}"
    try:
        if method in ("Count", "Ticks"):
            call = ch.unary_stream(path)(payload, timeout=timeout)
            for r in call:
                out["replies"].append(r.decode())
        else:
            reply, call = ch.unary_unary(path).with_call(payload, timeout=timeout)
            out["replies"].append(reply.decode())
        out["code"] = call.code().name
        out["trailers"] = dict(call.trailing_metadata() or ())
    except grpc.RpcError as e:
        out["code"] = e.code().name
        out["details"] = e.details()
        out["trailers"] = dict(e.trailing_metadata() or ())
print(json.dumps(out))
