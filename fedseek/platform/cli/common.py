"""What the platform's command modules share: the consoles, `fail`, and the platform settings
and DB session of this process (FEDSEEK_*, fedseek/platform/store/settings.py)."""
from __future__ import annotations

import sys

import typer
from rich.console import Console

console = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 160)  # no truncated names in logs
err_console = Console(stderr=True, soft_wrap=True, highlight=False)


def fail(message: str, code: int = 2):
    """Print `error: message` on stderr and exit with `code`."""
    err_console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code=code)


def settings():
    from fedseek.platform.store.settings import load_settings

    return load_settings()


def session():
    """A session on the platform DB (committed on success)."""
    from fedseek.platform.store.db import session_scope

    return session_scope(settings().database_url)


def mlflow_client():
    """An MLflow client on the platform's tracking/registry URI, after sending what the outbox holds."""
    from mlflow.tracking import MlflowClient

    from fedseek.platform.mlflow.tracking import flush_all

    current = settings()
    flush_all(current.outbox_dir, current.tracking_uri, current.artifact_root)
    return MlflowClient(tracking_uri=current.tracking_uri, registry_uri=current.tracking_uri)
