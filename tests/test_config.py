"""Job configuration survives Flower's flat ConfigRecord / run config."""
from __future__ import annotations

import pytest
from flwr.app import ConfigRecord
from flwr.common.config import flatten_dict

from fedseek.config import JobConfig
from fedseek.platform.flower_app import job_from_run_config, run_config_defaults


def test_job_config_round_trips_through_a_config_record():
    job = JobConfig()
    job.privacy.target_epsilon, job.lora.ffa, job.data.data = 3.5, True, "/data/notes.csv"
    job.lora.extra_trainable = ["score", "norm"]
    record = ConfigRecord(job.to_flat())  # raises if a value type is not transportable
    back = JobConfig.from_flat(dict(record))
    assert back == job
    assert "privacy.delta" not in record  # None is left out, and comes back as the default None
    assert back.privacy.delta is None


def test_flwr_run_config_keys_are_the_job_settings():
    job = job_from_run_config({"data.task": "medical_abstracts", "federation.rounds": 7,
                               "privacy.target_epsilon": 4.0, "privacy.enabled": False, "lora.rank": 4,
                               "optim.learning_rate": 0.01, "platform-track": True})
    assert (job.data.task, job.federation.rounds, job.privacy.target_epsilon) == ("medical_abstracts", 7, 4.0)
    assert job.privacy.enabled is False and job.lora.rank == 4 and job.optim.learning_rate == 0.01


def test_pyproject_flower_components_resolve_to_apps():
    import importlib
    import tomllib
    from pathlib import Path

    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    components = project["tool"]["flwr"]["app"]["components"]
    apps = {}
    for role, reference in components.items():
        module, attribute = reference.split(":")
        apps[role] = getattr(importlib.import_module(module), attribute)
    assert isinstance(apps["serverapp"], ServerApp) and isinstance(apps["clientapp"], ClientApp)
    # the run config is generated from the dataclasses (a default is written once) and is current
    shipped = flatten_dict(project["tool"]["flwr"]["app"]["config"])
    assert shipped == run_config_defaults() and job_from_run_config(shipped) == JobConfig()
    assert shipped["privacy.target_epsilon"] == JobConfig().privacy.target_epsilon


def test_set_overrides_are_parsed_by_the_declared_field_type_and_bad_items_are_named():
    job = JobConfig().with_overrides(["optim.learning_rate=0.01", "privacy.enabled=false", "privacy.delta=1e-6",
                                      "lora.extra_trainable=score,norm", "data.text_column=note",
                                      "federation.rounds=7"])
    assert job.optim.learning_rate == 0.01 and job.privacy.enabled is False and job.privacy.delta == 1e-6
    assert job.lora.extra_trainable == ["score", "norm"] and job.data.text_column == "note"
    assert job.federation.rounds == 7 and isinstance(job.federation.rounds, int)
    for item, reason in (("optim.learning_rat=0.01", "known field"), ("optim.local_steps=many", "not a valid int"),
                         ("privacy.enabled=maybe", "not a valid bool"), ("no-equals-sign", "known field")):
        with pytest.raises(ValueError, match=reason) as err:
            JobConfig().with_overrides([item])
        assert repr(item) in str(err.value)
