"""Start a program with secret arguments that appear in no process's command line.

Triton takes its admin key only on its command line (`--http-restricted-api=APIS:HEADER=KEY`),
and any user of a host can read any process's command line (`ps`, `/proc/<pid>/cmdline`), also
of processes in containers. So the program is started with a template in place of each secret
argument (`...:triton-admin-key=${TRITON_ADMIN_KEY}`): that is what the kernel keeps as its
command line. The expanded argument goes into the program's environment, which only its owner
and root can read, and, at the exec stop before the program runs a single instruction, ptrace
points the argv entry main() will read at that environment string. Nothing is copied back into
the command line: `ps` shows the template, Triton parses the key.

Standalone (standard library only, Linux, 64-bit): the serving stack mounts this file into
Triton's container and runs it as the command; validation/tritonserver.py uses it for the local
Triton. As a command it stays the program's parent, forwards signals and exits as it does:

    python3 secret_args.py tritonserver --model-repository=/models \\
        '--http-restricted-api=model-repository:triton-admin-key=${TRITON_ADMIN_KEY}'

It follows the program through exec's (a wrapper script that execs the real binary) and
redirects the arguments of the first image whose file name is the program's name.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import signal
import struct
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

# <sys/ptrace.h>: the same numbers on x86_64 and aarch64.
_PTRACE_TRACEME, _PTRACE_CONT, _PTRACE_DETACH, _PTRACE_SETOPTIONS = 0, 7, 17, 0x4200
_PTRACE_O_TRACEEXEC, _PTRACE_EVENT_EXEC = 0x10, 4
_MAX_EXECS = 8  # a wrapper or two, then the program itself
_ENV_PREFIX = "GPUFLEET_SECRET_ARG_"
_TEMPLATE = re.compile(r"\$\{([A-Z_][A-Z0-9_]*)\}")
_SEARCH_BELOW_ARGS = 1 << 20  # argc and argv sit below the strings, under envp and auxv
_POINTER = struct.Struct("<Q")


class SecretArgsError(RuntimeError):
    """A secret argument cannot be passed (missing variable, unsupported machine, ...)."""


def hide_secret_args(
    argv: Sequence[str], environ: Mapping[str, str]
) -> tuple[dict[str, str], dict[str, str]]:
    """The templates in `argv` and the environment to start the program with.

    Returns ({template argument: environment variable holding its expansion}, environment).
    Each `${NAME}` in an argument is replaced by NAME's value from `environ`.
    """
    if struct.calcsize("P") != 8 or sys.byteorder != "little":
        raise SecretArgsError("secret arguments need a 64-bit little-endian Linux machine")
    hidden: dict[str, str] = {}
    environment = {k: v for k, v in environ.items() if not k.startswith(_ENV_PREFIX)}
    for argument in argv[1:]:
        names = _TEMPLATE.findall(argument)
        if not names or argument in hidden:
            continue
        missing = [name for name in names if not environ.get(name)]
        if missing:
            raise SecretArgsError(
                f"{missing[0]} is not set (or empty); the argument {argument!r} needs it"
            )
        variable = f"{_ENV_PREFIX}{len(hidden)}"
        environment[variable] = _TEMPLATE.sub(lambda m: environ[m.group(1)], argument)
        hidden[argument] = variable
    return hidden, environment


def trace_me() -> None:
    """In the child, before exec: stop at each exec so that the parent can redirect argv."""
    if _ptrace(_PTRACE_TRACEME, 0) != 0:
        raise OSError(ctypes.get_errno(), "ptrace(PTRACE_TRACEME) failed")


def redirect_secret_args(pid: int, program: str, hidden: Mapping[str, str]) -> int | None:
    """Follow child `pid` (started with `trace_me`) to the image named like `program`, point
    its template arguments at their expansions, and let it run.

    On any failure the child is killed (it must never run with a template as its key) and
    SecretArgsError says why. Returns None once it runs, or its wait status if it exited
    before (then it is reaped: do not wait for it again).
    """
    name = Path(program).name
    try:
        # The first exec after PTRACE_TRACEME stops with a plain SIGTRAP; from then on exec's
        # stop with the exec event, told apart from signals sent to the program.
        exited = _wait_for_stop(pid, lambda status: os.WSTOPSIG(status) == signal.SIGTRAP)
        if exited is not None:
            return exited
        _ptrace(_PTRACE_SETOPTIONS, pid, 0, _PTRACE_O_TRACEEXEC)
        for _ in range(_MAX_EXECS):
            if Path(os.readlink(f"/proc/{pid}/exe")).name == name:
                _redirect(pid, hidden)
                _ptrace(_PTRACE_DETACH, pid)
                return None
            _ptrace(_PTRACE_CONT, pid)
            exited = _wait_for_stop(pid, lambda status: status >> 16 == _PTRACE_EVENT_EXEC)
            if exited is not None:
                return exited
        raise SecretArgsError(f"{program} was not exec'd within {_MAX_EXECS} exec's")
    except BaseException as error:
        _kill(pid)
        if isinstance(error, OSError):
            raise SecretArgsError(f"could not pass the secret arguments: {error}") from error
        raise


def _wait_for_stop(pid: int, wanted: Callable[[int], bool]) -> int | None:
    """Wait until `pid` stops as `wanted`, delivering the signals it gets meanwhile; None then,
    or its wait status if it exited first."""
    while True:
        _, status = os.waitpid(pid, 0)
        if not os.WIFSTOPPED(status):
            return status
        if wanted(status):
            return None
        _ptrace(_PTRACE_CONT, pid, 0, os.WSTOPSIG(status))  # a signal for the program


def _redirect(pid: int, hidden: Mapping[str, str]) -> None:
    """Point each argv entry of stopped `pid` that is a template at its environment value."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    # Fields 48-51 of proc(5): where exec put the argument and environment strings.
    arg_start, arg_end, env_start, env_end = (int(field) for field in fields[45:49])
    fd = os.open(f"/proc/{pid}/mem", os.O_RDWR)
    try:
        strings = os.pread(fd, arg_end - arg_start, arg_start)
        argv_address, pointers = _find_argv(fd, _stack_bottom(pid, arg_start), arg_start, arg_end)
        values = _environment_values(os.pread(fd, env_end - env_start, env_start), env_start)
        redirected = set()
        for index, pointer in enumerate(pointers):
            argument = strings[pointer - arg_start :].split(b"\0", 1)[0].decode()
            variable = hidden.get(argument)
            if variable is None:
                continue
            if variable not in values:
                raise SecretArgsError(f"{variable} did not reach the program's environment")
            os.pwrite(fd, _POINTER.pack(values[variable]), argv_address + 8 * index)
            redirected.add(argument)
    finally:
        os.close(fd)
    if redirected != set(hidden):
        raise SecretArgsError(f"arguments missing from the program's command line: {hidden}")


def _stack_bottom(pid: int, address: int) -> int:
    """The lowest address of the mapping (the stack) that holds `address`."""
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        low, high = (int(part, 16) for part in line.split()[0].split("-"))
        if low <= address < high:
            return low
    raise SecretArgsError(f"no mapping of process {pid} holds its arguments")


def _find_argv(fd: int, bottom: int, arg_start: int, arg_end: int) -> tuple[int, list[int]]:
    """The address of argv[] and its pointers: on the stack below the strings, `argc` then
    `argc` pointers into [arg_start, arg_end), the first at arg_start, then NULL."""
    low = max(bottom, arg_start - _SEARCH_BELOW_ARGS) & ~7
    memory = os.pread(fd, arg_start - low, low)
    words = [word for (word,) in _POINTER.iter_unpack(memory[: len(memory) & ~7])]
    for index in range(len(words) - 1, 0, -1):
        argc = words[index - 1]
        if words[index] != arg_start or not 0 < argc < len(words) - index:
            continue
        pointers = words[index : index + argc]
        inside = all(arg_start <= pointer < arg_end for pointer in pointers)
        if inside and pointers == sorted(pointers) and words[index + argc] == 0:
            return low + 8 * index, pointers
    raise SecretArgsError("could not find the program's argv on its stack")


def _environment_values(environment: bytes, env_start: int) -> dict[str, int]:
    """Address of the value of each of our variables in the program's environment strings."""
    values, offset = {}, 0
    for entry in environment.split(b"\0"):
        name, equals, _ = entry.partition(b"=")
        if equals and name.startswith(_ENV_PREFIX.encode()):
            values[name.decode()] = env_start + offset + len(name) + 1
        offset += len(entry) + 1
    return values


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


_libc = ctypes.CDLL(None, use_errno=True)
_libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
_libc.ptrace.restype = ctypes.c_long


def _ptrace(request: int, pid: int, address: int = 0, data: int = 0) -> int:
    result = int(_libc.ptrace(request, pid, address, data))
    if result == -1 and request != _PTRACE_TRACEME:
        errno = ctypes.get_errno()
        raise OSError(errno, f"ptrace({request}, {pid}): {os.strerror(errno)}")
    return result


def run(argv: Sequence[str]) -> int:
    """Start `argv` with its secret arguments hidden; wait for it and return its exit code."""
    try:
        hidden, environment = hide_secret_args(argv, os.environ)
    except SecretArgsError as error:
        print(f"secret_args: {error}", file=sys.stderr)
        return 2
    pid = os.fork()
    if pid == 0:  # the child: becomes the program
        try:
            trace_me()
            os.execvpe(argv[0], list(argv), environment)  # noqa: S606 - argv is the user's command
        except OSError as error:
            print(f"secret_args: cannot run {argv[0]}: {error}", file=sys.stderr)
        os._exit(127)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1):
        signal.signal(signum, lambda received, _frame: os.kill(pid, received))
    try:
        status = redirect_secret_args(pid, argv[0], hidden)
    except SecretArgsError as error:
        print(f"secret_args: {error}", file=sys.stderr)
        os.waitpid(pid, 0)
        return 1
    if status is None:
        _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


if __name__ == "__main__":
    if len(sys.argv) < 2:
        print("usage: secret_args.py PROGRAM [ARGUMENT...]  (${NAME} from the environment)")
        sys.exit(2)
    sys.exit(run(sys.argv[1:]))
