"""Findings: one sentence each, for a reader who is not an ML engineer."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from fedpath.common.metrics import (
    Estimate,
)
from fedpath.simulation.headline import (
    BEST_HOSPITAL,
    METHOD,
    nanmean,
    natural_key,
)

if TYPE_CHECKING:
    pass
from fedpath.simulation.report.analysis import (
    Analysis,
    Summary,
)
from fedpath.simulation.report.contract import (
    MIN_PATIENTS,
    PROTOCOLS,
    SHORT_LABELS,
)

# --- findings: one sentence each, for a reader who is not an ML engineer ------------------------------------


def estimate_text(e: Estimate) -> str:
    if not math.isfinite(e.value):
        return "undefined (one class only)"
    if not (math.isfinite(e.low) and math.isfinite(e.high)):
        return f"{e.value:.2f} (no CI: too few patients)"
    return f"{e.value:.2f} [{e.low:.2f}, {e.high:.2f}]"


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _basis(s: Summary, positive: str | None = "positive") -> str:
    where = "held-out site" if s.protocol == "loso" else "site"
    counted = f", {s.positives} {positive}" if positive else ""
    return f"mean over {_plural(s.sites, where)} × {_plural(s.seeds, 'seed')}; {s.patients} patients{counted}"


def _where(protocol: str, subject: str = "it") -> str:
    if protocol == "loso":
        return f"at hospitals {subject} never trained on"
    return f"on new patients of the hospitals {subject} trained with"


def _best(analysis: Analysis, protocol: str, kinds: Sequence[str]) -> Summary | None:
    """The method of the first kind in `kinds` that has any that learned, chosen as `Comparison.best` chooses
    (on validation loss, not on the test patients). Not for single hospitals: the best hospital is chosen on
    validation too (`Comparison.best_hospital`)."""
    table = analysis.comparisons.get(protocol)
    for kind in kinds:
        found = {
            m: s
            for m, s in analysis.usable(protocol).items()
            if analysis.kind(m) == kind and math.isfinite(s.auroc.value)
        }
        if not found:
            continue
        row = table.best(list(found)) if table is not None else None
        if row is not None and row.method in found:
            return found[row.method]
        return max(found.values(), key=lambda s: s.auroc.value)
    return None


def _best_hospital(analysis: Analysis, protocol: str) -> Summary | None:
    table = analysis.comparisons.get(protocol)
    if table is None or table.best_hospital is None:
        return None
    return analysis.overall.get((protocol, table.best_hospital))


def _federation_vs_members(analysis: Analysis, protocol: str) -> tuple[str, bool] | None:
    """The sentence comparing the best federated method with the best single hospital (chosen on
    validation), paired on the test sites both were tested at; True if the federation lost."""
    fed = _best(analysis, protocol, ["federated", "federated + DP"])
    table = analysis.comparisons.get(protocol)
    if fed is None or table is None:
        return None
    hospital = table.row(BEST_HOSPITAL)
    fed_row = next((r for r in table if r.role == METHOD and r.method == fed.method), None)
    if hospital is None or fed_row is None:
        return None
    # Paired on the same sites: in leave-one-site-out a hospital's own model is never tested at that
    # hospital, so its mean covers fewer sites than the federation's.
    sites = [
        s
        for s in hospital.sites
        if s in fed_row.sites and math.isfinite(hospital.at(s)) and math.isfinite(fed_row.at(s))
    ]
    if not sites:
        return None
    local_auroc = nanmean([hospital.at(s) for s in sites])
    fed_auroc = nanmean([fed_row.at(s) for s in sites])
    if protocol == "loso":
        where = f"{_where(protocol)}, on the {_plural(len(sites), 'held-out site')} both were tested at"
    else:
        tested = _plural(len(sites), "fold" if protocol == "cv" else "site")
        where = f"on the test patients of the {tested} both were tested at"
    if fed_auroc < local_auroc:
        return (
            f"⚠ Federated training did worse than one hospital training alone {where}: {fed.method} "
            f"{fed_auroc:.2f} against {hospital.method} {local_auroc:.2f}. This is the failure FLamby reported on "
            "Fed-Camelyon16 (FedProx 0.58 against 0.78 for one hospital alone): a federation that does not beat "
            "its best member gives a hospital no reason to join.",
            True,
        )
    return (
        f"The best single hospital alone ({hospital.method}) reached {local_auroc:.2f} {where}; the "
        f"federation ({fed.method}) reached {fed_auroc:.2f}, {fed_auroc - local_auroc:+.2f} (the hospital was "
        f"picked as {table.best_hospital_why}, not on test results).",
        False,
    )


def findings(analysis: Analysis) -> list[str]:
    """The report's findings, warnings first, one sentence each. Methods that did not learn or are inverted
    appear in none of them (`left_out_of_findings` says which)."""
    main = analysis.main_protocol
    warnings: list[str] = []
    out: list[str] = []
    lead = (
        _best(analysis, main, ["federated", "federated + DP"])
        or _best(analysis, main, ["pooled"])
        or _best_hospital(analysis, main)
    )
    if lead is not None:
        out.append(
            f"{lead.method} reached AUROC {estimate_text(lead.auroc)} {_where(main)} ({_basis(lead, analysis.positive)})."
        )
    elif any(p == main for p, _ in analysis.verdicts):
        warnings.append(
            f"⚠ No method of {SHORT_LABELS[main]} passed the check that it learned (see below the findings): "
            "this run says nothing about which way of training works."
        )
    for protocol in analysis.protocols:
        compared = _federation_vs_members(analysis, protocol)
        if compared is not None:
            sentence, lost = compared
            if lost:
                warnings.append(sentence)
            elif protocol == main:
                out.append(sentence)
    pooled = _best(analysis, main, ["pooled"])
    beaten_by = _best(analysis, main, ["federated", "federated + DP"])
    if pooled is not None and beaten_by is not None and beaten_by.auroc.value > pooled.auroc.value:
        warnings.append(
            f"⚠ Pooled training ({estimate_text(pooled.auroc)}) scored below {beaten_by.method} "
            f"({estimate_text(beaten_by.auroc)}). Pooling every hospital's patients is the reference a federation tries "
            "to match, so this is not a finding that federation beats pooling: it points to under-trained "
            "baselines or test sets too small, or (at unseen hospitals with strong site shift, as on fedpath's "
            "synthetic cohorts) to pooled training that learns what tells its hospitals apart, where the "
            "sites' separate local steps do not."
        )
    if pooled is not None and pooled is not lead:
        out.append(
            f"Pooling every hospital's patients in one place (the reference a federation tries to match, "
            f"not possible in practice) reached {estimate_text(pooled.auroc)} {_where(main, 'the model')}."
        )
    fed = beaten_by
    if fed is not None and main == "loso":
        per_site = [
            (s.auroc.value, site)
            for (p, m, site), s in analysis.per_site.items()
            if (p, m) == (main, fed.method) and math.isfinite(s.auroc.value)
        ]
        if len(per_site) > 1:
            (low, low_site), (high, high_site) = min(per_site), max(per_site)
            out.append(
                f"Across held-out hospitals, {fed.method} ranged from {low:.2f} ({low_site}) to {high:.2f} "
                f"({high_site})" + (": the hospital a model is used at matters." if high - low > 0.1 else ".")
            )
    gaps = {m: g for m in analysis.methods if (g := analysis.gap(m)) is not None and math.isfinite(g)}
    if gaps and analysis.internal_protocol:
        m = max(gaps, key=lambda k: gaps[k])
        internal = analysis.overall[(analysis.internal_protocol, m)]
        loso = analysis.overall[("loso", m)]
        out.append(
            f"The largest drop from {SHORT_LABELS[analysis.internal_protocol]} to unseen hospitals was {m}'s: "
            f"AUROC {internal.auroc.value:.2f} → {loso.auroc.value:.2f} (gap {gaps[m]:+.2f})"
            + (
                f"; {SHORT_LABELS[analysis.internal_protocol]} alone would have overstated it."
                if gaps[m] > 0.05
                else "."
            )
        )
    for name, points, reference in analysis.dp_curves(main):
        lo, hi = points[0], points[-1]
        text = (
            f"With differential privacy (smaller ε = stronger privacy), {name} reached {estimate_text(lo.auroc)} "
            f"at ε = {lo.epsilon:g}"
        )
        if hi is not lo:
            text += f" and {estimate_text(hi.auroc)} at ε = {hi.epsilon:g}"
        if reference is not None:
            text += f"; without DP, {reference.method} reached {estimate_text(reference.auroc)}"
        out.append(text + ".")
    warnings += _coverage_warnings(analysis, lead)
    flagged = [s for s in analysis.per_site.values() if s.warning]
    if flagged:
        sites = sorted({s.test_site for s in flagged}, key=natural_key)
        warnings.append(
            f"⚠ Estimates at {', '.join(sites)} ({len(flagged)} of {len(analysis.per_site)} per-site "
            f"estimates) rest on fewer than {MIN_PATIENTS} patients or on a single class, or are inverted; "
            "they are marked ⚠ below and are not evidence either way."
        )
    seeds = max(s.seeds for s in analysis.overall.values())
    if seeds < 3:
        warnings.append(
            f"⚠ Only {_plural(seeds, 'training seed')} per method: differences between methods may be "
            "training noise (at least 3 seeds are needed to see the spread)."
        )
    return warnings + out


def _coverage_warnings(analysis: Analysis, lead: Summary | None) -> list[str]:
    """A warning when the leading method's prediction sets, at hospitals it never saw, cover clearly less than
    they promise: its 'I don't know' cannot be relied on there (the coverage guarantee holds only for patients
    like its validation patients)."""
    if lead is None or "loso" not in analysis.protocols:
        return []
    rows = [c for (p, m, _), c in analysis.calibration.items() if (p, m) == ("loso", lead.method)]
    if not rows:
        return []
    coverage = sum(c.coverage for c in rows) / len(rows)
    target = rows[0].target
    if coverage >= target - 0.05:
        return []
    worst = min(rows, key=lambda c: c.coverage)
    local = [c for c in rows if math.isfinite(c.local_coverage)]
    refitted = (
        ""
        if not local
        else " Refitted on half of each such hospital's own labelled patients (fedpath predict --recalibrate), "
        f"they held it for {100 * sum(c.local_coverage for c in local) / len(local):.0f} % of the other half, "
        f"abstaining on {100 * sum(c.local_abstained for c in local) / len(local):.0f} %"
        + (
            "."
            if len(local) == len(rows)
            else f" (at {len(local)} of {len(rows)} hospitals; the others are too small)."
        )
    )
    return [
        f"⚠ At hospitals it never saw, {lead.method}'s {100 * target:.0f} % prediction sets held the right class "
        f"for only {100 * coverage:.0f} % of patients on average ({100 * worst.coverage:.0f} % at "
        f"{worst.test_site}): its calibration and abstention, fitted on its training hospitals' validation "
        "patients, do not carry to a new hospital here; check them on local patients before relying on them."
        + refitted
    ]


def left_out_of_findings(analysis: Analysis) -> list[str]:
    """One line per (protocol, method) that did not learn or is inverted, with the evidence."""
    return [
        f"✗ {m} ({SHORT_LABELS[p]}): {v.status}: {v.why}."
        for (p, m), v in sorted(
            analysis.verdicts.items(),
            key=lambda k: (PROTOCOLS.index(k[0][0]), analysis.methods.index(k[0][1])),
        )
        if v.excluded
    ]


def missing_parts(analysis: Analysis, settings: Mapping[str, Any] | None) -> list[str]:
    """What this run lacks, and what the report therefore cannot show."""
    out = []
    if "loso" not in analysis.protocols:
        out.append(
            "No leave-one-site-out (loso) results: this report cannot say how any method does at a hospital "
            "it never trained on."
        )
    if analysis.internal_protocol is None:
        out.append(
            "No internal-validation results (internal or cv): the generalization gap (internal vs unseen) is "
            "not computed."
        )
    if not analysis.has_validation:
        out.append(
            "No validation.csv (cells from before fedpath scored each model on its validation patients): no "
            "operating point (sensitivity, specificity, accuracy), no best hospital unless a single one is "
            "eligible, and local and pooled models are not checked for having learned."
        )
    if not analysis.has_training:
        out.append(
            "No training.csv: local models are not checked for their number of training patients and "
            "classes before one is chosen as the best hospital."
        )
    if not any(s.epsilon is not None for s in analysis.overall.values()):
        out.append("No differentially private method (no ε): no privacy–utility curve.")
    for protocol in analysis.protocols:
        for name, _, reference in analysis.dp_curves(protocol):
            if reference is None:
                out.append(
                    f"No non-DP counterpart of {name} in {protocol}: its privacy–utility curve has no ε = ∞."
                )
    if not analysis.rounds:
        out.append("No rounds.csv: no convergence plot.")
    if settings is None:
        out.append("No settings.json: the run's settings are not known to this report.")
    if any(e.probs.shape[1] > 2 for e in analysis.evals):
        out.append("More than two classes: no ROC curves (binary only); AUROC is the macro one-vs-rest mean.")
    return out
