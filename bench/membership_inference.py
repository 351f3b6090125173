"""Membership-inference audit (loss threshold, Yeom et al. 2018): how well can someone holding the
final global adapter tell an institution's training records (members) from records of the same
distribution it never saw (non-members), by the model's loss on them? Reported as the ROC AUC of
−loss (0.5 = no better than guessing) for the same federated run with DP (ε = 8 per institution)
and without DP. In process (the same LocalTrainer and FedAvg as the job), small member sets and
several epochs so that the non-DP model can overfit.

    python bench/membership_inference.py [--members 600 --rounds 5 --local-steps 12]
        -> bench/results/membership_inference.json
"""
from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
from torch import nn

import bench_io
from fedseek.clients.dp_trainer import LocalTrainer
from fedseek.config import LoraSettings, OptimSettings, PrivacySettings, RobustSettings
from fedseek.data.partition import stratified_split
from fedseek.data.tasks import load_federated_data
from fedseek.models.classifier import AdapterClassifier, EncodedTexts
from fedseek.models.lora import trainable_state
from robustness import federate


@torch.no_grad()
def losses(classifier: AdapterClassifier, data: EncodedTexts) -> np.ndarray:
    classifier.model.eval()
    out = np.zeros(len(data))
    for batch in classifier._length_sorted_chunks(data.inputs, np.arange(len(data)), 256):
        out[batch] = nn.functional.cross_entropy(classifier.logits(data, batch), data.labels[batch],
                                                 reduction="none").numpy()
    classifier.model.train()
    return out


def auc(members: np.ndarray, non_members: np.ndarray) -> float:
    """P(score of a random member > score of a random non-member), ties half (Mann-Whitney)."""
    scores = np.concatenate([members, non_members])
    order = scores.argsort(kind="stable")
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    for value in np.unique(scores):  # average ranks of ties
        tied = scores == value
        ranks[tied] = ranks[tied].mean()
    m, n = len(members), len(non_members)
    return float((ranks[:m].sum() - m * (m + 1) / 2) / (m * n))


def auc_stderr(a: float, m: int, n: int) -> float:
    """Hanley-McNeil standard error of an AUC."""
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    return math.sqrt((a * (1 - a) + (m - 1) * (q1 - a * a) + (n - 1) * (q2 - a * a)) / (m * n))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--members", type=int, default=600, help="training records over all institutions")
    p.add_argument("--institutions", type=int, default=3)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--local-steps", type=int, default=12)
    p.add_argument("--batch-fraction", type=float, default=0.125)
    p.add_argument("--epsilon", type=float, default=8.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default="membership_inference", help="results file bench/results/NAME.json")
    a = p.parse_args()
    data = load_federated_data("banking77", institutions=1, seed=a.seed)
    pool = data.train[0]
    rng = np.random.default_rng(a.seed)
    chosen = np.sort(rng.permutation(len(pool))[:2 * a.members])
    pool = pool.subset(chosen)
    member_idx, non_idx = stratified_split(pool.labels, 0.5, a.seed)  # same distribution, disjoint
    members, non_members = pool.subset(member_idx), pool.subset(non_idx)
    trainer = LocalTrainer(AdapterClassifier(None, len(pool.label_names), LoraSettings(seed=a.seed)))
    encode = lambda rows: trainer.classifier.encode(rows.texts, rows.labels)  # noqa: E731
    enc_members, enc_non = encode(members), encode(non_members)
    parts = np.array_split(rng.permutation(len(members)), a.institutions)
    sites = [encode(members.subset(np.sort(part))) for part in parts]
    test = encode(data.test)
    initial = {k: v.numpy().copy() for k, v in trainable_state(trainer.classifier.model).items()}
    optim = OptimSettings(local_steps=a.local_steps, batch_fraction=a.batch_fraction)
    rows = []
    for dp in (False, True):
        start = time.time()
        privacy = PrivacySettings(enabled=dp, target_epsilon=a.epsilon)
        run = federate(trainer, sites, test, initial, RobustSettings(), a.rounds, optim, privacy, seed=a.seed,
                       log=print)
        lm, ln = losses(trainer.classifier, enc_members), losses(trainer.classifier, enc_non)
        value = auc(-lm, -ln)
        rows.append({"dp": dp, "target_epsilon": a.epsilon if dp else None, "auc": value,
                     "auc_stderr": auc_stderr(value, len(lm), len(ln)), "test_accuracy": run["accuracy"],
                     "member_loss_mean": float(lm.mean()), "non_member_loss_mean": float(ln.mean()),
                     "train_accuracy_gap_proxy": float(ln.mean() - lm.mean()),
                     "wall_s": round(time.time() - start, 1)})
        print(rows[-1], flush=True)
    bench_io.write_json(a.name, {
        "command": "python bench/membership_inference.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(a).items()),
        "args": vars(a), "members_per_institution": [len(s) for s in sites], "members": len(members), "non_members": len(non_members),
        "attack": "loss threshold (AUC of -loss, members vs held-out non-members)", "rows": rows})


if __name__ == "__main__":
    main()
