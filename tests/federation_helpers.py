"""Cohorts and evaluation shared by the federation tests (real Flower, loopback, tiny synthetic sites)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fedpath.client.training import predict
from fedpath.common.bags import bags_from_manifest
from fedpath.common.manifest import load_manifest, split_patients
from fedpath.common.metrics import aggregate_by_patient, auroc
from fedpath.common.runconfig import RunConfig
from fedpath.simulation.synth import SynthConfig, synthesize

# Small and easy enough to learn in a few local epochs, large enough for a held-out AUROC per site.
EASY = {
    "dim": 16,
    "tiles_median": 60,
    "tiles_max": 200,
    "signal": 3.0,
    "witness_min": 0.1,
    "witness_max": 0.3,
}


def make_cohort(root: Path, *, sites: int, slides: int, shift: float, seed: int = 0) -> Path:
    config = SynthConfig(
        sites=sites, slides=slides, shift=shift, size_skew=0.0, prevalence_skew=0.0, seed=seed, **EASY
    )
    return synthesize(root, config, progress=False)


def held_out_by_site(
    model: torch.nn.Module, manifest: Path, run: RunConfig
) -> dict[str, tuple[float, float]]:
    """(AUROC, mean cross-entropy) per site on its validation and test patients: patients no site trained on."""
    m = load_manifest(manifest)
    splits = split_patients(m, val=run.val_fraction, test=run.test_fraction, seed=run.split_seed)
    out = {}
    for site in m.sites:
        bags = bags_from_manifest(m.for_patients(splits[site].val | splits[site].test))
        pred = predict(model, bags)
        _, labels, probs = aggregate_by_patient(pred.patient_ids, pred.labels, pred.probs)
        out[site] = (auroc(labels, probs), pred.loss)
    return out


def mean_auroc(by_site: dict[str, tuple[float, float]]) -> float:
    values = [a for a, _ in by_site.values() if np.isfinite(a)]
    assert values, f"no site has both classes among its held-out patients: {by_site}"
    return float(np.mean(values))


def mean_loss(by_site: dict[str, tuple[float, float]]) -> float:
    return float(np.mean([loss for _, loss in by_site.values()]))
