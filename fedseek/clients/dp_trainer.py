"""Local DP-LoRA training with Opacus DP-SGD.

Each logical step draws a Poisson sample (every record independently with probability q), splits
it into length-sorted physical chunks, accumulates per-sample clipped gradients over the chunks
(Opacus virtual steps) and adds Gaussian noise once. Only trainable (LoRA + head) parameters get
gradients. The privacy history (sigma, q, steps) is returned for the caller to persist: epsilon is
always computed from the whole history of the job, never per round.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from torch import nn

from fedseek.clients.recipe import Phase
from fedseek.config import FisherSettings, OptimSettings, PrivacySettings
from fedseek.continual.ewc import EWCState, add_penalty_gradient
from fedseek.continual.fisher import add_noise, clipped_square_sums, expand, group_sums
from fedseek.models.adapted import AdaptedModel, EncodedRecords
from fedseek.models.lora import LoraTargetError
from fedseek.privacy.accountant import History, default_delta, epsilon
from fedseek.privacy.planning import round_release
from fedseek.privacy.randomness import NoiseSource, noise_source



def learning_rate(settings: OptimSettings, step: int, total_steps: int) -> float:
    """Linear warmup, then cosine decay to 10 % (or constant)."""
    warmup = max(1, int(settings.warmup_fraction * total_steps))
    if step < warmup:
        return settings.learning_rate * (step + 1) / warmup
    if settings.schedule == "constant":
        return settings.learning_rate
    progress = (step - warmup) / max(1, total_steps - warmup)
    return settings.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@dataclass
class RoundResult:
    loss_before: float  # mean training loss of the first logical step
    loss_after: float  # mean training loss of the last logical step
    steps: int
    sample_rate: float
    noise_multiplier: float
    delta: float
    epsilon: float  # cumulative over the whole history, PRV
    epsilon_rdp: float
    history: History


class LocalTrainer:
    """One institution's trainer; holds the Opacus-wrapped model for the life of the process.
    `classifier`: the adapted model, an AdapterClassifier or (causal-lm) an AdapterGenerator."""

    def __init__(self, classifier: AdaptedModel):
        self.classifier = classifier
        self.named_params = {n: p for n, p in classifier.model.named_parameters() if p.requires_grad}
        self.params = list(self.named_params.values())
        self.private_module = GradSampleModule(classifier.model, batch_first=True, loss_reduction="mean")
        self.dp_unsupported = self._without_per_sample_gradients()

    def _without_per_sample_gradients(self) -> list[str]:
        """Trainable parameters that get no per-sample gradient in one DP forward/backward pass on
        two fixed public strings (no records): e.g. on DeepSeek-V3 in transformers 5, PEFT maps the
        MLP targets onto the fused 3-D routed-expert parameters, which Opacus has no rule for."""
        probe = self.classifier.public_probe()
        self.private_module.enable_hooks()
        self.classifier.model.train()
        try:
            self.classifier.loss(probe, [0, 1]).backward()
            missing = [n for n, p in self.named_params.items() if getattr(p, "grad_sample", None) is None]
        except (RuntimeError, ValueError) as err:
            missing = [f"(the pass failed: {str(err)[:120]})"]
        for module in self.classifier.model.modules():  # leave no activations or gradients behind
            if hasattr(module, "activations"):
                module.activations = []
        for p in self.params:
            p.grad_sample, p.grad = None, None
        return missing

    def check_dp(self) -> None:
        """Refuse DP training before any record is sampled if a trainable parameter has no
        per-sample gradient rule (it would crash mid-round or, worse, escape clipping)."""
        if self.dp_unsupported:
            raise LoraTargetError(
                f"lora.targets: DP-SGD cannot clip per-sample gradients of {len(self.dp_unsupported)} "
                f"trainable parameter(s), e.g. {self.dp_unsupported[0]}; on DeepSeek-V3 the MLP targets "
                "adapt the fused routed experts (3-D parameters, no Opacus rule): use --lora-targets "
                "attention, or train without DP")

    def plan_noise(self, privacy: PrivacySettings, optim: OptimSettings, num_records: int,
                   total_rounds: int, history: History, planned: History = ()) -> tuple[float, float, float]:
        """(sigma, q, delta) so that the job's planned steps, plus `planned` releases still to come
        (a Fisher pass), end exactly at the target epsilon."""
        if privacy.enabled and privacy.noise_multiplier is None and history:
            # sigma was fixed in the first round; keep it for the rest of the job
            return history[-1][0], min(1.0, optim.batch_fraction), privacy.delta or default_delta(num_records)
        return round_release(privacy, optim, num_records, total_rounds, planned)

    def noise_source(self, privacy: PrivacySettings, seed: int, stream: int) -> NoiseSource:
        """Private (OS-seeded, node-only) randomness for DP; `seed` is used only without DP or
        with `reproducible_noise` (not private)."""
        device = self.params[0].device if self.params else "cpu"
        return noise_source(None if privacy.private_noise else (seed, stream), device)

    def train_round(self, data: EncodedRecords, privacy: PrivacySettings, optim: OptimSettings,
                    server_round: int, total_rounds: int, history: History, seed: int,
                    ewc: EWCState | None = None, ewc_lambda: float = 0.0,
                    planned: History = (), phase: Phase | None = None) -> RoundResult:
        """One round of local DP-SGD. With `ewc`, the EWC gradient is added after clipping and
        noise (DP optimizer step hook), never through the loss that Opacus differentiates.
        Sampling and noise come from `noise_source` (private unless asked to be reproducible).
        `phase` (`fedseek.clients.recipe.round_phase`): a head-only linear-probe round over the
        cached frozen features, or a LoRA round; its rounds and learning rate. Both phases release
        (sigma, q, local_steps) per round: one plan, one budget."""
        if privacy.enabled:
            self.check_dp()
        sigma, q, delta = self.plan_noise(privacy, optim, len(data), total_rounds, history, planned)
        phase = phase or Phase("lora", server_round, total_rounds, optim.learning_rate)
        probe = phase.kind == "probe"
        trained = {n: p for n, p in self.named_params.items() if "score" in n or not probe}  # probe: head only
        params = list(trained.values())
        if probe and (not params or self.classifier.pooling != "layers"):
            raise ValueError("a linear-probe round needs the multi-layer head (pooling 'layers')")
        features = self.classifier.probe_features(data) if probe else None
        protect = (lambda *_: add_penalty_gradient(trained, ewc, ewc_lambda)) if ewc else None
        source = self.noise_source(privacy, seed, server_round)
        rng = source.sampler
        torch.manual_seed(int(rng.integers(2**31)))  # dropout and other data-independent randomness
        expected_batch = q * len(data)
        base_optimizer = torch.optim.Adam(params, lr=phase.learning_rate)
        optimizer = (DPOptimizer(base_optimizer, noise_multiplier=sigma, max_grad_norm=privacy.clip_norm,
                                 expected_batch_size=max(1, round(expected_batch)), generator=source.noise,
                                 secure_mode=source.private)  # 2n-sample noise vs floating-point attacks
                     if privacy.enabled else base_optimizer)
        if privacy.enabled and protect:
            optimizer.attach_step_hook(protect)
        if privacy.enabled:  # per-sample gradient hooks cost time; only DP needs them
            self.private_module.enable_hooks()
        else:
            self.private_module.disable_hooks()
        total_steps = optim.local_steps * phase.rounds
        schedule = dataclasses.replace(optim, learning_rate=phase.learning_rate)
        losses = []
        self.classifier.model.train()
        for local_step in range(optim.local_steps):
            lr = learning_rate(schedule, (phase.round - 1) * optim.local_steps + local_step, total_steps)
            for group in base_optimizer.param_groups:
                group["lr"] = lr
            sample = np.flatnonzero(rng.random(len(data)) < q)
            if len(sample) == 0:
                if privacy.enabled:
                    self._noise_only_step(base_optimizer, params, sigma * privacy.clip_norm / expected_batch,
                                      source.noise)
                continue
            chunks = ([sample[i:i + 4096] for i in range(0, len(sample), 4096)] if probe else
                      self.classifier.chunks(data.inputs, sample, optim.chunk_size))
            step_loss = 0.0
            for index, chunk in enumerate(chunks):
                last = index == len(chunks) - 1
                if probe:
                    logits = self.classifier.head_logits(data, features[chunk])
                    loss = nn.functional.cross_entropy(logits, data.labels[chunk].to(logits.device))
                else:
                    loss = self.classifier.loss(data, chunk)
                if not privacy.enabled:  # plain mean over the whole logical batch
                    loss = loss * len(chunk) / len(sample)
                loss.backward()
                step_loss += loss.item() * (len(chunk) if privacy.enabled else len(sample))
                if privacy.enabled and not last:
                    optimizer.signal_skip_step(do_skip=True)
                if privacy.enabled or last:
                    if not privacy.enabled and protect:
                        protect()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
            losses.append(step_loss / len(sample))
        new_history = list(history) + ([(sigma, q, optim.local_steps)] if privacy.enabled else [])
        return RoundResult(
            loss_before=losses[0] if losses else math.nan, loss_after=losses[-1] if losses else math.nan,
            steps=optim.local_steps, sample_rate=q, noise_multiplier=sigma, delta=delta,
            epsilon=epsilon(new_history, delta) if privacy.enabled else math.inf,
            epsilon_rdp=epsilon(new_history, delta, "rdp") if privacy.enabled else math.inf,
            history=new_history)

    def fisher(self, data: EncodedRecords, settings: FisherSettings, source: NoiseSource,
               chunk_size: int = 256) -> tuple[dict[str, torch.Tensor], tuple[float, float, int]]:
        """DP diagonal Fisher at the current parameters over a Poisson sample of `data`; returns it
        (per coordinate, un-normalised) and the (sigma, q, steps) entry to charge to the history.
        `source`: the sampler and noise generator (`noise_source`)."""
        self.check_dp()
        generator = torch.Generator().manual_seed(int(source.sampler.integers(2**63)))  # noise is added on CPU
        sample = np.flatnonzero(source.sampler.random(len(data)) < settings.sample_rate)
        self.private_module.enable_hooks()
        self.classifier.model.train()  # Opacus records activations in training mode only
        sums = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in self.named_params.items()}
        for chunk in self.classifier.chunks(data.inputs, sample, chunk_size):
            self.classifier.loss(data, chunk).backward()
            grad_samples = {n: p.grad_sample.detach().float() for n, p in self.named_params.items()}
            for name, value in clipped_square_sums(grad_samples, settings.clip_norm).items():
                sums[name] += value
            for p in self.params:
                p.grad_sample, p.grad = None, None
        groups = add_noise({n: g.cpu() for n, g in group_sums(sums, settings.granularity).items()},
                           settings.noise_multiplier * settings.clip_norm ** 2, generator)
        shapes = {n: p.shape for n, p in self.named_params.items()}
        expected = settings.sample_rate * len(data)  # data-independent given N (released anyway)
        fisher = expand(groups, shapes, settings.granularity, expected)
        return fisher, (settings.noise_multiplier, settings.sample_rate, 1)

    def _noise_only_step(self, optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], std: float,
                         generator: torch.Generator) -> None:
        """An empty Poisson sample still releases a noised (zero-signal) update."""
        for p in params:
            p.grad = torch.normal(0.0, std, size=p.shape, device=p.device, generator=generator)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
