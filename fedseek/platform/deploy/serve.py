"""One ClientApp process for a SuperNode's messages, one task after the other.

Flower 1.41's `flwr-clientapp` (`flwr.supernode.runtime.run_clientapp`) handles one task and
exits, so every message pays a Python start, Flower's imports, the FAB's installation and, in
FedSeek, joining the site's Ray cluster. `serve_clientapps` keeps one process per ClientApp
SuperExec and runs each task the executor hands it (`WarmExecutor`) with Flower's own task
steps: with the task's token it pulls the task input (message, context, run, FAB) from the
SuperNode's Runtime API, runs the run's ClientApp, pushes the reply and the context back, with a
task heartbeat meanwhile; a failure becomes the same error reply Flower sends. After each task it
writes a byte to `FEDSEEK_SERVE_DONE_FD`: the SuperExec asks for no task while one is in flight. What it keeps
between tasks: the Runtime API client settings, the run's ClientApp as loaded from its FAB
(installed and hash-checked by Flower once per FAB; a task with another FAB drops the old app's
modules and loads the new one) and whatever that app keeps in its module (FedSeek: the Ray
connection and the site worker's handle). The node state still lives in the SuperNode: each task
gets it in its context and returns it, as before. The SuperNode hands out one message at a time,
so tasks never overlap.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from logging import ERROR, INFO

from fedseek.platform.deploy.warm import drop_app_modules


class LoadedApp:
    """The ClientApp of one FAB, loaded once."""

    def __init__(self):
        self.fab_hash: str | None = None
        self.app = None
        self.path: str | None = None

    def get(self, run, fab):
        from flwr.cli.install import install_from_fab
        from flwr.clientapp.utils import get_load_client_app_fn
        from flwr.common.config import get_project_dir

        digest = hashlib.sha256(fab.content).hexdigest()  # of the bytes received, not a claimed hash
        if digest == self.fab_hash:
            return self.app
        if self.path and self.path in sys.path:
            sys.path.remove(self.path)
        drop_app_modules()
        install_from_fab(fab.content, skip_prompt=True)  # Flower verifies the FAB's file hashes
        self.path = str(get_project_dir(run.fab_id, run.fab_version, fab.hash_str).absolute())
        self.app = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)(
            run.fab_id, run.fab_version, fab.hash_str)
        self.fab_hash = digest
        return self.app


def run_one(args: list[str], loaded: LoadedApp) -> None:
    """One task, given the arguments Flower's executor would give `flwr-clientapp`."""
    from flwr.app import Message
    from flwr.app.error import Error
    from flwr.clientapp.client_app import LoadClientAppError
    from flwr.common.args import try_obtain_flwr_app_token
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.supercore import log
    from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
    from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supercore.runtime.tracing import RuntimeTracingInterceptor
    from flwr.supercore.tls import validate_and_resolve_root_certificates
    from flwr.supernode.cli.flwr_clientapp import _parse_args_run_flwr_clientapp
    from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

    parsed = _parse_args_run_flwr_clientapp().parse_args(args)
    token = try_obtain_flwr_app_token(parsed)
    retry_invoker = make_simple_http_retry_invoker()
    client = RuntimeHttpClient.from_server_address(
        server_address=parsed.runtime_api_address, insecure=parsed.insecure,
        root_certificates=validate_and_resolve_root_certificates(parsed.root_certificates, parsed.insecure),
        interceptors=[RuntimeTracingInterceptor(), RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                      RuntimeTokenHttpInterceptor(token)],
        retry_invoker=retry_invoker)
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    message = context = reply = None
    sub_status, details = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
    try:
        heartbeat.start()
        message, context, run, fab = pull_task_input(client)
        log(INFO, "[fedseek-clientapp] %s message pulled", message.metadata.message_type)
        reply = loaded.get(run, fab)(message=message, context=context)
        sub_status, details = SubStatus.COMPLETED, ""
    except Exception as ex:  # pylint: disable=broad-exception-caught
        code = ErrorCode.LOAD_CLIENT_APP_EXCEPTION if isinstance(ex, LoadClientAppError) \
            else ErrorCode.CLIENT_APP_RAISED_EXCEPTION
        reason = ("An exception was raised when attempting to load `ClientApp`" if isinstance(ex, LoadClientAppError)
                  else str(type(ex)) + ":<'" + str(ex) + "'>")
        log(ERROR, "ClientApp raised an exception", exc_info=ex)
        details = reason
        if message:
            reply = Message(Error(code=code, reason=reason), reply_to=message)
    finally:
        try:
            if reply and context:
                push_message(client, reply, context)
                log(INFO, "[fedseek-clientapp] reply pushed")
        except Exception as ex:  # pylint: disable=broad-exception-caught
            log(ERROR, "Failed to push reply message", exc_info=ex)
        retry_invoker.max_tries = 1
        push_task_output(client=client, context=context, sub_status=sub_status, details=details)
        if heartbeat.is_running:
            heartbeat.stop()
        client.close()
    log(INFO, "[fedseek-clientapp] task done (%s) in process %d", sub_status, os.getpid())  # context, status pushed


def serve_clientapps() -> None:
    """Run the tasks whose arguments arrive on stdin (one JSON list a line) until end of input."""
    from flwr.supercore import log

    loaded, done = LoadedApp(), os.environ.get("FEDSEEK_SERVE_DONE_FD")
    for line in sys.stdin:
        if line.strip():
            try:
                run_one(json.loads(line), loaded)
            except (Exception, SystemExit) as ex:  # pylint: disable=broad-exception-caught
                log(ERROR, "[fedseek-clientapp] task failed before it started", exc_info=ex)
            if done:
                os.write(int(done), b".")  # the SuperExec may ask its SuperNode for the next task
