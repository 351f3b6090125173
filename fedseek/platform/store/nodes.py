"""Deployment node identity: which SuperLink node id (authenticated by its registered key) may
report as which institution. Flower admits only registered keys; this binding additionally stops a
registered node from training, and spending budget, under another institution's name."""
from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from fedseek.platform.store import ledger
from fedseek.platform.store.db import Institution, session_scope


class NodeIdentityError(PermissionError):
    """A node reported an institution it is not registered as."""


def public_key_sha256(path: Path) -> str:
    """Digest of an OpenSSH public key's type and key material (the comment is ignored)."""
    parts = Path(path).read_text().split()
    if len(parts) < 2:
        raise ValueError(f"{path}: not an OpenSSH public key (expected '<type> <base64> [comment]')")
    return hashlib.sha256(" ".join(parts[:2]).encode()).hexdigest()


def bind_node(session: Session, name: str, node_id: int, key_sha256: str, default_budget: float) -> Institution:
    """Record that `name` authenticates as `node_id` (registering the institution if new)."""
    row = ledger.institution(session, name, None, default_budget)
    other = session.scalars(select(Institution).filter_by(node_id=str(node_id))).one_or_none()
    if other is not None and other.id != row.id:
        raise NodeIdentityError(f"node {node_id} is already bound to {other.name}")
    row.node_id, row.public_key_sha256 = str(node_id), key_sha256
    return row


def verify_node_identities(db_url: str, node_ids: dict[str, int]) -> None:
    """Refuse the job unless every institution's node id is the one registered for it."""
    problems = []
    with session_scope(db_url) as session:
        for name, node in sorted(node_ids.items()):
            row = session.scalars(select(Institution).filter_by(name=name)).one_or_none()
            if row is None or row.node_id is None:
                problems.append(f"node {node} reports institution {name!r}, which is not registered "
                                "(fedseek deploy register)")
            elif row.node_id != str(node):
                problems.append(f"node {node} reports institution {name!r}, registered as node {row.node_id}")
    if problems:
        raise NodeIdentityError("; ".join(problems))


def registered_but_offline(db_url: str, online: Iterable[int]) -> list[str]:
    """'name (node id)' of each registered institution whose node is not among `online`."""
    online = {str(node) for node in online}
    with session_scope(db_url) as session:
        rows = session.scalars(select(Institution).where(Institution.node_id.is_not(None))
                               .order_by(Institution.name))
        return [f"{row.name} (node {row.node_id})" for row in rows if row.node_id not in online]
