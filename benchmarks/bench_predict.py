"""`fedpath predict` against the bare MIL forward pass, and the cost of heatmaps, in one process (CPU).

Part 1. `--slides` synthetic feature files of `--tiles` tiles × `--dim` features (fedpath layout) and a
gated-ABMIL model with a calibration: slides/s of `predict_slides` (reading each file, the forward pass with the
temperature, prediction sets, the rows) ÷ slides/s of the bare forward pass over the same bags already in
memory. Target (issue 11): ≥ 0.8.

Part 2. One slide of about 10,000 tiles over the real CMU slide (tests/data/wsi): predicting it with heatmaps
(the attention × gradient maps, the PNG over the thumbnail and the GeoJSON; no top/bottom gallery, whose tile
reading the target leaves out) ÷ predicting it without. Target: ≤ 3.

    python benchmarks/bench_predict.py [--slides 200] [--tiles 500] [--dim 768] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

CMU = Path(__file__).resolve().parents[1] / "tests" / "data" / "wsi" / "CMU-1-Small-Region.svs"


def model_file(folder: Path, dim: int) -> Path:
    from fedpath.common.calibration import BINS, Calibration
    from fedpath.common.mil import initial_model
    from fedpath.common.modelfile import Checkpoint, save_checkpoint
    from fedpath.common.runconfig import RunConfig

    run = RunConfig(in_dim=dim, num_classes=2, classes="benign,tumour")
    model = initial_model(run.model, in_dim=dim, num_classes=2, seed=0)
    hist = [0] * BINS
    hist[100] = 100
    cal = Calibration(1.5, 0.9, 0.5, 100, hist, 0.7, 0.6, ["A"])
    path = folder / "run" / "model.pt"
    path.parent.mkdir(parents=True)
    save_checkpoint(path, Checkpoint(5, model.state_dict(), run.model_dump(), {}, 5, {}, cal.to_dict()))
    return path


def feature_files(folder: Path, n: int, tiles: int, dim: int) -> list[Path]:
    from fedpath.common.features import FeatureMeta, write_features

    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        coords = np.stack([np.arange(tiles) % 100, np.arange(tiles) // 100], axis=1) * 224
        meta = FeatureMeta(f"s{i:04d}", "synthetic", "synthetic", 224, 256.0, 0.5)
        paths.append(write_features(folder / f"s{i:04d}.h5", rng.normal(size=(tiles, dim)), coords, meta))
    return paths


def part1(folder: Path, args: argparse.Namespace) -> tuple[float, float]:
    from fedpath.client.predict import check_inputs, load_for_prediction, predict_slides, slides_from_folder
    from fedpath.common.features import read_feature_matrix

    model_path = model_file(folder, args.dim)
    files = feature_files(folder / "features", args.slides, args.tiles, args.dim)
    loaded = load_for_prediction(model_path)
    slides = slides_from_folder(folder / "features")
    infos, _ = check_inputs(loaded, slides, allow_mismatch=False)  # as the command does, before predicting
    bags = [torch.from_numpy(read_feature_matrix(p))[None] for p in files]
    model = loaded.model.eval()
    whole, bare = [], []
    for _ in range(args.repeats):  # alternate, so that both see the same machine load
        t0 = time.perf_counter()
        with torch.no_grad():
            for x in bags:
                model(x, torch.ones(x.shape[:2], dtype=torch.bool))
        bare.append(len(bags) / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        predict_slides(loaded, slides, infos=infos)
        whole.append(len(slides) / (time.perf_counter() - t0))
    return statistics.median(whole), statistics.median(bare)


def part2(folder: Path, args: argparse.Namespace) -> tuple[float, float, int]:
    import openslide

    from fedpath.client.heatmaps import write_heatmaps
    from fedpath.client.predict import load_for_prediction, predict_slides, slides_from_folder
    from fedpath.common.features import FeatureMeta, write_features

    width, height = openslide.OpenSlide(str(CMU)).dimensions
    side = 24  # level-0 px: about 10,000 tiles over the slide
    xs, ys = np.meshgrid(np.arange(0, width - side, side), np.arange(0, height - side, side))
    coords = np.stack([xs.ravel(), ys.ravel()], axis=1)
    one = folder / "one"
    one.mkdir()
    meta = FeatureMeta(CMU.stem, "synthetic", "synthetic", 224, side * 0.499, 0.499)
    rng = np.random.default_rng(1)
    write_features(one / f"{CMU.stem}.h5", rng.normal(size=(len(coords), args.dim)), coords, meta)
    loaded = load_for_prediction(model_file(folder / "m2", args.dim))
    slides = slides_from_folder(one, CMU.parent)

    def with_heatmaps() -> None:
        def draw(slide, coords_px, _features, scores):  # type: ignore[no-untyped-def]
            k = int(scores.probs.argmax())
            maps = {"attention": scores.attention, f"attention_x_gradient_{k}": scores.evidence[str(k)]}
            write_heatmaps(
                folder / "heatmaps", slide.slide_id, coords_px, side, maps, slide.slide_path, top_k=0
            )

        predict_slides(loaded, slides, on_slide=draw, evidence=True)

    plain, drawn = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        predict_slides(loaded, slides)
        plain.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        with_heatmaps()
        drawn.append(time.perf_counter() - t0)
    return statistics.median(plain), statistics.median(drawn), len(coords)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slides", type=int, default=200)
    p.add_argument("--tiles", type=int, default=500)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory(prefix="bench-predict-") as tmp:
        folder = Path(tmp)
        whole, bare = part1(folder, args)
        ratio = whole / bare
        print(
            f"predict over features: {whole:.1f} slides/s, bare MIL forward {bare:.1f} slides/s "
            f"({args.slides} slides × {args.tiles} tiles × {args.dim}); ratio {ratio:.2f} "
            f"(target ≥ 0.8 — {'met' if ratio >= 0.8 else 'MISSED'})"
        )
        plain, drawn, tiles = part2(folder, args)
        print(
            f"heatmaps for one slide of {tiles} tiles: {drawn:.2f} s against {plain:.2f} s without; ratio "
            f"{drawn / plain:.2f} (target ≤ 3 — {'met' if drawn / plain <= 3 else 'MISSED'})"
        )


if __name__ == "__main__":
    main()
