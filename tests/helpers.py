"""Small builders shared by the tests: feature files and manifests written to a temp folder."""

from __future__ import annotations

import csv
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fedpath.common.features import FeatureMeta, write_features


def write_feature_file(
    path: Path, n_tiles: int = 10, dim: int = 8, seed: int = 0, slide_id: str = "s"
) -> Path:
    rng = np.random.default_rng(seed)
    feats = rng.normal(size=(n_tiles, dim)).astype(np.float32)
    coords = np.stack([np.arange(n_tiles), np.zeros(n_tiles)], axis=1).astype(np.int64) * 224
    meta = FeatureMeta(
        slide_id=slide_id,
        encoder="test",
        weights_sha256="none",
        tile_size_px=224,
        tile_size_um=112.0,
        slide_mpp=0.5,
    )
    return write_features(path, feats, coords, meta)


def write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[str]]) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run the installed `fedpath` command (the one a user runs) and capture its output."""
    exe = Path(sys.executable).parent / "fedpath"
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=timeout)
