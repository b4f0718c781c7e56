#!/usr/bin/env python3
"""Minimal OTLP/gRPC trace receiver for broker/tests/trace.rs (the trace twin of
collector/tests/otlp_receiver.py).

Listens on 127.0.0.1 (on `--port`, 0 or absent for a free one) and prints the port as the first line of
stdout. Then, for every Export call, prints one JSON line per span:

    {"batch": N, "resource": {...}, "scope": "...", "name": "...", "kind": "server|client|internal|...",
     "trace_id": "<32 hex>", "span_id": "<16 hex>", "parent_span_id": "<16 hex>" | null,
     "start_ns": int, "end_ns": int, "status": {"code": "unset|ok|error", "message": "..."},
     "attributes": {...}}

followed by one line {"batch": N, "end": true, "spans": K}, so a reader can tell a complete export from a
partial one. Exits when stdin reaches end of file (the test holds it open), so the receiver cannot outlive a
test that crashed. Needs the PyPI packages `opentelemetry-proto` and `grpcio`.
"""

import argparse
import json
import sys
import threading
from concurrent import futures

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2


def any_value(v):
    kind = v.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [any_value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return attributes(v.kvlist_value.values)
    if kind == "bytes_value":
        return v.bytes_value.hex()
    return getattr(v, kind)


def attributes(kvs):
    return {kv.key: any_value(kv.value) for kv in kvs}


def enum_name(enum, value, prefix):
    """`SPAN_KIND_SERVER` -> `server`; an unknown number stays visible as such."""
    try:
        return enum.Name(value).removeprefix(prefix).lower()
    except ValueError:
        return f"unknown({value})"


class TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self):
        self.lock = threading.Lock()
        self.batches = 0

    def Export(self, request, context):
        lines = []
        with self.lock:
            self.batches += 1
            batch = self.batches
        for rs in request.resource_spans:
            resource = attributes(rs.resource.attributes)
            for ss in rs.scope_spans:
                for span in ss.spans:
                    lines.append(json.dumps({
                        "batch": batch,
                        "resource": resource,
                        "scope": ss.scope.name,
                        "name": span.name,
                        "kind": enum_name(trace_pb2.Span.SpanKind, span.kind, "SPAN_KIND_"),
                        "trace_id": span.trace_id.hex(),
                        "span_id": span.span_id.hex(),
                        "parent_span_id": span.parent_span_id.hex() or None,
                        "start_ns": span.start_time_unix_nano,
                        "end_ns": span.end_time_unix_nano,
                        "status": {
                            "code": enum_name(trace_pb2.Status.StatusCode, span.status.code, "STATUS_CODE_"),
                            "message": span.status.message,
                        },
                        "attributes": attributes(span.attributes),
                    }))
        lines.append(json.dumps({"batch": batch, "end": True, "spans": len(lines)}))
        # One write per batch under the lock: concurrent exports must not interleave their lines.
        with self.lock:
            sys.stdout.write("\n".join(lines) + "\n")
            sys.stdout.flush()
        return trace_service_pb2.ExportTraceServiceResponse()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1; 0 for a free one")
    args = parser.parse_args()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(TraceService(), server)
    port = server.add_insecure_port(f"127.0.0.1:{args.port}")
    if port == 0:
        print(f"otlp_trace_receiver: could not bind 127.0.0.1:{args.port}", file=sys.stderr)
        return 1
    server.start()
    print(port, flush=True)
    for _ in sys.stdin:
        pass
    server.stop(grace=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
