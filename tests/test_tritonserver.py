"""Tests of validation/tritonserver.py against the real tritonserver binary.

What is real: everything. Each test starts the tritonserver shipped in the nvidia-pytriton wheel
(on the CPU, loopback ports), with Triton's Python backend running model.py files written into
tmp_path; inference goes through tritonclient over HTTP. Nothing is mocked.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import tritonclient.http as httpclient

from tests.conftest import PROJECT_ROOT, settled_statistics
from validation.loopback import http_request
from validation.tritonserver import (
    ADMIN_KEY_HEADER,
    INSTALL_HINT,
    SHARED_MEMORY_DIR,
    LocalTritonServer,
    TritonBinary,
    TritonModelControlError,
    TritonStartError,
    TritonUnavailableError,
)

if TYPE_CHECKING:  # importing it for real here would keep pytest from loading it as a plugin
    from tests.triton_fixtures import TritonServerFactory

ADD_ONE = """
    import numpy as np
    import triton_python_backend_utils as pb_utils


    class TritonPythonModel:
        def execute(self, requests):
            responses = []
            for request in requests:
                x = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
                y = pb_utils.Tensor("OUTPUT0", (x + 1).astype(np.float32))
                responses.append(pb_utils.InferenceResponse(output_tensors=[y]))
            return responses
"""

FAILS_IN_INITIALIZE = """
    class TritonPythonModel:
        def initialize(self, args):
            raise RuntimeError("deliberate failure in initialize")

        def execute(self, requests):
            return []
"""


def write_python_model(repository: Path, name: str, model_py: str) -> None:
    """A Python-backend model with one FP32 vector input INPUT0 and output OUTPUT0."""
    version_dir = repository / name / "1"
    version_dir.mkdir(parents=True)
    (version_dir / "model.py").write_text(textwrap.dedent(model_py))
    (repository / name / "config.pbtxt").write_text(
        textwrap.dedent(
            f"""\
            name: "{name}"
            backend: "python"
            max_batch_size: 0
            input [ {{ name: "INPUT0" data_type: TYPE_FP32 dims: [ -1 ] }} ]
            output [ {{ name: "OUTPUT0" data_type: TYPE_FP32 dims: [ -1 ] }} ]
            instance_group [ {{ kind: KIND_CPU count: 1 }} ]
            """
        )
    )


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        # As any server would: a closed connection's TIME_WAIT does not make the port busy.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def process_group_is_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def test_python_model_loads_and_serves_inference(
    triton_server_factory: TritonServerFactory, tmp_path: Path
) -> None:
    repository = tmp_path / "models"
    write_python_model(repository, "add_one", ADD_ONE)

    server = triton_server_factory(repository)

    assert server.is_ready()
    assert [(m["name"], m["state"]) for m in server.repository_index()] == [("add_one", "READY")]
    assert server.model_config("add_one")["backend"] == "python"
    x = np.array([1.0, 2.5, -3.0], dtype=np.float32)
    client = httpclient.InferenceServerClient(url=server.http_url)
    try:
        tensor = httpclient.InferInput("INPUT0", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        result = client.infer("add_one", [tensor])
    finally:
        client.close()
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), x + 1)
    stats = settled_statistics(server, "add_one", at_least_inferences=1)
    assert stats["inference_count"] == 1


@pytest.mark.parametrize(
    "extra_args",
    [
        pytest.param([], id="triton-exits"),
        # Triton stays up, live but not ready; the reason then comes from the repository index.
        pytest.param(["--exit-on-error=false"], id="triton-stays-up"),
    ],
)
def test_model_failing_to_load_is_a_start_error_quoting_triton(
    tmp_path: Path, extra_args: list[str]
) -> None:
    repository = tmp_path / "models"
    write_python_model(repository, "add_one", ADD_ONE)
    write_python_model(repository, "broken", FAILS_IN_INITIALIZE)
    server = LocalTritonServer(repository, tmp_path / "work", extra_args=extra_args)

    try:
        with pytest.raises(TritonStartError) as caught:
            server.start()
    finally:
        server.stop()

    message = str(caught.value)
    assert "failed to load 'broken'" in message
    assert "RuntimeError: deliberate failure in initialize" in message
    assert "add_one" not in message  # only the failing model is reported
    assert "CudaDriverHelper" not in message  # CPU-only noise is left out
    assert caught.value.log_path == server.log_path
    assert server.pid is not None
    assert process_group_is_gone(server.pid)  # the Python backend stubs too
    assert not server.running


def test_stop_is_idempotent_and_frees_the_ports(
    triton_server_factory: TritonServerFactory, tmp_path: Path
) -> None:
    repository = tmp_path / "models"
    write_python_model(repository, "add_one", ADD_ONE)
    server = triton_server_factory(repository)
    ports = server.ports
    assert not any(port_is_free(port) for port in ports)

    server.stop()
    server.stop()

    assert server.pid is not None
    assert process_group_is_gone(server.pid)
    assert all(port_is_free(port) for port in ports)
    assert not server.is_ready()


def test_model_control_errors_quote_triton(
    triton_server_factory: TritonServerFactory, tmp_path: Path
) -> None:
    repository = tmp_path / "models"
    write_python_model(repository, "add_one", ADD_ONE)
    write_python_model(repository, "broken", FAILS_IN_INITIALIZE)
    server = triton_server_factory(repository, load_models=[])

    with pytest.raises(TritonModelControlError, match="could not load model 'nope'") as caught:
        server.load_model("nope")
    assert caught.value.triton_message == (
        "failed to load 'nope', failed to poll from model repository"
    )
    with pytest.raises(TritonModelControlError, match=r"could not unload model 'nope'.*no such"):
        server.unload_model("nope")
    with pytest.raises(TritonModelControlError, match="deliberate failure in initialize"):
        server.load_model("broken")

    server.load_model("add_one")
    assert server.model_config("add_one")["name"] == "add_one"
    server.unload_model("add_one")
    states = {m["name"]: m["state"] for m in server.repository_index()}
    assert states == {"add_one": "UNAVAILABLE", "broken": "UNAVAILABLE"}


def command_lines_holding(secret: str) -> list[str]:
    """`/proc/<pid>/cmdline` of every process on this machine that holds `secret`."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):  # a process that exited meanwhile
            if secret.encode() in cmdline.read_bytes():
                found.append(f"{cmdline}: {cmdline.read_bytes()!r}")
    return found


def test_loading_a_model_needs_the_admin_key_which_no_command_line_holds(
    triton_server_factory: TritonServerFactory, tmp_path: Path
) -> None:
    """Any local user can reach Triton's loopback ports: without the per-server key the
    repository and shared-memory APIs refuse (a model's python code runs as the operator);
    with it they work. The key is in no process's command line, nor in Triton's log."""
    repository = tmp_path / "models"
    write_python_model(repository, "add_one", ADD_ONE)
    server = triton_server_factory(repository, load_models=[])
    base = f"http://{server.http_url}/v2"
    load = ("POST", f"{base}/repository/models/add_one/load")
    unload = ("POST", f"{base}/repository/models/add_one/unload")
    shared_memory = ("GET", f"{base}/systemsharedmemory/status")
    wrong = {ADMIN_KEY_HEADER: server.admin_key[:-1]}

    for method, url in (load, unload, shared_memory, ("POST", f"{base}/repository/index")):
        assert http_request(method, url, 10)[0] == 403, url
        assert http_request(method, url, 10, wrong)[0] == 403, url
    assert server.repository_index()[0].get("state") != "READY"

    right = {ADMIN_KEY_HEADER: server.admin_key}
    assert http_request(*load, 60, right)[0] == 200
    assert server.model_config("add_one")["name"] == "add_one"
    assert http_request(*shared_memory, 10, right)[0] == 200
    # Inference, health and statistics stay open (the load gate reads statistics).
    assert http_request("GET", f"{base}/models/add_one/stats", 10)[0] == 200
    assert http_request("GET", f"{base}/health/ready", 10)[0] == 200
    assert http_request(*unload, 60, right)[0] == 200

    assert len(server.admin_key) >= 32
    assert LocalTritonServer(repository, tmp_path / "other").admin_key != server.admin_key
    assert command_lines_holding(server.admin_key) == []
    cmdline = Path(f"/proc/{server.pid}/cmdline").read_bytes().decode()
    assert f"--http-restricted-api=model-repository,shared-memory:{ADMIN_KEY_HEADER}=${{" in cmdline
    assert server.admin_key not in server.log_text()


@pytest.mark.parametrize("which", ["http_port", "grpc_port", "metrics_port"])
def test_port_in_use_is_reported(tmp_path: Path, which: str) -> None:
    # The metrics case matters most: Triton answers ready on HTTP before it finds the metrics
    # port taken and exits, and start() must not take that for success.
    repository = tmp_path / "models"
    repository.mkdir()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = LocalTritonServer(repository, tmp_path / "work", **{which: port})
        try:
            expected = re.escape(f"Socket '127.0.0.1:{port}' already in use")
            with pytest.raises(TritonStartError, match=expected):
                server.start()
        finally:
            server.stop()
        assert server.pid is not None
        assert process_group_is_gone(server.pid)


def test_missing_python_stub_says_what_to_install() -> None:
    with pytest.raises(TritonUnavailableError) as caught:
        TritonBinary.discover(python_version=(2, 7))
    assert "no Python backend stub for Python 2.7" in str(caught.value)
    assert INSTALL_HINT in str(caught.value)


def test_triton_stops_when_the_process_that_started_it_is_killed(tmp_path: Path) -> None:
    """A test run killed by SIGKILL (a CI timeout) leaves no tritonserver behind."""
    repository = tmp_path / "models"
    write_python_model(repository, "add_one", ADD_ONE)
    starter = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from pathlib import Path\n"
            "from validation.tritonserver import LocalTritonServer\n"
            "server = LocalTritonServer(Path(sys.argv[1]), Path(sys.argv[2]))\n"
            "server.start()\n"
            "print(server.pid, flush=True)\n"
            "time.sleep(600)\n",
            str(repository),
            str(tmp_path / "work"),
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    triton_pid: int | None = None
    try:
        assert starter.stdout is not None
        triton_pid = int(starter.stdout.readline())
        assert not process_group_is_gone(triton_pid)
        starter.kill()  # SIGKILL: no atexit, no finally, no stop()
        starter.wait()
        deadline = time.monotonic() + 60
        while not process_group_is_gone(triton_pid) and time.monotonic() < deadline:
            time.sleep(0.25)
        assert process_group_is_gone(triton_pid)
    finally:
        starter.kill()
        if triton_pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(triton_pid, signal.SIGKILL)


def test_stop_removes_the_shared_memory_of_a_killed_server(tmp_path: Path) -> None:
    """Stubs killed with their server leave /dev/shm regions; stop() removes this server's."""
    repository = tmp_path / "models"
    write_python_model(repository, "add_one", ADD_ONE)
    server = LocalTritonServer(repository, tmp_path / "work")
    server.start()
    try:
        regions = list(SHARED_MEMORY_DIR.glob(f"{server.shm_prefix}*"))
        assert regions, "the python backend names its regions with our prefix"
        assert server.pid is not None
        os.killpg(server.pid, signal.SIGKILL)  # as a crash would: nothing unmaps or unlinks
        deadline = time.monotonic() + 30
        while not process_group_is_gone(server.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert all(region.exists() for region in regions)
    finally:
        server.stop()
    assert not list(SHARED_MEMORY_DIR.glob(f"{server.shm_prefix}*"))


def test_secret_args_follow_a_wrapper_script_and_refuse_a_missing_variable(
    tmp_path: Path,
) -> None:
    """secret_args.py as the serving stack runs it: through a shell wrapper that execs the
    program (as the stand-in Triton image does), the program's main() gets the secret and its
    command line keeps the template; a missing variable starts nothing (exit 2)."""
    program = tmp_path / "bin" / "show-args"
    program.parent.mkdir()
    shutil.copy(sys.executable, program)  # a copy named like the program the wrapper execs
    wrapper = tmp_path / "wrapper" / "show-args"
    wrapper.parent.mkdir()
    wrapper.write_text(
        "#!/bin/sh\n"
        f'exec {program} -c "import sys; print(sys.argv[1:]); '
        f"print(open('/proc/self/cmdline', 'rb').read())\" \"$@\"\n"
    )
    wrapper.chmod(0o755)
    launcher = PROJECT_ROOT / "generators" / "serving_stack" / "secret_args.py"
    environment = {**os.environ, "PATH": f"{wrapper.parent}:{os.environ['PATH']}"}
    run = subprocess.run(
        [sys.executable, str(launcher), "show-args", "--key=${THE_KEY}", "plain"],
        env={**environment, "THE_KEY": "s3cret value"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    argv, cmdline = run.stdout.splitlines()
    assert argv == "['--key=s3cret value', 'plain']"
    assert "--key=${THE_KEY}" in cmdline
    assert "s3cret" not in cmdline

    missing = subprocess.run(
        [sys.executable, str(launcher), "show-args", "--key=${THE_KEY}"],
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert missing.returncode == 2
    assert "THE_KEY is not set" in missing.stderr
    assert missing.stdout == ""  # the program never ran
