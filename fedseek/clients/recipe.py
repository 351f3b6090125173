"""DP training recipes and the rule that sets their hyper-parameters (pure: no Flower/MLflow/SQL).

Recipes
- `probe` (the `fedseek simulate` default): the head reads every layer's mean-pooled hidden states,
  standardized with statistics of the public pretraining slice (`fedseek.models.features`). The
  first `probe_rounds` rounds train only the head, by DP-SGD over the frozen features (cached per
  site process: a probe step costs no forward pass of the base); the remaining rounds, if any,
  train LoRA + head (LP-FT). Every round of both phases releases the same (sigma, q, local_steps),
  so one sigma calibrated for rounds x local_steps steps covers the whole job (one budget).
- `lora` (the recipe before issue 16, kept for comparison): LoRA + a head on the last layer's
  mean-pooled states in every round, the old fixed defaults.

The rule (`probe_rule`), from N (records of the smallest institution), epsilon, rounds R and
institutions K — never from test data (the validation runs behind the constants are in
BENCHMARKS.md, "DP recipe": 20 % of each bank's training records held out):
- q = clamp(B / N, 0.2, 0.5) with target expected batch B = 512. DP-SGD's noise on the mean
  gradient is sigma*C/(qN), and at a fixed epsilon sigma grows slower than q, so a larger expected
  batch lowers the noise per signal (Ponomareva et al. 2023, "How to DP-fy ML"). Small sites
  (N < 2,560) get q above 0.2, up to 0.5.
- epochs E = 48 over the job, total steps T = E / q spread evenly: local_steps = ceil(T / R),
  at least 4 at q = 0.5. The probe is convex and cheap; on validation 12 -> 24 -> 48 epochs gained
  more than the larger sigma cost (banking77 57.2 / 60.5 / 64.0 %, medical_abstracts at 256
  tokens 43.3 / 44.8 %, means of 3 noise seeds).
- tokens per record: 256 (`data.max_length`; the LoRA recipe keeps 64). Features are computed
  once per site, so reading whole abstracts costs one forward pass each; on medical_abstracts
  validation 64 -> 256 tokens: 40.3 -> 43.3 % at 24 epochs. banking77 messages are shorter than
  64 tokens, so its default job does the same work as before.
- trainable parameters: the head reads all 256 shipped public principal directions at every N.
  Fewer directions for small sites (fewer noised parameters) was tried and lost on validation
  (medical_abstracts, 505 records per hospital: 40.3 / 38.3 / 35.6 / 31.7 % at 256 / 64 / 32 / 16
  directions); `recipe.components` keeps the option.
- lr: Adam 1e-2 for the zero-initialised head on whitened features, cosine after 5 % warmup;
  clip C = 1 (whitened features: per-sample gradients of norm ~1 are clipped mildly).
- phases: every round is a probe round by default (`probe_rounds` = R): a LoRA round costs a
  forward/backward through the adapted layers per sampled record, a probe round one matrix
  product, and the default job must stay within 5 minutes on 2 cores. `--probe-rounds P` < R
  runs LP-FT: P probe rounds, then LoRA + head rounds at the same (sigma, q, local_steps).
- K does not change the per-site rule: each institution's epsilon is its own (record-level DP per
  site); FedAvg over K sites averages K independent noises.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from fedseek.config import RecipeSettings

TARGET_BATCH = 512
EPOCHS = 48.0
MAX_LENGTH = 256  # tokens per record read by the probe recipe
Q_MIN, Q_MAX = 0.2, 0.5
PROBE_LR = RecipeSettings.probe_lr  # written once: config.RecipeSettings
CLIP = 1.0
COMPONENTS = 256  # public principal directions the head reads (all shipped)



@dataclass(frozen=True)
class Phase:
    """What one round trains: `kind` probe (head only, cached features) or lora; `round` is the
    round's number within its phase (1-based) and `rounds` the phase's length (lr schedule)."""

    kind: str
    round: int
    rounds: int
    learning_rate: float


@dataclass(frozen=True)
class RuleChoice:
    """The rule's hyper-parameters for one job."""

    sample_rate: float
    local_steps: int
    learning_rate: float
    clip_norm: float
    probe_rounds: int
    components: int
    max_length: int


def probe_rule(records: int, epsilon: float, rounds: int, institutions: int) -> RuleChoice:
    """The probe recipe's DP hyper-parameters for institutions of at least `records` records
    (the module docstring states the rule and why)."""
    if records < 1 or rounds < 1 or institutions < 1 or not epsilon > 0:
        raise ValueError(f"recipe rule needs records, rounds, institutions >= 1 and epsilon > 0 "
                         f"(got {records}, {rounds}, {institutions}, {epsilon})")
    q = min(Q_MAX, max(Q_MIN, TARGET_BATCH / records))
    total_steps = math.ceil(EPOCHS / q)
    local_steps = max(math.ceil(total_steps / rounds), 4 if q >= Q_MAX else 1)
    return RuleChoice(round(q, 4), local_steps, PROBE_LR, CLIP, rounds, COMPONENTS, MAX_LENGTH)


def round_phase(recipe: RecipeSettings, server_round: int, rounds: int, lora_lr: float) -> Phase:
    """The phase of round `server_round` (1-based) of a job of `rounds` rounds."""
    if recipe.name != "probe":
        return Phase("lora", server_round, rounds, lora_lr)
    probe_rounds = rounds if recipe.probe_rounds < 0 else min(recipe.probe_rounds, rounds)
    if server_round <= probe_rounds:
        return Phase("probe", server_round, probe_rounds, recipe.probe_lr)
    return Phase("lora", server_round - probe_rounds, rounds - probe_rounds, lora_lr)


def apply_rule(job, records: list[int], given: set[str] = frozenset()) -> None:
    """Set a probe-recipe job's optim.batch_fraction, optim.local_steps, privacy.clip_norm,
    recipe.probe_rounds/probe_lr/components and data.max_length from `probe_rule` (the LoRA
    phase's optim.learning_rate is left as is), for
    the smallest institution of `records`; a field in `given` (the user set it) is kept. One q and
    one local_steps for the whole job: every institution and round then releases the same plan."""
    if job.recipe.name != "probe":
        return
    choice = probe_rule(min(records), job.privacy.target_epsilon, job.federation.rounds, len(records))
    for settings, name, value in ((job.optim, "batch_fraction", choice.sample_rate),
                                  (job.optim, "local_steps", choice.local_steps),
                                  (job.privacy, "clip_norm", choice.clip_norm),
                                  (job.recipe, "probe_rounds", choice.probe_rounds),
                                  (job.recipe, "probe_lr", choice.learning_rate),
                                  (job.recipe, "components", choice.components),
                                  (job.data, "max_length", choice.max_length)):
        if name not in given:
            setattr(settings, name, value)


# causal-lm: (tokens per record, response tokens) of the shipped generative tasks; user files get the last
GENERATIVE_LENGTHS = {"banking77-gen": (64, 16), "pubmedqa-gen": (320, 64), "": (256, 64)}
# causal-lm LoRA rounds: Adam 5e-3 and 24 noised steps per round (validation, BENCHMARKS.md "Generative DP-LoRA":
# 2e-2 diverged in the first round without DP and rose after round 1 with DP)
GENERATIVE_LR, GENERATIVE_STEPS = 5e-3, 24


def apply_generative_rule(job, given: set[str] = frozenset()) -> None:
    """A causal-lm job trains LoRA (the `lora` recipe) at the generative learning rate and steps,
    and reads its task's lengths: banking77-gen's messages and intent names are short, PubMedQA's
    abstracts and answers long. A field in `given` (the user set it) is kept."""
    if not job.data.causal_lm:
        return
    job.recipe.name = "lora"
    shipped = not (job.data.data or job.data.data_dir)
    length, response = GENERATIVE_LENGTHS[job.data.task if shipped and job.data.task in GENERATIVE_LENGTHS else ""]
    for settings, name, value in ((job.data, "max_length", length), (job.data, "response_tokens", response),
                                  (job.optim, "learning_rate", GENERATIVE_LR),
                                  (job.optim, "local_steps", GENERATIVE_STEPS)):
        if name not in given:
            setattr(settings, name, value)
