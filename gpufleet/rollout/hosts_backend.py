"""The rollout's steps on a stack of hosts (static, proxmox, azure): every host, over the network.

- Triton: each host's, at the address its serving stack publishes, with the stack's admin key
  (as the deploy and gate steps reach it: gpufleet/lifecycle/gate.py).
- Loading versions: the lifecycle's deploy step (gpufleet/lifecycle/deploy.py) with the active
  rollouts' served versions, run `live`: the repository copied by the serving_stack role, the
  versions loaded through Triton's API, no container restarted.
- The gateway: each host's nginx container, its configuration written over SSH and reloaded
  gracefully (host_gateway.py); its access log read over SSH; the traffic summed over hosts.

    backend = HostsRolloutBackend(load_environment("lab", project_root=Path.cwd()), say=print)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from generators.serving_stack.files import GATEWAY_CONFIG
from gpufleet.lifecycle.deploy import deploy, write_serving_files
from gpufleet.lifecycle.environment import Environment
from gpufleet.lifecycle.gate import admin_key_headers, triton_grpc_url
from gpufleet.lifecycle.lock import EnvironmentLocked, environment_lock
from gpufleet.rebuild.holdings import compose_project
from gpufleet.rebuild.remote import HostShell, RemoteError
from gpufleet.registry.client import ModelRegistry
from gpufleet.rollout.backend import RolloutError, TritonEndpoint
from gpufleet.rollout.host_gateway import HostGateway, HostGatewayError
from gpufleet.rollout.state import RolloutRecord, active_records, as_served, served_specs
from gpufleet.rollout.traffic import VersionTraffic, merge_traffic, parse_log_lines
from gpufleet.spec.loading import LoadedModelSpec

_TIMEOUT_S = 20.0


class HostsRolloutBackend:
    """Every host of a stack whose serving stack has a gateway (gpufleet:serving.gateway)."""

    def __init__(self, environment: Environment, *, say: Callable[[str], None]) -> None:
        serving = environment.spec.serving
        if serving is None or serving.gateway is None:
            raise RolloutError(
                f"stack {environment.name!r} has no gateway to split traffic with; add "
                "gateway: {} to its gpufleet:serving (and gateway_http to publish), then run "
                f"`gpufleet up --stack {environment.name}`"
            )
        headers = admin_key_headers(environment)
        if headers is None:
            raise RolloutError(
                f"{serving.secrets_env.triton_admin_key} is not set: a rollout loads and "
                "unloads versions through each host's Triton repository API, which needs the "
                "stack's admin key; export it as for `gpufleet up`"
            )
        self.environment = environment
        self.say = say
        self.headers = headers
        self.worker_processes = serving.gateway.worker_processes

    @property
    def stack_name(self) -> str:
        return self.environment.name

    @property
    def specs(self) -> list[LoadedModelSpec]:
        return self.environment.models

    @property
    def state_dir(self) -> Path:
        return self.environment.state_dir

    @property
    def reports_dir(self) -> Path:
        return self.environment.reports_dir / "rollout"

    def registry(self) -> ModelRegistry:
        return self.environment.registry()

    def tritons(self) -> list[TritonEndpoint]:
        import tritonclient.grpc as triton_grpc
        from tritonclient.utils import InferenceServerException

        endpoints = []
        for host in self.environment.host_names:
            url = triton_grpc_url(self.environment, host)
            try:
                with triton_grpc.InferenceServerClient(url) as client:
                    ready = client.is_server_ready(client_timeout=_TIMEOUT_S)
            except InferenceServerException as error:
                ready, reason = False, str(error).splitlines()[0]
            else:
                reason = "not ready"
            if not ready:
                raise RolloutError(
                    f"Triton on {host} ({url}) does not answer: {reason}; bring it up with "
                    f"`gpufleet up --stack {self.stack_name}`"
                )
            endpoints.append(TritonEndpoint(host, url, self.headers))
        return endpoints

    def refresh_models(self) -> None:
        hosts = self.environment.host_names
        try:
            with environment_lock(self.state_dir, self.stack_name, "rollout"):
                outcomes = deploy(self.environment, hosts, say=self.say, live=True)
        except EnvironmentLocked as error:
            raise RolloutError(str(error)) from None
        failed = [outcome for outcome in outcomes if not outcome.succeeded]
        if failed:
            raise RolloutError(
                "; ".join(
                    f"{outcome.host}: deploy {outcome.status}: {'; '.join(outcome.reasons)}"
                    for outcome in failed
                )
            )
        self._check_served_versions()

    def apply_gateway(self) -> None:
        """Each host's gateway routed by the active rollouts. The generated serving files here
        are written first, so that `generate --check` and drift's files layer, which compare
        with them, see what the hosts run."""
        try:
            served, routes = as_served(self.environment.models, self.state_dir)
        except ValueError as error:
            raise RolloutError(str(error)) from None
        environment = dataclasses.replace(self.environment, models=served)
        files = write_serving_files(environment, say=self.say, routes=routes)
        for host in environment.host_names:
            try:
                self._gateway(host).apply(files[f"{host}/{GATEWAY_CONFIG}"])
            except HostGatewayError as error:
                raise RolloutError(str(error)) from None
            self.say(f"  {host}: gateway reloaded ({len(routes)} rollout route(s))")

    def log_offsets(self) -> dict[str, int]:
        try:
            return {host: self._gateway(host).log_size() for host in self.environment.host_names}
        except HostGatewayError as error:
            raise RolloutError(str(error)) from None

    def read_traffic(self, model: str, offsets: dict[str, int]) -> dict[int, VersionTraffic]:
        parts = []
        for host in self.environment.host_names:
            try:
                lines = self._gateway(host).read_log(offsets.get(host, 0))
            except HostGatewayError as error:
                raise RolloutError(str(error)) from None
            parts.append(parse_log_lines(lines, model))
        return merge_traffic(parts)

    def _gateway(self, host: str) -> HostGateway:
        try:
            shell = HostShell.for_host(self.environment, host)
        except RemoteError as error:
            raise HostGatewayError(str(error)) from None
        directory = self.environment.spec.serving_directory()
        project = compose_project(self.environment)
        return HostGateway(shell, project, directory, self.worker_processes)

    def _records(self) -> list[RolloutRecord]:
        try:
            return active_records(self.state_dir)
        except ValueError as error:
            raise RolloutError(str(error)) from None

    def _check_served_versions(self) -> None:
        """Each Triton serves exactly the versions wanted of each model under a rollout (the
        deploy step reports a Triton it could not converge without failing)."""
        import tritonclient.grpc as triton_grpc
        from tritonclient.utils import InferenceServerException

        wanted = {
            item.spec.name: sorted(item.spec.version_policy.specific or [])
            for item in served_specs(self.specs, self._records())
            if item.spec.version_policy is not None and item.spec.version_policy.specific
        }
        if not wanted:
            return
        for triton in self.tritons():
            try:
                with triton_grpc.InferenceServerClient(triton.grpc_url) as client:
                    index = client.get_model_repository_index(
                        headers=triton.headers, as_json=True, client_timeout=_TIMEOUT_S
                    )
            except InferenceServerException as error:
                raise RolloutError(f"{triton.label}: Triton's repository index: {error}") from None
            for model, versions in wanted.items():
                loaded = sorted(
                    int(entry["version"])
                    for entry in index.get("models", [])
                    if entry.get("name") == model and entry.get("state") == "READY"
                )
                if loaded != versions:
                    raise RolloutError(
                        f"{triton.label}: Triton serves {model} versions {loaded}, not "
                        f"{versions}; see the deploy's output above"
                    )
