"""Synthetic multi-site cohorts: real fedpath feature files and a manifest, with the structure that makes
federated pathology hard.

Generative model (all seeded):

* **Sites** — K sites whose sizes follow a power law: site k gets a share ∝ (k+1)^-size_skew of the slides.
* **Patients and labels** — site k's prevalence is sigmoid(logit(prevalence) + prevalence_skew·z_k); a
  fraction `multi_slide_fraction` of patients has two or three slides (all with the patient's label).
* **Tiles** — each tile is a tissue prototype plus Gaussian noise in D dimensions. A positive slide holds a
  minority (`witness_min`…`witness_max`) of *tumour* tiles whose prototype lies `signal` noise-SDs away from a
  normal prototype: mean pooling dilutes it, attention finds it. Bag sizes are log-normal around
  `tiles_median`, clipped to [`tiles_min`, `tiles_max`].
* **Site shift** — every tile at site k is mapped by an affine "scanner and stain" transform
  x ↦ A_k x + b_k, A_k = I + shift·0.5·G_k/√D, b_k = shift·u_k (G_k, u_k standard Gaussian), and the
  mix of normal tissue types differs between sites.
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tqdm.auto import tqdm

from fedpath.common.atomic import write_text_atomic
from fedpath.common.features import FeatureMeta, write_features
from fedpath.common.manifest import SlideRecord, write_manifest

ENCODER_NAME = "synthetic"
N_PROTOTYPES = 8
TILE_PX = 224
TILE_UM = 256.0
SLIDE_MPP = TILE_UM / TILE_PX


class SynthConfig(BaseModel):
    """Knobs of the synthetic cohort (see the module docstring for the model)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sites: int = Field(4, ge=2, le=702, description="number of sites K")
    slides: int = Field(400, ge=8, description="slides over all sites")
    dim: int = Field(64, ge=4, description="tile feature dimension D")
    shift: float = Field(1.0, ge=0, description="site shift strength (0 = identical sites)")
    prevalence: float = Field(0.4, gt=0, lt=1, description="mean share of positive patients")
    prevalence_skew: float = Field(0.8, ge=0, description="SD of per-site prevalence on the logit scale")
    size_skew: float = Field(1.0, ge=0, description="power-law exponent of site sizes (0 = equal sites)")
    multi_slide_fraction: float = Field(0.2, ge=0, le=1, description="patients with 2-3 slides")
    tiles_median: int = Field(150, ge=1)
    tiles_min: int = Field(16, ge=1)
    tiles_max: int = Field(1500, ge=1)
    witness_min: float = Field(
        0.03, gt=0, le=1, description="least share of tumour tiles in a positive slide"
    )
    witness_max: float = Field(0.15, gt=0, le=1, description="largest share of tumour tiles")
    signal: float = Field(1.5, ge=0, description="tumour prototype's distance from normal, in noise SDs")
    seed: int = 0

    @model_validator(mode="after")
    def _ranges(self) -> SynthConfig:
        if self.tiles_min > self.tiles_max:
            raise ValueError(f"tiles_min {self.tiles_min} > tiles_max {self.tiles_max}")
        if self.witness_min > self.witness_max:
            raise ValueError(f"witness_min {self.witness_min} > witness_max {self.witness_max}")
        if self.slides < 4 * self.sites:
            raise ValueError(f"{self.slides} slides are too few for {self.sites} sites (need ≥ 4 per site)")
        return self


def site_names(k: int) -> list[str]:
    """site-A … site-Z, then site-AA, site-AB, … (as spreadsheet columns; 702 names in all)."""
    letters = string.ascii_uppercase
    singles = list(letters)
    pairs = [a + b for a in letters for b in letters]
    return [f"site-{name}" for name in (singles + pairs)[:k]]


def site_sizes(config: SynthConfig) -> list[int]:
    """Slides per site: power-law shares, at least 4 each, summing to `config.slides`."""
    shares = np.arange(1, config.sites + 1, dtype=float) ** -config.size_skew
    raw = shares / shares.sum() * (config.slides - 4 * config.sites)
    sizes = np.floor(raw).astype(int) + 4
    for k in np.argsort(-(raw - np.floor(raw)))[: config.slides - int(sizes.sum())]:
        sizes[k] += 1
    return [int(s) for s in sizes]


@dataclass(frozen=True)
class _World:
    prototypes: np.ndarray  # (P, D) normal tissue prototypes
    tumour: np.ndarray  # (D,)
    transforms: list[tuple[np.ndarray, np.ndarray]]  # per site (A, b)
    tissue_mix: np.ndarray  # (K, P) per-site mixture over normal prototypes
    prevalence: np.ndarray  # (K,)


def _world(config: SynthConfig, rng: np.random.Generator) -> _World:
    d = config.dim
    prototypes = rng.normal(0, 1.0, (N_PROTOTYPES, d))
    direction = rng.normal(size=d)
    tumour = prototypes[0] + config.signal * direction / np.linalg.norm(direction)
    transforms = []
    for _ in range(config.sites):
        a = np.eye(d) + config.shift * 0.5 * rng.normal(size=(d, d)) / np.sqrt(d)
        b = config.shift * rng.normal(size=d)
        transforms.append((a, b))
    tissue_mix = rng.dirichlet(np.full(N_PROTOTYPES, 2.0), size=config.sites)
    logit = np.log(config.prevalence / (1 - config.prevalence))
    prevalence = 1 / (1 + np.exp(-(logit + config.prevalence_skew * rng.normal(size=config.sites))))
    return _World(prototypes, tumour, transforms, tissue_mix, np.clip(prevalence, 0.1, 0.9))


def _slide_tiles(
    config: SynthConfig, world: _World, site: int, positive: bool, rng: np.random.Generator
) -> np.ndarray:
    n = int(np.clip(rng.lognormal(np.log(config.tiles_median), 0.6), config.tiles_min, config.tiles_max))
    kinds = rng.choice(N_PROTOTYPES, size=n, p=world.tissue_mix[site])
    x = world.prototypes[kinds] + rng.normal(size=(n, config.dim))
    if positive:
        n_tumour = max(1, round(n * rng.uniform(config.witness_min, config.witness_max)))
        rows = rng.choice(n, size=n_tumour, replace=False)
        x[rows] = world.tumour + rng.normal(size=(n_tumour, config.dim))
    a, b = world.transforms[site]
    return (x @ a.T + b).astype(np.float32)


def _grid_coords(n: int, rng: np.random.Generator) -> np.ndarray:
    """Top-left corners (level-0 px) of n distinct tiles on a square-ish grid, as on a real slide."""
    side = int(np.ceil(np.sqrt(n * 1.5)))
    cells = rng.choice(side * side, size=n, replace=False)
    return np.stack([cells % side, cells // side], axis=1).astype(np.int64) * TILE_PX


def _planned_slides(
    config: SynthConfig, world: _World, rng: np.random.Generator
) -> list[tuple[int, str, int]]:
    """(site index, patient id, label) per slide: patients drawn until each site has its slide count."""
    plan: list[tuple[int, str, int]] = []
    for k, (name, size) in enumerate(zip(site_names(config.sites), site_sizes(config), strict=True)):
        made, patient = 0, 0
        while made < size:
            label = int(rng.random() < world.prevalence[k])
            n = 1 if rng.random() >= config.multi_slide_fraction else int(rng.integers(2, 4))
            n = min(n, size - made)
            plan.extend((k, f"{name}-P{patient:04d}", label) for _ in range(n))
            made += n
            patient += 1
    return plan


def synthesize(out: Path, config: SynthConfig, *, progress: bool = True, overwrite: bool = False) -> Path:
    """Write feature files under out/features/ and out/manifest.csv; return the manifest path.

    A cohort already in `out` with the same config is kept as it is (nothing is rewritten).
    """
    out = Path(out)
    manifest_path = out / "manifest.csv"
    config_path = out / "cohort.json"
    wanted = config.model_dump()
    if not overwrite and manifest_path.exists() and config_path.exists():
        if json.loads(config_path.read_text())["config"] == wanted:
            return manifest_path
        raise FileExistsError(
            f"{out} holds a synthetic cohort with other settings; use --overwrite or another --out"
        )
    rng = np.random.default_rng(config.seed)
    world = _world(config, rng)
    plan = _planned_slides(config, world, rng)
    names = site_names(config.sites)
    records = []
    slide_no: dict[str, int] = {}
    for k, patient_id, label in tqdm(plan, desc="synthetic slides", disable=not progress, unit="slide"):
        slide_no[patient_id] = slide_no.get(patient_id, 0) + 1
        slide_id = f"{patient_id}-S{slide_no[patient_id]}"
        feats = _slide_tiles(config, world, k, bool(label), rng)
        path = out / "features" / f"{slide_id}.h5"
        meta = FeatureMeta(
            slide_id=slide_id,
            encoder=ENCODER_NAME,
            weights_sha256="synthetic",
            tile_size_px=TILE_PX,
            tile_size_um=TILE_UM,
            slide_mpp=SLIDE_MPP,
            mpp_source="synthetic",
            random_init=True,
        )
        write_features(path, feats, _grid_coords(len(feats), rng), meta)
        records.append(SlideRecord(slide_id, patient_id, names[k], str(label), label, path, None, None, 0))
    write_manifest(manifest_path, records)
    info = {
        "config": wanted,
        "site_prevalence": dict(zip(names, np.round(world.prevalence, 3).tolist(), strict=True)),
        "site_slides": dict(zip(names, site_sizes(config), strict=True)),
    }
    write_text_atomic(config_path, json.dumps(info, indent=2) + "\n")
    return manifest_path
