"""The comparison report: results.csv rows, the findings a reader sees, graceful gaps, and that the HTML
renders in a real browser (headless Chromium)."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from fedpath.simulation.report import (
    RESULT_COLUMNS,
    PredictionRow,
    ReportError,
    ReportPaths,
    analyse,
    load_predictions,
    write_predictions,
    write_report,
)
from tests.helpers import run_cli, write_csv

SITES = {"site-A": 40, "site-B": 30, "site-C": 12}  # site-C is too small to trust
SEEDS = (0, 1, 2)
# method → how strongly its score separates the classes, (loso, internal); None = perfect scores
SIGNAL: dict[str, tuple[float, float] | None] = {
    "pooled": None,
    "local:site-A": (0.4, 1.0),
    "fedprox(mu=0.01)": (0.8, 3.0),
    "fedprox-dp(eps=1)": (0.1, 0.3),
    "fedprox-dp(eps=8)": (0.6, 2.0),
}
N_BOOT = 100  # enough to exercise the CIs, cheap on a busy machine


def _labels(n: int) -> np.ndarray:
    return (np.arange(n) % 5 < 2).astype(int)  # 40% positive


def _scores(labels: np.ndarray, signal: float | None, rng: np.random.Generator) -> np.ndarray:
    if signal is None:
        return np.where(labels == 1, 0.9, 0.1)
    logits = signal * (2 * labels - 1) + rng.normal(size=len(labels))
    return 1 / (1 + np.exp(-logits))


def _prediction_rows(
    signals: dict[str, tuple[float, float] | None], protocols: tuple[str, ...]
) -> list[list[str]]:
    rng = np.random.default_rng(0)
    rows = []
    for protocol in protocols:
        for method, signal in signals.items():
            eps = re.search(r"eps=(\d+)", method)
            for site, n in SITES.items():
                for seed in SEEDS:
                    labels = _labels(n)
                    strength = None if signal is None else signal[0 if protocol == "loso" else 1]
                    for i, (y, s) in enumerate(zip(labels, _scores(labels, strength, rng), strict=True)):
                        epsilon = eps.group(1) if eps else ""
                        rows.append(
                            [protocol, method, site, str(seed), f"{site}-p{i}", str(y), f"{s:.6f}", epsilon]
                        )
    return rows


HEADER = ["protocol", "method", "test_site", "seed", "patient_id", "label", "score", "epsilon"]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory) -> ReportPaths:
    run = tmp_path_factory.mktemp("run")
    write_csv(run / "predictions.csv", HEADER, _prediction_rows(SIGNAL, ("loso", "internal")))
    rounds = [
        ["loso", "fedprox(mu=0.01)", site, str(seed), str(r), metric, f"{value:.4f}"]
        for site in SITES
        for seed in SEEDS
        for r in range(1, 6)
        for metric, value in (("val_auroc", 0.5 + 0.08 * r), ("train_loss", 1.0 / r))
    ]
    write_csv(
        run / "rounds.csv", ["protocol", "method", "test_site", "seed", "round", "metric", "value"], rounds
    )
    settings = {"cohort": "synthetic", "seeds": list(SEEDS), "mu_grid": [0.01], "epsilon_grid": [1, 8]}
    (run / "settings.json").write_text(json.dumps({**settings, "training": {"rounds": 5, "local_epochs": 2}}))
    return write_report(run, n_boot=N_BOOT)


def _results(paths: ReportPaths) -> list[dict[str, str]]:
    with paths.results.open(newline="") as f:
        return list(csv.DictReader(f))


def test_results_csv_has_one_row_per_protocol_method_site_seed(full_run: ReportPaths) -> None:
    rows = _results(full_run)
    assert tuple(rows[0]) == RESULT_COLUMNS
    keys = {(r["protocol"], r["method"], r["test_site"], r["seed"]) for r in rows}
    assert len(rows) == len(keys) == 2 * len(SIGNAL) * len(SITES) * len(SEEDS)
    pooled = [r for r in rows if r["method"] == "pooled"]
    assert all(float(r["auroc"]) == 1.0 and float(r["balanced_accuracy"]) == 1.0 for r in pooled)
    site_a = next(r for r in rows if r["test_site"] == "site-A")
    assert (int(site_a["patients"]), int(site_a["positives"])) == (40, 16)
    assert float(site_a["auroc_low"]) <= float(site_a["auroc"]) <= float(site_a["auroc_high"])
    small = [r for r in rows if r["test_site"] == "site-C"]
    assert small and all("only 12 patients" in r["warning"] for r in small)
    assert all(r["warning"] == "" for r in rows if r["test_site"] != "site-C")
    assert {r["epsilon"] for r in rows if "-dp" in r["method"]} == {"1", "8"}
    assert {r["epsilon"] for r in rows if "-dp" not in r["method"]} == {""}


def test_gap_and_privacy_utility_follow_the_data(full_run: ReportPaths) -> None:
    rows = _results(full_run)

    def mean_auroc(protocol: str, method: str) -> float:
        return float(
            np.mean([float(r["auroc"]) for r in rows if (r["protocol"], r["method"]) == (protocol, method)])
        )

    fedprox = "fedprox(mu=0.01)"
    gap = mean_auroc("internal", fedprox) - mean_auroc("loso", fedprox)
    assert gap > 0.1
    assert mean_auroc("loso", "fedprox-dp(eps=1)") < mean_auroc("loso", "fedprox-dp(eps=8)")
    text = full_run.markdown.read_text()
    section = text.split("## Generalization gap", 1)[1].split("\n## ", 1)[0]
    gap_row = next(line for line in section.splitlines() if line.startswith(f"| {fedprox} |"))
    assert gap_row.endswith(f"| {gap:+.2f} |")
    assert f"without DP, {fedprox} reached" in text


def test_report_leads_with_findings_and_flags_small_sites(full_run: ReportPaths) -> None:
    text = full_run.markdown.read_text()
    findings = text.split("## Findings", 1)[1].split("\n## ", 1)[0]
    assert "fedprox(mu=0.01) reached AUROC" in findings and "at hospitals it never trained on" in findings
    assert "The best single hospital alone (local:site-A)" in findings
    assert "did worse than one hospital" not in text
    assert "⚠ site-C: only 12 patients" in text
    assert "12 patients, 6 positive" in text  # the per-site header says what each column rests on
    assert text.index("## Headline") < text.index("## AUROC per site") < text.index("## Run settings")
    assert "| training.local_epochs | 2 |" in text
    assert "## Not in this run" not in text
    for plot in full_run.plots:
        assert plot.read_bytes().startswith(b"\x89PNG") and f"](plots/{plot.name})" in text
    assert {p.name for p in full_run.plots} >= {"convergence.png", "privacy_utility.png", "calibration.png"}


def test_federation_losing_to_one_hospital_is_the_first_finding(tmp_path: Path) -> None:
    # loso only, no DP, no rounds.csv, no settings.json: the report still renders and says what is missing
    signals: dict[str, tuple[float, float] | None] = {"local:site-B": (2.0, 2.0), "fedavg": (0.1, 0.1)}
    write_csv(
        tmp_path / "predictions.csv", HEADER[:-1], [r[:-1] for r in _prediction_rows(signals, ("loso",))]
    )
    paths = write_report(tmp_path, n_boot=N_BOOT)
    text = paths.markdown.read_text()
    first = text.split("## Findings", 1)[1].strip().splitlines()[0]
    assert (
        "Federated training did worse than one hospital training alone" in first and "Fed-Camelyon16" in first
    )
    for missing in (
        "No internal-validation results",
        "no privacy–utility curve",
        "No rounds.csv",
        "No settings.json",
    ):
        assert missing in text
    assert paths.html.exists() and len(_results(paths)) == 2 * len(SITES) * len(SEEDS)


def test_multiclass_and_single_seed_do_not_crash(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    rows = []
    for i in range(30):
        y = i % 3
        p = rng.dirichlet(np.ones(3)) * 0.5
        p[y] += 0.5
        rows.append(["internal", "fedavg", "site-A", "0", f"p{i}", str(y), *(f"{v:.6f}" for v in p)])
    header = ["protocol", "method", "test_site", "seed", "patient_id", "label", "prob_0", "prob_1", "prob_2"]
    write_csv(tmp_path / "predictions.csv", header, rows)
    paths = write_report(tmp_path, n_boot=N_BOOT)
    (result,) = _results(paths)
    assert float(result["auroc"]) > 0.8
    text = paths.markdown.read_text()
    assert "macro one-vs-rest" in text and "Only 1 training seed" in text
    assert "No leave-one-site-out (loso) results" in text


def test_slide_rows_are_averaged_per_patient(tmp_path: Path) -> None:
    rows = [
        PredictionRow("loso", "fedavg", "site-A", 0, pid, y, (1 - s, s), None)
        for pid, y, s in [("a", 1, 0.9), ("a", 1, 0.1), ("b", 0, 0.55), ("c", 1, 0.6)]
    ]
    write_predictions(tmp_path / "predictions.csv", rows)
    assert load_predictions(tmp_path / "predictions.csv") == rows
    (summary,) = analyse(rows, n_boot=N_BOOT).per_run.values()
    # patient a's mean 0.5 < b 0.55 < c 0.6; scored per slide (0.9, 0.1) it would be 2/3
    assert summary.patients == 3 and summary.auroc.value == 0.5


def test_malformed_inputs_name_file_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "predictions.csv"
    write_csv(path, HEADER[:5], [["loso", "fedavg", "site-A", "0", "p1"]])
    with pytest.raises(ReportError, match=r"predictions\.csv: missing column\(s\) label"):
        load_predictions(path)
    write_csv(
        path,
        HEADER,
        [["loso", "m", "A", "0", "p", "1", "0.5", ""], ["LOSO", "m", "A", "0", "q", "0", "0.2", ""]],
    )
    with pytest.raises(ReportError, match=r"line 3, column protocol: 'LOSO'"):
        load_predictions(path)
    write_csv(path, HEADER, [["loso", "m", "A", "0", "p", "1", "1.5", ""]])
    with pytest.raises(ReportError, match=r"line 2: scores \[1\.5\] must be probabilities"):
        load_predictions(path)
    with pytest.raises(ReportError, match="file not found"):
        write_report(tmp_path / "nowhere")


def _find_chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if found := shutil.which(name):
            return found
    pytest.fail(
        "NO CHROMIUM FOUND: the HTML report was NOT checked in a browser. Install Debian's package with "
        "`apt-get install -y chromium` (.ci/run does this when it is absent) and run the tests again.",
        pytrace=False,
    )


def test_html_renders_in_headless_chromium(full_run: ReportPaths, tmp_path: Path) -> None:
    page = full_run.html.read_text()
    assert not re.search(r"(src|href)=\"(?!data:)", page) and "<link" not in page  # self-contained
    images, table_rows = page.count("<img "), page.count("<tr>")
    assert images == len(full_run.plots) >= 5 and table_rows > 10
    browser = _find_chromium()
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=5000",
        "--dump-dom",
    ]
    done = subprocess.run(
        [browser, *flags, full_run.html.resolve().as_uri()], capture_output=True, text=True, timeout=60
    )
    body = re.search(r"<body[^>]*>", done.stdout)
    assert body, f"no DOM dumped (exit {done.returncode}): {done.stderr[-2000:]}"
    attrs = dict(re.findall(r'data-([a-z-]+)="(\d+)"', body.group(0)))
    assert attrs == {"images": str(images), "images-decoded": str(images), "table-rows": str(table_rows)}


def test_report_command(tmp_path: Path) -> None:
    rows = [
        ["loso", "fedavg", site, "0", f"{site}-p{i}", str(i % 2), f"{0.3 + 0.4 * (i % 2):.2f}", ""]
        for site in ("A", "B")
        for i in range(6)
    ]
    write_csv(tmp_path / "predictions.csv", HEADER, rows)
    done = run_cli("report", str(tmp_path), "--bootstrap", "20")
    assert done.returncode == 0, done.stderr
    assert str(tmp_path / "report.html") in done.stdout and (tmp_path / "results.csv").exists()
    failed = run_cli("report", str(tmp_path / "missing"))
    assert failed.returncode == 2 and "predictions.csv: file not found" in failed.stderr
    assert "Traceback" not in failed.stderr


def test_features_from_a_random_encoder_get_a_warning_before_the_findings(tmp_path: Path) -> None:
    from fedpath.common.features import FeatureMeta, write_features
    from fedpath.common.manifest import load_manifest
    from fedpath.simulation.compare import feature_provenance

    signals: dict[str, tuple[float, float] | None] = {"pooled": (2.0, 2.0), "fedavg": (1.0, 1.0)}
    write_csv(
        tmp_path / "predictions.csv", HEADER[:-1], [r[:-1] for r in _prediction_rows(signals, ("loso",))]
    )
    # what the cohort's feature files say: one of two made with random weights
    rows = []
    for i, random_init in enumerate((True, False)):
        meta = FeatureMeta(
            slide_id=f"s{i}", encoder="resnet18", weights_sha256="none", tile_size_px=224,
            tile_size_um=112.0, slide_mpp=0.5, random_init=random_init,
        )  # fmt: skip
        write_features(tmp_path / f"s{i}.h5", np.ones((3, 4), np.float32), np.zeros((3, 2), np.int64), meta)
        rows.append([f"s{i}", f"p{i}", str(i), f"site-{i}", f"s{i}.h5"])
    write_csv(tmp_path / "manifest.csv", ["slide_id", "patient_id", "label", "site", "features"], rows)
    features = feature_provenance(load_manifest(tmp_path / "manifest.csv"))
    assert features == {"files": 2, "random_init_files": 1, "encoders": "resnet18"}
    (tmp_path / "settings.json").write_text(json.dumps({"features": features}))
    text = write_report(tmp_path, n_boot=N_BOOT).markdown.read_text()
    warning = text.index("WARNING: 1 of 2 feature files were extracted with a randomly initialised encoder")
    assert warning < text.index("## Findings")
    (tmp_path / "settings.json").write_text(json.dumps({"features": {**features, "random_init_files": 0}}))
    assert "WARNING" not in write_report(tmp_path, n_boot=N_BOOT).markdown.read_text()


def test_pooled_losing_and_inverted_models_are_warnings_not_findings(tmp_path: Path) -> None:
    signals: dict[str, tuple[float, float] | None] = {
        "pooled": (0.3, 0.3),
        "fedprox(mu=0.01)": (2.0, 2.0),
        "local:site-B": (-3.0, -3.0),  # scores that rank the classes the wrong way round
    }
    write_csv(
        tmp_path / "predictions.csv", HEADER[:-1], [r[:-1] for r in _prediction_rows(signals, ("loso",))]
    )
    text = write_report(tmp_path, n_boot=N_BOOT).markdown.read_text()
    findings = text.split("## Findings", 1)[1].split("\n## ", 1)[0]
    assert "⚠ Pooled training" in findings and "not a finding that federation beats pooling" in findings
    assert "inverted: the whole AUROC CI lies below 0.5" in text
