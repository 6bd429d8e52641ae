"""The comparison table of one protocol: every method's means over the same test sites, the single hospitals
summarised (best hospital chosen on validation, best at each site, mean of hospitals), and what was left
out and why.

One function, `comparison`, builds it from results.csv rows (`RunResult`); the report renders it into
report.md/report.html and `fedpath compare` prints it, so the two cannot disagree.
"""

from __future__ import annotations

import csv
import math
import re
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import numpy as np

from fedpath.simulation.verdicts import (
    LEARNED,
    MIN_HOSPITAL_CLASSES,
    MIN_HOSPITAL_PATIENTS,
    Verdict,
    hospital_ineligibility,
)

# What a table's means are over; a site enters the means only where every shown metric is defined for
# every method (an AUROC on a one-class test set is not, a balanced accuracy is: means over different sites
# would compare different hospitals).
METRICS = ("auroc", "balanced_accuracy", "sensitivity", "specificity", "accuracy", "ece")
METRIC_NAMES = {
    "auroc": "AUROC",
    "balanced_accuracy": "balanced accuracy",
    "sensitivity": "sensitivity",
    "specificity": "specificity",
    "accuracy": "accuracy",
    "ece": "ECE",
}
METHOD, BEST_HOSPITAL, ORACLE, MEAN_OF_HOSPITALS = "method", "best hospital", "oracle", "mean of hospitals"


def natural_key(text: str) -> tuple[tuple[int, float, str], ...]:
    """Sort key that orders 'site-2' before 'site-10'."""
    parts = re.split(r"(\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)", text)
    return tuple((0, float(p), "") if i % 2 else (1, 0.0, p) for i, p in enumerate(parts))


def is_local(method: str) -> bool:
    """A single-hospital model (`local:SITE`)."""
    return method.strip().lower().startswith("local")


def nanmean(values: Sequence[float]) -> float:
    """Mean of the finite values; NaN when there are none."""
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


# --- results.csv --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunResult:
    """One row of results.csv: one trained model scored on one test site (metrics are fractions 0–1; NaN
    where undefined, None where the run folder does not record it)."""

    protocol: str
    method: str
    test_site: str
    seed: int
    auroc: float
    auroc_low: float
    auroc_high: float
    balanced_accuracy: float
    sensitivity: float  # at `threshold`
    specificity: float
    accuracy: float
    threshold: float  # on P(class 1), chosen on the model's validation patients; NaN: not available
    threshold_from: str  # how it was chosen, or why there is none
    ece: float
    patients: int
    positives: int
    epsilon: float | None
    val_auroc: float  # the same model on its training sites' validation patients
    val_loss: float  # its cross-entropy there (nats per patient)
    val_patients: int | None
    train_patients: int | None
    train_classes: int | None  # classes among the training patients
    verdict: str  # of the (protocol, method): verdicts.LEARNED, DID_NOT_LEARN, INVERTED or NOT_CHECKED
    verdict_why: str
    hospital_eligible: str  # local models: 'yes', 'no: …' or 'not checked: …'; others ''
    warning: str  # why this one estimate should not be trusted, or ''


RESULT_COLUMNS = tuple(f.name for f in fields(RunResult))


def _cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def result_row(r: RunResult) -> list[str]:
    """A RunResult as results.csv cells, in RESULT_COLUMNS order."""
    return [_cell(getattr(r, c)) for c in RESULT_COLUMNS]


def load_results(path: str | Path) -> list[RunResult]:
    """Read results.csv as written by the report (one RunResult per row)."""
    path = Path(path)
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in RESULT_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(
                f"{path}: missing column(s) {', '.join(missing)}: written by an older fedpath; rerun "
                "`fedpath report` on its run folder"
            )
        out = []
        for line, row in enumerate(reader, start=2):
            values: dict[str, object] = {}
            for f_ in fields(RunResult):
                text = (row[f_.name] or "").strip()
                try:
                    if f_.type == "int":
                        values[f_.name] = int(text)
                    elif f_.type == "int | None":
                        values[f_.name] = int(text) if text else None
                    elif f_.type == "float":
                        values[f_.name] = float(text) if text else math.nan
                    elif f_.type == "float | None":
                        values[f_.name] = float(text) if text else None
                    else:
                        values[f_.name] = text
                except ValueError:
                    raise ValueError(
                        f"{path} line {line}, column {f_.name}: {text!r} is not a number"
                    ) from None
            out.append(RunResult(**values))  # type: ignore[arg-type]
    return out


# --- the comparison -----------------------------------------------------------------------------------------


def _site_mean(runs: Sequence[RunResult], metric: str) -> float:
    return nanmean([getattr(r, metric) for r in runs])


def common_sites(results: Sequence[RunResult]) -> tuple[tuple[str, ...], dict[str, str]]:
    """The test sites of one protocol at which every method has every metric it reports defined (mean over
    seeds), and why each other site was left out. A local model is not required where it was not tested
    (in leave-one-site-out never at its own site): it is compared paired on the sites it has."""
    sites = sorted({r.test_site for r in results}, key=natural_key)
    by_method: dict[str, list[RunResult]] = defaultdict(list)
    for r in results:
        by_method[r.method].append(r)
    # a metric constrains a method's sites only if the method reports it somewhere (old cells without
    # validation.csv have no operating point at all)
    reported = {
        m: [k for k in METRICS if any(math.isfinite(getattr(r, k)) for r in runs)]
        for m, runs in by_method.items()
    }
    left_out: dict[str, str] = {}
    for site in sites:
        for method, runs in by_method.items():
            here = [r for r in runs if r.test_site == site]
            if not here:
                if not is_local(method):
                    left_out[site] = f"{method} was not tested there"
                    break
                continue
            undefined = [k for k in reported[method] if not math.isfinite(_site_mean(here, k))]
            if undefined:
                one_class = all(r.positives in (0, r.patients) for r in here)
                left_out[site] = f"{METRIC_NAMES[undefined[0]]} undefined for {method}" + (
                    " (one class among the test patients)" if one_class else ""
                )
                break
    return tuple(s for s in sites if s not in left_out), left_out


@dataclass(frozen=True)
class ComparisonRow:
    """One line of a comparison table: its runs' metrics per (test site, seed) and the sites its means are
    over (the table's common sites, fewer for a hospital's own model)."""

    label: str
    role: str  # METHOD, BEST_HOSPITAL, ORACLE or MEAN_OF_HOSPITALS
    method: str  # the results.csv method behind the row ('' for a summary over several hospitals)
    runs: Mapping[tuple[str, int], Mapping[str, float]]
    sites: tuple[str, ...]
    verdict: Verdict = field(default_factory=lambda: Verdict(LEARNED, ""))
    note: str = ""

    @property
    def excluded(self) -> bool:
        return self.verdict.excluded

    def at(self, site: str, metric: str = "auroc") -> float:
        """Mean over seeds at one test site."""
        return nanmean([v[metric] for (s, _), v in self.runs.items() if s == site])

    def mean_of(self, metric: str) -> float:
        """Mean over the row's sites of the per-site means (each site weighs the same)."""
        return nanmean([self.at(s, metric) for s in self.sites])

    @property
    def mean(self) -> float:
        return self.mean_of("auroc")

    @property
    def validation_loss(self) -> float:
        """Mean validation loss over the row's runs (each on its own training sites' validation patients)."""
        return nanmean([v.get("val_loss", math.nan) for v in self.runs.values()])

    @property
    def by_site(self) -> dict[str, float]:
        """AUROC (mean over seeds) at every site the row was tested at, inside the means or not."""
        return {s: self.at(s) for s in sorted({s for s, _ in self.runs}, key=natural_key)}

    @property
    def seeds(self) -> int:
        return len({k for _, k in self.runs})

    @property
    def seed_sd(self) -> float:
        """SD across seeds of the per-seed mean AUROC over the row's sites (NaN with one seed)."""
        per_seed = [
            nanmean([v["auroc"] for (s, k), v in self.runs.items() if k == seed and s in self.sites])
            for seed in sorted({k for _, k in self.runs})
        ]
        per_seed = [v for v in per_seed if math.isfinite(v)]
        return float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else float("nan")


@dataclass(frozen=True)
class Hospital:
    """A local model as a candidate for 'best hospital'."""

    method: str
    val_auroc: float  # mean over seeds, on its own validation patients
    val_loss: float  # mean over seeds, cross-entropy on them: breaks ties of the AUROC
    val_patients: int | None  # the fewest validation patients of its runs
    train_patients: int | None
    train_classes: int | None
    ineligible: str | None  # why it may not be chosen; '' when it may; None when not known
    verdict: Verdict
    row: ComparisonRow

    @property
    def candidate(self) -> bool:
        return not self.verdict.excluded and not self.ineligible


@dataclass(frozen=True)
class Comparison:
    """The comparison table of one protocol. Iterating gives its rows: methods (best first, ✗ last), then the
    single hospitals summarised."""

    protocol: str
    sites: tuple[str, ...]  # the test sites every mean is over
    tested_sites: tuple[str, ...]  # every test site of the protocol
    left_out: Mapping[str, str]  # test site → why it is not in the means
    metrics: tuple[str, ...]  # the metrics some row reports
    rows: tuple[ComparisonRow, ...]
    hospitals: tuple[Hospital, ...]
    best_hospital: str | None  # the chosen local model
    best_hospital_why: str  # how it was chosen, or why none was
    notes: tuple[str, ...]  # what the table's reader must know: sites, choices, exclusions
    # official protocol: method → (mean over seeds, SD) of the AUROC over every site's test patients together,
    # FLamby's headline definition (`pooled_test_auroc`); empty for the other protocols
    pooled_test: Mapping[str, tuple[float, float]] = field(default_factory=dict)

    def __iter__(self) -> Iterator[ComparisonRow]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def row(self, role: str) -> ComparisonRow | None:
        return next((r for r in self.rows if r.role == role), None)

    def best(self, methods: Sequence[str] | None = None) -> ComparisonRow | None:
        """The method row (not excluded) that a researcher would pick without looking at the test patients,
        among `methods` if given: the lowest mean validation loss (over its runs, on their training sites'
        validation patients), so a μ grid or FedAvg-vs-FedProx is decided on validation; by test AUROC only
        where no row has a validation loss (cells from before validation.csv)."""
        found = [
            r
            for r in self.rows
            if r.role == METHOD
            and not r.excluded
            and math.isfinite(r.mean)
            and (methods is None or r.method in methods)
        ]
        validated = [r for r in found if math.isfinite(r.validation_loss)]
        if validated:
            return min(validated, key=lambda r: (r.validation_loss, -r.mean))
        return max(found, key=lambda r: r.mean, default=None)


def paired_difference(a: ComparisonRow, b: ComparisonRow, metric: str = "auroc") -> tuple[float, int]:
    """Mean over the sites both rows' means cover of (a − b) at each site, and how many sites that is: a
    paired comparison on the same test patients."""
    diffs = [a.at(s, metric) - b.at(s, metric) for s in a.sites if s in b.sites]
    diffs = [d for d in diffs if math.isfinite(d)]
    return (float(np.mean(diffs)) if diffs else float("nan")), len(diffs)


def _metrics(r: RunResult) -> dict[str, float]:
    return {k: float(getattr(r, k)) for k in (*METRICS, "val_loss")}


def _hospitals_summary(
    label: str,
    role: str,
    hospitals: Sequence[Hospital],
    sites: tuple[str, ...],
    pick: str,
) -> ComparisonRow | None:
    """Per (site, seed), the mean over the hospitals tested there (pick='mean') or the one with the
    highest AUROC (pick='max', an oracle: it picks after seeing the test result)."""
    at: dict[tuple[str, int], list[Mapping[str, float]]] = defaultdict(list)
    for h in hospitals:
        for key, values in h.row.runs.items():
            at[key].append(values)
    runs: dict[tuple[str, int], Mapping[str, float]] = {}
    for key, found in at.items():
        if pick == "mean":
            runs[key] = {k: nanmean([v[k] for v in found]) for k in METRICS}
        else:
            ranked = [v for v in found if math.isfinite(v["auroc"])]
            if ranked:
                runs[key] = max(ranked, key=lambda v: v["auroc"])
    if not runs:
        return None
    covered = tuple(s for s in sites if any(k[0] == s for k in runs))
    note = (
        ""
        if covered == sites
        else f"over {len(covered)} of the {len(sites)} sites: no hospital model it summarises was tested at "
        "the others"
    )
    return ComparisonRow(label, role, "", runs, covered, note=note)


def comparison(results: Sequence[RunResult], protocol: str) -> Comparison:
    """The comparison table of `protocol` from results.csv rows (see `Comparison`)."""
    rows = [r for r in results if r.protocol == protocol]
    tested = tuple(sorted({r.test_site for r in rows}, key=natural_key))
    sites, left_out = common_sites(rows)
    notes: list[str] = []
    if tested and not sites:
        sites = tested
        notes.append(
            "No test site has every metric defined for every method: each row's means are over the sites it "
            "has, so the rows are not compared on the same patients."
        )
    elif left_out:
        notes.append(
            f"Means are over the {len(sites)} of {len(tested)} test sites where every method has every metric: "
            + "; ".join(
                f"{s} left out ({why})"
                for s, why in sorted(left_out.items(), key=lambda k: natural_key(k[0]))
            )
            + "."
        )
    by_method: dict[str, list[RunResult]] = defaultdict(list)
    for r in rows:
        by_method[r.method].append(r)
    metrics = tuple(k for k in METRICS if any(math.isfinite(getattr(r, k)) for r in rows))

    def method_row(method: str, runs: Sequence[RunResult]) -> ComparisonRow:
        mine = tuple(s for s in sites if any(r.test_site == s for r in runs))
        return ComparisonRow(
            method,
            METHOD,
            method,
            {(r.test_site, r.seed): _metrics(r) for r in runs},
            mine,
            Verdict(runs[0].verdict, runs[0].verdict_why),
        )

    methods = [method_row(m, runs) for m, runs in by_method.items() if not is_local(m)]
    methods.sort(key=lambda r: (r.excluded, -r.mean if math.isfinite(r.mean) else math.inf))
    hospitals = []
    for m, runs in by_method.items():
        if not is_local(m):
            continue
        patients = [r.train_patients for r in runs if r.train_patients is not None]
        classes = [r.train_classes for r in runs if r.train_classes is not None]
        n_patients, n_classes = min(patients, default=None), min(classes, default=None)
        hospitals.append(
            Hospital(
                m,
                nanmean([r.val_auroc for r in runs]),
                nanmean([r.val_loss for r in runs]),
                min((r.val_patients for r in runs if r.val_patients is not None), default=None),
                n_patients,
                n_classes,
                hospital_ineligibility(n_patients, n_classes),
                Verdict(runs[0].verdict, runs[0].verdict_why),
                method_row(m, runs),
            )
        )
    summaries: list[ComparisonRow] = []
    best: Hospital | None = None
    why = "no local models in this protocol"
    if hospitals:
        notes.append(
            {
                "loso": "A hospital's own model is never tested at that hospital in leave-one-site-out: a local "
                "model's means are over the other sites, and it is compared with other rows paired on those "
                "sites.",
                "internal": "A hospital's own model is tested on its own site's test patients only: its means "
                "are over that site, and it is compared with other rows paired on it.",
                "official": "Every model, a hospital's own included, is tested on every hospital's official test "
                "patients, as FLamby does; 'pooled test set' is the AUROC over all of them together, FLamby's "
                "headline figure.",
            }.get(
                protocol,
                "A hospital's own model is tested on every fold's patients, of every site (most of them from "
                "other hospitals), like the other rows.",
            )
        )
        candidates = [h for h in hospitals if h.candidate]
        best, why = _choose_hospital(candidates)
        shut_out = [h for h in hospitals if not h.candidate]
        notes.append(
            (f"Best hospital: {best.method}, {why}." if best else f"Best hospital: none, {why}.")
            + f" It is chosen among local models trained on ≥ {MIN_HOSPITAL_PATIENTS} patients of ≥ "
            f"{MIN_HOSPITAL_CLASSES} classes that learned, never on test results."
            + (
                " Never chosen: "
                + "; ".join(f"{h.method} ({h.verdict.mark or h.ineligible})" for h in shut_out)
                + "."
                if shut_out
                else ""
            )
            + (
                " Not checked for lack of training facts (training.csv, or cells from before fedpath "
                "recorded them): " + ", ".join(h.method for h in candidates if h.ineligible is None) + "."
                if any(h.ineligible is None for h in candidates)
                else ""
            )
        )
        # The best at each site is a choice (after the fact), so it picks among the eligible hospitals only; the
        # mean of hospitals is what a hospital alone gets, so it takes every one that learned. A summary that
        # would repeat another row is dropped: with one hospital model per test site (internal) the best at
        # each site is the mean of hospitals, and with one hospital both are the best hospital.
        learned = [h for h in hospitals if not h.verdict.excluded]
        several = any(
            sum(1 for h in candidates if key in h.row.runs) > 1
            for key in {k for h in candidates for k in h.row.runs}
        )
        oracle = _hospitals_summary("local, best at each site (oracle)", ORACLE, candidates, sites, "max")
        if oracle is not None and several:
            summaries.append(oracle)
        elif len(candidates) > 1:
            notes.append(
                "No 'best at each site (oracle)' row: one hospital model is tested at each site, so there is "
                "nothing to pick from."
            )
        if best is not None:
            label = f"local, best hospital ({best.method.removeprefix('local:')})"
            summaries.append(replace(best.row, label=label, role=BEST_HOSPITAL))
        mean = _hospitals_summary("local, mean of hospitals", MEAN_OF_HOSPITALS, learned, sites, "mean")
        if mean is not None and [h.method for h in learned] != [best.method if best else None]:
            summaries.append(mean)
    excluded = [r for r in methods if r.excluded] + [h.row for h in hospitals if h.row.excluded]
    if excluded:
        notes.append(
            "Left out of the comparisons and 'best' choices (shown, marked ✗): "
            + "; ".join(f"{r.method} ({r.verdict.status}: {r.verdict.why})" for r in excluded)
            + "."
        )
    return Comparison(
        protocol,
        sites,
        tested,
        left_out,
        metrics,
        (*methods, *summaries),
        tuple(hospitals),
        best.method if best else None,
        why,
        tuple(notes),
    )


def _choose_hospital(candidates: Sequence[Hospital]) -> tuple[Hospital | None, str]:
    if len(candidates) == 1:
        return candidates[0], "the only eligible hospital model"
    scored = [h for h in candidates if math.isfinite(h.val_auroc)]
    if not scored:
        return None, (
            "as no eligible hospital model has a validation AUROC (validation.csv missing, or one class among "
            "the validation patients)"
            if candidates
            else "as no hospital model is eligible"
        )
    top = max(h.val_auroc for h in scored)
    tied = [h for h in scored if h.val_auroc >= top - 1e-9]
    if len(tied) == 1:
        return tied[0], f"highest AUROC on its own validation patients ({top:.2f})"
    # a handful of validation patients often ranks several hospitals perfectly: their loss tells them apart
    best = min(tied, key=lambda h: h.val_loss if math.isfinite(h.val_loss) else math.inf)
    others = ", ".join(h.method for h in tied if h is not best)
    return best, (
        f"highest AUROC on its own validation patients ({top:.2f}, tied with {others}) and the lowest "
        f"validation loss of those ({best.val_loss:.3f})"
    )
