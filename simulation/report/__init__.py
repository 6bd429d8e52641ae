"""The comparison report of a simulation run: which training method generalizes to hospitals it never saw.

Input contract: a run folder holding

``predictions.csv`` (required): one row per (protocol, method, test_site, seed, patient), columns

- ``protocol``: ``loso`` (leave-one-site-out: the test site took no part in training), ``internal``
  (held-out patients of the sites that trained the model) or ``cv`` (patient-level k-fold over the whole
  cohort; ``test_site`` names the fold, e.g. ``fold-01``; like ``internal``, the model trained with patients
  of the sites it is tested at)
- ``method``: free text naming the training method, e.g. ``local:site-A``, ``pooled``, ``fedavg``,
  ``fedprox(mu=0.01)``, ``fedprox-dp(eps=4)``. Names starting with ``local`` are single-site models and
  ``pooled`` is all sites' data in one place; everything else is federated. Parameters in parentheses are
  ``key=value`` pairs separated by commas.
- ``test_site``: the site whose patients were scored; ``seed``: integer training seed
- ``patient_id``; ``label``: the patient's class index (0 = negative, 1 = positive for binary tasks)
- scores, in one of two forms: binary tasks give ``score`` = P(class 1) in [0, 1]; tasks with C > 2 classes
  give ``prob_0`` … ``prob_{C-1}`` (each in [0, 1], summing to 1) and no ``score`` column.
- ``epsilon`` (optional): the method's differential-privacy budget ε (δ as set in the run); empty or ``inf``
  means no DP. Where the column is absent or empty, an ``eps=`` parameter in the method name gives it.

A patient with several rows in one (protocol, method, test_site, seed) group (one per slide) is reduced to one
patient with `aggregate_by_patient` (mean probability, majority label).

``rounds.csv`` (optional): convergence of federated methods, columns ``protocol``, ``method``, ``test_site``
(the held-out site for ``loso``; empty or ``all`` for ``internal``), ``seed``, ``round`` (1-based integer),
``metric`` (e.g. ``val_auroc``, ``train_loss``), ``value`` (float).

``validation.csv`` (optional): the same columns as predictions.csv, one row per validation patient of each
(protocol, method, test_site, seed): the presented model scored on its training sites' validation patients
(``test_site`` names the cell it belongs to). It picks each model's decision threshold, the best hospital,
and (for local and pooled models) whether the model learned.

``training.csv`` (optional): ``protocol``, ``method``, ``test_site``, ``seed``, ``train_patients``,
``train_classes`` (classes among the training patients), ``val_patients``; empty where unknown. It decides
which local models may be chosen as the best hospital.

``calibration.csv`` (optional): ``protocol``, ``method``, ``test_site``, ``seed``, ``temperature``,
``threshold``, ``coverage``, ``source``: each model's temperature and conformal threshold
(`fedpath.common.calibration`), fitted on its training sites' validation patients. The report then shows per
test site the ECE before and after, the prediction sets' coverage against the target, the abstention rate and
the accuracy on the patients not abstained on.
``settings.json`` (optional): a JSON object of the run's settings, printed as a table.

Without validation.csv or training.csv (runs from before fedpath recorded them) the report renders, and says
which rules it could not apply.

Outputs, written atomically into the run folder: ``results.csv`` (one row per protocol × method × test site ×
seed, columns `RESULT_COLUMNS`), ``report.md`` with PNG plots in ``plots/``, and ``report.html``, the same
report in one self-contained file (plots inlined, no external resources).

Statistics: per (protocol, method, test_site, seed) AUROC with a patient bootstrap 95% CI, balanced accuracy,
top-label ECE, and sensitivity, specificity and accuracy at a threshold chosen on validation patients
(`fedpath.simulation.verdicts`). Over seeds (and over sites for a method's overall figure), the AUROC is the
mean of the per-run AUROCs and its 95% CI is a patient bootstrap of that mean: every resample draws patients,
and every seed's model is scored on the same drawn patients. The CI therefore covers which patients were
tested; the spread caused by training randomness is reported separately as the SD across seeds. A method's
figure over sites is over the protocol's common sites (`fedpath.simulation.headline.common_sites`), the same
for every row of a table. Methods that did not learn, or whose AUROC is inverted, are shown marked and left out of the
findings (`fedpath.simulation.verdicts`).
"""

from __future__ import annotations

from fedpath.simulation.headline import RESULT_COLUMNS  # the columns of results.csv
from fedpath.simulation.report.analysis import Analysis, analyse
from fedpath.simulation.report.contract import (
    ALL_SITES,
    CalibrationRow,
    PredictionRow,
    ReportError,
    RoundRow,
    TrainingFacts,
    load_calibration,
    load_predictions,
    load_rounds,
    write_calibration,
    write_predictions,
    write_rounds,
    write_training,
)
from fedpath.simulation.report.render import ReportPaths, write_report

# What the rest of fedpath uses; the modules hold the rest.
__all__ = [
    "ALL_SITES",
    "RESULT_COLUMNS",
    "Analysis",
    "CalibrationRow",
    "PredictionRow",
    "ReportError",
    "ReportPaths",
    "RoundRow",
    "TrainingFacts",
    "analyse",
    "load_calibration",
    "load_predictions",
    "load_rounds",
    "write_calibration",
    "write_predictions",
    "write_report",
    "write_rounds",
    "write_training",
]
