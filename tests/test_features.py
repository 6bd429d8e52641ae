import os
from pathlib import Path

import h5py
import numpy as np
import pytest

from fedpath.common.atomic import atomic_path
from fedpath.common.features import (
    FeatureFileError,
    FeatureMeta,
    inspect_features,
    read_feature_matrix,
    read_features,
    read_matrix,
    write_features,
)


def meta(mpp: float | None = 0.5) -> FeatureMeta:
    return FeatureMeta(
        slide_id="S1",
        encoder="resnet18",
        weights_sha256="ab" * 32,
        tile_size_px=224,
        tile_size_um=256.0,
        slide_mpp=mpp,
        extra={"settings_hash": "xyz"},
    )


def test_fedpath_layout_round_trip(tmp_path: Path) -> None:
    feats = np.random.default_rng(0).normal(size=(5, 12)).astype(np.float32)
    coords = np.array([[0, 0], [512, 0], [1024, 0], [0, 512], [512, 512]])
    path = write_features(tmp_path / "s1.h5", feats, coords, meta())
    with h5py.File(path) as f:  # the documented layout, with units stated on the datasets
        assert f.attrs["format"] == "fedpath-features"
        assert f["coords_px"].attrs["unit"] == "level0_px"
        assert f["coords_um"].attrs["unit"] == "um"
    tf = read_features(path)
    assert tf.info.layout == "fedpath"
    np.testing.assert_array_equal(tf.features, feats)
    np.testing.assert_array_equal(tf.coords_px, coords)
    np.testing.assert_allclose(tf.coords_um, coords * 0.5)
    info = inspect_features(path)
    assert (info.n_tiles, info.dim, info.encoder) == (5, 12, "resnet18")
    assert info.tile_size_um == 256.0 and info.slide_mpp == 0.5 and info.weights_sha256 == "ab" * 32
    assert info.attrs["settings_hash"] == "xyz" and "fedpath_version" in info.attrs


def test_unknown_mpp_keeps_pixel_coords_only(tmp_path: Path) -> None:
    path = write_features(tmp_path / "s.h5", np.zeros((2, 3)), np.zeros((2, 2)), meta(mpp=None))
    tf = read_features(path)
    assert tf.coords_um is None and tf.info.slide_mpp is None
    assert tf.coords_px is not None


def test_reads_stamp_files_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "stamp.h5"
    feats = np.random.default_rng(1).normal(size=(4, 6)).astype(np.float16)
    with h5py.File(path, "w") as f:
        f["feats"] = feats
        f["coords"] = np.array([[0.0, 0.0], [256.0, 0.0], [0.0, 256.0], [256.0, 256.0]])
        f.attrs.update({"extractor": "uni", "unit": "um", "tile_size_um": 256.0, "tile_size_px": 224})
    tf = read_features(path)
    assert tf.info.layout == "stamp" and tf.info.encoder == "uni"
    assert tf.features.dtype == np.float32 and tf.features.shape == (4, 6)
    np.testing.assert_allclose(tf.features, feats.astype(np.float32))
    np.testing.assert_allclose(tf.coords_um[:, 0], [0, 256, 0, 256])  # type: ignore[index]
    assert tf.coords_px is None  # STAMP does not record the slide's MPP


def test_reads_clam_and_trident_files_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "clam.h5"
    feats = np.random.default_rng(2).normal(size=(1, 3, 5)).astype(np.float32)  # CLAM's batch axis
    with h5py.File(path, "w") as f:
        f["features"] = feats
        c = f.create_dataset("coords", data=np.array([[[0, 0], [448, 0], [0, 448]]]))
        c.attrs["patch_size"] = 448
        c.attrs["patch_level"] = 0
    tf = read_features(path)
    assert tf.info.layout == "clam" and tf.info.tile_size_px == 448
    np.testing.assert_array_equal(tf.features, feats[0])
    np.testing.assert_array_equal(tf.coords_px, [[0, 0], [448, 0], [0, 448]])
    np.testing.assert_array_equal(read_feature_matrix(path, rows=np.array([0, 2])), feats[0][[0, 2]])


def test_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(FeatureFileError, match="does not exist"):
        read_features(tmp_path / "none.h5")
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not hdf5 at all")
    with pytest.raises(FeatureFileError, match=r"junk\.h5: not a readable HDF5"):
        inspect_features(junk)
    empty = tmp_path / "empty.h5"
    with h5py.File(empty, "w") as f:
        f["something"] = np.zeros(3)
    with pytest.raises(FeatureFileError, match=r"empty\.h5: no tile features found.*something"):
        read_features(empty)
    nan = tmp_path / "nan.h5"
    write_features(nan, np.full((2, 2), np.nan), np.zeros((2, 2)), meta())
    with pytest.raises(FeatureFileError, match="NaN"):
        read_feature_matrix(nan)


def test_write_is_atomic(tmp_path: Path) -> None:
    target = tmp_path / "s.h5"
    write_features(target, np.ones((2, 2)), np.zeros((2, 2)), meta())
    before = target.read_bytes()
    # a failure in the middle of a write leaves the previous file intact and no temp file behind
    with pytest.raises(ValueError, match="coords_px must be"):
        write_features(target, np.ones((3, 2)), np.zeros((2, 2)), meta())
    with pytest.raises(KeyboardInterrupt), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise KeyboardInterrupt
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.h5"]


def test_plain_read_equals_h5py_for_every_layout(tmp_path: Path) -> None:
    """`read_matrix` reads a plainly stored matrix as bytes: the same floats as h5py, for fedpath (float32 and
    float16), STAMP and CLAM's (1, N, D); a chunked, compressed file, and one whose matrix is an external link
    into another file, have no extent and are read by h5py."""
    rng = np.random.default_rng(3)
    feats = rng.normal(size=(7, 5)).astype(np.float32)
    coords = np.arange(14).reshape(7, 2) * 256
    paths = [
        write_features(tmp_path / "f32.h5", feats, coords, meta()),
        write_features(tmp_path / "f16.h5", feats, coords, meta(), dtype="float16"),
    ]
    with h5py.File(tmp_path / "stamp.h5", "w") as f:
        f["feats"] = feats
    with h5py.File(tmp_path / "clam.h5", "w") as f:
        f["features"] = feats[None]
    with h5py.File(tmp_path / "gzip.h5", "w") as f:
        f.create_dataset("features", data=feats, compression="gzip", chunks=(2, 5))
    with h5py.File(tmp_path / "link.h5", "w") as f:  # the matrix in another file, this one large enough
        f["features"] = h5py.ExternalLink("f32.h5", "/features")
        f["padding"] = np.zeros(4096, dtype=np.float32)
    paths += [tmp_path / name for name in ("stamp.h5", "clam.h5", "gzip.h5", "link.h5")]
    for path in paths:
        info = inspect_features(path)
        assert (info.extent is None) == (path.name in ("gzip.h5", "link.h5")), path.name
        got = read_matrix(info)
        assert got.dtype == np.float32 and got.shape == (7, 5)
        np.testing.assert_array_equal(got, read_feature_matrix(path))


def test_plain_read_of_a_changed_file_is_not_stale(tmp_path: Path) -> None:
    """A file rewritten, truncated or filled with NaN after its header was read: new values read through h5py,
    or an error naming the file; never bytes at the old place."""
    coords = np.zeros((4, 2), dtype=np.int64)
    first = np.ones((4, 3), dtype=np.float32)
    path = write_features(tmp_path / "s.h5", first, coords, meta())
    info = inspect_features(path)
    assert info.extent is not None
    np.testing.assert_array_equal(read_matrix(info), first)

    stat = path.stat()  # replaced by a file of the same size and modification time (cp -p, rsync -t)
    write_features(path, first + 5, coords, meta())
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size
    through_h5py = []
    import fedpath.common.features as features_module

    real = features_module.read_feature_matrix
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(
            features_module, "read_feature_matrix", lambda *a, **k: through_h5py.append(a) or real(*a, **k)
        )
        np.testing.assert_array_equal(read_matrix(info), first + 5)
    assert through_h5py  # another file (inode) than the header's: not read at the old place

    second = np.full((6, 3), 2.0, dtype=np.float32)
    write_features(path, second, np.zeros((6, 2), dtype=np.int64), meta())
    np.testing.assert_array_equal(read_matrix(info), second)  # the old header, the new file

    bad = first.copy()
    bad[2, 1] = np.nan
    write_features(path, bad, coords, meta())
    with pytest.raises(FeatureFileError, match=r"s\.h5: features contain NaN"):
        read_matrix(inspect_features(path))

    info = inspect_features(path)
    data = path.read_bytes()
    path.write_bytes(data[: info.extent.offset + 10])
    with pytest.raises(FeatureFileError, match=r"s\.h5"):
        read_matrix(info)
