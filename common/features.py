"""Per-slide tile-feature files (HDF5): the one layout fedpath writes, and readers for STAMP and CLAM/TRIDENT.

fedpath layout, ``format = "fedpath-features"``, ``format_version = 1``:

=================  ==============================  ====================================================
object             type, shape                     meaning
=================  ==============================  ====================================================
``features``       float32 or float16, (N, D)      one row per tile, the encoder's output
``coords_px``      int64, (N, 2)                   tile top-left corner (x, y) in level-0 pixels;
                                                   attribute ``unit = "level0_px"``
``coords_um``      float32, (N, 2)                 the same corner in micrometres; ``unit = "um"``
attributes         (on the file root)              ``format``, ``format_version``, ``slide_id``,
                                                   ``encoder`` (timm name), ``weights_sha256``,
                                                   ``random_init``, ``tile_size_px``, ``tile_size_um``,
                                                   ``slide_mpp`` (µm/px at level 0), ``mpp_source``,
                                                   ``fedpath_version``, ``created``
=================  ==============================  ====================================================

Read unchanged as well:

* STAMP: ``feats`` (N, D) and ``coords`` in micrometres (attrs ``extractor``, ``tile_size_um``, ...).
* CLAM / TRIDENT: ``features`` (N, D) (a leading batch axis of 1 is dropped) and ``coords`` in level-0 pixels.

Writes are atomic: a temp file beside the target, renamed when complete.
"""

from __future__ import annotations

import datetime as _dt
import os
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import h5py
import numpy as np

from fedpath.common.atomic import atomic_path
from fedpath.common.version import fedpath_version

FORMAT_NAME = "fedpath-features"
FORMAT_VERSION = 1

Layout = Literal["fedpath", "stamp", "clam"]


class FeatureFileError(Exception):
    """A feature file that cannot be read; the message names the file and what is wrong."""


@dataclass(frozen=True)
class FeatureMeta:
    """What a fedpath feature file records about how its features were made."""

    slide_id: str
    encoder: str
    weights_sha256: str
    tile_size_px: int
    tile_size_um: float
    slide_mpp: float | None
    mpp_source: str = "slide"
    random_init: bool = False
    extra: dict[str, str | int | float | bool] = field(default_factory=dict)


@dataclass(frozen=True)
class FeatureFileInfo:
    """Header of a feature file: its layout, size and provenance, read without loading the features."""

    path: Path
    layout: Layout
    n_tiles: int
    dim: int
    encoder: str | None
    weights_sha256: str | None
    tile_size_px: int | None
    tile_size_um: float | None
    slide_mpp: float | None
    attrs: dict[str, Any]
    extent: RawExtent | None = None  # where the feature matrix lies in the file, when it can be read directly


@dataclass(frozen=True)
class RawExtent:
    """Where an uncompressed, contiguous feature matrix lies in its file, and the file h5py had open when its
    header was read (device, inode, size, modification time): the matrix can then be read with one plain read,
    which, unlike h5py's, lets other threads run. A file that is not that one any more is read through h5py."""

    offset: int
    dtype: str  # "<f4" or "<f2"
    shape: tuple[int, ...]
    file: tuple[int, int, int, int]  # st_dev, st_ino, st_size, st_mtime_ns


@dataclass(frozen=True)
class TileFeatures:
    """A slide's tiles: features (N, D) float32, corners in µm and level-0 px where known, and the header."""

    features: np.ndarray
    coords_um: np.ndarray | None
    coords_px: np.ndarray | None
    info: FeatureFileInfo


def write_features(
    path: str | os.PathLike[str],
    features: np.ndarray,
    coords_px: np.ndarray,
    meta: FeatureMeta,
    *,
    dtype: Literal["float32", "float16"] = "float32",
) -> Path:
    """Write a fedpath feature file atomically.

    features: (N, D) tile features; coords_px: (N, 2) top-left corners (x, y) in level-0 pixels.
    The µm coordinates are derived from ``meta.slide_mpp`` when known.
    """
    features = np.asarray(features)
    coords_px = np.asarray(coords_px)
    if features.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {features.shape} for slide {meta.slide_id}")
    if coords_px.shape != (features.shape[0], 2):
        raise ValueError(
            f"coords_px must be ({features.shape[0]}, 2) to match the features, got {coords_px.shape} "
            f"for slide {meta.slide_id}"
        )
    final = Path(path)
    with atomic_path(final) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("features", data=features.astype(dtype, copy=False))
        px = f.create_dataset("coords_px", data=coords_px.astype(np.int64, copy=False))
        px.attrs["unit"] = "level0_px"
        px.attrs["origin"] = "top-left (x, y)"
        if meta.slide_mpp is not None:
            um = f.create_dataset("coords_um", data=(coords_px * meta.slide_mpp).astype(np.float32))
            um.attrs["unit"] = "um"
            um.attrs["origin"] = "top-left (x, y)"
        a = f.attrs
        a["format"] = FORMAT_NAME
        a["format_version"] = FORMAT_VERSION
        a["slide_id"] = meta.slide_id
        a["encoder"] = meta.encoder
        a["weights_sha256"] = meta.weights_sha256
        a["random_init"] = bool(meta.random_init)
        a["tile_size_px"] = int(meta.tile_size_px)
        a["tile_size_um"] = float(meta.tile_size_um)
        a["slide_mpp"] = float("nan") if meta.slide_mpp is None else float(meta.slide_mpp)
        a["mpp_source"] = meta.mpp_source
        a["fedpath_version"] = fedpath_version()
        a["created"] = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
        for key, value in meta.extra.items():
            a[key] = value
    return final


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.generic):
        return value.item()
    return value


def _layout_of(f: h5py.File, path: Path) -> Layout:
    if _plain(f.attrs.get("format")) == FORMAT_NAME:
        return "fedpath"
    if "feats" in f:
        return "stamp"
    if "features" in f:
        return "clam"
    raise FeatureFileError(
        f"{path}: no tile features found (expected a dataset 'features' (fedpath, CLAM, TRIDENT) or "
        f"'feats' (STAMP)); datasets present: {sorted(f.keys()) or 'none'}"
    )


def _feature_dataset(f: h5py.File, layout: Layout, path: Path) -> h5py.Dataset:
    ds = f["feats" if layout == "stamp" else "features"]
    shape = ds.shape
    if len(shape) == 3 and shape[0] == 1:
        return ds  # CLAM's (1, N, D); squeezed when read
    if len(shape) != 2:
        raise FeatureFileError(f"{path}: features must be (tiles, dim), found shape {shape}")
    return ds


def _shape2(ds: h5py.Dataset) -> tuple[int, int]:
    shape = ds.shape
    return (int(shape[-2]), int(shape[-1]))


def _num(value: Any, kind: type) -> Any:
    value = _plain(value)
    if value is None:
        return None
    try:
        out = kind(value)
    except (TypeError, ValueError):
        return None
    if isinstance(out, float) and not np.isfinite(out):
        return None
    return out


def _extent(f: h5py.File, ds: h5py.Dataset) -> RawExtent | None:
    """The dataset's place in the open file `f` when it is stored there as one plain little-endian float array
    (not through a link to another file, not chunked, filtered or external)."""
    dtype = ds.dtype.str
    if dtype not in ("<f4", "<f2") or ds.chunks is not None or ds.compression is not None:
        return None
    if f.driver != "sec2" or ds.file.id != f.id:  # an external link: the data lie in another file
        return None
    dcpl = ds.id.get_create_plist()
    if dcpl.get_nfilters() or dcpl.get_external_count():
        return None
    offset = ds.id.get_offset()
    if offset is None:  # not allocated: an empty dataset
        return None
    stat = os.fstat(f.id.get_vfd_handle())  # the file h5py read, whatever its path names by now
    extent = RawExtent(int(offset), dtype, tuple(int(n) for n in ds.shape), _identity(stat))
    return extent if extent.offset + _nbytes(extent) <= stat.st_size else None


def _identity(stat: os.stat_result) -> tuple[int, int, int, int]:
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)


def _nbytes(extent: RawExtent) -> int:
    return int(np.prod(extent.shape)) * np.dtype(extent.dtype).itemsize


def _info(f: h5py.File, path: Path) -> FeatureFileInfo:
    layout = _layout_of(f, path)
    ds = _feature_dataset(f, layout, path)
    n, d = _shape2(ds)
    attrs = {k: _plain(v) for k, v in f.attrs.items()}
    if layout == "clam" and "coords" in f:
        # CLAM/TRIDENT keep patch geometry on the coords dataset
        attrs.update({f"coords.{k}": _plain(v) for k, v in f["coords"].attrs.items()})
    encoder = attrs.get("encoder") or attrs.get("extractor") or attrs.get("coords.encoder")
    return FeatureFileInfo(
        path=path,
        layout=layout,
        n_tiles=n,
        dim=d,
        encoder=None if encoder is None else str(encoder),
        weights_sha256=_plain(attrs.get("weights_sha256") or attrs.get("code_hash")),
        tile_size_px=_num(attrs.get("tile_size_px") or attrs.get("coords.patch_size"), int),
        tile_size_um=_num(attrs.get("tile_size_um"), float),
        slide_mpp=_num(attrs.get("slide_mpp") or attrs.get("mpp"), float),
        attrs=attrs,
        extent=_extent(f, ds),
    )


def _open(path: Path) -> h5py.File:
    if not path.exists():
        raise FeatureFileError(f"{path}: feature file does not exist")
    try:
        return h5py.File(path, "r")
    except OSError as err:
        raise FeatureFileError(f"{path}: not a readable HDF5 feature file ({err})") from err


def inspect_features(path: str | os.PathLike[str]) -> FeatureFileInfo:
    """Read a feature file's header (layout, tiles, dim, encoder, geometry) without loading features."""
    p = Path(path)
    with _open(p) as f:
        return _info(f, p)


def _matrix(f: h5py.File, layout: Layout, p: Path, rows: np.ndarray | None = None) -> np.ndarray:
    ds = _feature_dataset(f, layout, p)
    try:
        data = ds[()] if rows is None or ds.ndim == 3 else ds[rows]
    except OSError as err:  # truncated or corrupt chunk
        raise FeatureFileError(f"{p}: features cannot be read ({err})") from err
    if ds.ndim == 3:
        data = data[0] if rows is None else data[0][rows]
    return _finite(np.asarray(data, dtype=np.float32), p)


def _finite(out: np.ndarray, p: Path) -> np.ndarray:
    if not np.isfinite(out).all():
        raise FeatureFileError(f"{p}: features contain NaN or Inf; re-extract this slide")
    return out


def read_feature_matrix(
    path: str | os.PathLike[str], rows: np.ndarray | None = None, *, layout: Layout | None = None
) -> np.ndarray:
    """Read the (N, D) features of one file as float32; `rows` (sorted indices) reads only those tiles;
    `layout`, when known from the header, is not looked up again."""
    p = Path(path)
    with _open(p) as f:
        return _matrix(f, layout or _layout_of(f, p), p, rows)


def read_matrix(info: FeatureFileInfo) -> np.ndarray:
    """The (N, D) float32 features of the file `info` describes (`inspect_features`). When its header found the
    matrix stored plainly and the file is unchanged since, one read of its bytes, which lets other threads run
    meanwhile (a prefetching reader beside a model); otherwise through h5py. Same checks either way."""
    extent = info.extent
    if extent is None:
        return read_feature_matrix(info.path, layout=info.layout)
    try:
        with open(info.path, "rb", buffering=0) as fh:
            # replaced or changed since its header was read: h5py reads it as it is now
            if _identity(os.fstat(fh.fileno())) != extent.file:
                return read_feature_matrix(info.path, layout=info.layout)
            # numpy's buffer, not a bytearray: its pages are first touched inside the read, which lets other
            # threads run, rather than zeroed while holding the GIL
            data = np.empty(extent.shape[-2:], dtype=extent.dtype)
            view, got = memoryview(data.data).cast("B"), 0
            fh.seek(extent.offset)
            while got < view.nbytes:
                n = fh.readinto(view[got:])
                if not n:
                    break
                got += n
    except FileNotFoundError as err:
        raise FeatureFileError(f"{info.path}: feature file does not exist") from err
    except OSError as err:
        raise FeatureFileError(f"{info.path}: features cannot be read ({err})") from err
    if got != view.nbytes:
        raise FeatureFileError(f"{info.path}: features cannot be read (the file ends inside them)")
    return _finite(data if extent.dtype == "<f4" else data.astype(np.float32), info.path)


def read_features(path: str | os.PathLike[str], info: FeatureFileInfo | None = None) -> TileFeatures:
    """Read a whole feature file of any supported layout, with coordinates in both units where known; `info`,
    the file's header read before (`inspect_features`), saves reading it again."""
    p = Path(path)
    with _open(p) as f:
        info = info or _info(f, p)
        features = _matrix(f, info.layout, p)
        coords_um: np.ndarray | None = None
        coords_px: np.ndarray | None = None
        if info.layout == "fedpath":
            coords_px = np.asarray(f["coords_px"][()], dtype=np.int64)
            if "coords_um" in f:
                coords_um = np.asarray(f["coords_um"][()], dtype=np.float32)
        elif "coords" in f:
            raw = np.asarray(f["coords"][()])
            if raw.ndim == 3 and raw.shape[0] == 1:
                raw = raw[0]
            if info.layout == "stamp":
                coords_um = raw.astype(np.float32)
            else:
                coords_px = raw.astype(np.int64)
    mpp = info.slide_mpp
    if coords_um is None and coords_px is not None and mpp:
        coords_um = (coords_px * mpp).astype(np.float32)
    if coords_px is None and coords_um is not None and mpp:
        coords_px = np.rint(coords_um / mpp).astype(np.int64)
    for name, c in (("coords_um", coords_um), ("coords_px", coords_px)):
        if c is not None and c.shape != (info.n_tiles, 2):
            raise FeatureFileError(f"{p}: {name} has shape {c.shape}, expected ({info.n_tiles}, 2)")
    return TileFeatures(features, coords_um, coords_px, info)


# --- provenance: what the features were made with ---------------------------------------------------------

PROVENANCE_KEYS = ("encoder", "weights_sha256", "tile_size_px", "tile_size_um")


def provenance(info: FeatureFileInfo) -> dict[str, str | int | float]:
    """What a feature file states it was made with (encoder, weights checksum, tile size); stated keys only."""
    values: dict[str, str | int | float | None] = {
        "encoder": info.encoder,
        "weights_sha256": info.weights_sha256,
        "tile_size_px": info.tile_size_px,
        "tile_size_um": info.tile_size_um,
    }
    return {k: v for k, v in values.items() if v is not None and v != ""}


def _same(a: object, b: object) -> bool:
    if isinstance(a, int | float) and isinstance(b, int | float):
        return abs(float(a) - float(b)) <= 1e-3 * max(1.0, abs(float(a)))
    return str(a) == str(b)


def provenance_mismatch(expected: Mapping[str, object], found: Mapping[str, object]) -> list[str]:
    """Keys that both state with different values, as "key: model X, features Y" (an unstated key is not a
    mismatch: STAMP and TRIDENT files state less than fedpath's)."""
    return [
        f"{key}: model {expected[key]!r}, features {found[key]!r}"
        for key in PROVENANCE_KEYS
        if key in expected and key in found and not _same(expected[key], found[key])
    ]


def common_provenance(stated: Iterable[Mapping[str, str | int | float]]) -> dict[str, str | int | float]:
    """The provenance most files state (see `provenance`), with ``files_agree`` False when they differ."""
    seen = Counter(tuple(sorted(p.items())) for p in stated)
    if not seen:
        return {}
    (most, _), agree = seen.most_common(1)[0], len(seen) == 1
    return {**dict(most), "files_agree": agree}
