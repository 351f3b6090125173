"""What a coordinator may learn from a failed request: a category and the job field it sent.

The coordinator chooses the column names and settings a node reads its records with, so an error
text such as "label 'MRN-0042-SMITH' in 'mrn' is not one of ..." would let it read a column value
by value. Every handler failure is therefore logged in full on the site and replaced by a
`SiteRefusal` whose text is only `<category>: <field>` (categories: policy-refused, data-error,
site-error), raised without its cause so no traceback carries the original message.
"""
from __future__ import annotations

import logging

from fedseek.clients.site_policy import PolicyRefusal
from fedseek.data.loader import DataError

logger = logging.getLogger("fedseek.clients")


class SiteRefusal(Exception):
    """A failure as the coordinator sees it (no record values)."""


def safe_reason(err: BaseException) -> str:
    if isinstance(err, SiteRefusal):
        return str(err)
    if isinstance(err, PolicyRefusal):
        return f"policy-refused: {err.field}"
    if isinstance(err, DataError):
        return f"data-error: {err.field or 'data'}"
    cause = getattr(err, "cause", None)  # ray.exceptions.RayTaskError wraps the worker's error
    if isinstance(cause, BaseException) and cause is not err:
        return safe_reason(cause)
    return f"site-error: {type(err).__name__}"


def run_guarded(kind: str, handler, *args):
    """Run `handler(*args)`; any failure is logged here in full and re-raised as a SiteRefusal."""
    try:
        return handler(*args)
    except Exception as err:  # noqa: BLE001 - every failure must be sanitized before it leaves
        reason = safe_reason(err)
        detail = err.detail if isinstance(err, PolicyRefusal) else ""
        logger.error("request %s refused (%s) %s", kind, reason, detail, exc_info=not isinstance(err, PolicyRefusal))
        raise SiteRefusal(reason) from None
