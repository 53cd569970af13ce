"""The gate step: the host gate (testinfra over SSH), then the correctness and load gates
against that host's Triton, exactly the gates the local stack runs. A host passes when every
gate passes (or warns); a gate that failed fails the host (exit 1), one that could not run
(Triton not listening, registry down) is an error (exit 2).

Reports go to build/<stack>/reports/<host>/<gate>.json and .junit.xml.

    outcomes = gate(environment, ["gpu-a"], say=print)
    outcomes[0].details["reports"]      # the GateReports
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

from generators.ansible_inventory import InventoryError
from generators.serving_stack.graph import ServiceGraphError, bind_address_of, url_host
from gpufleet.lifecycle.ansible_step import Say
from gpufleet.lifecycle.environment import Environment
from gpufleet.lifecycle.outcome import StepOutcome, StepStatus
from gpufleet.registry.client import RegistryError
from gpufleet.spec.stack import GateName
from validation.gates import GateContext, run_gates
from validation.gpu_host import gpu_host_targets, run_gpu_host_gate
from validation.report import CheckResult, GateReport, write_reports
from validation.tritonserver import GRPC_ADMIN_KEY_HEADER


def gate(
    environment: Environment,
    hosts: Sequence[str],
    *,
    say: Say,
    gates: Sequence[GateName] | None = None,
    load_engine: str | None = None,
) -> list[StepOutcome]:
    """Run the stack's gates (or `gates`) on each of `hosts`; one outcome per host.
    `load_engine`: the load gate's ("perf_analyzer", "python"; None: perf_analyzer where found)."""
    wanted = list(gates or environment.spec.gates)
    return [_gate_host(environment, host, wanted, say, load_engine) for host in hosts]


def triton_grpc_url(environment: Environment, host: str) -> str:
    """Where the host's Triton answers gRPC: the address its serving stack publishes on."""
    serving = environment.spec.serving
    if serving is None:
        raise ServiceGraphError(
            f"stack {environment.name!r} has no gpufleet:serving: no Triton runs on {host}"
        )
    address = bind_address_of(serving, environment.host(host))
    return f"{url_host(address)}:{environment.spec.ports.triton_grpc}"


def _gate_host(
    environment: Environment,
    host: str,
    gates: list[GateName],
    say: Say,
    load_engine: str | None = None,
) -> StepOutcome:
    started = time.monotonic()
    reports_dir = environment.reports_dir / host
    label = f"{environment.name}/{host}"
    reports: list[GateReport] = []
    say(f"  gating {host}: {', '.join(gates)}")
    if "host" in gates:
        reports.append(_host_gate(environment, host, label))
        write_reports(reports[-1], reports_dir)
        say(f"  {host}: gate host: {reports[-1].status}")
    service_gates = [name for name in gates if name != "host"]
    if service_gates:
        try:
            grpc_url = triton_grpc_url(environment, host)
            registry = environment.registry()
        except (ServiceGraphError, RegistryError) as error:
            for name in service_gates:
                reports.append(GateReport(name, [CheckResult(host, "error", str(error))], label))
                write_reports(reports[-1], reports_dir)
        else:
            context = GateContext(
                stack=label,
                spec=environment.spec,
                models=[item.spec for item in environment.models],
                repository=environment.repository,
                registry=registry,
                processes=[],  # on a host the host gate checks containers over SSH instead
                grpc_url=grpc_url,
                reports_dir=reports_dir,
                admin_headers=admin_key_headers(environment),
                load_engine=load_engine,
            )
            reports += run_gates(context, service_gates, say=lambda line: say(f"  {host}:{line}"))
    status, reasons = _judge(reports)
    return StepOutcome(
        "gate",
        host,
        status,
        reasons,
        time.monotonic() - started,
        {"reports": reports, "reports_dir": str(reports_dir)},
    )


def admin_key_headers(environment: Environment) -> dict[str, str] | None:
    """The gRPC header with Triton's admin key, from the variable the spec names: the generated
    stack restricts the statistics the load gate reads and the repository index the correctness
    gate quotes. None when unset: the load gate then measures without Triton's server-side split."""
    serving = environment.spec.serving
    if serving is None:
        return None
    key = os.environ.get(serving.secrets_env.triton_admin_key)
    return {GRPC_ADMIN_KEY_HEADER: key} if key else None


def _host_gate(environment: Environment, host: str, label: str) -> GateReport:
    try:
        targets = gpu_host_targets(
            environment.name, environment.spec, project_root=environment.project_root, limit=host
        )
    except InventoryError as error:
        return GateReport("host", [CheckResult(host, "error", str(error))], label)
    return run_gpu_host_gate(targets, label)


def _judge(reports: Sequence[GateReport]) -> tuple[StepStatus, list[str]]:
    statuses = {report.status for report in reports}
    status: StepStatus = "ok"
    if "fail" in statuses:
        status = "failed"
    elif "error" in statuses:
        status = "error"
    reasons = [
        f"gate {report.gate}: {check.name}: {check.status}: {check.message}"
        for report in reports
        for check in report.checks
        if check.status in ("fail", "error")
    ]
    return status, reasons
