"""SuperExec task processes started ahead of their message.

Flower 1.41's SuperExec (`flower-superexec`, subprocess executor) starts a new `flwr-clientapp`
(or `flwr-serverapp`) process for every task it acquires, with the task's token on its command
line; that process spends its first seconds importing Flower (and the ClientApp's Ray client)
before it pulls the message. `WarmExecutor` keeps Flower's model, one process per task, and
only moves the start earlier: once a task of a kind has finished it starts the next process of
that kind, which imports Flower's entry point and the heavy third-party modules and then waits
on a pipe; the next task's arguments (token included) are written to that pipe and the process
runs Flower's own entry point with them, exactly as the subprocess executor would have. No
app code runs before the task: modules of the app's package (`fedseek`) imported by the wait
are dropped first, so the ClientApp / ServerApp is imported from the run's FAB, as in Flower.
A dead or missing warm process falls back to a fresh one (same command).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import entry_points
from typing import Callable

from flwr.supercore.constant import TASK_TYPE_TO_APPIO_API_ADDRESS_ARG, TASK_TYPE_TO_COMMAND, TaskType
from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor
from flwr.supercore.superexec.executor.types import ExecutionSpec, LaunchResult

# third-party modules a task of this kind imports anyway (the app's own modules never: FAB code)
PRELOAD = {"flwr-clientapp": ("flwr.supernode.runtime.run_clientapp", "ray"), "flwr-serverapp": ("torch",)}
APP_PACKAGE = "fedseek"
DONE_FD = "FEDSEEK_SERVE_DONE_FD"  # the ClientApp process writes one byte here per finished task


def task_arguments(spec: ExecutionSpec) -> list[str]:
    """The arguments Flower's subprocess executor gives the task command (after its name)."""
    args = [TASK_TYPE_TO_APPIO_API_ADDRESS_ARG[spec.task_type], spec.runtime_api_address, "--token", spec.token]
    if spec.insecure:
        args.append("--insecure")
    elif spec.root_certificates_path is not None:
        args += ["--root-certificates", spec.root_certificates_path]
    if spec.parent_pid is not None:
        args += ["--parent-pid", str(spec.parent_pid)]
    if spec.runtime_dependency_install:
        args.append("--allow-runtime-dependency-installation")
    return args


class WarmExecutor(SubprocessExecutor):
    """Flower's subprocess executor with the next process of each task kind started ahead, and
    one long-lived process for all ClientApp tasks (`serve`: a SuperNode hands out one message
    at a time, so they run one after the other). `on_launch` is called at every ClientApp launch
    (the SuperExec then polls fast: a job's next message follows; a ServerApp launch is a job's
    start, after which the next task is not soon). `task_in_flight`: whether the ClientApp
    process still works on a task (its SuperNode hands out no other message meanwhile, so the
    SuperExec need not ask for one)."""

    def __init__(self, on_launch: Callable[[], None] = lambda: None):
        self.on_launch = on_launch
        self.ready: dict[tuple[TaskType, bool], subprocess.Popen] = {}  # waiting for a task
        self.running: dict[tuple[TaskType, bool], list[subprocess.Popen]] = {}  # handed a task
        self.servers: dict[bool, subprocess.Popen] = {}  # ClientApp tasks, by suppressed output
        self.done: dict[bool, int] = {}  # read end of each ClientApp process's DONE_FD pipe
        self.in_flight: dict[bool, int] = {}

    def start_server(self, quiet: bool) -> subprocess.Popen:
        if quiet in self.done:
            os.close(self.done.pop(quiet))
        read, write = os.pipe()
        os.set_blocking(read, False)
        output = subprocess.DEVNULL if quiet else None
        proc = subprocess.Popen([sys.executable, "-m", "fedseek.platform.deploy.launch", "serve"],
                                stdin=subprocess.PIPE, stdout=output, stderr=output, text=True,
                                pass_fds=(write,), env={**os.environ, DONE_FD: str(write)})
        os.close(write)
        self.servers[quiet], self.done[quiet], self.in_flight[quiet] = proc, read, 0
        return proc

    def task_in_flight(self) -> bool:
        for quiet, proc in self.servers.items():
            try:
                self.in_flight[quiet] -= len(os.read(self.done[quiet], 4096))
            except BlockingIOError:
                pass
            if proc.poll() is not None:
                self.in_flight[quiet] = 0
        return any(n > 0 for n in self.in_flight.values())

    @staticmethod
    def start(task_type: TaskType, quiet: bool) -> subprocess.Popen:
        output = subprocess.DEVNULL if quiet else None
        return subprocess.Popen([sys.executable, "-m", "fedseek.platform.deploy.launch", "task",
                                 TASK_TYPE_TO_COMMAND[task_type]],
                                stdin=subprocess.PIPE, stdout=output, stderr=output, text=True)

    @staticmethod
    def hand_over(proc: subprocess.Popen, args: list[str], last: bool = True) -> bool:
        """Give a waiting process a task (`last`: its only one); False if it is gone."""
        if proc.poll() is not None:
            return False
        try:
            proc.stdin.write(json.dumps(args) + "\n")
            proc.stdin.close() if last else proc.stdin.flush()
        except (BrokenPipeError, OSError, ValueError):
            return False
        return True

    def launch(self, spec: ExecutionSpec) -> LaunchResult:
        key, args = (spec.task_type, spec.suppress_output), task_arguments(spec)
        if spec.task_type == TaskType.CLIENT_APP:
            self.on_launch()
            server = self.servers.get(spec.suppress_output)
            if server is None or not self.hand_over(server, args, last=False):
                server = self.start_server(spec.suppress_output)
                if not self.hand_over(server, args, last=False):
                    return LaunchResult.failed("the ClientApp process exited before its task")
            self.in_flight[spec.suppress_output] += 1
            return LaunchResult.accepted()
        proc = self.ready.pop(key, None)
        if proc is None or not self.hand_over(proc, args):
            if proc is not None:
                proc.kill()
                proc.wait()
            proc = self.start(*key)
            if not self.hand_over(proc, args):
                return LaunchResult.failed(f"{TASK_TYPE_TO_COMMAND[spec.task_type]} exited before its task")
        self.running.setdefault(key, []).append(proc)
        return LaunchResult.accepted()

    def reconcile(self) -> None:
        """Between task polls: reap finished task processes; once none of a kind is running,
        start that kind's next process (its imports then overlap no task of this executor)."""
        for key, procs in self.running.items():
            procs[:] = [p for p in procs if p.poll() is None]
            if not procs and (key not in self.ready or self.ready[key].poll() is not None):
                self.ready[key] = self.start(*key)

    def close(self) -> None:
        for proc in [*self.ready.values(), *self.servers.values()]:
            try:
                proc.stdin.close()  # a waiting process exits on end of input
            except OSError:
                pass
        for proc in [*self.ready.values(), *self.servers.values()]:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
        for read in self.done.values():
            os.close(read)
        self.ready.clear()
        self.servers.clear()
        self.done.clear()


def console_entry(command: str) -> Callable[[], None]:
    """Flower's console-script function of `command` (e.g. flwr-clientapp)."""
    (entry,) = entry_points(group="console_scripts", name=command)
    return entry.load()


def drop_app_modules() -> None:
    """Forget the app package's modules so the task imports them from the run's FAB."""
    for name in [n for n in sys.modules if n == APP_PACKAGE or n.startswith(APP_PACKAGE + ".")]:
        del sys.modules[name]


def preload(command: str) -> Callable[[], None]:
    """Import Flower's entry point of `command` and the third-party modules its tasks use."""
    import importlib

    entry = console_entry(command)
    for module in PRELOAD.get(command, ()):
        try:
            importlib.import_module(module)
        except ImportError:
            pass
    return entry


def run_task(command: str) -> None:
    """A warm task process: import, wait for the task's arguments on stdin, run Flower's entry.
    End of input without arguments (the SuperExec stopped): exit quietly."""
    entry = preload(command)
    if command == "flwr-serverapp":
        from fedseek.platform.deploy.prompt import prompt_grid

        prompt_grid()
    line = sys.stdin.readline()
    if not line.strip():
        return
    args = json.loads(line)
    drop_app_modules()
    sys.argv = [command, *args]
    entry()
