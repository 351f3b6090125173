"""Flower 1.41's SuperNode and SuperExec as the deployment runs them: Flower's own entry points
and arguments, with the fixed polls shortened while busy (`prompt`), the SuperExec's task
processes started ahead of their message (`warm`), one ClientApp process for all messages
(`serve`) and timestamps on Flower's log lines.

    python -m fedseek.platform.deploy.launch flower-supernode <flower-supernode arguments>
    python -m fedseek.platform.deploy.launch flower-superexec <flower-superexec arguments>
    python -m fedseek.platform.deploy.launch task flwr-serverapp   (a warm task process; internal)
    python -m fedseek.platform.deploy.launch serve                 (the ClientApp process; internal)
"""
from __future__ import annotations

import sys

COMMANDS = ("flower-supernode", "flower-superexec", "task", "serve")


def main(argv: list[str]) -> None:
    if not argv or argv[0] not in COMMANDS:
        sys.exit(f"usage: python -m fedseek.platform.deploy.launch {{{','.join(COMMANDS)}}} ARGUMENTS")
    command, args = argv[0], argv[1:]
    from flwr.supercore.logger import update_console_handler

    from fedseek.platform.deploy import prompt, warm

    update_console_handler(timestamps=True)  # Flower's log lines with their time (stages of a round)
    prompt.prompt_pulls()
    if command == "task":
        warm.run_task(args[0])
        return
    if command == "serve":
        from fedseek.platform.deploy.serve import serve_clientapps

        warm.preload("flwr-clientapp")
        serve_clientapps()
        return
    if command == "flower-supernode":
        prompt.prompt_supernode()
    else:
        from flwr.supercore.constant import ExecutorType
        from flwr.supercore.superexec import run_superexec

        clock, flower_executor = prompt.prompt_superexec(), run_superexec.get_executor

        def get_executor(executor_type, *a, **kw):
            if executor_type == ExecutorType.SUBPROCESS:
                executor = warm.WarmExecutor(on_launch=clock.mark_active)
                clock.held = executor.task_in_flight  # no task poll while the ClientApp works on one
                return executor
            return flower_executor(executor_type, *a, **kw)

        run_superexec.get_executor = get_executor
    entry = warm.console_entry(command)
    sys.argv = [command, *args]
    entry()


if __name__ == "__main__":
    main(sys.argv[1:])
