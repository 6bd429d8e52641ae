"""The site's Flower ClientApp: load the global weights, train or evaluate on this site's patients, reply.

Train reply: the updated weights (ArrayRecord ``arrays``) and aggregate metrics (``patients``, ``slides``,
``loss``, ``seconds``). Evaluate reply: ``patients``, ``auroc``, ``balanced_accuracy``, ``loss`` on the
site's validation patients. Both carry a ConfigRecord ``site`` with the site's name. Nothing per slide or
per patient (no ids, no scores) leaves the site.

Local training is `fedpath.client.training.train_epochs` with the FedProx term μ/2·‖w − w_global‖², μ taken
from the message (``proximal-mu``, set by the coordinator's FedProx strategy).

With per-patient DP on (run config ``dp-noise`` or ``dp-epsilon``), training is DP-SGD over the site's
patients and every round is entered in the site's privacy ledger, a file that stays at the site; the reply
adds ``epsilon`` (cumulative over all rounds and runs in the ledger), ``delta``, ``dp-noise``,
``dp-sample-rate`` and ``dp-steps``. A round that would take the site past its budget is refused before any
training with an error reply (code ``PRIVACY_EXHAUSTED``), and the coordinator goes on without the site; the
budget is checked again when the round is recorded (another run may have spent meanwhile), and the update is
then not sent. A round whose run config breaks the site's own policy (client/policy.py: DP required, ε per
run, minimum σ, rounds, models) is refused before any training with code ``POLICY_REFUSED``. Every round, DP
or not, is entered in the ledger; one without DP voids the guarantee (ε = ∞ from then on).

**Nothing identifying in an error reply.** Every handler runs inside `reply_without_detail`: a failure becomes
an error reply with a code (``SITE_DATA_ERROR``, ``INCOMPATIBLE_MODEL``, ``SITE_INTERNAL_ERROR``) and that
code's fixed text from `fedpath.common.runconfig.SITE_ERRORS`, which names no file, patient, slide or path.
The exception and its traceback go only to the site's own log at ERROR (`site_log`: Flower's SuperNode log
in deployment; a file per simulated site in simulation).

**No metric over fewer than k patients.** k is the site's node config ``min-report-patients`` (default 10; a
site policy, so nothing in the run config lowers it; 1 for a node of the simulation engine, which is no
hospital: see `min_report_patients`). An evaluate reply for fewer than k validation patients
carries only the count (``patients``) and ``unit-weight``: no loss, AUROC or accuracy. A train reply for fewer
than k training patients leaves out the mean training ``loss`` (a mean over a handful of patients is close to
a per-patient figure); the weights, counts and privacy figures are sent as usual.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import nn

from fedpath.client.policy import NODE_CONFIG_KEYS, PolicyRefused, SitePolicy
from fedpath.client.privacy import (
    LEDGER_KEY,
    BudgetExhausted,
    DPConfig,
    PrivacyLedger,
    PrivatePlan,
    default_delta,
    ledger_path,
    plan_round,
)
from fedpath.client.site import (
    IncompatibleSite,
    SiteConfigError,
    SiteData,
    check_compatible,
    load_site,
    resolve_site,
)
from fedpath.client.training import TrainConfig, local_config, predict, summarize, train_epochs
from fedpath.common.calibration import site_statistics
from fedpath.common.features import FeatureFileError
from fedpath.common.manifest import ManifestError
from fedpath.common.mil import create_mil
from fedpath.common.runconfig import (
    FEATURES_PREFIX,
    INCOMPATIBLE_MODEL,
    POLICY_REFUSED,
    PRIVACY_EXHAUSTED,
    SITE_DATA_ERROR,
    SITE_ERRORS,
    SITE_INTERNAL_ERROR,
    SITE_NAME,
    SITE_RECORD,
    UNIT_WEIGHT_KEY,
    WEIGHT_KEY,
    RunConfig,
    RunConfigError,
    round_seed,
)
from fedpath.common.standardize import moments_of
from fedpath.common.wire import (
    MOMENTS_COUNT,
    calibration_to_arrays,
    load_arrays,
    model_to_arrays,
    moments_to_arrays,
)

app = ClientApp()
logger = logging.getLogger(__name__)

Handler = Callable[[Message, Context], Message]


def error_code(err: BaseException) -> int:
    """The reply code of a failure at the site (see `fedpath.common.runconfig.SITE_ERRORS`)."""
    if isinstance(err, IncompatibleSite | RunConfigError):
        return INCOMPATIBLE_MODEL
    if isinstance(err, FeatureFileError | ManifestError | SiteConfigError | OSError):
        return SITE_DATA_ERROR
    return SITE_INTERNAL_ERROR


def reply_without_detail(handler: Handler) -> Handler:
    """`handler`, but a failure is answered with an error reply that holds a code and its fixed text only;
    the exception and its traceback are logged here, at the site, and never sent."""

    @functools.wraps(handler)
    def guarded(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except Exception as err:
            code = error_code(err)
            site_log(context).exception(
                "%s failed; the coordinator is told only code %d", handler.__name__, code
            )
            return Message(error=Error(code=code, reason=SITE_ERRORS[code]), reply_to=msg)

    return guarded


def site_log(context: Context) -> logging.Logger:
    """Where the detail of a failure goes: this process's log, the SuperNode's at the site. A simulated node
    (Flower's simulation engine forwards every node's output into the coordinator's log) writes it to
    ``site-logs/partition-<id>.log`` in the run folder instead, as its privacy ledger lives in ``privacy/``."""
    run_dir = Path(str(context.run_config.get("run-dir", "")))
    if "partition-id" not in context.node_config or not run_dir.is_absolute():
        return logger
    name = f"partition-{context.node_config['partition-id']}"
    path = run_dir / "site-logs" / f"{name}.log"
    simulated = logging.getLogger(f"{__name__}.{name}")
    simulated.propagate = False
    if not any(getattr(h, "baseFilename", None) == str(path) for h in simulated.handlers):
        for old in list(simulated.handlers):
            simulated.removeHandler(old)
            old.close()
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(path)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        simulated.addHandler(handler)
    return simulated


def min_report_patients(node_config: Mapping[str, object]) -> int:
    """k: the site policy's ``min-report-patients`` (default 10).

    A node of Flower's simulation engine (a partition id, no manifest of its own) is not a hospital: the
    researcher who runs it holds the whole cohort and is the coordinator too, so nobody is kept from
    anything and k is 1 there unless the node config says otherwise (the validation curve and best-round
    selection of a simulation then see every site)."""
    if "partition-id" in node_config and NODE_CONFIG_KEYS["min_report_patients"] not in node_config:
        return 1
    return SitePolicy.from_node_config(node_config).min_report_patients


def _site_and_model(msg: Message, context: Context) -> tuple[RunConfig, SiteData, nn.Module]:
    run = RunConfig.from_flower(context.run_config)
    run.require_model_shape()
    site = load_site(resolve_site(context.node_config, run), run)
    check_compatible(site, run)
    model = create_mil(run.model, in_dim=run.in_dim, num_classes=run.num_classes)
    try:
        load_arrays(model, msg.content.array_records["arrays"])
    except (KeyError, RuntimeError, ValueError) as err:
        raise IncompatibleSite(f"the coordinator's weights do not fit the run's model ({err})") from err
    return run, site, model


def local_train_config(run: RunConfig, site: str, server_round: int, proximal_mu: float) -> TrainConfig:
    """This site's training settings for one round (seeded by run seed, round and site)."""
    return local_config(
        run,
        seed=round_seed(run.seed, server_round, site),
        proximal_mu=proximal_mu,
        private_lr=run.dp_lr if run.private else None,
    )


def _reply(msg: Message, site: SiteData, metrics: MetricRecord, arrays: ArrayRecord | None) -> Message:
    # the site's name and what its features were made with (encoder, weights checksum, tile size): the
    # coordinator records it in the model, so that applying the model to other features can be refused
    stated = {f"{FEATURES_PREFIX}{k}": v for k, v in site.features.items()}
    content = RecordDict({"metrics": metrics, SITE_RECORD: ConfigRecord({SITE_NAME: site.name, **stated})})
    if arrays is not None:
        content["arrays"] = arrays
    return Message(content=content, reply_to=msg)


def privacy_ledger(run: RunConfig, site: SiteData, node_config: Mapping[str, object]) -> PrivacyLedger:
    """The site's ledger, read and verified (LedgerTampered stops the round), where `ledger_path` puts it:
    node config 'privacy-ledger' (`fedpath site start` always sets it), else beside the site's manifest, else
    in the run folder (simulation, where one machine plays every site)."""

    def given(key: str) -> str | None:
        return str(node_config[key]) if key in node_config else None

    # a simulated node outside a run folder (a test calling the handler): beside the simulation's manifest
    manifest = given("manifest") or (None if run.run_dir else run.manifest)
    path = ledger_path(site.name, explicit=given(LEDGER_KEY), manifest=manifest, run_dir=run.run_dir)
    return PrivacyLedger(path, site=site.name, delta=run.dp_delta or default_delta(len(site.train)))


def privacy_config(run: RunConfig, policy: SitePolicy) -> DPConfig:
    """DP-SGD settings from the run config. Budget: the smaller of the site's ('privacy-budget') and the
    run's (dp-budget), else the run's dp-epsilon, else DEFAULT_BUDGET_EPSILON: never unlimited."""
    budgets = [b for b in (policy.max_epsilon_total, run.dp_budget) if b]
    return DPConfig(
        noise_multiplier=run.dp_noise or None,
        target_epsilon=run.dp_epsilon or None,
        max_grad_norm=run.dp_clip,
        expected_batch_size=run.dp_batch or run.batch_size,
        budget_epsilon=min(budgets) if budgets else None,
    )


def _refused(msg: Message, context: Context, code: int, reason: str) -> Message:
    """A refused round: the rule and its values (settings, never data) go to the site's log and in the reply;
    the coordinator records only the code and its fixed text (`fedpath.server.strategy`)."""
    site_log(context).warning("round refused (code %d): %s", code, reason)
    return Message(error=Error(code=code, reason=reason), reply_to=msg)


@app.train()
@reply_without_detail
def train(msg: Message, context: Context) -> Message:
    started = time.perf_counter()
    run, site, model = _site_and_model(msg, context)
    config = msg.content.config_records["config"]
    server_round = int(config["server-round"])  # type: ignore[arg-type]
    mu = float(config.get("proximal-mu", 0.0))  # type: ignore[arg-type]
    run_id = str(context.run_id)
    # the site's own rules, before any training: refusals carry the rule and the two values, never data
    policy = SitePolicy.from_node_config(context.node_config)
    ledger = privacy_ledger(run, site, context.node_config)
    plan: PrivatePlan | None = None
    dp = privacy_config(run, policy) if run.private else None
    try:
        policy.check_run(run, server_round)
        if dp is not None:
            plan = plan_round(
                dp,
                ledger,
                patients=len(site.train),
                epochs=run.local_epochs,
                steps=run.local_steps or None,
                rounds_left=max(1, run.num_server_rounds - server_round + 1),
            )
            policy.check_noise(plan.noise_multiplier)
            policy.check_run_epsilon(
                ledger.run_epsilon(run_id, [(plan.noise_multiplier, plan.sample_rate, plan.steps)])
            )
    except PolicyRefused as err:
        return _refused(msg, context, POLICY_REFUSED, err.reason)
    except BudgetExhausted as err:
        return _refused(msg, context, PRIVACY_EXHAUSTED, str(err))
    train_config = local_train_config(run, site.name, server_round, mu)
    stats = train_epochs(model, site.train, train_config, privacy=plan)
    metrics: dict[str, int | float] = {
        WEIGHT_KEY: len(site.train),
        UNIT_WEIGHT_KEY: 1,
        "slides": site.slides_train,
        "loss": stats.loss,
        "seconds": time.perf_counter() - started,
    }
    if len(site.train) < min_report_patients(context.node_config):
        del metrics["loss"]  # no mean over fewer than k patients leaves the site (module docstring)
    # every round is recorded, DP or not (without DP: ε = ∞ from then on); the budget is re-checked under the
    # ledger's lock on what is on disk now, and if another run spent it meanwhile this update is not sent
    try:
        entry = ledger.record(
            run=run_id,
            round=server_round,
            noise_multiplier=None if plan is None else plan.noise_multiplier,
            q=0.0 if plan is None else plan.sample_rate,
            steps=stats.steps,
            budget=math.inf if dp is None else dp.budget,
            max_epsilon_run=policy.max_epsilon_run or math.inf,
            policy=policy.as_record(),
        )
    except BudgetExhausted as err:
        return _refused(msg, context, PRIVACY_EXHAUSTED, str(err))
    if plan is not None:
        metrics |= {
            "epsilon": entry.epsilon,
            "delta": plan.delta,
            "dp-noise": plan.noise_multiplier,
            "dp-sample-rate": plan.sample_rate,
            "dp-steps": stats.steps,
        }
    return _reply(msg, site, MetricRecord(metrics), model_to_arrays(model))  # type: ignore[arg-type]


@app.evaluate()
@reply_without_detail
def evaluate(msg: Message, context: Context) -> Message:
    started = time.perf_counter()
    _, site, model = _site_and_model(msg, context)
    metrics: dict[str, int | float] = {WEIGHT_KEY: len(site.val), UNIT_WEIGHT_KEY: 1}
    if len(site.val) >= min_report_patients(context.node_config):
        summary = summarize(predict(model, site.val))
        metrics |= {
            "auroc": summary["auroc"],
            "balanced_accuracy": summary["balanced_accuracy"],
            "loss": summary["loss"],
            "seconds": time.perf_counter() - started,
        }
    return _reply(msg, site, MetricRecord(metrics), None)  # type: ignore[arg-type]


@app.query()
@reply_without_detail
def statistics(msg: Message, context: Context) -> Message:
    """Per-dimension tile count, sum and sum of squares over this site's training patients, for the feature
    standardisation the sites agree on (fedpath.common.standardize). Aggregates over every training tile,
    never a tile; only with at least k training patients, and never in a run with per-patient DP (its
    accounting does not cover these sums): otherwise the reply holds the patient count alone. A run the site's
    own policy refuses (DP required, models, rounds) gets no statistics either: the refusal a training round
    would get (code ``POLICY_REFUSED``), before the site's manifest or any feature file is read."""
    run = RunConfig.from_flower(context.run_config)
    try:
        SitePolicy.from_node_config(context.node_config).check_run(run, 0)
    except PolicyRefused as err:
        return _refused(msg, context, POLICY_REFUSED, err.reason)
    run.require_model_shape()
    site = load_site(resolve_site(context.node_config, run), run)
    check_compatible(site, run)
    metrics: dict[str, int | float] = {WEIGHT_KEY: len(site.train)}
    arrays = None
    if not run.private and len(site.train) >= min_report_patients(context.node_config):
        moments = moments_of(site.train)
        metrics[MOMENTS_COUNT] = moments.count
        arrays = moments_to_arrays(moments)
        site_log(context).info(
            "sent feature statistics (tile count, per-dimension sums) over %d training patients, run %s",
            len(site.train),
            context.run_id,
        )
    return _reply(msg, site, MetricRecord(metrics), arrays)  # type: ignore[arg-type]


@app.query("calibration")
@reply_without_detail
def calibration(msg: Message, context: Context) -> Message:
    """Aggregates for the calibration the sites agree on (`fedpath.common.calibration`), over this site's
    validation patients with the weights the coordinator sends (the presented model): per temperature of a
    fixed grid, a summed NLL and a histogram of nonconformity scores; never a patient's score. Only with at
    least k validation patients and never in a run with per-patient DP (its accounting does not cover them);
    otherwise the reply holds the patient count alone. A run the site's policy refuses gets ``POLICY_REFUSED``
    before anything is read."""
    run = RunConfig.from_flower(context.run_config)
    try:
        SitePolicy.from_node_config(context.node_config).check_run(run, 0)
    except PolicyRefused as err:
        return _refused(msg, context, POLICY_REFUSED, err.reason)
    run, site, model = _site_and_model(msg, context)
    metrics: dict[str, int | float] = {WEIGHT_KEY: len(site.val)}
    arrays = None
    if not run.private and site.val and len(site.val) >= min_report_patients(context.node_config):
        scored = predict(model, site.val)
        # log-probabilities are the logits up to a constant per patient, which softmax(z / T) ignores
        nll, histogram = site_statistics(np.log(np.clip(scored.probs, 1e-12, 1.0)), scored.labels)
        arrays = calibration_to_arrays(nll, histogram)
        site_log(context).info(
            "sent calibration aggregates (NLL sums, score histograms) over %d validation patients, run %s",
            len(site.val),
            context.run_id,
        )
    return _reply(msg, site, MetricRecord(metrics), arrays)  # type: ignore[arg-type]
