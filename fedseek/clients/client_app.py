"""Flower ClientApp: a thin dispatcher. It imports Flower only, so the short-lived process the
SuperNode starts per message stays cheap; the work (`fedseek.clients.handlers`: DP-LoRA rounds,
the DP Fisher pass, validation counts, the census) runs here or on the institution's Ray worker
(`ray-address` in the node config, `fedseek.clients.ray_worker`), which keeps the model loaded.
"""
from __future__ import annotations

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


def handle(kind: str, content: RecordDict, context: Context) -> RecordDict:
    """Run the `kind` handler here, or on the institution's Ray worker when its node config names a
    Ray cluster (`ray-address`): the worker keeps the model and encoded records between rounds.
    A failure reaches the coordinator only as `<category>: <field>` (`fedseek.clients.refusals`)."""
    from fedseek.clients.refusals import run_guarded

    return run_guarded(kind, _dispatch, kind, content, context)


def _dispatch(kind: str, content: RecordDict, context: Context) -> RecordDict:
    if context.node_config.get("ray-address"):
        from fedseek.clients.ray_worker import run_on_worker

        return run_on_worker(kind, content, context)
    from fedseek.clients.handlers import HANDLERS

    return HANDLERS[kind](content, context)


@app.train()
def train(msg: Message, context: Context) -> Message:
    return Message(content=handle("train", msg.content, context), reply_to=msg)


@app.train("fisher")
def fisher(msg: Message, context: Context) -> Message:
    return Message(content=handle("train.fisher", msg.content, context), reply_to=msg)


@app.evaluate("validation")
def validation(msg: Message, context: Context) -> Message:
    return Message(content=handle("evaluate.validation", msg.content, context), reply_to=msg)


@app.query("census")
def site_census(msg: Message, context: Context) -> Message:
    return Message(content=handle("query.census", msg.content, context), reply_to=msg)
