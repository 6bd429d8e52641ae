from pathlib import Path

import numpy as np
import pytest
import torch

from fedpath.common import bags as bags_module
from fedpath.common.bags import BagDataset, bags_from_manifest, collate_bags
from fedpath.common.features import FeatureFileError, read_feature_matrix
from fedpath.common.manifest import load_manifest
from tests.helpers import write_csv, write_feature_file


@pytest.fixture
def manifest_path(tmp_path: Path) -> Path:
    sizes = {"a": 5, "b": 7, "c": 40}
    for i, (name, n) in enumerate(sizes.items()):
        write_feature_file(tmp_path / f"{name}.h5", n_tiles=n, dim=4, seed=i)
    rows = [["a", "p1", "H", "1", "a.h5"], ["b", "p1", "H", "1", "b.h5"], ["c", "p2", "H", "0", "c.h5"]]
    return write_csv(tmp_path / "m.csv", ["slide_id", "patient_id", "site", "label", "features"], rows)


def test_patient_bags_merge_slides(manifest_path: Path) -> None:
    m = load_manifest(manifest_path)
    by_patient = bags_from_manifest(m)
    assert [(b.bag_id, len(b.paths), b.label) for b in by_patient] == [("p1", 2, 1), ("p2", 1, 0)]
    item = BagDataset(by_patient)[0]
    expected = np.concatenate([read_feature_matrix(p) for p in by_patient[0].paths])
    np.testing.assert_array_equal(item.features.numpy(), expected)
    assert len(bags_from_manifest(m, by="slide")) == 3


def test_bags_are_read_on_demand(manifest_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reads: list[Path] = []
    real = bags_module.read_feature_matrix

    def counting(path: Path) -> np.ndarray:
        reads.append(Path(path))
        return real(path)

    monkeypatch.setattr(bags_module, "read_feature_matrix", counting)
    ds = BagDataset(bags_from_manifest(load_manifest(manifest_path)))
    assert reads == []  # building the dataset reads nothing
    ds[1]
    assert [p.name for p in reads] == ["c.h5"]
    ds[1]
    assert len(reads) == 2  # nothing is cached: memory stays flat over a cohort


def test_tile_cap_is_seeded_per_epoch(manifest_path: Path) -> None:
    bags = bags_from_manifest(load_manifest(manifest_path))
    ds = BagDataset(bags, max_tiles=10, seed=3)
    full = BagDataset(bags)[1].features
    first = ds[1].features
    assert first.shape == (10, 4)
    # a subset of the bag's real rows, in their original order
    rows = [int(torch.nonzero((full == r).all(dim=1))[0]) for r in first]
    assert rows == sorted(rows) and len(set(rows)) == 10
    assert torch.equal(BagDataset(bags, max_tiles=10, seed=3)[1].features, first)  # reproducible
    ds.set_epoch(1)
    assert not torch.equal(ds[1].features, first)  # a new draw each epoch
    assert ds[0].features.shape[0] == 10  # capped at 12 → 10
    assert BagDataset(bags, max_tiles=100)[0].features.shape[0] == 12  # small bags are left whole


def test_collate_pads_and_masks(manifest_path: Path) -> None:
    ds = BagDataset(bags_from_manifest(load_manifest(manifest_path)))
    batch = collate_bags([ds[0], ds[1]])
    assert batch.features.shape == (2, 40, 4)
    assert batch.mask.sum(dim=1).tolist() == [12, 40]
    assert torch.all(batch.features[0, 12:] == 0)
    assert batch.labels.tolist() == [1, 0]


def test_mixed_feature_dims_in_one_bag_is_an_error(tmp_path: Path) -> None:
    write_feature_file(tmp_path / "a.h5", dim=4)
    write_feature_file(tmp_path / "b.h5", dim=6)
    rows = [["a", "p1", "H", "1", "a.h5"], ["b", "p1", "H", "1", "b.h5"]]
    m = load_manifest(
        write_csv(tmp_path / "m.csv", ["slide_id", "patient_id", "site", "label", "features"], rows)
    )
    with pytest.raises(FeatureFileError, match=r"bag 'p1'.*different dimensions \[4, 6\]"):
        BagDataset(bags_from_manifest(m))[0]
