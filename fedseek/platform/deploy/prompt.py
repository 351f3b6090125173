"""Shorter fixed waits in Flower 1.41's deployment loops, while a federation is busy.

Flower's components poll with fixed sleeps that no option changes: the SuperNode asks the
SuperLink for a message every 3 s and looks for its ClientApp's reply every 0.5 s
(`flwr.supernode.start_client_internal`), the SuperExec asks its Runtime API for a task every 1 s
(`flwr.supercore.superexec.run_superexec`; `FLWR_SUPEREXEC_TASK_POLL_INTERVAL` sets it, for idle
and busy alike) and a ServerApp's `Grid.send_and_receive` pulls replies every 3 s
(`flwr.superlink.grid.http_grid`). In a round each message waits for up to all four. And an
object of a message that is not yet there when a component pulls it (a SuperNode sees a message
as soon as the ServerApp has sent it, before its arrays are uploaded) is asked for again after
1 s, then 2 s, 4 s... (`flwr.supercore.inflatable.inflatable_utils.pull_objects`).

`PromptClock` stands in for the `time` module inside one of those modules: a sleep there lasts
at most `FEDSEEK_POLL_INTERVAL` seconds (default 0.2) while the component handled a message in
the last `FEDSEEK_POLL_WINDOW` seconds (default 120), and Flower's own length otherwise; so an
idle SuperNode still polls the SuperLink every 3 s. `prompt_pulls` starts the object retries at
that interval, doubling up to 0.5 s (Flower: from 1 s up to 10 s; a ClientApp asks its SuperNode
for the message's objects while the SuperNode still downloads them, and a doubling wait that
overshoots their arrival by seconds is the longest stage of a short round). Nothing else in those modules changes: the
same requests, with the same TLS, node authentication and SuperExec authentication, only sooner.
"""
from __future__ import annotations

import os
import time

POLL_INTERVAL = "FEDSEEK_POLL_INTERVAL"
POLL_WINDOW = "FEDSEEK_POLL_WINDOW"


def poll_interval() -> float:
    """Seconds between polls while busy (`FEDSEEK_POLL_INTERVAL`, 0.01..3)."""
    value = float(os.environ.get(POLL_INTERVAL) or 0.2)
    if not 0.01 <= value <= 3:
        raise ValueError(f"{POLL_INTERVAL}={value}: give 0.01..3 seconds")
    return value


def poll_window() -> float:
    """Seconds after a message during which a component polls fast (`FEDSEEK_POLL_WINDOW`)."""
    value = float(os.environ.get(POLL_WINDOW) or 120)
    if value < 0:
        raise ValueError(f"{POLL_WINDOW}={value}: give a number of seconds >= 0")
    return value


class PromptClock:
    """The `time` module for one Flower module, with sleeps capped at `fast` seconds while the
    component was active in the last `window` seconds (`window=None`: always). `held`: while it
    says yes, a sleep goes on (in `fast` steps): nothing can arrive that a poll would fetch."""

    def __init__(self, fast: float, window: float | None = None, held=None):
        self.fast, self.window, self.last_active, self.held = fast, window, None, held

    def mark_active(self) -> None:
        self.last_active = time.monotonic()

    def busy(self) -> bool:
        if self.window is None:
            return True
        return self.last_active is not None and time.monotonic() - self.last_active < self.window

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self.fast) if self.busy() else seconds)
        while self.held is not None and self.held():
            time.sleep(self.fast)

    def __getattr__(self, name: str):
        return getattr(time, name)


def prompt_supernode() -> PromptClock:
    """The SuperNode's Fleet poll and reply wait, fast for a window after each message."""
    from flwr.supernode import start_client_internal as loop

    clock = PromptClock(poll_interval(), poll_window())
    pull, push = loop._pull_and_store_message, loop._push_messages  # pylint: disable=protected-access

    def pulled(*args, **kwargs):
        run_id = pull(*args, **kwargs)
        if run_id is not None:
            clock.mark_active()
        return run_id

    def pushed(*args, **kwargs):
        push(*args, **kwargs)
        clock.mark_active()

    loop.time, loop._pull_and_store_message, loop._push_messages = clock, pulled, pushed
    return clock


def prompt_superexec() -> PromptClock:
    """The SuperExec's task poll, fast for a window after each launch (the caller marks it and
    may set `held`: a ClientApp task in flight)."""
    from flwr.supercore.superexec import run_superexec as loop

    clock = PromptClock(poll_interval(), poll_window())
    loop.time = clock
    return clock


def prompt_grid() -> PromptClock:
    """A ServerApp's reply poll (`send_and_receive`), always fast: it waits only for replies."""
    from flwr.superlink.grid import http_grid

    clock = PromptClock(poll_interval())
    http_grid.time = clock
    return clock


def prompt_pulls() -> None:
    """Retry a not-yet-uploaded object after `FEDSEEK_POLL_INTERVAL`, doubling up to 0.5 s (or the
    interval if longer): the defaults of Flower's object pulls in this process."""
    from flwr.supercore.inflatable import inflatable_utils

    first = poll_interval()
    for function in (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree):
        function.__kwdefaults__ = {**(function.__kwdefaults__ or {}), "initial_backoff": first,
                                   "backoff_cap": max(first, 0.5)}
