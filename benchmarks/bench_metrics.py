"""Our metrics against the libraries that could replace them: per-call time on one test set, and what importing
sklearn.metrics adds to a site's process.

Per call (median of --repeats timings of --calls calls each, µs): AUROC binary ((N, 2) probabilities, as the
report passes them) and 3-class (macro one-vs-rest) against sklearn's roc_auc_score, balanced accuracy against
balanced_accuracy_score, the reliability curve against calibration_curve, ROC against roc_curve; and one
1000-resample patient bootstrap of AUROC against scipy.stats.bootstrap (paired, percentile), ms.

Import: `import fedpath.client.training` (what every site imports) in a fresh interpreter, with and without
`import sklearn.metrics` after it, --imports times each, alternating; the medians and their difference.

    python benchmarks/bench_metrics.py [--patients 100] [--calls 500] [--repeats 5] [--imports 5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
import timeit
import warnings
from collections.abc import Callable

import numpy as np


def per_call_us(f: Callable[[], object], calls: int, repeats: int) -> float:
    return statistics.median(timeit.repeat(f, number=calls, repeat=repeats)) / calls * 1e6


def calls_part(patients: int, calls: int, repeats: int) -> None:
    from scipy.stats import bootstrap
    from sklearn.calibration import calibration_curve
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score
    from sklearn.metrics import roc_curve as sklearn_roc_curve

    from fedpath.common.metrics import auroc, balanced_accuracy, bootstrap_ci, reliability_curve, roc_curve

    rng = np.random.default_rng(0)
    y2 = rng.integers(0, 2, patients)
    s = np.round(rng.random(patients) + 0.3 * y2, 2)
    p2 = np.stack([1 - s, s], axis=1)
    y3 = rng.integers(0, 3, patients)
    logits = rng.normal(size=(patients, 3)) + np.eye(3)[y3]
    p3 = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    correct3 = (p3.argmax(axis=1) == y3).astype(np.float64)
    pairs: list[tuple[str, Callable[[], object], Callable[[], object]]] = [
        ("AUROC, binary", lambda: auroc(y2, p2), lambda: roc_auc_score(y2, p2[:, 1])),
        (
            "AUROC, 3 classes",
            lambda: auroc(y3, p3),
            lambda: roc_auc_score(y3, p3, multi_class="ovr", average="macro"),
        ),
        (
            "balanced accuracy, 3 cl.",
            lambda: balanced_accuracy(y3, p3),
            lambda: balanced_accuracy_score(y3, p3.argmax(axis=1)),
        ),
        (
            "reliability curve",
            lambda: reliability_curve(y3, p3),
            lambda: calibration_curve(correct3, p3.max(axis=1), n_bins=10),
        ),
        (
            "ROC curve (both sklearn)",
            lambda: roc_curve(y2, p2),
            lambda: sklearn_roc_curve(y2, p2[:, 1], drop_intermediate=False),
        ),
    ]
    print(f"per call on {patients} patients (µs)      ours    library   library ÷ ours")
    for name, ours, library in pairs:
        t_ours, t_lib = per_call_us(ours, calls, repeats), per_call_us(library, calls, repeats)
        print(f"  {name:34s} {t_ours:8.1f}  {t_lib:9.1f}   {t_lib / t_ours:6.1f}")

    def scipy_bootstrap() -> object:
        return bootstrap(
            (y2, s),
            auroc,
            paired=True,
            vectorized=False,
            method="percentile",
            n_resamples=1000,
            random_state=np.random.default_rng(0),
        )

    t_ours = min(timeit.repeat(lambda: bootstrap_ci(auroc, y2, s, n_boot=1000), number=1, repeat=repeats))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t_lib = min(timeit.repeat(scipy_bootstrap, number=1, repeat=repeats))
    print(
        f"  {'bootstrap, 1000 resamples (ms)':34s} {t_ours * 1e3:8.1f}  {t_lib * 1e3:9.1f}   {t_lib / t_ours:6.2f}"
    )


def import_part(runs: int) -> None:
    cases = {
        "fedpath.client.training": "import fedpath.client.training",
        "  + sklearn.metrics": "import fedpath.client.training; import sklearn.metrics",
    }
    subprocess.run([sys.executable, "-c", cases["  + sklearn.metrics"]], check=True)  # warm the file cache
    seconds: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(runs):
        for name, code in cases.items():
            start = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], check=True)
            seconds[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(v) for name, v in seconds.items()}
    print(f"fresh interpreter, median of {runs} (s)")
    for name, v in seconds.items():
        print(f"  {name:34s} {medians[name]:6.3f}   ({', '.join(f'{x:.2f}' for x in v)})")
    print(
        f"  sklearn.metrics adds {medians['  + sklearn.metrics'] - medians['fedpath.client.training']:.3f} s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--patients", type=int, default=100, help="patients in the test set")
    parser.add_argument("--calls", type=int, default=500, help="calls per timing")
    parser.add_argument("--repeats", type=int, default=5, help="timings per metric (median)")
    parser.add_argument("--imports", type=int, default=5, help="fresh interpreters per import case")
    args = parser.parse_args()
    calls_part(args.patients, args.calls, args.repeats)
    import_part(args.imports)


if __name__ == "__main__":
    main()
