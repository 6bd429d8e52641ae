"""FedProx with an aggregation guard, per-site bookkeeping and round numbers that survive a resume.

`GuardedFedProx` is Flower's `FedProx` (aggregation exactly as FedAvg, weighted by each site's training
patients) with three additions:

* **Guard** — before aggregation every training reply is checked: an error reply (the site failed), an
  update with NaN/Inf, missing, extra or reshaped arrays, another dtype, or no positive patient count is
  left out and logged with the site that sent it. The round is aggregated when at least `min_sites`
  updates are left; otherwise the global model stays as it was for that round. Of an error reply only the
  code is kept, with the coordinator's own text for it (`site_error`): a site's free text may name files or
  patients (an old or malicious site, or Flower's traceback of a ClientApp that raised), so it is never
  logged or recorded.
* **Metrics as sent** — a site leaves out a metric computed over fewer than its k patients, so replies may
  hold different metric keys; each metric is averaged over the replies that hold it.
* **Round offset** — a resumed run starts Flower's round counter at 1 again; the offset makes the messages,
  the seeds the sites derive from them, the checkpoints and the log carry the true round number.
* **Bookkeeping** — per round and site: training and validation metrics, bytes received, status; collected
  in `RoundRecord` for the round log. Replies are aggregated in site-name order, so the floating-point sum
  (and a resumed run) does not depend on the order in which replies arrived.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from flwr.common.logger import log
from flwr.common.serde import recorddict_to_proto
from flwr.serverapp import Grid
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedProx
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from fedpath.common.runconfig import (
    FEATURES_PREFIX,
    POLICY_REFUSED,
    PRIVACY_EXHAUSTED,
    PRIVACY_METRICS,
    SITE_ERRORS,
    SITE_NAME,
    SITE_RECORD,
    UNIT_WEIGHT_KEY,
    WEIGHT_KEY,
)
from fedpath.common.wire import update_problems
from fedpath.server.standardization import keep_standardization


@dataclass
class SiteRound:
    """What the coordinator learned about one site in one round."""

    node_id: int
    status: str = "ok"  # ok | rejected | failed | privacy-exhausted | policy-refused
    reason: str = ""
    code: int | None = None  # of the site's error reply
    bytes_received: int = 0
    train: dict[str, float] = field(default_factory=dict)
    evaluate: dict[str, float] = field(default_factory=dict)
    features: dict[str, str | int | float] = field(default_factory=dict)  # what its features state


@dataclass
class RoundRecord:
    round: int
    started: float
    bytes_sent_per_site: int = 0
    sites: dict[str, SiteRound] = field(default_factory=dict)
    train_aggregate: dict[str, float] = field(default_factory=dict)
    evaluate_aggregate: dict[str, float] = field(default_factory=dict)
    aggregated: bool = False

    def name_node(self, node_id: int, site: str) -> None:
        """File what was logged under 'node-<id>' (an error reply names no site) under the site's name, once
        a later reply of the same round (its evaluation) names it."""
        anonymous = self.sites.pop(f"node-{node_id}", None)
        if anonymous is not None and site != f"node-{node_id}":
            named = self.sites.setdefault(site, SiteRound(node_id=node_id))
            named.status, named.reason, named.code = anonymous.status, anonymous.reason, anonymous.code
            named.bytes_received += anonymous.bytes_received
            named.train = named.train or anonymous.train
        elif anonymous is not None:
            self.sites[site] = anonymous

    def as_log_line(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "seconds": round(time.perf_counter() - self.started, 3),
            "finished_at": round(time.time(), 3),
            "aggregated": self.aggregated,
            "bytes_sent_per_site": self.bytes_sent_per_site,
            "bytes_received": sum(s.bytes_received for s in self.sites.values()),
            "sites": {
                name: {
                    "node_id": s.node_id,
                    "status": s.status,
                    **({"reason": s.reason} if s.reason else {}),
                    **({"code": s.code} if s.code is not None else {}),
                    "bytes_received": s.bytes_received,
                    "train": s.train,
                    "evaluate": s.evaluate,
                    **({"features": s.features} if s.features else {}),
                }
                for name, s in sorted(self.sites.items())
            },
            "aggregate": {"train": self.train_aggregate, "evaluate": self.evaluate_aggregate},
        }


# Flower's own error codes (a node that went away, a ClientApp that raised or crashed): code → name.
FLOWER_ERRORS = {v: k for k, v in vars(ErrorCode).items() if k.isupper() and isinstance(v, int)}
ERROR_STATUS = {PRIVACY_EXHAUSTED: "privacy-exhausted", POLICY_REFUSED: "policy-refused"}


def site_error(code: int) -> tuple[str, str]:
    """Status and recorded text of an error reply: the code and the coordinator's own text for it, never the
    reason the site sent; an unknown code is recorded as the number alone."""
    if code in SITE_ERRORS:
        meaning = f": {SITE_ERRORS[code]}"
    elif code in FLOWER_ERRORS:
        meaning = f": Flower error {FLOWER_ERRORS[code]}"
    else:
        meaning = ""
    return ERROR_STATUS.get(code, "failed"), f"error code {code}{meaning}"


def message_bytes(msg: Message) -> int:
    """Serialized size of a message's content (arrays, metrics, config) in bytes: what crosses the wire."""
    return int(recorddict_to_proto(msg.content).ByteSize())


def site_of(msg: Message, known: dict[int, str]) -> str:
    """The site named in a reply; for a reply that names none (an error reply), the name the node gave in
    an earlier reply, else its node id."""
    node = msg.metadata.src_node_id
    if not msg.has_error() and SITE_RECORD in msg.content.config_records:
        name = msg.content.config_records[SITE_RECORD].get(SITE_NAME)
        if isinstance(name, str) and name:
            known[node] = name
            return name
    return known.get(node, f"node-{node}")


def stated_features(msg: Message) -> dict[str, str | int | float]:
    """What a reply says the site's features were made with (encoder, weights checksum, tile size)."""
    record = msg.content.config_records.get(SITE_RECORD) if not msg.has_error() else None
    if record is None:
        return {}
    return {
        str(k)[len(FEATURES_PREFIX) :]: v
        for k, v in record.items()
        if str(k).startswith(FEATURES_PREFIX) and isinstance(v, str | int | float)
    }


def _metrics(msg: Message) -> dict[str, float]:
    records = list(msg.content.metric_records.values())
    return {k: v for k, v in records[0].items() if isinstance(v, int | float)} if records else {}


def reply_problems(msg: Message, reference: ArrayRecord) -> list[str]:
    """Why a training reply cannot be aggregated (empty when it can)."""
    content = msg.content
    if len(content.array_records) != 1:
        return [f"expected one ArrayRecord, got {len(content.array_records)}"]
    if len(content.metric_records) != 1:
        return [f"expected one MetricRecord, got {len(content.metric_records)}"]
    update = next(iter(content.array_records.values()))
    problems = update_problems(update, reference)
    for name in sorted(set(update) & set(reference)):
        if update[name].dtype != reference[name].dtype:
            problems.append(f"'{name}' has another dtype than {reference[name].dtype}")  # as sent: any text
    weight = next(iter(content.metric_records.values())).get(WEIGHT_KEY)
    if not isinstance(weight, int | float) or not weight > 0:
        problems.append(f"metric '{WEIGHT_KEY}' must be a positive number, got {weight!r}")
    return problems


def train_metrics(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Weighted mean of the training metrics, without the privacy figures: a site's ε is its own and is
    logged per site; an average ε across sites would guarantee nothing to anyone."""
    mean = weighted_mean_finite(records, weight_key)
    return MetricRecord({k: v for k, v in mean.items() if k not in PRIVACY_METRICS})


def weighted_mean_finite(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Weighted mean of each metric over the replies where it is finite (a site whose validation patients
    are all of one class has no AUROC; it must not turn the federation's AUROC into NaN)."""
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    for record in records:
        metrics = next(iter(record.metric_records.values()))
        w = float(metrics[weight_key])  # type: ignore[arg-type]
        for key, value in metrics.items():
            if (
                key not in (weight_key, UNIT_WEIGHT_KEY)
                and isinstance(value, int | float)
                and math.isfinite(value)
            ):
                sums[key] = sums.get(key, 0.0) + w * float(value)
                weights[key] = weights.get(key, 0.0) + w
    return MetricRecord({k: sums[k] / weights[k] for k in sums if weights[k] > 0})


class GuardedFedProx(FedProx):
    """FedProx weighted by training patients, with the guard and bookkeeping described above."""

    def __init__(
        self,
        *,
        reference: ArrayRecord,
        proximal_mu: float,
        min_sites: int,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        round_offset: int = 0,
        weighted_by_key: str = WEIGHT_KEY,
    ) -> None:
        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=min_sites,
            min_evaluate_nodes=min_sites if fraction_evaluate > 0 else 0,
            min_available_nodes=min_sites,
            weighted_by_key=weighted_by_key,
            train_metrics_aggr_fn=train_metrics,
            evaluate_metrics_aggr_fn=weighted_mean_finite,
            proximal_mu=proximal_mu,
        )
        self.reference = reference
        self.min_sites = min_sites
        self.round_offset = round_offset
        self.current: RoundRecord | None = None
        self.node_sites: dict[int, str] = {}  # node id → site name, learned from replies

    def true_round(self, server_round: int) -> int:
        return server_round + self.round_offset

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        r = self.true_round(server_round)
        self.current = RoundRecord(round=r, started=time.perf_counter())
        messages = list(super().configure_train(r, arrays, config, grid))
        if messages:
            self.current.bytes_sent_per_site = message_bytes(messages[0])
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        r = self.true_round(server_round)
        record = self._record(r)
        accepted: list[tuple[str, Message]] = []
        for msg in replies:
            site = site_of(msg, self.node_sites)
            entry = record.sites.setdefault(site, SiteRound(node_id=msg.metadata.src_node_id))
            if msg.has_error():
                entry.code = int(msg.error.code)
                self._refuse(r, site, entry, *site_error(entry.code))
                continue
            entry.bytes_received += message_bytes(msg)
            entry.train = _metrics(msg)
            entry.features = stated_features(msg)
            problems = reply_problems(msg, self.reference)
            if problems:
                self._refuse(r, site, entry, "rejected", "update rejected: " + "; ".join(problems))
                continue
            accepted.append((site, msg))
        if len(accepted) < self.min_sites:
            log(
                WARNING,
                "round %d: %d usable update(s), fewer than min-sites=%d; the global model is kept unchanged",
                r,
                len(accepted),
                self.min_sites,
            )
            return None, None
        accepted.sort(key=lambda pair: pair[0])
        # FedAvg's aggregation without its check that all replies hold the same metric keys (see above).
        contents = [msg.content for _, msg in accepted]
        arrays = aggregate_arrayrecords(contents, self.weighted_by_key)
        keep_standardization(arrays, self.reference)
        metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key)
        record.aggregated = arrays is not None
        record.train_aggregate = dict(metrics or {})  # type: ignore[arg-type]
        return arrays, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return super().configure_evaluate(self.true_round(server_round), arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        r = self.true_round(server_round)
        record = self._record(r)
        usable: list[tuple[str, Message]] = []
        for msg in replies:
            site = site_of(msg, self.node_sites)
            record.name_node(msg.metadata.src_node_id, site)
            entry = record.sites.setdefault(site, SiteRound(node_id=msg.metadata.src_node_id))
            if msg.has_error():
                log(
                    WARNING,
                    "round %d: evaluation failed at site %s: %s",
                    r,
                    site,
                    site_error(msg.error.code)[1],
                )
                entry.evaluate = {}
                continue
            entry.evaluate = _metrics(msg)
            if len(msg.content.metric_records) == 1 and entry.evaluate.get(WEIGHT_KEY, 0) > 0:
                usable.append((site, msg))
        if not usable:
            return None
        usable.sort(key=lambda pair: pair[0])
        metrics = self.evaluate_metrics_aggr_fn([msg.content for _, msg in usable], self.weighted_by_key)
        record.evaluate_aggregate = dict(metrics or {})  # type: ignore[arg-type]
        return metrics

    def _record(self, r: int) -> RoundRecord:
        if self.current is None or self.current.round != r:
            self.current = RoundRecord(round=r, started=time.perf_counter())
        return self.current

    def _refuse(self, r: int, site: str, entry: SiteRound, status: str, reason: str) -> None:
        entry.status, entry.reason = status, reason
        log(
            WARNING,
            "round %d: site %s (node %d): %s; the round goes on without it",
            r,
            site,
            entry.node_id,
            reason,
        )

    def summary(self) -> None:
        log(INFO, "\t├──> fedpath guard: updates with NaN/Inf or another layout are rejected per site")
        log(INFO, "\t│\t└── Minimum sites per round: %d; round offset: %d", self.min_sites, self.round_offset)
        super().summary()


class GuardedCentralDP(DifferentialPrivacyServerSideFixedClipping):
    """Flower's client-level DP wrapper around `GuardedFedProx`, except that the standardizer's buffers are
    put back after the noise is added: they are the coordinator's fixed values, not something learned, and
    noise on a scale could make it zero or negative."""

    strategy: GuardedFedProx

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is not None:
            keep_standardization(arrays, self.strategy.reference)
        return arrays, metrics
