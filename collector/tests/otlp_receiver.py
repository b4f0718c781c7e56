#!/usr/bin/env python3
"""Minimal OTLP/gRPC receiver for metrics and traces, used by collector/tests/otlp.rs,
broker/tests/trace.rs and the broker benchmark.

Listens on 127.0.0.1 (on `--port`, 0 or absent for a free one) and prints the port as the first line of
stdout. Then, for every metrics Export call, prints one JSON line per data point:

    {"batch": N, "resource": {...}, "scope": "...", "name": "...", "kind": "sum|gauge|histogram|...",
     "unit": "...", "monotonic": bool|null, "temporality": "cumulative|delta|null",
     "attributes": {...}, "value": int|float|{"count": .., "sum": ..}}

followed by one line {"batch": N, "end": true, "points": K}; and for every trace Export call, one JSON line
per span:

    {"batch": N, "resource": {...}, "scope": "...", "name": "...", "kind": "server|client|internal|...",
     "trace_id": "<32 hex>", "span_id": "<16 hex>", "parent_span_id": "<16 hex>" | null,
     "start_ns": int, "end_ns": int, "status": {"code": "unset|ok|error", "message": "..."},
     "attributes": {...}}

followed by one line {"batch": N, "end": true, "spans": K}. The end lines let a reader tell a complete export
from a partial one. Exits when stdin reaches end of file (the test holds it open), so the receiver cannot
outlive a test that crashed. Needs the PyPI packages `opentelemetry-proto` and `grpcio`.
"""

import argparse
import json
import sys
import threading
from concurrent import futures

import grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.metrics.v1 import metrics_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

TEMPORALITY = {
    metrics_pb2.AGGREGATION_TEMPORALITY_CUMULATIVE: "cumulative",
    metrics_pb2.AGGREGATION_TEMPORALITY_DELTA: "delta",
}


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


def number(point):
    kind = point.WhichOneof("value")
    return None if kind is None else getattr(point, kind)


def points(metric):
    """Yields (kind, monotonic, temporality, attributes, value) for each data point of a metric."""
    kind = metric.WhichOneof("data")
    if kind == "sum":
        t = TEMPORALITY.get(metric.sum.aggregation_temporality)
        for p in metric.sum.data_points:
            yield kind, metric.sum.is_monotonic, t, p.attributes, number(p)
    elif kind == "gauge":
        for p in metric.gauge.data_points:
            yield kind, None, None, p.attributes, number(p)
    elif kind == "histogram":
        t = TEMPORALITY.get(metric.histogram.aggregation_temporality)
        for p in metric.histogram.data_points:
            value = {"count": p.count, "sum": p.sum, "bucket_counts": list(p.bucket_counts),
                     "explicit_bounds": list(p.explicit_bounds)}
            yield kind, None, t, p.attributes, value
    elif kind is not None:
        # Anything else is reported by kind only, so the test fails on it visibly instead of missing it.
        yield kind, None, None, [], None


class Printer:
    """Numbers export calls and prints each call's lines in one write, so concurrent exports (of either
    signal) never interleave their lines."""

    def __init__(self):
        self.lock = threading.Lock()
        self.batches = 0

    def next_batch(self):
        with self.lock:
            self.batches += 1
            return self.batches

    def emit(self, batch, lines, count_key):
        lines.append(json.dumps({"batch": batch, "end": True, count_key: len(lines)}))
        with self.lock:
            sys.stdout.write("\n".join(lines) + "\n")
            sys.stdout.flush()


class MetricsService(metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self, printer):
        self.printer = printer

    def Export(self, request, context):
        batch = self.printer.next_batch()
        lines = []
        for rm in request.resource_metrics:
            resource = attributes(rm.resource.attributes)
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    for kind, monotonic, temporality, attrs, value in points(metric):
                        lines.append(json.dumps({
                            "batch": batch,
                            "resource": resource,
                            "scope": sm.scope.name,
                            "name": metric.name,
                            "kind": kind,
                            "unit": metric.unit,
                            "monotonic": monotonic,
                            "temporality": temporality,
                            "attributes": attributes(attrs),
                            "value": value,
                        }))
        self.printer.emit(batch, lines, "points")
        return metrics_service_pb2.ExportMetricsServiceResponse()


class TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, printer):
        self.printer = printer

    def Export(self, request, context):
        batch = self.printer.next_batch()
        lines = []
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
        self.printer.emit(batch, lines, "spans")
        return trace_service_pb2.ExportTraceServiceResponse()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1; 0 for a free one")
    args = parser.parse_args()
    printer = Printer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(MetricsService(printer), server)
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(TraceService(printer), server)
    port = server.add_insecure_port(f"127.0.0.1:{args.port}")
    if port == 0:
        print(f"otlp_receiver: could not bind 127.0.0.1:{args.port}", file=sys.stderr)
        return 1
    server.start()
    print(port, flush=True)
    for _ in sys.stdin:
        pass
    server.stop(grace=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
