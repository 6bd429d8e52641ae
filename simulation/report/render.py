"""The report: the blocks of report.md/report.html from an analysis, and the files written."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedpath.common.accounting import DEFAULT_DELTA_RULE
from fedpath.common.atomic import write_bytes_atomic, write_text_atomic
from fedpath.common.version import fedpath_version
from fedpath.simulation.headline import (
    METHOD,
    METRIC_NAMES,
    Comparison,
    natural_key,
)
from fedpath.simulation.verdicts import (
    HOSPITAL_RULE,
    LEARNED_RULE,
    NOT_CHECKED,
    THRESHOLD_RULE,
    Verdict,
)

if TYPE_CHECKING:
    pass
from fedpath.simulation.report.analysis import (
    LOCAL_SPLITS,
    Analysis,
    Summary,
    analyse,
    results_csv,
)
from fedpath.simulation.report.contract import (
    MIN_PATIENTS,
    PROTOCOL_LABELS,
    PROTOCOLS,
    SHORT_LABELS,
    load_calibration,
    load_predictions,
    load_rounds,
    load_settings,
    load_training,
)
from fedpath.simulation.report.document import (
    Block,
    Bullets,
    Heading,
    Paragraph,
    Plot,
    Table,
    render_html,
    render_markdown,
)
from fedpath.simulation.report.findings import (
    estimate_text,
    findings,
    left_out_of_findings,
    missing_parts,
)
from fedpath.simulation.report.plots import (
    method_colours,
    plot_auroc_by_site,
    plot_convergence,
    plot_privacy_utility,
    plot_reliability,
    plot_roc,
)


@dataclass(frozen=True)
class ReportPaths:
    """What `write_report` wrote, and the analysis behind it."""

    results: Path
    markdown: Path
    html: Path
    plots: tuple[Path, ...]
    analysis: Analysis | None = field(default=None, repr=False)  # what the report shows


# --- the report ---------------------------------------------------------------------------------------------


def _short(protocol: str) -> str:
    return {
        "loso": "unseen hospitals",
        "internal": "internal",
        "official": "official split",
        "cv": "cross-validation",
    }[protocol]


def _flag(s: Summary) -> str:
    return " ⚠" if s.warning else ""


def _with_ci(value: float, s: Summary | None) -> str:
    """A row's mean AUROC with its bootstrap CI (a summary over several hospitals has none)."""
    if not math.isfinite(value):
        return "undefined (one class only)"
    if s is None:
        return f"{value:.2f} (no CI: a summary over hospitals)"
    if not (math.isfinite(s.auroc.low) and math.isfinite(s.auroc.high)):
        return f"{value:.2f} (no CI: too few patients)"
    return f"{value:.2f} [{s.auroc.low:.2f}, {s.auroc.high:.2f}]"


def _learned_cell(verdict: Verdict) -> str:
    return verdict.mark or ("yes" if verdict.status != NOT_CHECKED else "not checked")


def _comparison_table(analysis: Analysis, table: Comparison) -> list[Block]:
    """The comparison of one protocol (`Comparison`, the rows `fedpath compare` prints), its single
    hospitals and what its reader must know."""
    protocol = table.protocol
    operating = [k for k in ("sensitivity", "specificity", "accuracy") if k in table.metrics]
    header = ["Method", "Type", "Learned?", "AUROC [95% CI]", "± across seeds (SD)", "Balanced accuracy"]
    header += [f"{METRIC_NAMES[k].capitalize()} at threshold" for k in operating]
    header += ["ECE", f"Patients ({analysis.positive})" if analysis.positive else "Patients", "Sites × seeds"]
    if table.pooled_test:
        header.insert(4, "AUROC, pooled test set (± seeds)")
    rows = []
    for row in table:
        s = analysis.overall.get((protocol, row.method)) if row.method else None
        sites = f"{len(row.sites)}" if row.sites == table.sites else f"{len(row.sites)} of {len(table.sites)}"
        cells = [
            row.label,
            analysis.kind(row.method) if row.method and row.role == METHOD else "single hospital",
            _learned_cell(row.verdict) if row.method else "—",
            _with_ci(row.mean, s) + (_flag(s) if s else ""),
            _number(row.seed_sd),
            _number(row.mean_of("balanced_accuracy")),
            *(_number(row.mean_of(k)) for k in operating),
            _number(row.mean_of("ece")),
            (f"{s.patients} ({s.positives})" if analysis.positive else f"{s.patients}") if s else "—",
            f"{sites} × {row.seeds}" + (f" ({row.note})" if row.note else ""),
        ]
        if table.pooled_test:
            mean, sd = table.pooled_test.get(row.method, (math.nan, math.nan))
            cells.insert(4, _number(mean) + (f" ± {sd:.2f}" if math.isfinite(sd) else ""))
        rows.append(tuple(cells))
    where = "held-out sites" if protocol == "loso" else "folds" if protocol == "cv" else "sites"
    blocks: list[Block] = [
        Paragraph(
            f"Every mean in this table is over the same {len(table.sites)} {where} "
            f"({', '.join(table.sites)}) and the seeds, except where 'Sites' says fewer."
        ),
        Table(tuple(header), tuple(rows)),
    ]
    if table.hospitals:
        hospital_rows = tuple(
            (
                h.method,
                "not known" if h.train_patients is None else str(h.train_patients),
                "not known" if h.train_classes is None else str(h.train_classes),
                f"{h.val_auroc:.2f} ({h.val_patients} patients)"
                if math.isfinite(h.val_auroc)
                else "not available",
                "yes"
                if h.ineligible == ""
                else "not checked"
                if h.ineligible is None
                else f"no: {h.ineligible}",
                _learned_cell(h.verdict),
                _number(h.row.mean),
                f"{len(h.row.sites)} of {len(table.sites)}",
                "chosen" if h.method == table.best_hospital else "",
            )
            for h in table.hospitals
        )
        blocks += [
            Paragraph("Single hospitals: which local model may be chosen as the best hospital, and on what."),
            Table(
                (
                    "Local model",
                    "Training patients",
                    "Classes",
                    "Validation AUROC (patients)",
                    "Eligible",
                    "Learned?",
                    "AUROC (test)",
                    "Sites",
                    "Best hospital",
                ),
                hospital_rows,
            ),
        ]
    if table.notes:
        blocks.append(Bullets(table.notes))
    return blocks


def _headline(analysis: Analysis) -> list[Block]:
    main = analysis.main_protocol
    blocks: list[Block] = [Heading(2, f"Headline: {PROTOCOL_LABELS[main]}")]
    blocks += _comparison_table(analysis, analysis.comparisons[main])
    for protocol in analysis.protocols:
        if protocol != main:
            blocks += [Heading(3, f"The same comparison: {PROTOCOL_LABELS[protocol]}")]
            blocks += _comparison_table(analysis, analysis.comparisons[protocol])
    explain = [
        "AUROC: how well the model ranks a positive patient above a negative one; 0.5 is a coin flip, "
        "1.0 is perfect. Here it is the mean over the table's sites and seeds; the 95% CI is the range that "
        "re-sampling the tested patients gives.",
        "± across seeds: the standard deviation between training runs that differ only in their random seed.",
        "Balanced accuracy: the mean of sensitivity and specificity at the model's most likely class.",
        "Sensitivity, specificity and accuracy at threshold: what a clinic would see using the model with one "
        "fixed decision threshold. " + THRESHOLD_RULE,
        "ECE (expected calibration error): how far the model's stated confidence is from how often it is "
        "right, 0 = its probabilities can be taken at face value.",
        "Patients (class): distinct patients the estimate rests on and, for a two-class task, how many of them "
        "hold its second class (named from settings.json; 'positive' when unnamed). A task of more classes has "
        "no positive class: its AUROC is the mean of each class against the rest.",
        "Learned? " + LEARNED_RULE,
        HOSPITAL_RULE
        + " 'Best at each site (oracle)' picks among them after seeing each site's test result: an upper "
        "bound no hospital could choose in advance. 'Mean of hospitals' averages every local model that "
        "learned, eligible or not: what a hospital alone gets.",
    ]
    return [*blocks, Paragraph("How to read these tables:"), Bullets(tuple(explain))]


def _number(value: float) -> str:
    return f"{value:.2f}" if math.isfinite(value) else "—"


def _per_site(analysis: Analysis, protocol: str, colours: Mapping[str, Any]) -> list[Block]:
    sites = analysis.sites(protocol)
    header = ["Method"] + [
        f"{t} ({analysis.site_patients(protocol, t)} patients"
        + (f", {analysis.site_positives(protocol, t)} {analysis.positive})" if analysis.positive else ")")
        for t in sites
    ]
    rows = []
    for m in analysis.methods:
        if (protocol, m) not in analysis.overall:
            continue
        cells = [m + (f" {analysis.verdicts[(protocol, m)].mark}" if analysis.excluded(protocol, m) else "")]
        for t in sites:
            s = analysis.per_site.get((protocol, m, t))
            cells.append("not tested" if s is None else estimate_text(s.auroc) + _flag(s))
        rows.append(tuple(cells))
    flagged = sorted(
        {
            (s.test_site, s.warning)
            for (p, _, _), s in analysis.per_site.items()
            if p == protocol and s.warning
        },
        key=lambda k: natural_key(k[0]),
    )
    where = {
        "loso": "held-out site (one column per site left out of training)",
        "internal": "test site",
        "official": "hospital's official test set",
        "cv": "fold",
    }[protocol]
    blocks: list[Block] = [
        Heading(3, PROTOCOL_LABELS[protocol].capitalize()),
        Paragraph(f"AUROC [95% CI] per {where}, mean over seeds."),
        Table(tuple(header), tuple(rows)),
    ]
    if flagged:
        blocks.append(
            Bullets(tuple(f"⚠ {site}: {why}; read as an anecdote, not evidence." for site, why in flagged))
        )
    blocks.append(
        Plot(
            f"auroc_by_site_{protocol}.png",
            plot_auroc_by_site(analysis, protocol, colours),
            f"AUROC per site and method, {PROTOCOL_LABELS[protocol]}; bars are 95% CIs.",
        )
    )
    return blocks


def _gap_section(analysis: Analysis) -> list[Block]:
    internal = analysis.internal_protocol or "internal"
    blocks: list[Block] = [Heading(2, f"Generalization gap: {SHORT_LABELS[internal]} vs unseen hospitals")]
    methods = [m for m in analysis.methods if analysis.gap(m) is not None]
    if not methods:
        return [
            *blocks,
            Paragraph(
                "Not computed: the run needs both loso and internal (or cv) results of a method that learned "
                "in both."
            ),
        ]
    rows = tuple(
        (
            m,
            estimate_text(analysis.overall[(internal, m)].auroc),
            estimate_text(analysis.overall[("loso", m)].auroc),
            f"{analysis.gap(m) or 0.0:+.2f}",
        )
        for m in methods
    )
    return [
        *blocks,
        Paragraph(
            f"Gap = mean {SHORT_LABELS[internal]} AUROC − mean AUROC at unseen hospitals (leave-one-site-out), "
            "in AUROC points; methods that did not learn are left out. FLamby's hospital-0 model scored 0.87 "
            "at home and 0.68 at the other hospital: a gap of "
            "0.19."
        ),
        Table(
            (
                "Method",
                f"{SHORT_LABELS[internal].capitalize()} AUROC [95% CI]",
                "Unseen hospitals AUROC [95% CI]",
                "Gap",
            ),
            rows,
        ),
    ]


def _privacy_section(analysis: Analysis, colours: Mapping[str, Any]) -> list[Block]:
    blocks: list[Block] = [Heading(2, "Privacy–utility")]
    if not any(s.epsilon is not None for s in analysis.overall.values()):
        return [*blocks, Paragraph("Not shown: no method in this run used differential privacy.")]
    rows = []
    for protocol in analysis.protocols:
        for name, points, reference in analysis.dp_curves(protocol):
            for s in [*points, *([reference] if reference else [])]:
                eps = "∞ (no DP)" if s.epsilon is None else f"{s.epsilon:g}"
                rows.append((_short(protocol), name, s.method, eps, estimate_text(s.auroc) + _flag(s)))
    return [
        *blocks,
        Paragraph(
            "Differential privacy bounds what the shared model reveals about any one patient; ε is the "
            "budget (smaller = stronger guarantee), at δ = "
            f"{DEFAULT_DELTA_RULE} unless the run set --dp-delta (δ: the chance that the guarantee fails "
            "outright, kept far below 1/patients). The ε = ∞ point is the same method without DP."
        ),
        Table(("Protocol", "DP method", "Run", "ε", "AUROC [95% CI]"), tuple(rows)),
        Plot(
            "privacy_utility.png",
            plot_privacy_utility(analysis, colours),
            "AUROC against ε; solid: unseen hospitals, dashed: internal validation, dotted: cross-validation.",
        ),
    ]


def _flatten(settings: Mapping[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    out = []
    for key, value in settings.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out += _flatten(value, f"{name}.")
        else:
            out.append((name, value if isinstance(value, str) else json.dumps(value)))
    return out


def _calibration_section(analysis: Analysis) -> list[Block]:
    """What each model's calibration (temperature, conformal sets) does at the sites it is tested at."""
    if not analysis.calibration:
        return [Paragraph("Calibration and abstention: not shown, the run folder has no calibration.csv.")]
    order = {m: i for i, m in enumerate(analysis.methods)}
    keys = sorted(
        analysis.calibration,
        key=lambda k: (PROTOCOLS.index(k[0]), order.get(k[1], len(order)), natural_key(k[2])),
    )
    rows = []
    for key in keys:
        c = analysis.calibration[key]
        miss = c.coverage - c.target
        rows.append(
            (
                SHORT_LABELS[c.protocol],
                c.method,
                c.test_site,
                f"{c.ece_before:.3f} → {c.ece_after:.3f}",
                f"{100 * c.coverage:.0f} % ({100 * miss:+.0f})",
                f"{100 * c.abstained:.0f} %",
                _number(c.accuracy_kept),
                "—"
                if math.isnan(c.local_coverage)
                else f"{100 * c.local_coverage:.0f} %, abstained {100 * c.local_abstained:.0f} % "
                f"({c.local_patients} patients)",
                f"{c.temperature:.2g}",
                f"{c.patients} × {c.seeds}",
            )
        )
    target = next(iter(analysis.calibration.values())).target
    return [
        Heading(3, "Calibration and abstention at each test site"),
        Paragraph(
            "Each model carries a temperature and a conformal threshold fitted on its training sites' validation "
            "patients (a federation's sites agree on them from aggregates; local and pooled models are fitted "
            f"the same way). A prediction set holds every class likely enough for {100 * target:.0f} % "
            "coverage; the model abstains when the set is not a single class. Coverage is only guaranteed for "
            "patients like the validation patients: at a hospital the model never saw (LOSO), this table "
            "measures it. 'Refitted at the site': the threshold fitted instead on a random half of the test "
            "site's own labelled patients (what fedpath predict --recalibrate does at a hospital), the coverage "
            f"measured on the other half, averaged over {LOCAL_SPLITS} halves; '—' where half the site is "
            "too few patients for the target."
        ),
        Table(
            (
                "Protocol",
                "Method",
                "Test site",
                "ECE before → after",
                "Coverage (vs target)",
                "Abstained",
                "Accuracy when not abstaining",
                "Refitted at the site",
                "Temperature",
                "Patients × seeds",
            ),
            tuple(rows),
        ),
    ]


def report_blocks(analysis: Analysis, settings: Mapping[str, Any] | None, run_name: str) -> list[Block]:
    """The whole report as blocks (plots rendered to PNG on the way)."""
    colours = method_colours(analysis.methods)
    blocks: list[Block] = [
        Heading(1, f"Cross-site comparison of training methods: {run_name}"),
        Paragraph(
            "Which way of training a model works at a hospital whose patients it never saw: one hospital "
            "alone, all hospitals' data pooled in one place, or a federation in which the data stay at each "
            "hospital? "
            f"Made by fedpath {fedpath_version()}."
        ),
    ]
    features = (settings or {}).get("features") or {}
    if features.get("random_init_files"):
        blocks.append(
            Paragraph(
                f"WARNING: {features['random_init_files']} of {features['files']} feature files were extracted "
                f"with a randomly initialised encoder ({features.get('encoders', 'unknown')}). The numbers below "
                "measure the pipeline and the training methods on those features, not what a pretrained "
                "encoder would reach: do not read them as clinical performance."
            )
        )
    blocks += [Heading(2, "Findings"), Bullets(tuple(findings(analysis)))]
    left_out = left_out_of_findings(analysis)
    if left_out:
        blocks += [
            Paragraph(
                "Left out of these findings, the comparisons and every 'best' choice (shown in the tables, "
                "marked ✗):"
            ),
            Bullets(tuple(left_out)),
        ]
    missing = missing_parts(analysis, settings)
    if missing:
        blocks += [Heading(2, "Not in this run"), Bullets(tuple(missing))]
    blocks += _headline(analysis)
    blocks.append(Heading(2, "AUROC per site"))
    for protocol in analysis.protocols:
        blocks += _per_site(analysis, protocol, colours)
    blocks += _gap_section(analysis)
    blocks.append(Heading(2, "Convergence per round"))
    if analysis.rounds:
        blocks.append(
            Plot(
                "convergence.png",
                plot_convergence(analysis, colours),
                "Each metric in rounds.csv per server round: mean over seeds and held-out sites, "
                "band ± 1 SD.",
            )
        )
    else:
        blocks.append(Paragraph("Not shown: the run folder has no rounds.csv."))
    blocks.append(Heading(2, "ROC curves"))
    if all(e.probs.shape[1] == 2 for e in analysis.evals):
        for protocol in analysis.protocols:
            blocks.append(
                Plot(
                    f"roc_{protocol}.png",
                    plot_roc(analysis, protocol, colours),
                    f"ROC curve per site, {PROTOCOL_LABELS[protocol]}: sensitivity against 1 − specificity "
                    "at every threshold; the nearer the top-left corner, the better.",
                )
            )
    else:
        blocks.append(Paragraph("Not shown: ROC curves are drawn for binary tasks only."))
    blocks += [
        Heading(2, "Calibration"),
        Paragraph(
            "Can the model's probabilities be taken at face value? If it says 80%, it should be right 80% of "
            "the time: points on the diagonal. ECE per method is in the headline table."
        ),
        Plot(
            "calibration.png",
            plot_reliability(analysis, colours),
            "Reliability diagram, all sites and seeds.",
        ),
    ]
    blocks += _calibration_section(analysis)
    blocks += _privacy_section(analysis, colours)
    blocks.append(Heading(2, "Run settings"))
    if settings:
        blocks.append(Table(("Setting", "Value"), tuple(_flatten(settings))))
    else:
        blocks.append(Paragraph("Not known: the run folder has no settings.json (or it is empty)."))
    blocks += [
        Heading(2, "How the numbers are computed"),
        Bullets(
            (
                "Every estimate is at the patient level: a patient's slides are averaged into one score.",
                "results.csv holds one row per protocol × method × test site × seed, with its own bootstrap "
                "CI.",
                "Over seeds (and sites), AUROC is the mean of the per-run AUROCs. Its 95% CI is a percentile "
                "bootstrap over patients: each resample draws patients with replacement and scores every "
                "seed's model on the same drawn patients, so the CI reflects which patients were tested; the "
                "spread from training randomness is the separate '± across seeds'.",
                f"Estimates on fewer than {MIN_PATIENTS} patients or a single class are marked ⚠.",
                "A table's means are over the test sites at which every method has every metric shown: a "
                "site whose test patients hold one class has no AUROC, so it leaves every mean of the table "
                "(balanced accuracy and ECE included), and the table says so.",
                LEARNED_RULE,
                HOSPITAL_RULE,
                THRESHOLD_RULE,
            )
        ),
    ]
    return blocks


def write_report(
    run_dir: str | Path, *, n_boot: int = 1000, progress: Callable[[str], None] | None = None
) -> ReportPaths:
    """Read RUN_DIR/predictions.csv (and rounds.csv, validation.csv, training.csv, settings.json where
    present), write results.csv, report.md with plots/*.png, and the self-contained report.html into RUN_DIR,
    each file atomically."""
    return write_analysis(
        run_dir, read_analysis(run_dir, n_boot=n_boot, progress=progress), progress=progress
    )


def read_analysis(
    run_dir: str | Path, *, n_boot: int = 1000, progress: Callable[[str], None] | None = None
) -> Analysis:
    """The analysis of a run folder's predictions.csv (and its optional inputs, see the module docstring)."""
    run_dir = Path(run_dir)
    rows = load_predictions(run_dir / "predictions.csv")
    settings_path = run_dir / "settings.json"
    classes = (
        tuple(str(c) for c in load_settings(settings_path).get("classes", ()))
        if settings_path.exists()
        else ()
    )
    optional = {
        name: run_dir / name for name in ("rounds.csv", "validation.csv", "training.csv", "calibration.csv")
    }
    rounds = load_rounds(optional["rounds.csv"]) if optional["rounds.csv"].exists() else []
    validation = load_predictions(optional["validation.csv"]) if optional["validation.csv"].exists() else []
    training = load_training(optional["training.csv"]) if optional["training.csv"].exists() else []
    calibration = (
        load_calibration(optional["calibration.csv"]) if optional["calibration.csv"].exists() else []
    )
    analysis = analyse(
        rows, rounds, validation=validation, training=training, calibration=calibration, n_boot=n_boot,
        progress=progress,
    )  # fmt: skip
    return replace(analysis, classes=classes)


def write_analysis(
    run_dir: str | Path, analysis: Analysis, *, progress: Callable[[str], None] | None = None
) -> ReportPaths:
    """Write results.csv, report.md with plots/*.png and report.html of `analysis` into RUN_DIR."""
    run_dir = Path(run_dir)
    settings_path = run_dir / "settings.json"
    settings = load_settings(settings_path) if settings_path.exists() else None
    results = run_dir / "results.csv"
    write_text_atomic(results, results_csv(analysis))
    if progress:
        progress("plots")
    blocks = report_blocks(analysis, settings, run_dir.resolve().name)
    plots = []
    for b in blocks:
        if isinstance(b, Plot):
            plots.append(run_dir / "plots" / b.name)
            write_bytes_atomic(plots[-1], b.png)
    markdown, page = run_dir / "report.md", run_dir / "report.html"
    write_text_atomic(markdown, render_markdown(blocks))
    write_text_atomic(page, render_html(blocks, f"fedpath report: {run_dir.resolve().name}"))
    return ReportPaths(results, markdown, page, tuple(plots), analysis)
