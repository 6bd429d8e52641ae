import json
from pathlib import Path

import numpy as np
import pytest

from fedpath.common.features import inspect_features, read_feature_matrix
from fedpath.common.manifest import load_manifest
from fedpath.simulation.synth import SynthConfig, _slide_tiles, _world, site_sizes, synthesize

SMALL = SynthConfig(sites=3, slides=60, dim=8, tiles_median=30, seed=1)


def test_cohort_is_a_valid_manifest_with_real_feature_files(tmp_path: Path) -> None:
    m = load_manifest(synthesize(tmp_path, SMALL, progress=False))
    assert len(m.slides) == 60 and m.sites == ["site-A", "site-B", "site-C"]
    assert {inspect_features(s.features).dim for s in m.slides} == {8}  # type: ignore[arg-type]
    multi = [slides for slides in m.patients().values() if len(slides) > 1]
    assert multi, "some patients have several slides"
    for slides in multi:
        assert len({s.label for s in slides}) == 1 and len({s.site for s in slides}) == 1


def test_seeded_and_idempotent(tmp_path: Path) -> None:
    a = load_manifest(synthesize(tmp_path / "a", SMALL, progress=False))
    b = load_manifest(synthesize(tmp_path / "b", SMALL, progress=False))
    for sa, sb in zip(a.slides, b.slides, strict=True):
        assert sa.slide_id == sb.slide_id
        np.testing.assert_array_equal(read_feature_matrix(sa.features), read_feature_matrix(sb.features))  # type: ignore[arg-type]
    before = a.slides[0].features.stat().st_mtime_ns  # type: ignore[union-attr]
    synthesize(tmp_path / "a", SMALL, progress=False)  # same settings: kept as is
    assert a.slides[0].features.stat().st_mtime_ns == before  # type: ignore[union-attr]
    with pytest.raises(FileExistsError, match="other settings"):
        synthesize(tmp_path / "a", SMALL.model_copy(update={"seed": 2}), progress=False)


def test_sites_are_heavy_tailed_with_different_prevalence(tmp_path: Path) -> None:
    sizes = site_sizes(SynthConfig(sites=5, slides=500))
    assert sum(sizes) == 500 and sizes == sorted(sizes, reverse=True) and sizes[0] >= 4 * sizes[-1]
    assert len(set(site_sizes(SynthConfig(sites=4, slides=400, size_skew=0)))) == 1
    synthesize(
        tmp_path, SynthConfig(sites=4, slides=80, dim=4, tiles_median=10, prevalence_skew=1.5), progress=False
    )
    prevalence = json.loads((tmp_path / "cohort.json").read_text())["site_prevalence"]
    assert max(prevalence.values()) - min(prevalence.values()) > 0.1


def _site_means(config: SynthConfig) -> np.ndarray:
    rng = np.random.default_rng(0)
    world = _world(config, rng)
    return np.array(
        [
            np.mean([_slide_tiles(config, world, k, False, rng).mean(0) for _ in range(10)], 0)
            for k in range(config.sites)
        ]
    )


def test_site_shift_moves_feature_distributions() -> None:
    def spread(shift: float) -> float:
        means = _site_means(SynthConfig(sites=3, slides=30, dim=16, shift=shift, tiles_median=200))
        return float(np.linalg.norm(means[0] - means[1]) + np.linalg.norm(means[1] - means[2]))

    assert spread(2.0) > 3 * spread(0.0)


def test_only_a_minority_of_tiles_carries_the_signal() -> None:
    config = SynthConfig(sites=2, slides=8, dim=16, shift=0.0, signal=12.0, witness_min=0.05, witness_max=0.2)
    rng = np.random.default_rng(3)
    world = _world(config, rng)
    direction = (world.tumour - world.prototypes[0]) / config.signal
    for positive in (True, False):
        for _ in range(5):
            x = _slide_tiles(config, world, 0, positive, rng)
            projection = (x - world.prototypes[0]) @ direction
            near_tumour = np.mean(np.abs(projection - config.signal) < 4) if positive else 0.0
            if positive:
                assert 0.04 <= near_tumour <= 0.25
            else:
                assert np.mean(projection > config.signal - 4) < 0.01


def test_more_than_26_sites_get_distinct_names() -> None:
    from fedpath.simulation.synth import SynthConfig, site_names

    names = site_names(40)
    assert (
        len(set(names)) == 40 and names[25] == "site-Z" and names[26] == "site-AA" and names[39] == "site-AN"
    )
    assert SynthConfig(sites=40).sites == 40
