"""Rounds without fixed overhead (issue 19): the deployment's Flower processes run through
`fedseek.platform.deploy.launch`. Checked here: busy polls are capped only while busy, Flower's
object pulls retry sooner, the warm executor hands a task exactly the arguments Flower's own
subprocess executor would, and on the real loopback deployment (TLS, node auth) one long-lived
ClientApp process per institution serves all of a job's messages. No timing is asserted: the
seconds are measured by bench/deployment.py."""
from __future__ import annotations

import re
import time

import psutil
import pytest

pytestmark = pytest.mark.xdist_group("federation")  # conftest.FEDERATION_GROUP: one federation at a time

SITES = ("bank_a", "bank_b", "bank_c")


def test_a_prompt_clock_caps_sleeps_only_while_busy(monkeypatch):
    from fedseek.platform.deploy import prompt

    slept = []
    monkeypatch.setattr(prompt.time, "sleep", slept.append)
    clock = prompt.PromptClock(0.2, window=60)
    clock.sleep(3)  # idle: Flower's own interval
    clock.mark_active()
    clock.sleep(3)
    clock.sleep(0.05)
    always = prompt.PromptClock(0.2)  # no window: a ServerApp waiting for replies
    always.sleep(3)
    assert slept == [3, 0.2, 0.05, 0.2]
    assert clock.monotonic() > 0 and clock.time() > 0  # everything else is the time module
    in_flight = [True, True, False]  # a ClientApp task in flight: no poll until it is done
    held = prompt.PromptClock(0.2, window=60, held=lambda: in_flight.pop(0))
    held.mark_active()
    slept.clear()
    held.sleep(1)
    assert slept == [0.2, 0.2, 0.2] and not in_flight


def test_the_poll_interval_is_checked(monkeypatch):
    from fedseek.platform.deploy import prompt

    monkeypatch.setenv(prompt.POLL_INTERVAL, "0.5")
    assert prompt.poll_interval() == 0.5
    monkeypatch.setenv(prompt.POLL_INTERVAL, "0")
    with pytest.raises(ValueError, match="FEDSEEK_POLL_INTERVAL"):
        prompt.poll_interval()


def test_object_pulls_retry_after_the_poll_interval():
    import subprocess
    import sys

    code = ("from fedseek.platform.deploy.prompt import prompt_pulls; prompt_pulls(); "
            "from flwr.supercore.inflatable import inflatable_utils as u; "
            "print(u.pull_objects.__kwdefaults__['initial_backoff'], "
            "u.pull_and_inflate_object_from_tree.__kwdefaults__['initial_backoff'], "
            "u.pull_objects.__kwdefaults__['backoff_cap'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["0.2", "0.2", "0.5"]  # Flower's: 1 s, doubling up to 10 s


def test_warm_tasks_get_the_arguments_of_flowers_executor(monkeypatch):
    import subprocess

    from flwr.supercore.constant import TaskType
    from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor
    from flwr.supercore.superexec.executor.types import ExecutionSpec

    from fedseek.platform.deploy.warm import task_arguments

    for insecure, certs in ((False, "site/ca.crt"), (True, None)):
        spec = ExecutionSpec(task_type=TaskType.CLIENT_APP, runtime_api_address="127.0.0.1:9094", token="t0k",
                             insecure=insecure, root_certificates_path=certs, runtime_dependency_install=False,
                             parent_pid=123, suppress_output=False, task_id=7)
        launched = []
        monkeypatch.setattr(subprocess, "Popen", lambda args, **kw: launched.append(args))
        SubprocessExecutor().launch(spec)
        monkeypatch.undo()
        assert launched == [["flwr-clientapp", *task_arguments(spec)]]


@pytest.fixture(scope="module")
def federation(deployment):
    return deployment  # conftest.deployment: shared with the other deployment modules


def serve_processes(federation, site: str) -> list[psutil.Process]:
    superexec = psutil.Process(federation.named[f"clientapp-{site}"][1].pid)
    return [p for p in superexec.children(recursive=True) if "fedseek.platform.deploy.launch serve" in " ".join(p.cmdline())]


def test_one_clientapp_process_serves_every_message_of_a_job(federation):
    root = federation.root
    seen = {site: len(federation.log(f"clientapp-{site}")) for site in SITES}
    proc = federation.run("run", "--superlink", federation.superlink, "--ca", "certs/ca.crt", "--institutions", "3",
                          "--rounds", "2", "--local-steps", "2", "--epsilon", "4", "--out", str(root / "overhead-job"),
                          "--census-timeout", "300", "--set", "data.max_test_rows=300", timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:] + federation.log("serverapp")[-2000:]
    time.sleep(1)
    for site in SITES:
        log = federation.log(f"clientapp-{site}")[seen[site]:]
        done = re.findall(r"\[fedseek-clientapp\] task done \(completed\) in process (\d+)", log)
        assert len(done) >= 3, log[-3000:]  # the census and two training rounds
        assert "Start `flwr-clientapp` process" not in log  # Flower's one-process-per-message executor
        servers = serve_processes(federation, site)
        assert len(servers) == 1 and servers[0].is_running(), [p.cmdline() for p in servers]
        assert set(done) == {str(servers[0].pid)}  # every message in the one process that is still up
