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
TRAINING_HEADER = [
    "protocol",
    "method",
    "test_site",
    "seed",
    "train_patients",
    "train_classes",
    "val_patients",
]


def _validation_rows(
    signals: dict[str, tuple[float, float] | None], protocols: tuple[str, ...], n: int = 10
) -> list[list[str]]:
    """validation.csv: each cell's model on n validation patients of its training sites, scored with the
    same signal as its test patients (other noise)."""
    rng = np.random.default_rng(1)
    rows = []
    for protocol in protocols:
        for method, signal in signals.items():
            eps = re.search(r"eps=(\d+)", method)
            for site in SITES:
                for seed in SEEDS:
                    labels = _labels(n)
                    strength = None if signal is None else signal[0 if protocol == "loso" else 1]
                    epsilon = eps.group(1) if eps else ""
                    for i, (y, s) in enumerate(zip(labels, _scores(labels, strength, rng), strict=True)):
                        patient = f"val-{site}-{seed}-{i}"
                        rows.append([protocol, method, site, str(seed), patient, str(y), f"{s:.6f}", epsilon])
    return rows


def _training_rows(
    signals: dict[str, tuple[float, float] | None], protocols: tuple[str, ...], patients: int = 30
) -> list[list[str]]:
    """training.csv: every cell trained on `patients` patients of both classes, 10 validation patients."""
    return [
        [protocol, method, site, str(seed), str(patients), "2", "10"]
        for protocol in protocols
        for method in signals
        for site in SITES
        for seed in SEEDS
    ]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory) -> ReportPaths:
    run = tmp_path_factory.mktemp("run")
    write_csv(run / "predictions.csv", HEADER, _prediction_rows(SIGNAL, ("loso", "internal")))
    write_csv(run / "validation.csv", HEADER, _validation_rows(SIGNAL, ("loso", "internal")))
    write_csv(run / "training.csv", TRAINING_HEADER, _training_rows(SIGNAL, ("loso", "internal")))
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
    # three classes have no positive one: no count of 'positive' patients anywhere in the tables or findings
    assert "| Patients |" in text and "positive)" not in text and " positive;" not in text
    # a binary task names its second class from settings.json
    binary = tmp_path / "binary"
    binary.mkdir()
    rows2 = [
        ["internal", "fedavg", "site-A", "0", f"p{i}", str(i % 2), f"{0.2 + 0.6 * (i % 2):.2f}"]
        for i in range(30)
    ]
    write_csv(binary / "predictions.csv", [*header[:6], "score"], rows2)
    (binary / "settings.json").write_text(json.dumps({"classes": ["benign", "tumour"]}))
    named = write_report(binary, n_boot=N_BOOT).markdown.read_text()
    assert "Patients (tumour)" in named and "30 patients, 15 tumour" in named and "positive)" not in named


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


# --- what the report refuses to claim: methods that did not learn, small hospitals, uneven means ------------


def _cell(
    protocol: str, method: str, site: str, seed: int, labels: np.ndarray, scores: np.ndarray, who: str = "p"
) -> list[list[str]]:
    """predictions.csv (or validation.csv) rows of one cell, binary, no ε column."""
    return [
        [protocol, method, site, str(seed), f"{site}-{who}{i}", str(y), f"{s:.6f}"]
        for i, (y, s) in enumerate(zip(labels, scores, strict=True))
    ]


def _findings(text: str) -> list[str]:
    section = text.split("## Findings", 1)[1].split("\n## ", 1)[0]
    bullets = section.split("\n\nLeft out of these findings", 1)[0]
    return [line[2:] for line in bullets.splitlines() if line.startswith("- ")]


def test_method_with_training_loss_at_chance_is_marked_and_not_named_by_any_finding(tmp_path: Path) -> None:
    from fedpath.simulation.compare import comparison_lines, format_headline, headline

    # fedavg's test scores are the best of the run, but its training loss never left ln 2 ≈ 0.693
    signals: dict[str, tuple[float, float] | None] = {
        "pooled": (1.0, 1.0),
        "fedavg": (3.0, 3.0),
        "fedprox(mu=0.01)": (1.5, 1.5),
    }
    write_csv(
        tmp_path / "predictions.csv", HEADER[:-1], [r[:-1] for r in _prediction_rows(signals, ("loso",))]
    )
    rounds = [
        ["loso", method, site, str(seed), str(r), metric, f"{value:.4f}"]
        for method, losses in (("fedavg", (0.70,) * 5), ("fedprox(mu=0.01)", (0.69, 0.6, 0.5, 0.4, 0.3)))
        for site in SITES
        for seed in SEEDS
        for r, loss in enumerate(losses, start=1)
        for metric, value in (("train_loss", loss), ("val_auroc", 0.9))
    ]
    write_csv(
        tmp_path / "rounds.csv",
        ["protocol", "method", "test_site", "seed", "round", "metric", "value"],
        rounds,
    )
    paths = write_report(tmp_path, n_boot=N_BOOT)
    assert paths.analysis is not None
    verdict = paths.analysis.verdicts[("loso", "fedavg")]
    assert verdict.status == "did not learn" and "training loss stayed at chance" in verdict.why
    assert paths.analysis.verdicts[("loso", "fedprox(mu=0.01)")].status == "learned"
    text = paths.markdown.read_text()
    findings = _findings(text)
    assert findings and not any("fedavg" in f for f in findings), findings
    assert next(f for f in findings if not f.startswith("⚠")).startswith("fedprox(mu=0.01) reached AUROC")
    assert "✗ fedavg (unseen hospitals (LOSO)): did not learn: training loss stayed at chance" in text
    assert "| fedavg | federated | ✗ did not learn |" in text
    assert {r["verdict"] for r in _results(paths) if r["method"] == "fedavg"} == {"did not learn"}
    # the printed table: marked, listed after the methods that learned, and compared with nothing
    table = headline(paths.results, "loso")
    methods = [r.label for r in table if r.role == "method"]
    assert methods[-1] == "fedavg" and table.rows[methods.index("fedavg")].excluded
    assert "fedavg ✗" in format_headline(table, "loso")
    lines = comparison_lines(table)
    assert lines and all(line.startswith("fedprox(mu=0.01) − ") for line in lines)


def test_inverted_method_is_left_out_of_findings(tmp_path: Path) -> None:
    signals: dict[str, tuple[float, float] | None] = {
        "pooled": (1.0, 1.0),
        "fedavg": (-3.0, -3.0),  # ranks the classes the wrong way round: the only federation
        "local:site-B": (2.0, 2.0),
    }
    write_csv(
        tmp_path / "predictions.csv", HEADER[:-1], [r[:-1] for r in _prediction_rows(signals, ("loso",))]
    )
    paths = write_report(tmp_path, n_boot=N_BOOT)
    assert paths.analysis is not None and paths.analysis.verdicts[("loso", "fedavg")].status == "inverted"
    text = paths.markdown.read_text()
    findings = _findings(text)
    assert not any("fedavg" in f for f in findings), findings
    assert findings[0].startswith("pooled reached AUROC") or any(
        f.startswith("pooled reached") for f in findings
    )
    assert (
        "Federated training did worse" not in text
    )  # a federation that is inverted is no federation to judge
    assert "✗ fedavg (unseen hospitals (LOSO)): inverted" in text
    assert "| fedavg | federated | ✗ inverted |" in text


def _loso_cells(
    test_signal: dict[str, float],
    sites: dict[str, int],
    rng: np.random.Generator,
    labels_at: dict[str, np.ndarray] | None = None,
) -> list[list[str]]:
    """LOSO predictions: local:X at every site but X, other methods at every site, seeds 0 and 1."""
    rows = []
    for method, signal in test_signal.items():
        for site, n in sites.items():
            if method == f"local:{site}":
                continue
            for seed in (0, 1):
                labels = labels_at[site] if labels_at and site in labels_at else _labels(n)
                rows += _cell("loso", method, site, seed, labels, _scores(labels, signal, rng))
    return rows


def test_one_class_or_five_patient_hospital_is_never_the_best_hospital(tmp_path: Path) -> None:
    from fedpath.simulation.compare import format_headline, headline

    rng = np.random.default_rng(3)
    sites = {"site-A": 30, "site-B": 30, "site-C": 30, "site-D": 30}
    test_signal = {"local:site-A": 4.0, "local:site-B": 4.0, "local:site-C": 0.5, "local:site-D": 1.0}
    write_csv(
        tmp_path / "predictions.csv", HEADER[:-1], _loso_cells({**test_signal, "fedavg": 1.5}, sites, rng)
    )
    # on validation A, B and C are perfect, D good: C wins, though D is better at test and A, B at both
    val_signal: dict[str, float | None] = {
        "local:site-A": None, "local:site-B": None, "local:site-C": None, "local:site-D": 1.0, "fedavg": 1.5,
    }  # fmt: skip
    validation = []
    for method, signal in val_signal.items():
        for site in sites:
            if method != f"local:{site}":
                for seed in (0, 1):
                    labels = _labels(20)
                    validation += _cell("loso", method, site, seed, labels, _scores(labels, signal, rng), "v")
    write_csv(tmp_path / "validation.csv", HEADER[:-1], validation)
    facts = {
        "local:site-A": (30, 1),
        "local:site-B": (5, 2),
        "local:site-C": (30, 2),
        "local:site-D": (30, 2),
    }
    training = [
        ["loso", method, site, str(seed), str(n), str(k), "6"]
        for method, (n, k) in facts.items()
        for site in sites
        for seed in (0, 1)
        if method != f"local:{site}"
    ]
    write_csv(tmp_path / "training.csv", TRAINING_HEADER, training)
    paths = write_report(tmp_path, n_boot=N_BOOT)
    assert paths.analysis is not None
    table = paths.analysis.comparisons["loso"]
    assert table.best_hospital == "local:site-C"
    notes = " ".join(table.notes)
    assert "local:site-A (only 1 class among its training patients)" in notes
    assert "local:site-B (5 training patients (< 10))" in notes
    results = _results(paths)
    assert {r["hospital_eligible"] for r in results if r["method"] == "local:site-A"} == {
        "no: only 1 class among its training patients"
    }
    text = paths.markdown.read_text()
    assert "The best single hospital alone (local:site-C)" in text
    assert "| local:site-B | 5 | 2 | 1.00 (20 patients) | no: 5 training patients (< 10) |" in text
    # the oracle picks among the eligible hospitals only: at site-B, C or D, never A
    oracle = table.row("oracle")
    assert oracle is not None
    at_b = {m: table.hospitals[i].row.at("site-B") for i, m in enumerate(test_signal)}
    assert oracle.at("site-B") == pytest.approx(max(at_b["local:site-C"], at_b["local:site-D"]), abs=1e-5)
    assert oracle.at("site-B") < at_b["local:site-A"]
    printed = format_headline(headline(paths.results, "loso"), "loso")
    assert "local, best hospital (site-C)" in printed and "(site-A)" not in printed


def test_every_mean_of_a_table_is_over_the_same_sites(tmp_path: Path) -> None:
    from fedpath.simulation.compare import headline

    rng = np.random.default_rng(4)
    sites = {"site-A": 30, "site-B": 30, "site-C": 12}
    one_class = {"site-C": np.zeros(12, dtype=int)}  # no AUROC at site-C; balanced accuracy and ECE exist
    methods = {"fedavg": 1.5, "pooled": 1.0, "local:site-A": 1.0, "local:site-B": 0.8}
    write_csv(tmp_path / "predictions.csv", HEADER[:-1], _loso_cells(methods, sites, rng, one_class))
    write_csv(
        tmp_path / "validation.csv",
        HEADER[:-1],
        _loso_cells(methods, {"site-A": 20, "site-B": 20, "site-C": 20}, rng),
    )
    paths = write_report(tmp_path, n_boot=N_BOOT)
    assert paths.analysis is not None
    table = paths.analysis.comparisons["loso"]
    assert table.sites == ("site-A", "site-B") and "one class" in table.left_out["site-C"]
    results = _results(paths)

    def site_mean(method: str, metric: str, site: str) -> float:
        return float(
            np.mean([float(r[metric]) for r in results if (r["method"], r["test_site"]) == (method, site)])
        )

    fedavg = next(r for r in table if r.method == "fedavg")
    for metric in ("auroc", "balanced_accuracy", "ece", "sensitivity", "specificity", "accuracy"):
        over_ab = np.mean([site_mean("fedavg", metric, s) for s in ("site-A", "site-B")])
        assert fedavg.mean_of(metric) == pytest.approx(over_ab, abs=1e-5), metric
    over_all = np.mean([site_mean("fedavg", "balanced_accuracy", s) for s in sites])
    assert fedavg.mean_of("balanced_accuracy") != pytest.approx(over_all, abs=1e-3)  # site-C would move it
    assert all(r.sites == ("site-A", "site-B") for r in table if r.role in ("method", "mean of hospitals"))
    best = table.row("best hospital")
    assert best is not None and best.sites == tuple(s for s in ("site-A", "site-B") if s not in best.method)
    text = paths.markdown.read_text()
    fed_line = next(line for line in text.splitlines() if line.startswith("| fedavg |"))
    assert f"| {fedavg.mean_of('balanced_accuracy'):.2f} |" in fed_line and "| 2 × 2 |" in fed_line
    assert "site-C left out (AUROC undefined for" in text
    # the findings quote the same means as the table
    assert f"fedavg reached AUROC {fedavg.mean:.2f}" in text
    # and the printed table, read back from results.csv, is the same table
    printed = headline(paths.results, "loso")
    assert [(r.label, round(r.mean, 4), r.sites) for r in printed] == [
        (r.label, round(r.mean, 4), r.sites) for r in table
    ]


def test_threshold_chosen_on_validation_sets_sensitivity_and_specificity(tmp_path: Path) -> None:
    from fedpath.simulation.verdicts import operating_point, youden_threshold

    labels = np.array([1, 1, 1, 1, 0, 0, 0, 0])
    test = np.array([0.62, 0.68, 0.75, 0.9, 0.2, 0.4, 0.55, 0.66])
    # validation patients that separate at 0.65, at 0.725, and one-class ones (fall back to 0.5)
    cases = [
        (labels, np.array([0.7, 0.8, 0.9, 0.95, 0.1, 0.2, 0.3, 0.6]), 0.65, (0.75, 0.75, 0.75)),
        (labels, np.array([0.75, 0.8, 0.9, 0.95, 0.1, 0.3, 0.6, 0.7]), 0.725, (0.5, 1.0, 0.75)),
        (np.zeros(8, dtype=int), np.linspace(0.1, 0.8, 8), 0.5, (1.0, 0.5, 0.75)),
    ]
    for val_labels, val_scores, threshold, expected in cases:
        chosen, _ = youden_threshold(val_labels, val_scores)
        assert chosen == pytest.approx(threshold)
        assert operating_point(labels, test, chosen) == pytest.approx(expected)
        write_csv(
            tmp_path / "predictions.csv", HEADER[:-1], _cell("loso", "fedavg", "site-A", 0, labels, test)
        )
        write_csv(
            tmp_path / "validation.csv",
            HEADER[:-1],
            _cell("loso", "fedavg", "site-A", 0, val_labels, val_scores, "v"),
        )
        (row,) = _results(write_report(tmp_path, n_boot=N_BOOT))
        assert float(row["threshold"]) == pytest.approx(threshold)
        got = (float(row["sensitivity"]), float(row["specificity"]), float(row["accuracy"]))
        assert got == pytest.approx(expected)
    assert "one class" in row["threshold_from"]  # the last case says why its threshold is 0.5
    (
        tmp_path / "validation.csv"
    ).unlink()  # an older run: the report still renders, without an operating point
    paths = write_report(tmp_path, n_boot=N_BOOT)
    (row,) = _results(paths)
    assert row["sensitivity"] in ("", "nan") and row["threshold_from"].startswith("not available")
    assert "No validation.csv" in paths.markdown.read_text()


@pytest.mark.parametrize("protocol", ["internal", "cv"])
def test_internal_and_cv_headlines_never_speak_of_unseen_sites(tmp_path: Path, protocol: str) -> None:
    from fedpath.simulation.compare import comparison_lines, format_headline, headline

    rng = np.random.default_rng(5)
    sites = ["site-A", "site-B", "site-C"] if protocol == "internal" else ["fold-01", "fold-02", "fold-03"]
    rows, validation = [], []
    for method, signal in {
        "fedavg": 2.0,
        "pooled": 2.0,
        "local:A": 1.0,
        "local:B": 1.2,
        "local:C": 0.9,
    }.items():
        for i, site in enumerate(sites):
            if protocol == "internal" and method.startswith("local") and method[-1] != "ABC"[i]:
                continue  # internal: one hospital model per site, on its own test patients; cv: every fold
            for seed in (0, 1):
                labels = _labels(30)
                rows += _cell(protocol, method, site, seed, labels, _scores(labels, signal, rng))
                validation += _cell(protocol, method, site, seed, labels, _scores(labels, signal, rng), "v")
    write_csv(tmp_path / "predictions.csv", HEADER[:-1], rows)
    write_csv(tmp_path / "validation.csv", HEADER[:-1], validation)
    paths = write_report(tmp_path, n_boot=N_BOOT)
    table = headline(paths.results, protocol)
    # the oracle is dropped exactly where it would repeat the mean of hospitals: one hospital model per site
    assert table.row("mean of hospitals") is not None
    assert (table.row("oracle") is None) == (protocol == "internal")
    assert any("No 'best at each site (oracle)' row" in note for note in table.notes) == (
        protocol == "internal"
    )
    lines = comparison_lines(table)
    assert lines and not any("did not train on" in line for line in lines)
    assert any("at its own site's test patients" in line for line in lines) == (protocol == "internal")
    assert "held-out" not in format_headline(table, protocol).splitlines()[0]
    text = paths.markdown.read_text()
    headline_section = text.split("## Headline", 1)[1].split("\n## ", 1)[0]
    findings = _findings(text)
    assert not any("never trained on" in f or "did not train on" in f for f in [*findings, headline_section])
    assert any("on new patients of the hospitals it trained with" in f for f in findings)


def test_a_mu_grid_is_decided_on_validation_not_on_the_test_patients(tmp_path: Path) -> None:
    from fedpath.simulation.compare import comparison_lines, headline

    rng = np.random.default_rng(4)
    sites = {"site-A": 30, "site-B": 30, "site-C": 30}
    # μ = 0.1 ranks the test patients better; μ = 0.01 fits its validation patients better (lower loss)
    test_signal = {"fedprox(mu=0.01)": 1.0, "fedprox(mu=0.1)": 3.0, "pooled": 3.0}
    val_signal = {"fedprox(mu=0.01)": 4.0, "fedprox(mu=0.1)": 0.8, "pooled": 3.0}
    write_csv(tmp_path / "predictions.csv", HEADER[:-1], _loso_cells(test_signal, sites, rng))
    validation = []
    for method, signal in val_signal.items():
        for site in sites:
            for seed in (0, 1):
                labels = _labels(20)
                validation += _cell("loso", method, site, seed, labels, _scores(labels, signal, rng), "v")
    write_csv(tmp_path / "validation.csv", HEADER[:-1], validation)
    paths = write_report(tmp_path, n_boot=N_BOOT)
    assert paths.analysis is not None
    table = paths.analysis.comparisons["loso"]
    rows = {r.method: r for r in table.rows}
    tuned, better_at_test = rows["fedprox(mu=0.01)"], rows["fedprox(mu=0.1)"]
    assert better_at_test.mean > tuned.mean and tuned.validation_loss < better_at_test.validation_loss
    assert table.best(["fedprox(mu=0.01)", "fedprox(mu=0.1)"]) is tuned
    lines = comparison_lines(headline(paths.results, "loso"))
    assert lines and all(line.startswith("fedprox(mu=0.01)") for line in lines), lines
    pooled_line = next(line for line in lines if "− pooled:" in line)
    assert "upper reference" not in pooled_line  # the federation is below pooled here: nothing to caution


def test_a_federation_above_pooled_is_printed_with_its_caution(tmp_path: Path) -> None:
    from fedpath.simulation.compare import comparison_lines, headline

    rng = np.random.default_rng(6)
    sites = {"site-A": 30, "site-B": 30, "site-C": 30}
    write_csv(
        tmp_path / "predictions.csv",
        HEADER[:-1],
        _loso_cells({"fedprox(mu=0.01)": 3.0, "pooled": 1.0}, sites, rng),
    )
    paths = write_report(tmp_path, n_boot=N_BOOT)
    pooled_line = next(line for line in comparison_lines(headline(paths.results, "loso")) if "pooled" in line)
    assert pooled_line.startswith("fedprox(mu=0.01) − pooled: +")
    assert "upper reference: above it, read the report's caution" in pooled_line


def test_calibration_table_counts_coverage_abstention_and_accuracy(tmp_path: Path) -> None:
    from fedpath.simulation.report import CalibrationRow, load_calibration, write_calibration

    # four patients, T = 1, threshold 0.55: a class is in the set when its probability is at least 0.45
    cases = [("a", 1, 0.9), ("b", 0, 0.2), ("c", 1, 0.5), ("d", 0, 0.7)]
    rows = [PredictionRow("loso", "pooled", "site-A", 0, pid, y, (1 - s, s), None) for pid, y, s in cases]
    calibration = [CalibrationRow("loso", "pooled", "site-A", 0, 1.0, 0.55, 0.9, "fitted on the validation")]
    write_calibration(tmp_path / "calibration.csv", calibration)
    assert load_calibration(tmp_path / "calibration.csv") == calibration
    result = analyse(rows, calibration=calibration, n_boot=N_BOOT).calibration[("loso", "pooled", "site-A")]
    # a {1} right, b {0} right, c {0, 1} (abstains, covered), d {1} wrong (label 0: not covered)
    assert result.coverage == pytest.approx(0.75) and result.abstained == pytest.approx(0.25)
    assert result.accuracy_kept == pytest.approx(2 / 3) and result.target == 0.9
    assert result.ece_before == pytest.approx(result.ece_after)  # T = 1 changes nothing
    assert result.patients == 4 and result.seeds == 1
    write_predictions(tmp_path / "predictions.csv", rows)
    report = write_report(tmp_path, n_boot=N_BOOT).markdown.read_text()
    assert "Calibration and abstention at each test site" in report
    assert "| unseen hospitals (LOSO) | pooled | site-A | " in report and "| 75 % (-15) | 25 % |" in report
    # the leading method's sets cover 75 % against 90 %: a warning among the findings says so
    assert "pooled's 90 % prediction sets held the right class for only 75 %" in report
    wide = [CalibrationRow("loso", "pooled", "site-A", 0, 1.0, 1.0, 0.9, "x")]  # every class always: 100 %
    write_calibration(tmp_path / "calibration.csv", wide)
    assert "prediction sets held" not in write_report(tmp_path, n_boot=N_BOOT).markdown.read_text()
    # a temperature that softens moves ECE: the table shows before and after
    hot = [CalibrationRow("loso", "pooled", "site-A", 0, 3.0, 0.55, 0.9, "x")]
    softened = analyse(rows, calibration=hot, n_boot=N_BOOT).calibration[("loso", "pooled", "site-A")]
    assert softened.ece_after != pytest.approx(softened.ece_before)
    assert "| — |" in report  # two patients per half: too few to refit at 90 %
    bad = tmp_path / "bad.csv"
    bad.write_text(
        "protocol,method,test_site,seed,temperature,threshold,coverage,source\nloso,pooled,site-A,0,-1,0.5,0.9,x\n"
    )
    with pytest.raises(ReportError, match="line 2"):
        load_calibration(bad)


def test_the_calibration_table_shows_sets_refitted_on_half_of_the_test_site(tmp_path: Path) -> None:
    """A threshold fitted elsewhere that covers few of a site's patients; refitted on random halves of the site's
    own patients (as `predict --recalibrate` would), the other halves are covered at about the target."""
    from fedpath.simulation.report import CalibrationRow, write_calibration

    rng = np.random.default_rng(4)
    labels = rng.integers(0, 2, 60)
    scores = np.clip(0.5 + 0.25 * (2 * labels - 1) + rng.normal(0, 0.3, 60), 0.01, 0.99)
    rows = [
        PredictionRow("loso", "pooled", "site-A", 0, f"p{i}", int(y), (1 - q, q), None)
        for i, (y, q) in enumerate(zip(labels, scores, strict=True))
    ]
    calibration = [CalibrationRow("loso", "pooled", "site-A", 0, 1.0, 0.05, 0.9, "fitted elsewhere")]
    result = analyse(rows, calibration=calibration, n_boot=N_BOOT).calibration[("loso", "pooled", "site-A")]
    assert result.coverage < 0.5  # the sets of the threshold fitted elsewhere: mostly empty
    assert result.local_patients == 30
    assert 0.85 <= result.local_coverage <= 0.97, result.local_coverage
    assert 0 <= result.local_abstained <= 1
    write_calibration(tmp_path / "calibration.csv", calibration)
    write_predictions(tmp_path / "predictions.csv", rows)
    report = write_report(tmp_path, n_boot=N_BOOT).markdown.read_text()
    assert (
        f"{100 * result.local_coverage:.0f} %, abstained {100 * result.local_abstained:.0f} % (30 patients)"
        in report
    )
    assert "Refitted on half of each such hospital's own labelled patients" in report
