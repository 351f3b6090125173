"""The privacy promise from a site's side (issue 15): each test plays a curious or malicious
coordinator against the real ClientApp handlers of a node that holds its own CSV.

- DP noise and sampling come from the node's private randomness: two runs of the same job on the
  same records release different updates, and the update a coordinator regenerates from the job
  config (the seed it knows) does not match the released one.
- A failure reaches the coordinator as `<category>: <field>`, never a record value.
- The site's own policy (node config) refuses requests outside it — no DP, a large epsilon, small
  sigma, large q, large delta, seeded noise, a column it does not allow, exact validation counts —
  and its durable history enforces its lifetime budget across jobs and restarts.
"""
from __future__ import annotations

import time

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict

from fedseek.clients import client_app
from fedseek.clients.handlers import _site_seed
from fedseek.clients.refusals import SiteRefusal
from fedseek.clients.site_store import SiteStore, store_path
from fedseek.config import JobConfig, LoraSettings
from fedseek.data.loader import read_labelled_file
from fedseek.models.classifier import AdapterClassifier
from fedseek.models.lora import trainable_state
from fedseek.resources import resource_path
from fedseek.wire.arrays import to_arrays

LABELS = ["card_arrival", "card_linking", "exchange_rate", "lost_or_stolen_card", "pin_blocked"]
SECRET = "MRN-0042-SMITH"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A bank's CSV: 60 banking77 records of 5 intents, plus an `mrn` column of identifiers."""
    source = resource_path("data/shipped", "banking77/train.csv") / "banking77" / "train.csv"
    rows = read_labelled_file(source, "text", "category")
    chosen = [i for i, label in enumerate(rows.labels) if rows.label_names[label] in LABELS][:60]
    path = tmp_path_factory.mktemp("bank") / "bank_x.csv"
    with path.open("w", encoding="utf-8") as handle:
        handle.write("text,category,mrn\n")
        for k, i in enumerate(chosen):
            mrn = SECRET if k == 7 else f"MRN-{k:04d}"
            handle.write('"' + rows.texts[i].replace('"', '""') + f'",{rows.label_names[rows.labels[i]]},{mrn}\n')
    adapter = {k: v.numpy() for k, v in trainable_state(AdapterClassifier(None, len(LABELS), LoraSettings()).model).items()}
    return path, adapter


def job_config(**changes) -> dict:
    job = JobConfig()
    job.federation.rounds, job.optim.local_steps, job.optim.batch_fraction = 1, 2, 0.25
    job.data.label_column, job.data.validation_fraction = "category", 0.25
    for key, value in changes.items():
        section, name = key.split("__")
        setattr(getattr(job, section), name, value)
    return {**job.to_flat(), "label-names": LABELS, "server-round": 1}


def context(site, tmp_path, **policy) -> Context:
    config = {"data-path": str(site[0]), "institution": "bank_x", "state-dir": str(tmp_path / "site-state"),
              "epsilon-budget": 1000.0, "max-job-epsilon": 1000.0, **policy}
    return Context(run_id=1, node_id=3, node_config=config, state=RecordDict(), run_config={})


def message(kind: str, site, config: dict) -> Message:
    metadata = Metadata(run_id=1, message_id="m", src_node_id=0, dst_node_id=3, reply_to_message_id="",
                        group_id="1", created_at=time.time(), ttl=3600, message_type=kind)
    return Message(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in site[1].items()}),
                               "config": ConfigRecord(config)}), metadata=metadata)


def call(kind: str, site, config: dict, ctx: Context) -> RecordDict:
    """The real ClientApp, as the SuperNode runs it (a raised exception becomes Flower's error
    reply with reason `str(type(ex)) + ":<'" + str(ex) + "'>"`)."""
    return client_app.app(message(kind, site, config), ctx).content


def released(reply: RecordDict) -> dict[str, np.ndarray]:
    return to_arrays(reply["arrays"])


def differ(a: dict, b: dict) -> bool:
    return any(not np.array_equal(a[k], b[k]) for k in a)


def test_dp_noise_is_private_to_the_node(site, tmp_path):
    first = released(call("train", site, job_config(), context(site, tmp_path / "a")))
    second = released(call("train", site, job_config(), context(site, tmp_path / "b")))
    assert differ(first, second), "two DP runs of the same job on the same records released the same update"
    # the coordinator knows the job config: regenerating with the seed it could derive must not match
    regenerated = released(call("train", site, job_config(privacy__reproducible_noise=True),
                                context(site, tmp_path / "c", **{"allow-reproducible-noise": True})))
    again = released(call("train", site, job_config(privacy__reproducible_noise=True),
                          context(site, tmp_path / "d", **{"allow-reproducible-noise": True})))
    assert not differ(regenerated, again)  # seeded noise is regenerable (hence "not private")
    assert differ(first, regenerated) and differ(second, regenerated)
    assert _site_seed(JobConfig.from_flat(job_config()), "bank_x") is not None  # what the attacker would use


def test_non_dp_runs_stay_seeded_and_reproducible(site, tmp_path):
    policy = {"require-dp": False}
    first = released(call("train", site, job_config(privacy__enabled=False), context(site, tmp_path / "a", **policy)))
    second = released(call("train", site, job_config(privacy__enabled=False), context(site, tmp_path / "b", **policy)))
    assert not differ(first, second) and differ(first, site[1])  # trained, and bit-identical


def test_fisher_noise_is_private_to_the_node(site, tmp_path):
    a = released(call("train.fisher", site, job_config(), context(site, tmp_path / "a")))
    b = released(call("train.fisher", site, job_config(), context(site, tmp_path / "b")))
    assert differ(a, b)


def test_error_replies_carry_no_record_value(site, tmp_path, caplog):
    config = {**job_config(data__label_column="mrn"), "label-names": ["MRN-0000"]}
    with pytest.raises(SiteRefusal) as refusal:
        call("train", site, config, context(site, tmp_path))
    assert str(refusal.value) == "data-error: data.label_column"
    assert "MRN" not in str(refusal.value) and refusal.value.__cause__ is None
    assert refusal.value.__suppress_context__
    assert SECRET in caplog.text or "MRN-" in caplog.text  # the details stay in the site's own log
    with pytest.raises(SiteRefusal) as missing:
        call("train", site, job_config(data__text_column="no_such_column"), context(site, tmp_path))
    assert str(missing.value) == "data-error: data.text_column"


@pytest.mark.parametrize("changes, policy, field", [
    ({"privacy__enabled": False}, {}, "privacy.enabled"),
    ({"privacy__target_epsilon": 50.0}, {"max-job-epsilon": 10.0, "min-noise-multiplier": 0.0}, "privacy.target_epsilon"),
    ({"privacy__noise_multiplier": 0.05}, {}, "privacy.noise_multiplier"),
    ({"optim__batch_fraction": 0.9}, {}, "optim.batch_fraction"),
    ({"privacy__delta": 0.01}, {}, "privacy.delta"),
    ({"privacy__reproducible_noise": True}, {}, "privacy.reproducible_noise"),
    ({}, {"allowed-columns": "text,label"}, "data.label_column"),
])
def test_the_site_refuses_requests_outside_its_policy(site, tmp_path, changes, policy, field):
    ctx = context(site, tmp_path, **policy)
    with pytest.raises(SiteRefusal) as refusal:
        call("train", site, job_config(**changes), ctx)
    assert str(refusal.value) == f"policy-refused: {field}"
    assert SiteStore(store_path(ctx.node_config)).releases() == []  # nothing was charged or trained


def test_the_site_enforces_its_lifetime_budget_across_jobs_and_restarts(site, tmp_path):
    policy = {"epsilon-budget": 10.0, "max-job-epsilon": 10.0}
    call("train", site, job_config(privacy__target_epsilon=8.0), context(site, tmp_path, **policy))
    stored = SiteStore(store_path(context(site, tmp_path).node_config)).releases()
    assert len(stored) == 1 and stored[0].steps == 2
    # a restarted node (fresh context, state lost) asked for a second job: 8 then 8 compose past 10
    with pytest.raises(SiteRefusal, match="policy-refused: privacy.target_epsilon"):
        call("train", site, job_config(privacy__target_epsilon=8.0), context(site, tmp_path, **policy))
    call("train", site, job_config(privacy__target_epsilon=2.0), context(site, tmp_path, **policy))


def test_validation_counts_are_noised_and_charged_unless_the_site_allows_exact(site, tmp_path):
    ctx = context(site, tmp_path)
    noised = call("evaluate.validation", site, job_config(), ctx)["metrics"]
    assert noised["noise-multiplier"] == 10.0 and noised["sample-rate"] == 1.0 and noised["steps"] == 1
    stored = SiteStore(store_path(ctx.node_config)).releases()
    assert [(r.sigma, r.q, r.steps) for r in stored] == [(10.0, 1.0, 1)]
    exact = call("evaluate.validation", site, job_config(), context(site, tmp_path / "e", **{"validation-counts": "exact"}))
    assert "noise-multiplier" not in exact["metrics"] and float(exact["metrics"]["correct"]).is_integer()
    with pytest.raises(SiteRefusal, match="policy-refused: evaluate.validation"):
        call("evaluate.validation", site, job_config(), context(site, tmp_path / "r", **{"validation-counts": "refuse"}))


def test_seeded_noise_is_refused_by_deployed_and_tracked_jobs(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from fedseek.platform.cli.main import app
    from fedseek.platform.run.jobs import refuse_reproducible_noise
    from fedseek.platform.store.settings import PlatformSettings

    job = JobConfig.from_flat(job_config(privacy__reproducible_noise=True))
    with pytest.raises(ValueError, match="privacy.reproducible_noise"):
        refuse_reproducible_noise(job, deployed=True)  # `fedseek deploy run`, whatever the platform allows
    with pytest.raises(ValueError, match="tracked jobs"):
        refuse_reproducible_noise(job, PlatformSettings(allow_reproducible_noise=False), deployed=False)
    refuse_reproducible_noise(job, PlatformSettings(allow_reproducible_noise=True), deployed=False)  # a test platform
    monkeypatch.setenv("FEDSEEK_HOME", str(tmp_path))
    monkeypatch.delenv("FEDSEEK_ALLOW_REPRODUCIBLE_NOISE", raising=False)
    result = CliRunner().invoke(app, ["simulate", "--reproducible-noise", "--max-train-rows", "120", "--rounds", "1",
                                      "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "not private" in result.output, result.output
    assert not (tmp_path / "out" / "report.json").exists()


def test_a_policy_typo_stops_the_supernode():
    from fedseek.platform.deploy.stack import site_policy_config

    assert site_policy_config("epsilon-budget=6 require-dp=true") == {"epsilon-budget": "6", "require-dp": "true"}
    for bad in ("epsilon-budgt=6", "epsilon-budget=abc", "validation-counts=sometimes", "require-dp=maybe"):
        with pytest.raises(ValueError):
            site_policy_config(bad)
