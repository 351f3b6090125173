"""The ClientApp's handlers: one institution's local DP-LoRA training (run in the ClientApp
process, or on the institution's Ray worker; `fedseek.clients.client_app` dispatches).

The base model is loaded once per process and the site's records are tokenized (and their frozen
prefix computed) once per process; each round applies the received adapter, trains with DP-SGD and
replies with the trainable tensors only. The accountant history lives in the node's persistent
`context.state`, one history per data scope (a continual-learning period, or "all"), so epsilon
composes over every round, period and Fisher pass of the run.

Message types: `train` (a DP-LoRA round, with EWC when the server ships `ewc` tensors),
`train.fisher` (the DP Fisher diagonal at the received adapter: a charged release) and
`evaluate.validation` (accuracy on the institution's held-out validation records of given periods,
for choosing λ without the test set; counts only) and `query.census` (institution name and
record count, for the coordinator's privacy pre-flight in deployment). With `ray-address` in the
node config the handlers run on the institution's Ray worker (`fedseek.clients.ray_worker`).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import zlib

import numpy as np
from flwr.app import ConfigRecord, Context, RecordDict

from fedseek.clients.dp_trainer import LocalTrainer
from fedseek.clients.recipe import round_phase
from fedseek.clients.site_guard import SiteGuard
from fedseek.clients.site_policy import PolicyRefusal
from fedseek.config import PERIOD_SEPARATOR, CompressionSettings, JobConfig
from fedseek.continual.ewc import EWCState
from fedseek.data.loader import LabelledTexts, read_labelled_file
from fedseek.data.periods import Period, split_validation
from fedseek.data.plan import institution_rows
from fedseek.models.adapted import EncodedRecords, adapted_model, encode_rows
from fedseek.models.lora import load_trainable_state, trainable_state
from fedseek.privacy.accountant import default_delta, epsilon
from fedseek.privacy.planning import reserved_releases
from fedseek.wire.arrays import to_arrays, to_record, to_tensors
from fedseek.wire.compression import compress, delta_between
from fedseek.wire.replies import CensusReply, FisherReply, TrainReply, ValidationReply

logger = logging.getLogger("fedseek.clients")
PRIVACY_STATE = "privacy-history"
COMPRESSION_STATE = "compression-residual"


_trainers: dict[tuple, LocalTrainer] = {}  # the process's models (at most two kept)


def trainer_for(job: JobConfig, num_labels: int) -> LocalTrainer:
    """The process's trainer for this job's model (loaded once, reused by every round and period)."""
    fed, d = job.federation, job.data
    key = (repr(job.lora), fed.base_model, fed.dtype, fed.quantize, num_labels, d.max_length, d.causal_lm,
           d.response_tokens, job.recipe.pooling, job.recipe.components)
    if key not in _trainers:
        if len(_trainers) >= 2:
            _trainers.pop(next(iter(_trainers)))
        _trainers[key] = LocalTrainer(adapted_model(job, num_labels))
    return _trainers[key]


_site_cache: dict[tuple, tuple[str, EncodedRecords, EncodedRecords]] = {}


def _site_rows(job: JobConfig, node_config: dict, label_names: list[str],
               active: list[int] | None) -> tuple[str, LabelledTexts, LabelledTexts]:
    """(institution, train rows, validation rows) of the job's period(s). Deployment: the node's
    own `data-path` file; simulation: partition `partition-id`, as the server split it."""
    path = node_config.get("data-path")
    if not path:
        return institution_rows(job, int(node_config["partition-id"]))
    d = job.data
    rows = read_labelled_file(path, d.prompt_column if d.causal_lm else d.text_column, d.label_column,
                              d.period_column, label_names=label_names, encoding=d.encoding,
                              response_column=d.response_column if d.causal_lm else None)
    if d.periods:
        names = [n for n in d.period.split(PERIOD_SEPARATOR) if n]
        index = np.unique(np.concatenate([Period(n, active).selects(rows, d.periods, d.period_freq)
                                          for n in names])).astype(int)
        rows = rows.subset(index)
    train, validation = split_validation(rows, d.validation_fraction, job.federation.seed)
    return str(node_config.get("institution", path)), train, validation


def site_data(job: JobConfig, node_config: dict, label_names: list[str], trainer: LocalTrainer,
              active: list[int] | None = None) -> tuple[str, EncodedRecords, EncodedRecords | None]:
    """(institution name, encoded training records, encoded validation records or None)."""
    key = (node_config.get("data-path"), node_config.get("partition-id"), repr(job.data),
           job.federation.seed, job.federation.institutions, job.federation.base_model, job.recipe.pooling,
           job.lora.top_layers)
    if key not in _site_cache:
        name, train, validation = _site_rows(job, node_config, label_names, active)
        encode = lambda rows: encode_rows(trainer.classifier, rows, active)  # noqa: E731
        _site_cache[key] = (name, encode(train), encode(validation) if validation is not None and len(validation) else None)
    return _site_cache[key]


def _scope_key(job: JobConfig) -> str:
    """The privacy history's key: per data scope (period), and per study arm in comparisons."""
    scope, study = job.data.period_scope, job.federation.study
    return PRIVACY_STATE + (f"/{study}" if study else "") + ("" if scope == "all" else f"/{scope}")


def _history(context: Context, job: JobConfig) -> list[tuple[float, float, int]]:
    key = _scope_key(job)
    if key not in context.state:
        return []
    record = context.state[key]
    return list(zip(record["sigma"], record["q"], record["steps"]))


def _save_history(context: Context, job: JobConfig, history) -> None:
    context.state[_scope_key(job)] = ConfigRecord({
        "sigma": [float(h[0]) for h in history], "q": [float(h[1]) for h in history],
        "steps": [int(h[2]) for h in history]})


@dataclasses.dataclass
class Request:
    """A received request as the site reads it: the job, this site's records and its guard."""

    config: ConfigRecord
    job: JobConfig
    trainer: LocalTrainer
    institution: str
    data: EncodedRecords
    validation: EncodedRecords | None
    guard: SiteGuard


def _setup(content: RecordDict, context: Context) -> Request:
    config = content["config"]
    job = JobConfig.from_flat(dict(config))
    guard = SiteGuard.for_node(job, dict(context.node_config))
    guard.check_request(job)  # the site's policy, before any record is read
    label_names = list(config["label-names"])
    active = [int(x) for x in config["active-labels"]] if "active-labels" in config else None
    trainer = trainer_for(job, len(label_names))
    name, data, validation = site_data(job, dict(context.node_config), label_names, trainer, active)
    if "arrays" in content:  # the global adapter to train/evaluate from (a census has none)
        received = to_tensors(content["arrays"])
        load_trainable_state(trainer.classifier.model, received)
    return Request(config, job, trainer, name, data, validation, guard)


def _site_seed(job: JobConfig, name: str) -> int:
    return job.federation.seed * 7919 + zlib.crc32((name + job.data.period).encode())


def upload(trained: dict[str, np.ndarray], received: dict[str, np.ndarray], context: Context,
           settings: CompressionSettings) -> dict[str, np.ndarray]:
    """What the institution sends: its trained tensors, or with compression its encoded delta
    against the received global adapter (the encoding error kept in the node state for next round)."""
    if not settings.enabled:
        return trained
    residual = (to_arrays(context.state[COMPRESSION_STATE])
                if COMPRESSION_STATE in context.state else None)
    payload, residual = compress(delta_between(trained, received), settings, residual)
    if residual:
        context.state[COMPRESSION_STATE] = to_record(residual)
    return payload


def assumed_history(trainer: LocalTrainer, job: JobConfig, records: int, server_round: int, planned) -> list:
    """The node lost its accountant history (a restarted SuperNode, a resumed job): assume it took
    part in every earlier round with the job's sigma (re-derived: the calibration is deterministic)
    — exact when it did, an over-estimate of its epsilon when it missed rounds."""
    sigma, q, _ = trainer.plan_noise(job.privacy, job.optim, records, job.federation.rounds, [], planned)
    logger.warning("no privacy history for round %d: assuming %d earlier rounds of %d steps at sigma %.4g",
                   server_round, server_round - 1, job.optim.local_steps, sigma)
    return [(sigma, q, job.optim.local_steps)] * (server_round - 1)


def train_round(content: RecordDict, context: Context) -> RecordDict:
    """A DP-LoRA round on the received adapter; the reply holds only trainable tensors. The site's
    policy admits the round (and the rest of the job's plan) first; the round is charged to the
    site's own history before the reply leaves."""
    request = _setup(content, context)
    config, job, trainer, name, data, guard = (request.config, request.job, request.trainer, request.institution,
                                               request.data, request.guard)
    server_round = int(config["server-round"]) + int(config.get("round-offset", 0))  # a resumed job's rounds
    rounds = job.federation.rounds
    if not 1 <= server_round <= rounds or job.optim.local_steps < 1:
        raise PolicyRefusal("federation.rounds", f"round {server_round} of {rounds} "
                            f"({job.optim.local_steps} local steps) is outside the job")
    ewc = EWCState.from_flat(to_tensors(content["ewc"])) if "ewc" in content else None
    planned = reserved_releases(job)
    history = _history(context, job)
    if not history and server_round > 1 and job.privacy.enabled:
        history = assumed_history(trainer, job, len(data), server_round, planned)
    if job.privacy.enabled:
        sigma, q, delta = trainer.plan_noise(job.privacy, job.optim, len(data), rounds, history, planned)
        step = (sigma, q, job.optim.local_steps)
        guard.admit(len(data), history, [step], [step] * (rounds - server_round) + planned, delta,
                    job.privacy.reproducible_noise)
    phase = round_phase(job.recipe, server_round, rounds, job.optim.learning_rate)
    result = trainer.train_round(data, job.privacy, job.optim, server_round, rounds,
                                 history, _site_seed(job, name), ewc=ewc, ewc_lambda=job.ewc.lam,
                                 planned=planned if job.privacy.enabled else [], phase=phase)
    if job.privacy.enabled:
        guard.charge("train", result.history[-1:], result.delta)
    if result.history:
        _save_history(context, job, result.history)
    trained = {k: v.numpy() for k, v in trainable_state(trainer.classifier.model).items()}
    received = to_arrays(content["arrays"])
    sent = upload(trained, received, context, job.compression)
    arrays = to_record(sent)
    # training losses are computed on private records without clipping or noise: under DP they are
    # not released (NaN); the server's accuracy/loss on its own test set are the progress signal
    released, dp = not job.privacy.enabled, job.privacy.enabled
    return TrainReply(
        num_examples=len(data), institution=name, noise_multiplier=result.noise_multiplier,
        sample_rate=result.sample_rate, steps=server_round * result.steps, delta=result.delta,
        bytes_up=sum(int(a.numpy().nbytes) for a in arrays.values()),
        train_loss_first=result.loss_before if released else math.nan,
        train_loss_last=result.loss_after if released else math.nan,
        # cumulative over the scope's whole history, not this round alone
        epsilon=result.epsilon if dp else None, epsilon_rdp=result.epsilon_rdp if dp else None,
    ).to_records(arrays)


def fisher_pass(content: RecordDict, context: Context) -> RecordDict:
    """The DP Fisher diagonal of this institution's period records at the received adapter; charged
    to the same privacy history as training, and to the site's own history."""
    request = _setup(content, context)
    job, trainer, name, data, guard = request.job, request.trainer, request.institution, request.data, request.guard
    settings = dataclasses.replace(job.fisher, clip_norm=job.privacy.clip_norm)
    if not job.privacy.enabled:
        settings = dataclasses.replace(settings, noise_multiplier=0.0)
    delta = job.privacy.delta or default_delta(len(data))
    if job.privacy.enabled:
        entry = (settings.noise_multiplier, settings.sample_rate, 1)
        guard.admit(len(data), _history(context, job), [entry], [], delta, job.privacy.reproducible_noise)
    source = trainer.noise_source(job.privacy, _site_seed(job, name), 0)
    diagonal, entry = trainer.fisher(data, settings, source)
    if job.privacy.enabled:
        guard.charge("fisher", [entry], delta)
    reply = FisherReply(num_examples=len(data), institution=name,
                        bytes_up=sum(int(t.numel() * 4) for t in diagonal.values()))
    if job.privacy.enabled:
        history = _history(context, job) + [entry]
        _save_history(context, job, history)
        reply = dataclasses.replace(reply, fisher_noise_multiplier=entry[0], fisher_sample_rate=entry[1],
                                    fisher_steps=entry[2], delta=delta, epsilon=epsilon(history, delta),
                                    epsilon_rdp=epsilon(history, delta, "rdp"))
    return reply.to_records(to_record(diagonal))


def validation_counts(content: RecordDict, context: Context) -> RecordDict:
    """Correct/total on this institution's validation records of the job's period(s). `correct` is
    released with Gaussian noise (sensitivity 1, sigma = the site's `validation-noise`) charged like
    any release, exactly only where the site's policy says `validation-counts=exact`, or refused."""
    request = _setup(content, context)
    job, trainer, name, held, guard = (request.job, request.trainer, request.institution, request.validation,
                                       request.guard)
    mode = guard.policy.validation_counts
    if mode == "refuse":
        raise PolicyRefusal("evaluate.validation", "the site does not release validation counts")
    reply = ValidationReply(correct=0.0, total=0, institution=name)
    if held is not None:
        correct, total = round(trainer.classifier.evaluate(held)["accuracy"] * len(held)), len(held)
        reply = dataclasses.replace(reply, total=total)
        if mode == "exact":
            reply = dataclasses.replace(reply, correct=float(correct))
        else:
            sigma, delta = guard.policy.validation_noise, job.privacy.delta or default_delta(total)
            release = (sigma, 1.0, 1)
            history = _history(context, job)
            guard.admit(total, history, [release], [], delta, coordinator_chose=False)  # the site's own sigma
            source = trainer.noise_source(job.privacy, _site_seed(job, name), 1_000_003)
            noised = correct + sigma * float(source.sampler.normal())
            guard.charge("validation", [release], delta)
            _save_history(context, job, history + [release])
            reply = dataclasses.replace(reply, correct=float(min(max(noised, 0.0), total)), noise_multiplier=sigma,
                                        sample_rate=1.0, steps=1, delta=delta)
    return reply.to_records()


def census(content: RecordDict, context: Context) -> RecordDict:
    """Who this node is and how many training records it holds for the job (counts only): the
    coordinator plans each institution's privacy budget from it before any training."""
    request = _setup(content, context)
    return CensusReply(num_examples=len(request.data), institution=request.institution).to_records()


HANDLERS = {"train": train_round, "train.fisher": fisher_pass, "evaluate.validation": validation_counts,
            "query.census": census}
