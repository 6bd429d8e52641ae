"""Training and evaluating a MIL aggregator on bags: the one training function that a site's ClientApp,
the local-only and the pooled baselines all call.

FedProx: with `proximal_mu > 0`, the weights at entry are the global model and the loss gains
μ/2·Σ‖w − w_global‖² (Li et al. 2020). With a `PrivatePlan` the same loop runs under Opacus DP-SGD over
Poisson-sampled patients, and the proximal pull becomes a step after each noisy update (client/privacy.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from fedpath.common.bags import Bag, BagBatch, BagDataset, bags_from_manifest, collate_bags
from fedpath.common.features import inspect_features
from fedpath.common.manifest import Manifest
from fedpath.common.metrics import aggregate_by_patient, auroc, balanced_accuracy, expected_calibration_error
from fedpath.common.settings import TrainingSettings

if TYPE_CHECKING:  # Opacus is imported only when a site trains with DP (it takes seconds to import)
    from fedpath.client.privacy import PrivatePlan


class TrainConfig(BaseModel):
    """Local training settings; a typo in a key is an error, not a silently ignored setting."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    epochs: int = Field(5, ge=1, description="local epochs over the training bags (when steps is not set)")
    steps: int | None = Field(
        None,
        ge=1,
        description="optimizer steps in all, passing over the bags as often as that takes (instead of epochs)",
    )
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate")
    weight_decay: float = Field(1e-4, ge=0)
    batch_size: int = Field(8, ge=1, description="bags per optimisation step")
    max_tiles: int | None = Field(512, ge=1, description="random tiles kept per bag in training")
    num_workers: int = Field(0, ge=0, description="DataLoader workers reading feature files")
    seed: int = 0
    proximal_mu: float = Field(0.0, ge=0, description="FedProx μ (0 = FedAvg / plain training)")
    optimizer: Literal["adamw", "sgd"] = Field(
        "adamw", description="AdamW, or SGD with momentum 0.9 (better under DP: Adam rescales noise upward)"
    )
    site_batches: bool = Field(
        False, description="every batch from one site (training pooled across sites; see SiteBatches)"
    )


def local_config(
    settings: TrainingSettings,
    *,
    seed: int,
    rounds: int = 1,
    sites: int = 1,
    proximal_mu: float = 0.0,
    private_lr: float | None = None,
    site_batches: bool = False,
) -> TrainConfig:
    """The one way from the shared training settings to a training call's settings: `rounds` rounds of
    ``local_steps`` steps at each of `sites` sites (a site in one round: 1 × 1; pooled over K sites for a
    whole run: rounds × K), or ``rounds × local_epochs`` epochs when ``local_steps`` is 0.

    `private_lr`: the run trains with DP-SGD at that learning rate, with SGD and momentum (Adam divides by the
    running gradient scale, which DP noise dominates)."""
    return TrainConfig(
        epochs=rounds * settings.local_epochs,
        steps=rounds * sites * settings.local_steps or None,
        lr=private_lr if private_lr is not None else settings.lr,
        optimizer="sgd" if private_lr is not None else "adamw",
        weight_decay=settings.weight_decay,
        batch_size=settings.batch_size,
        max_tiles=settings.max_tiles or None,
        seed=seed,
        proximal_mu=proximal_mu,
        site_batches=site_batches,
    )


@dataclass(frozen=True)
class TrainStats:
    loss: float  # mean cross-entropy over the last epoch's bags, or (steps) all bags seen; no proximal term
    bags: int
    steps: int


@dataclass(frozen=True)
class Predictions:
    """Per-bag outputs in dataset order: labels (N,), probabilities (N, C), mean cross-entropy."""

    bag_ids: list[str]
    patient_ids: list[str]
    labels: np.ndarray
    probs: np.ndarray
    loss: float


class SiteBatches:
    """Batches that each hold one site's bags (a torch batch sampler over a BagDataset's indices): every bag
    once per pass, in batches of its own site, the batches in random order."""

    def __init__(self, bags: Sequence[Bag], *, batch_size: int, seed: int) -> None:
        self.by_site: dict[str, list[int]] = {}
        for i, bag in enumerate(bags):
            self.by_site.setdefault(bag.site, []).append(i)
        self.batch_size = batch_size
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return sum(-(-len(v) // self.batch_size) for v in self.by_site.values())

    def __iter__(self) -> Iterator[list[int]]:
        batches = []
        for idx in self.by_site.values():
            order = self.rng.permutation(idx).tolist()
            batches += [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        for k in self.rng.permutation(len(batches)):
            yield batches[k]


def make_loader(
    dataset: BagDataset,
    *,
    batch_size: int,
    shuffle: bool,
    seed: int,
    num_workers: int = 0,
    batches: SiteBatches | None = None,
) -> DataLoader[BagBatch]:
    """Bags in batches of `batch_size`, or as `batches` groups them."""
    generator = torch.Generator().manual_seed(seed)
    if batches is not None:
        return DataLoader(
            dataset,  # type: ignore[arg-type]
            batch_sampler=batches,
            collate_fn=collate_bags,
            num_workers=num_workers,
            persistent_workers=num_workers > 0,
        )
    return DataLoader(
        dataset,  # type: ignore[arg-type]
        batch_size=batch_size,
        shuffle=shuffle,
        collate_fn=collate_bags,
        num_workers=num_workers,
        generator=generator,
        persistent_workers=num_workers > 0,
    )


def proximal_term(model: nn.Module, global_weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σ‖w − w_global‖² over the trainable parameters (FedProx's penalty, before the μ/2 factor)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.stack(
        [((p - g.to(p.device)) ** 2).sum() for p, g in zip(params, global_weights, strict=True)]
    ).sum()


def train_epochs(
    model: nn.Module,
    bags: Sequence[Bag],
    config: TrainConfig,
    *,
    device: torch.device | str = "cpu",
    progress: bool = False,
    privacy: PrivatePlan | None = None,
    after_epoch: Callable[[int], None] | None = None,
    every: tuple[int, Callable[[int], None]] | None = None,
) -> TrainStats:
    """Train `model` in place on `bags` for `config.epochs` epochs, or for exactly `config.steps` optimizer
    steps when that is set (the bags are passed over as often as it takes, reshuffled every pass: a site of
    3 patients and one of 300 then do the same amount of local work).

    With `config.site_batches`, every batch holds one site's bags (`SiteBatches`). Not under DP, whose Poisson
    sampling and accounting are per patient.

    Callbacks, where a baseline's early-stopping rule looks at its validation patients: `after_epoch(epoch)`
    (0-based) after each epoch; `every=(n, f)` calls f(k) after every n-th step (k = 1, 2, …).

    When `config.proximal_mu > 0`, the model's weights at entry are the FedProx anchor (the global model).
    With `privacy`, training is DP-SGD with the plan's σ, clipping norm and Poisson rate over the bags
    (one bag per patient), `plan.steps` steps in all.
    """
    if not bags:
        raise ValueError("no training bags")
    if privacy is not None and config.site_batches:
        raise ValueError("site_batches does not go with DP: its sampling and accounting are per patient")
    torch.manual_seed(config.seed)
    model.to(device).train()
    dataset = BagDataset(bags, max_tiles=config.max_tiles, seed=config.seed)
    optimizer: torch.optim.Optimizer
    if config.optimizer == "sgd":
        optimizer = torch.optim.SGD(
            model.parameters(), lr=config.lr, momentum=0.9, weight_decay=config.weight_decay
        )
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    anchor = [p.detach().clone() for p in model.parameters() if p.requires_grad] if config.proximal_mu else []
    trained: nn.Module = model
    if privacy is None:
        loader: DataLoader[BagBatch] = make_loader(
            dataset,
            batch_size=config.batch_size,
            shuffle=True,
            seed=config.seed,
            num_workers=config.num_workers,
            batches=(
                SiteBatches(bags, batch_size=config.batch_size, seed=config.seed)
                if config.site_batches
                else None
            ),
        )
    else:
        from fedpath.client.privacy import make_private, proximal_step

        dim = inspect_features(bags[0].paths[0]).dim
        trained, optimizer, loader = make_private(
            model, optimizer, dataset, privacy, dim=dim, seed=config.seed
        )
    limit = config.steps
    steps = 0
    epoch_loss = float("nan")
    run_total, run_seen = 0.0, 0
    bar = tqdm(total=limit or config.epochs, desc="steps" if limit else "epochs", disable=not progress,
               leave=False)  # fmt: skip
    try:
        epoch = 0
        while (steps < limit) if limit else (epoch < config.epochs):
            dataset.set_epoch(epoch)
            total, seen = 0.0, 0
            for batch in loader:
                batch = batch.to(device)
                out = trained(batch.features, batch.mask)
                if len(batch.labels):
                    loss = F.cross_entropy(out.logits, batch.labels)
                else:  # an empty Poisson batch: no data, but the noisy step is still taken
                    loss = out.logits.sum() * 0.0
                objective = loss
                if anchor and privacy is None:
                    objective = loss + config.proximal_mu / 2 * proximal_term(model, anchor)
                optimizer.zero_grad(set_to_none=True)
                objective.backward()
                optimizer.step()
                if anchor and privacy is not None:
                    proximal_step(model, anchor, config.lr, config.proximal_mu)
                steps += 1
                total += float(loss.detach()) * len(batch.labels)
                seen += len(batch.labels)
                if limit:
                    bar.update(1)
                if every is not None and steps % every[0] == 0:
                    every[1](steps // every[0])
                    trained.train()
                if limit and steps >= limit:
                    break
            run_total, run_seen = run_total + total, run_seen + seen
            epoch_loss = total / max(seen, 1)
            if not limit:
                bar.update(1)
            if after_epoch is not None:
                after_epoch(epoch)
                trained.train()
            epoch += 1
    finally:
        bar.close()
        if privacy is not None:
            trained._close()  # type: ignore[operator]  # removes Opacus's hooks and per-sample gradients
    loss_out = run_total / max(run_seen, 1) if limit else epoch_loss
    return TrainStats(loss=loss_out, bags=len(bags), steps=steps)


@torch.no_grad()
def predict(
    model: nn.Module,
    bags: Sequence[Bag],
    *,
    batch_size: int = 8,
    max_tiles: int | None = None,
    device: torch.device | str = "cpu",
) -> Predictions:
    """Class probabilities for every bag (all tiles by default), in the order given."""
    model.to(device).eval()
    dataset = BagDataset(bags, max_tiles=max_tiles)
    loader = make_loader(dataset, batch_size=batch_size, shuffle=False, seed=0)
    probs, losses = [], []
    for batch in loader:
        batch = batch.to(device)
        logits = model(batch.features, batch.mask).logits
        losses.append(F.cross_entropy(logits, batch.labels, reduction="sum").item())
        probs.append(torch.softmax(logits, dim=-1).cpu().numpy())
    p = np.concatenate(probs) if probs else np.zeros((0, 2))
    return Predictions(
        bag_ids=[b.bag_id for b in bags],
        patient_ids=[b.patient_id for b in bags],
        labels=dataset.labels,
        probs=p,
        loss=float(sum(losses) / max(len(bags), 1)),
    )


def predict_patients(model: nn.Module, manifest: Manifest) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Patient ids, labels (N,) and probabilities (N, C) of `model` on every patient of `manifest`: all tiles
    of every slide, a patient's slides reduced as in training (`aggregate_by_patient`). Empty: no patients."""
    bags = bags_from_manifest(manifest)
    if not bags:
        return [], np.zeros(0, dtype=int), np.zeros((0, 0))
    pred = predict(model, bags)
    patients, labels, probs = aggregate_by_patient(pred.patient_ids, pred.labels, pred.probs)
    return list(patients), labels, probs


def summarize(pred: Predictions) -> dict[str, float]:
    """Aggregate metrics only (no per-bag values): what may leave a site."""
    return {
        "auroc": auroc(pred.labels, pred.probs),
        "balanced_accuracy": balanced_accuracy(pred.labels, pred.probs),
        "ece": expected_calibration_error(pred.labels, pred.probs),
        "loss": pred.loss,
    }
