#!/usr/bin/env python3
"""Minimal OTLP/gRPC metrics receiver for collector/tests/otlp.rs.

Listens on 127.0.0.1 on a free port and prints that port as the first line of stdout. Then, for every
Export call, prints one JSON line per data point:

    {"batch": N, "resource": {...}, "scope": "...", "name": "...", "kind": "sum|gauge|histogram|...",
     "unit": "...", "monotonic": bool|null, "temporality": "cumulative|delta|null",
     "attributes": {...}, "value": int|float|{"count": .., "sum": ..}}

followed by one line {"batch": N, "end": true, "points": K}, so a reader can tell a complete export from
a partial one. Exits when stdin reaches end of file (the test holds it open), so the receiver cannot
outlive a test that crashed. Needs the PyPI packages `opentelemetry-proto` and `grpcio`.
"""

import json
import sys
import threading
from concurrent import futures

import grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.metrics.v1 import metrics_pb2

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


class MetricsService(metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self):
        self.lock = threading.Lock()
        self.batches = 0

    def Export(self, request, context):
        lines = []
        with self.lock:
            self.batches += 1
            batch = self.batches
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
        lines.append(json.dumps({"batch": batch, "end": True, "points": len(lines)}))
        # One write per batch under the lock: concurrent exports must not interleave their lines.
        with self.lock:
            sys.stdout.write("\n".join(lines) + "\n")
            sys.stdout.flush()
        return metrics_service_pb2.ExportMetricsServiceResponse()


def main():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(MetricsService(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    if port == 0:
        print("otlp_receiver: could not bind 127.0.0.1", file=sys.stderr)
        return 1
    server.start()
    print(port, flush=True)
    for _ in sys.stdin:
        pass
    server.stop(grace=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
