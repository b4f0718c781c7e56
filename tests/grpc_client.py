"""A gRPC client of Vigil in another language, for tests/grpc.rs.

Generates Python stubs from proto/ with grpc_tools.protoc into a temporary directory, then against a
running `vigil up` (token configured; services `echo`, fixed and started at once, and `lazy`, started on
demand) calls every operation of vigil.v1.Remediation while it watches the decisions, checks the
standard health service and server reflection (v1alpha and v1), and checks that bad requests get the
right status codes. Exits non-zero, saying what differed, on the first failure.

Usage: grpc_client.py TARGET TOKEN PROTO_DIR
"""

import os
import subprocess
import sys
import tempfile
import threading
import time

import grpc
from google.protobuf import descriptor_pool, message_factory
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

TARGET, TOKEN, PROTO_DIR = sys.argv[1], sys.argv[2], sys.argv[3]
AUTH = [("authorization", f"Bearer {TOKEN}")]
WAIT = "60s"


def log(*args):
    print("grpc_client:", *args, flush=True)


def generate_stubs():
    out = tempfile.mkdtemp(prefix="vigil-grpc-stubs-")
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO_DIR}", f"--python_out={out}",
         f"--grpc_python_out={out}", "vigil/v1/remediation.proto"],
        check=True,
    )
    sys.path.insert(0, out)
    from vigil.v1 import remediation_pb2, remediation_pb2_grpc
    return remediation_pb2, remediation_pb2_grpc


pb, pb_grpc = generate_stubs()


def expect_code(code, call, *args, **kwargs):
    """Calls and expects the RPC to fail with `code`; returns the error."""
    try:
        answer = call(*args, **kwargs)
    except grpc.RpcError as e:
        assert e.code() == code, f"expected {code}, got {e.code()}: {e.details()}"
        assert e.details(), "an error status carries a message"
        return e
    raise AssertionError(f"expected {code}, got an answer: {answer}")


def wait_until(what, condition, timeout=30.0):
    """Polls `condition` until it gives a true value, and answers that value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def error_code_metadata(e):
    return dict(e.trailing_metadata() or ()).get("vigil-error-code")


class Watcher:
    """Collects WatchDecisions in a thread."""

    def __init__(self, stub, since_seq=None):
        request = pb.WatchDecisionsRequest() if since_seq is None else pb.WatchDecisionsRequest(since_seq=since_seq)
        self.call = stub.WatchDecisions(request, metadata=AUTH)
        # The server answers with headers once it has subscribed: from then on no decision is missed.
        self.call.initial_metadata()
        self.seen = []
        self.error = None
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        try:
            for d in self.call:
                with self.lock:
                    self.seen.append(d)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.CANCELLED:
                self.error = e

    def decisions(self):
        with self.lock:
            return list(self.seen)

    def has(self, action, instance_id, outcome):
        return any(d.action == action and d.instance_id == instance_id and d.outcome == outcome
                   for d in self.decisions())

    def stop(self):
        self.call.cancel()
        self.thread.join(5)


def check_health_and_reflection(channel):
    # Reflection, v1alpha: lists every service, without a token.
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    answers = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for a in answers for s in a.list_services_response.service}
    for want in ["vigil.v1.Remediation", "grpc.health.v1.Health"]:
        assert want in names, f"v1alpha reflection lists {sorted(names)}"
    # Reflection, v1: the same messages on the wire under the v1 service name.
    v1 = channel.stream_stream(
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    names_v1 = {s.name for a in v1(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
                for s in a.list_services_response.service}
    assert "vigil.v1.Remediation" in names_v1, f"v1 reflection lists {sorted(names_v1)}"

    # The health messages, learnt from the server itself by reflection (which also shows it serves the
    # descriptors, not only the names).
    pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
    remediation = pool.FindServiceByName("vigil.v1.Remediation")
    methods = {m.name for m in remediation.methods}
    assert "WatchDecisions" in methods and "Scale" in methods, methods
    request_type = message_factory.GetMessageClass(pool.FindMessageTypeByName("grpc.health.v1.HealthCheckRequest"))
    response_type = message_factory.GetMessageClass(pool.FindMessageTypeByName("grpc.health.v1.HealthCheckResponse"))
    check = channel.unary_unary("/grpc.health.v1.Health/Check", request_serializer=request_type.SerializeToString,
                                response_deserializer=response_type.FromString)
    serving = response_type.DESCRIPTOR.fields_by_name["status"].enum_type.values_by_name["SERVING"].number
    for service in ["", "vigil.v1.Remediation"]:
        status = check(request_type(service=service)).status
        assert status == serving, f"health of {service!r}: {status}"
    expect_code(grpc.StatusCode.NOT_FOUND, check, request_type(service="no.such.Service"))
    log("health and reflection: ok")


def main():
    channel = grpc.insecure_channel(TARGET)
    grpc.channel_ready_future(channel).result(timeout=10)
    check_health_and_reflection(channel)
    stub = pb_grpc.RemediationStub(channel)

    # The token rule: none, or a wrong one, is UNAUTHENTICATED on every Remediation call.
    e = expect_code(grpc.StatusCode.UNAUTHENTICATED, stub.ListInstances, pb.ListInstancesRequest())
    assert error_code_metadata(e) == "unauthorized", e.trailing_metadata()
    expect_code(grpc.StatusCode.UNAUTHENTICATED, stub.GetRules, pb.GetRulesRequest(),
                metadata=[("authorization", f"Bearer {TOKEN}x")])
    expect_code(grpc.StatusCode.UNAUTHENTICATED, lambda: list(stub.WatchDecisions(pb.WatchDecisionsRequest())))

    watcher = Watcher(stub)

    instances = stub.ListInstances(pb.ListInstancesRequest(), metadata=AUTH).instances
    by_id = {i.id: i for i in instances}
    assert {"echo-0", "lazy-0"} <= by_id.keys(), list(by_id)
    echo = by_id["echo-0"]
    assert (echo.service, echo.state, echo.managed) == ("echo", "active", True), echo
    assert echo.pids and echo.port > 0 and echo.cgroup.endswith("/echo/echo-0"), echo
    assert by_id["lazy-0"].state == "stopped", by_id["lazy-0"]
    one = stub.GetInstance(pb.GetInstanceRequest(id="echo-0"), metadata=AUTH)
    assert one.id == "echo-0" and one.pids == echo.pids, one

    hibernated = stub.Hibernate(pb.ActionRequest(instance_id="echo-0", wait=WAIT), metadata=AUTH)
    assert (hibernated.status, hibernated.action, hibernated.state) == ("finished", "hibernate", "hibernated"), hibernated
    assert hibernated.decision.outcome == "succeeded", hibernated
    assert hibernated.HasField("standby"), hibernated
    woke = stub.Wake(pb.ActionRequest(instance_id="echo-0", wait=WAIT), metadata=AUTH)
    assert (woke.state, woke.decision.outcome) == ("active", "succeeded"), woke

    before = stub.GetInstance(pb.GetInstanceRequest(id="echo-0"), metadata=AUTH).pids
    restarted = stub.Restart(pb.ActionRequest(instance_id="echo-0", wait=WAIT), metadata=AUTH)
    assert (restarted.state, restarted.decision.outcome) == ("active", "succeeded"), restarted
    after = stub.GetInstance(pb.GetInstanceRequest(id="echo-0"), metadata=AUTH).pids
    assert after and set(after).isdisjoint(before), f"restart kept the processes: {before} -> {after}"

    started = stub.Start(pb.ActionRequest(instance_id="lazy-0", wait=WAIT), metadata=AUTH)
    assert (started.state, started.decision.outcome) == ("active", "succeeded"), started
    stopped = stub.Stop(pb.ActionRequest(instance_id="lazy-0", wait=WAIT), metadata=AUTH)
    assert (stopped.state, stopped.decision.outcome) == ("stopped", "succeeded"), stopped
    # A fixed service's instance does not stop until needed: the action fails on it.
    e = expect_code(grpc.StatusCode.FAILED_PRECONDITION, stub.Stop,
                    pb.ActionRequest(instance_id="echo-0", wait=WAIT), metadata=AUTH)
    assert error_code_metadata(e) == "action_failed", e.trailing_metadata()

    action = stub.GetAction(pb.GetActionRequest(action_id=hibernated.action_id), metadata=AUTH)
    assert (action.status, action.action, action.instance_id) == ("finished", "hibernate", "echo-0"), action
    assert action.decision.outcome == "succeeded", action

    rules = stub.GetRules(pb.GetRulesRequest(), metadata=AUTH)
    assert not rules.dry_run and list(rules.files) == [], rules
    assert stub.SetDryRun(pb.SetDryRunRequest(enabled=True), metadata=AUTH).dry_run is True
    assert stub.GetRules(pb.GetRulesRequest(), metadata=AUTH).dry_run is True
    dry = stub.Hibernate(pb.ActionRequest(instance_id="echo-0", wait=WAIT), metadata=AUTH)
    assert (dry.decision.outcome, dry.state) == ("dry_run", "active"), dry
    assert stub.SetDryRun(pb.SetDryRunRequest(enabled=False), metadata=AUTH).dry_run is False

    services = {s.name: s for s in stub.ListServices(pb.ListServicesRequest(), metadata=AUTH).services}
    assert {"echo", "lazy"} <= services.keys(), list(services)
    echo_service = stub.GetService(pb.GetServiceRequest(name="echo"), metadata=AUTH)
    assert (echo_service.scale, echo_service.desired, echo_service.ready) == ("fixed", 1, 1), echo_service
    assert not echo_service.HasField("mode"), echo_service
    e = expect_code(grpc.StatusCode.FAILED_PRECONDITION, stub.Scale,
                    pb.ScaleRequest(name="echo", instances=2), metadata=AUTH)
    assert error_code_metadata(e) == "not_scaled", e.trailing_metadata()

    # The alert the test posted over REST.
    alerts = stub.ListAlerts(pb.ListAlertsRequest(), metadata=AUTH).alerts
    assert [a.name for a in alerts] == ["EchoSlow"], alerts
    slow = alerts[0]
    assert (slow.scope_instance_id, slow.labels["severity"], slow.fingerprint) == ("echo-0", "critical", "f00d"), slow
    assert (slow.starts_at, slow.annotations["summary"], slow.receiver) == (
        "2026-12-02T05:00:00.000Z", "echo is slow", "vigil"), slow
    assert not slow.HasField("ends_at"), slow
    assert len(stub.ListAlerts(pb.ListAlertsRequest(service="echo"), metadata=AUTH).alerts) == 1
    assert len(stub.ListAlerts(pb.ListAlertsRequest(instance_id="nope-0"), metadata=AUTH).alerts) == 0

    # Bad requests.
    expect_code(grpc.StatusCode.NOT_FOUND, stub.GetInstance, pb.GetInstanceRequest(id="nope-0"), metadata=AUTH)
    expect_code(grpc.StatusCode.NOT_FOUND, stub.Wake, pb.ActionRequest(instance_id="nope-0"), metadata=AUTH)
    expect_code(grpc.StatusCode.NOT_FOUND, stub.GetAction, pb.GetActionRequest(action_id=999999), metadata=AUTH)
    expect_code(grpc.StatusCode.NOT_FOUND, stub.GetService, pb.GetServiceRequest(name="nope"), metadata=AUTH)
    expect_code(grpc.StatusCode.NOT_FOUND, stub.Scale, pb.ScaleRequest(name="nope", auto=True), metadata=AUTH)
    for wait in ["soon", "5m"]:
        e = expect_code(grpc.StatusCode.INVALID_ARGUMENT, stub.Hibernate,
                        pb.ActionRequest(instance_id="echo-0", wait=wait), metadata=AUTH)
        assert error_code_metadata(e) == "bad_request", e.trailing_metadata()
    expect_code(grpc.StatusCode.INVALID_ARGUMENT, stub.Scale, pb.ScaleRequest(name="echo"), metadata=AUTH)

    # The watcher saw each action's decision as it was made, in order, each once.
    made = [("hibernate", "echo-0", "succeeded"), ("wake", "echo-0", "succeeded"),
            ("restart", "echo-0", "succeeded"), ("start", "lazy-0", "succeeded"),
            ("stop", "lazy-0", "succeeded"), ("stop", "echo-0", "failed"), ("hibernate", "echo-0", "dry_run")]
    wait_until("the watcher to see every decision", lambda: all(watcher.has(*m) for m in made))
    assert watcher.error is None, watcher.error
    seen = watcher.decisions()
    seqs = [d.seq for d in seen]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), f"gaps or duplicates: {seqs}"
    assert all(d.rule == "manual" and d.unix_ms > 0 for d in seen), seen
    failed = next(d for d in seen if d.action == "stop" and d.instance_id == "echo-0")
    assert failed.error, failed

    # The log agrees, newest first, and a watch from seq 0 replays it whole, oldest first.
    logged = stub.ListDecisions(pb.ListDecisionsRequest(limit=50), metadata=AUTH).decisions
    assert [d.seq for d in logged][: len(seqs)] == sorted(seqs, reverse=True)[: len(seqs)], [d.seq for d in logged]
    assert len(stub.ListDecisions(pb.ListDecisionsRequest(limit=2), metadata=AUTH).decisions) == 2
    replay = Watcher(stub, since_seq=0)
    wait_until("the replay", lambda: len(replay.decisions()) >= len(logged))
    assert [d.seq for d in replay.decisions()][: len(logged)] == sorted(d.seq for d in logged)
    replay.stop()
    watcher.stop()
    log(f"every operation: ok ({len(seen)} decisions watched)")
    check_workflows_and_hardware(stub)


def kmsg(line):
    """Writes one record to the kernel log (root), in a file opened afresh: the kernel takes at most 10
    records per 5 s from one open /dev/kmsg."""
    with open("/dev/kmsg", "w") as f:
        f.write(line + "\n")


def check_workflows_and_hardware(stub):
    """The workflow operations and the hardware report; run after the decision watch ended (the runs'
    steps are decisions too)."""
    listed = stub.ListWorkflows(pb.ListWorkflowsRequest(), metadata=AUTH)
    assert [w.name for w in listed.workflows] == ["probe"], listed
    probe = listed.workflows[0]
    assert [(s.name, s.kind) for s in probe.steps] == [("cordon", "cordon"), ("ok", "approve"), ("fix", "run")], probe
    assert list(probe.steps[2].after) == ["ok"] and not probe.steps[2].idempotent, probe.steps[2]
    assert '"manual":true' in probe.trigger_json, probe.trigger_json
    expect_code(grpc.StatusCode.NOT_FOUND, stub.RunWorkflow, pb.RunWorkflowRequest(name="nope"), metadata=AUTH)
    expect_code(grpc.StatusCode.INVALID_ARGUMENT, stub.RunWorkflow,
                pb.RunWorkflowRequest(name="probe", params={"run_id": "1"}), metadata=AUTH)
    expect_code(grpc.StatusCode.NOT_FOUND, stub.GetWorkflowRun, pb.WorkflowRunRequest(id=999999), metadata=AUTH)

    plan = stub.RunWorkflow(pb.RunWorkflowRequest(name="probe", params={"device": "vigilgrpc0"}, dry_run=True),
                            metadata=AUTH)
    assert plan.dry_run and plan.params["device"] == "vigilgrpc0", plan
    run = stub.RunWorkflow(pb.RunWorkflowRequest(name="probe", params={"device": "vigilgrpc0"}, reason="by gRPC"),
                           metadata=AUTH)
    assert run.id > plan.id and run.source == "api" and run.reason == "by gRPC", run
    get = lambda: stub.GetWorkflowRun(pb.WorkflowRunRequest(id=run.id), metadata=AUTH)
    waiting = wait_until("the run to wait for approval", lambda: (r := get()).state == "waiting" and r)
    assert [s.state for s in waiting.steps] == ["succeeded", "waiting", "pending"], waiting
    assert '"cordoned":"vigilgrpc0"' in waiting.steps[0].output_json, waiting.steps[0]
    cordons = stub.ListWorkflows(pb.ListWorkflowsRequest(limit=5), metadata=AUTH).cordons
    assert [(c.resource, c.run_id) for c in cordons] == [("vigilgrpc0", run.id)], cordons
    e = expect_code(grpc.StatusCode.FAILED_PRECONDITION, stub.Uncordon,
                    pb.UncordonRequest(resource="vigilgrpc0"), metadata=AUTH)
    assert "still under way" in e.details(), e.details()
    approved = stub.ApproveWorkflowRun(pb.WorkflowRunRequest(id=run.id), metadata=AUTH)
    assert approved.steps[1].state == "succeeded", approved
    failed = wait_until("the run to fail at its command", lambda: (r := get()).state == "failed" and r)
    assert failed.steps[2].error and failed.ended_ms >= failed.created_ms, failed
    expect_code(grpc.StatusCode.FAILED_PRECONDITION, stub.CancelWorkflowRun,
                pb.WorkflowRunRequest(id=run.id), metadata=AUTH)
    # The failed run left its cordon: a person lifts it.
    lifted = stub.Uncordon(pb.UncordonRequest(resource="vigilgrpc0", reason="checked"), metadata=AUTH)
    assert lifted.resource == "vigilgrpc0" and lifted.cordon.run_id == run.id, lifted
    assert not stub.ListWorkflows(pb.ListWorkflowsRequest(), metadata=AUTH).cordons
    expect_code(grpc.StatusCode.NOT_FOUND, stub.Uncordon, pb.UncordonRequest(resource="vigilgrpc0"), metadata=AUTH)
    other = stub.RunWorkflow(pb.RunWorkflowRequest(name="probe", params={"device": "vigilgrpc1"}), metadata=AUTH)
    cancelled = stub.CancelWorkflowRun(pb.WorkflowRunRequest(id=other.id), metadata=AUTH)
    wait_until("the cancel", lambda: stub.GetWorkflowRun(pb.WorkflowRunRequest(id=other.id), metadata=AUTH).state
               == "cancelled")
    assert cancelled.id == other.id
    stub.Uncordon(pb.UncordonRequest(resource="vigilgrpc1"), metadata=AUTH)

    # Two kernel I/O error records on a device of the test's own: counted exactly, degraded.
    device = f"vigilgrpc{os.getpid()}"
    expect_code(grpc.StatusCode.NOT_FOUND, stub.GetHardware, pb.GetHardwareRequest(device=device), metadata=AUTH)
    for sector in (8, 16):
        kmsg(f"<3>I/O error, dev {device}, sector {sector} op 0x0:(READ) flags 0x0 phys_seg 1 prio class 2")

    def seen():
        try:
            hw = stub.GetHardware(pb.GetHardwareRequest(device=device), metadata=AUTH)
        except grpc.RpcError:
            return None
        return hw if hw.devices[0].errors["io_error"] == 2 else None

    hw = wait_until("the two records", seen)
    d = hw.devices[0]
    assert (d.device, d.state) == (device, "degraded") and d.since_unix_ms > 0 and d.reason, d
    everything = stub.GetHardware(pb.GetHardwareRequest(), metadata=AUTH)
    assert device in [x.device for x in everything.devices], everything.devices
    kmsg_source = next(x for x in everything.sources if x.name == "kmsg")
    assert kmsg_source.available, everything.sources
    log("workflows and hardware: ok")


if __name__ == "__main__":
    main()
