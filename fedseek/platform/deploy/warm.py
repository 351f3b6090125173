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
    start, after which the next task is not soon)."""

    def __init__(self, on_launch: Callable[[], None] = lambda: None):
        self.on_launch = on_launch
        self.ready: dict[tuple[TaskType, bool], subprocess.Popen] = {}  # waiting for a task
        self.running: dict[tuple[TaskType, bool], list[subprocess.Popen]] = {}  # handed a task
        self.servers: dict[bool, subprocess.Popen] = {}  # ClientApp tasks, by suppressed output

    @staticmethod
    def start(task_type: TaskType, quiet: bool, serve: bool = False) -> subprocess.Popen:
        output = subprocess.DEVNULL if quiet else None
        mode = ["serve"] if serve else ["task", TASK_TYPE_TO_COMMAND[task_type]]
        return subprocess.Popen([sys.executable, "-m", "fedseek.platform.deploy.launch", *mode],
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
                self.servers[spec.suppress_output] = server = self.start(*key, serve=True)
                if not self.hand_over(server, args, last=False):
                    return LaunchResult.failed("the ClientApp process exited before its task")
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
        self.ready.clear()
        self.servers.clear()


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
