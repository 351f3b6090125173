"""The privacy ledger in the platform DB: what each institution has spent, the pre-flight
projection of a job, and the atomic commit of a round with its ledger entries.

Composition follows `fedseek.privacy.ledger_math`: an entry's `data_scope` is a `DataScope` key
(dataset fingerprint, period scheme with its parameters, slice; `fedseek.config.data_scope`), and
only slices of one scheme over one dataset compose in parallel, everything else (and every legacy
key of an older DB) sequentially. An institution a job meets for the first time is registered
automatically with `FEDSEEK_DEFAULT_EPSILON_MAX` (register it beforehand with
`fedseek institutions add` to set its own budget). Jobs without DP are not charged: they carry no
guarantee at all, and the job row records that DP was off.
"""
from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from fedseek.platform.store.db import Institution, LedgerEntry, Round
from fedseek.privacy.ledger_math import Release, counts_release, institution_epsilon
from fedseek.privacy.planning import job_round_release

KINDS = ("hospital", "bank", "site")


class BudgetExceeded(ValueError):
    """A job (or its next round) would take an institution past its privacy budget."""


@dataclass
class Projection:
    institution: str
    epsilon_max: float
    spent: float
    projected: float
    delta: float

    @property
    def exceeds(self) -> bool:
        return self.projected > self.epsilon_max + 1e-9

    def refusal(self) -> str:
        return (f"institution {self.institution!r} would exceed its privacy budget: epsilon_max "
                f"{self.epsilon_max:g}, already spent {self.spent:.3f}, projected after this job "
                f"{self.projected:.3f} (delta {self.delta:.1e})")


def kind_of(name: str) -> str:
    prefix = name.split("_", 1)[0]
    return prefix if prefix in KINDS else "site"


def institution(session: Session, name: str, delta: float | None, default_budget: float) -> Institution:
    """The registered institution `name`, registered now with `default_budget` if unknown."""
    row = session.scalars(select(Institution).filter_by(name=name)).one_or_none()
    if row is None:
        row = Institution(name=name, kind=kind_of(name), epsilon_max=default_budget, delta=delta)
        session.add(row)
        session.flush()
    elif row.delta is None and delta is not None:
        row.delta = delta
    return row


def releases(session: Session, institution_id: int) -> list[Release]:
    entries = session.scalars(select(LedgerEntry).filter_by(institution_id=institution_id)
                              .order_by(LedgerEntry.id)).all()
    return [Release(e.data_scope, e.sigma, e.q, e.steps) for e in entries]


def spent(session: Session, row: Institution, method: str = "prv") -> float:
    delta = row.delta or 1e-5
    return institution_epsilon(releases(session, row.id), delta, method)


def planned_releases(job, num_records: int, scope: str) -> tuple[list[Release], float]:
    """The releases a DP job will make for one institution with `num_records`, and its delta:
    sigma comes from the function the client uses (`planning.round_release`, behind
    `LocalTrainer.plan_noise`), with the same reservation for a planned DP Fisher pass; both
    phases of the probe recipe release the same (sigma, q, local_steps) per round."""
    sigma, q, delta = job_round_release(job, num_records)
    return [Release(scope, sigma, q, job.optim.local_steps)] * job.federation.rounds, delta


def project(session: Session, plans: dict[str, tuple[list[Release], float]],
            default_budget: float) -> list[Projection]:
    """epsilon per institution after its stored history plus the planned releases."""
    projections = []
    for name, (planned, delta) in plans.items():
        row = institution(session, name, delta, default_budget)
        history = releases(session, row.id)
        at = row.delta or delta
        projections.append(Projection(name, row.epsilon_max, institution_epsilon(history, at),
                                      institution_epsilon(history + planned, at), at))
    return projections


def check_budget(projections: list[Projection]) -> None:
    refused = [p.refusal() for p in projections if p.exceeds]
    if refused:
        raise BudgetExceeded("; ".join(refused) + ". Nothing was trained.")


def commit_round(session: Session, job_id: int, row: dict, entries: list[dict], scope: str,
                 clip: float, default_budget: float, checkpoint_sha256: str | None = None) -> None:
    """Add the round and its ledger entries to `session` (the caller's one transaction).
    `entries`: dicts with institution, kind, sigma, q, steps, delta."""
    session.add(Round(job_id=job_id, number=int(row["round"]), accuracy=float(row["accuracy"]),
                      loss=float(row["loss"]), train_loss=_finite(row.get("train_loss")),
                      bytes_up=int(row.get("bytes_up", 0)), checkpoint_sha256=checkpoint_sha256))
    add_entries(session, job_id, int(row["round"]), entries, scope, clip, default_budget)


def add_entries(session: Session, job_id: int, round_number: int, entries: list[dict], scope: str,
                clip: float, default_budget: float) -> None:
    """Charge `entries` (a round's, or a Fisher pass's) to their institutions, in `session`."""
    for entry in entries:
        inst = institution(session, entry["institution"], entry["delta"], default_budget)
        history = releases(session, inst.id) + [Release(scope, entry["sigma"], entry["q"], entry["steps"])]
        at = inst.delta or entry["delta"]
        session.add(LedgerEntry(
            institution_id=inst.id, job_id=job_id, round_number=round_number, kind=entry["kind"],
            data_scope=scope, sigma=entry["sigma"], q=entry["q"], steps=int(entry["steps"]), clip=clip,
            delta=entry["delta"], epsilon_after=institution_epsilon(history, at),
            epsilon_rdp_after=institution_epsilon(history, at, "rdp")))
        session.flush()


def count_entries(entries: list[dict], scope: str) -> list[dict]:
    """Ledger entries (kind `validation`) of noised record counts: `entries` hold institution,
    sigma (std per count, sensitivity 1), delta and optionally counts (how many counts were noised,
    default 1) and steps (default 1); see `ledger_math.counts_release`."""
    charged = []
    for entry in entries:
        release = counts_release(scope, entry["sigma"], int(entry.get("counts", 1)), int(entry.get("steps", 1)))
        charged.append({"institution": entry["institution"], "kind": "validation", "sigma": release.sigma,
                        "q": release.q, "steps": release.steps, "delta": float(entry["delta"])})
    return charged


def _finite(value) -> float | None:
    return None if value is None or value != value else float(value)


def epsilon_series(session: Session, names: list[str]) -> tuple[dict[str, list[tuple[int, float]]], dict[str, float]]:
    """Per institution: (entry number, epsilon after it) over its whole ledger, and its budget."""
    series, budgets = {}, {}
    for inst in session.scalars(select(Institution).where(Institution.name.in_(names))):
        entries = session.scalars(select(LedgerEntry).filter_by(institution_id=inst.id).order_by(LedgerEntry.id)).all()
        series[inst.name] = [(i + 1, e.epsilon_after) for i, e in enumerate(entries)]
        budgets[inst.name] = inst.epsilon_max
    return series, budgets


def round_entries(row: dict, steps_seen: dict[tuple[str, str], int]) -> list[dict]:
    """Ledger entries of one committed round from the clients' replies: the steps made *this*
    round (replies count train steps over the whole job; `steps_seen` is updated)."""
    entries = []
    for client in row.get("clients", []):
        name = client["institution"]
        for kind, prefix in (("train", ""), ("fisher", "fisher_")):
            if f"{prefix}steps" not in client or f"{prefix}noise_multiplier" not in client:
                continue
            total = int(client[f"{prefix}steps"])
            steps = total - steps_seen.get((name, kind), 0) if kind == "train" else total
            steps_seen[(name, kind)] = total
            if steps > 0:
                entries.append({"institution": name, "kind": kind, "sigma": float(client[f"{prefix}noise_multiplier"]),
                                "q": float(client[f"{prefix}sample_rate"]), "steps": steps,
                                "delta": float(client["delta"])})
    return entries


def next_round_refusal(session: Session, entries: list[dict], scope: str, rounds_done: int) -> str:
    """Why the next round must not run ("" if it may): repeating this round's train releases would
    take an institution over its budget."""
    for entry in (e for e in entries if e["kind"] == "train"):
        inst = session.scalars(select(Institution).filter_by(name=entry["institution"])).one()
        planned = Release(scope, entry["sigma"], entry["q"], entry["steps"])
        nxt = institution_epsilon(releases(session, inst.id) + [planned], inst.delta or entry["delta"])
        if nxt > inst.epsilon_max + 1e-9:
            return (f"stopped before round {rounds_done + 1}: institution {inst.name!r} "
                    f"would reach epsilon {nxt:.3f} > budget {inst.epsilon_max:g}")
    return ""


def fisher_entry(entry: dict) -> dict:
    """A ledger entry from one institution's Fisher-pass log (`report["fisher"]`)."""
    return {"institution": entry["institution"], "kind": "fisher", "sigma": float(entry["fisher_noise_multiplier"]),
            "q": float(entry["fisher_sample_rate"]), "steps": int(entry["fisher_steps"]),
            "delta": float(entry["delta"])}
