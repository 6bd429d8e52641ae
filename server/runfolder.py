"""The coordinator's run folder: per-round checkpoints, the round log, the final model and its model card.

Layout (all writes atomic, so a crash leaves the previous complete file, never a half-written one)::

    RUN/checkpoints/round-0003.pt   global weights after round 3 + round, run config, seeds
    RUN/rounds.jsonl                one JSON line per finished round (per-site and aggregate metrics,
                                    seconds, bytes received)
    RUN/model.pt                    the presented global model: the weights of the round selected by
                                    `fedpath.common.selection` (lowest validation loss), same layout as a
                                    checkpoint; not written when no round aggregated a training update
    RUN/model_card.md, .json        config, sites, rounds, metrics of the run

A checkpoint is written before its round-log line; on resume the log is cut back to the checkpoint's round.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from fedpath.common.atomic import write_text_atomic
from fedpath.common.modelfile import (  # noqa: F401  (re-exported: the run folder's file format)
    Checkpoint,
    RunFolderError,
    load_checkpoint,
    load_model,
    save_checkpoint,
)

CHECKPOINT_RE = re.compile(r"round-(\d{4,})\.pt$")
# Run-config fields that must not change between a run and its resumption (they change what is computed).
RESUME_INVARIANT = (
    "proximal_mu",
    "model",
    "in_dim",
    "num_classes",
    "local_epochs",
    "local_steps",
    "standardize",
    "lr",
    "weight_decay",
    "batch_size",
    "max_tiles",
    "seed",
    "val_fraction",
    "test_fraction",
    "split_seed",
    "manifest",
)


def json_safe(value: Any) -> Any:
    """NaN/Inf → None, recursively, so that every line of the round log is strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


class RunFolder:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.checkpoints = root / "checkpoints"
        self.round_log = root / "rounds.jsonl"
        self.model = root / "model.pt"
        self.card_md = root / "model_card.md"
        self.card_json = root / "model_card.json"

    # ------------------------------------------------------------------------------------ checkpoints
    def checkpoint_path(self, server_round: int) -> Path:
        return self.checkpoints / f"round-{server_round:04d}.pt"

    def checkpoint_rounds(self) -> list[int]:
        if not self.checkpoints.is_dir():
            return []
        found = (CHECKPOINT_RE.search(p.name) for p in self.checkpoints.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    def save_checkpoint(self, ckpt: Checkpoint) -> Path:
        path = self.checkpoint_path(ckpt.round)
        save_checkpoint(path, ckpt)
        return path

    def latest_checkpoint(self) -> Checkpoint | None:
        rounds = self.checkpoint_rounds()
        return load_checkpoint(self.checkpoint_path(rounds[-1])) if rounds else None

    def resumable(self, config: dict[str, Any], *, resume: bool, rounds: int) -> Checkpoint | None:
        """The one resume rule: the checkpoint a run with run config `config` continues from (None: start
        fresh). A folder with checkpoints is not started over without `resume`; a resumed run keeps the
        settings that shape what it computes (`resume_conflicts`) and does not end before its checkpoint."""
        latest = self.latest_checkpoint()
        if latest is None:
            return None
        if not resume:
            raise RunFolderError(
                f"{self.root} already holds a run (checkpoints up to round {latest.round}): resume it "
                "(--resume / run config resume=true) or choose another run folder"
            )
        conflicts = resume_conflicts(latest.config, config)
        if conflicts:
            raise RunFolderError(
                f"cannot resume {self.root}: these settings differ from the checkpointed run: "
                + "; ".join(conflicts)
                + ". Resume with the original settings or start a new run folder"
            )
        if latest.round > rounds:
            raise RunFolderError(
                f"{self.root} has a checkpoint after round {latest.round}, beyond {rounds} rounds; "
                "raise the number of rounds"
            )
        return latest

    # ------------------------------------------------------------------------------------ round log
    def append_round(self, record: dict[str, Any]) -> None:
        """Add one round's line (the whole log is rewritten atomically; it is small)."""
        lines = self.round_log.read_text().splitlines() if self.round_log.exists() else []
        lines.append(json.dumps(json_safe(record), sort_keys=True))
        write_text_atomic(self.round_log, "\n".join(lines) + "\n")

    def read_rounds(self) -> list[dict[str, Any]]:
        if not self.round_log.exists():
            return []
        return [json.loads(line) for line in self.round_log.read_text().splitlines() if line.strip()]

    def truncate_rounds(self, last_round: int) -> None:
        """Drop log lines of rounds after `last_round` (written after the last checkpoint of a crashed run)."""
        if not self.round_log.exists():
            return
        kept = [r for r in self.read_rounds() if int(r["round"]) <= last_round]
        write_text_atomic(self.round_log, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))

    # ------------------------------------------------------------------------------------ final outputs
    def save_model(self, ckpt: Checkpoint) -> Path:
        save_checkpoint(self.model, ckpt)
        return self.model

    def no_training(self, since: float = 0.0) -> str | None:
        """The model card's account of a run in which no site trained, if the card (written at or after
        `since`, a time.time()) says so; else None."""
        if not self.card_json.exists() or self.card_json.stat().st_mtime < since:
            return None
        untrained = json.loads(self.card_json.read_text()).get("no_site_trained")
        return str(untrained) if untrained else None

    def write_model_card(self, card: dict[str, Any]) -> None:
        write_text_atomic(self.card_json, json.dumps(json_safe(card), indent=2, sort_keys=True) + "\n")
        write_text_atomic(self.card_md, render_model_card(json_safe(card)))


def resume_conflicts(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Settings that differ between a checkpoint's run config and the resuming run's."""
    return [
        f"{k}: {saved.get(k)!r} → {current.get(k)!r}"
        for k in RESUME_INVARIANT
        if saved.get(k) != current.get(k)
    ]


def describe_features(features: dict[str, Any]) -> str:
    """One line on what the training sites' features were made with (the model's `features`)."""
    if not features:
        return "not stated by the sites (fedpath predict cannot check an encoder mismatch)"
    sha = str(features.get("weights_sha256", ""))
    text = (
        f"encoder `{features.get('encoder', '?')}`"
        + (f", weights sha256 {sha[:12]}…" if sha else "")
        + (f", tiles {features['tile_size_px']} px" if "tile_size_px" in features else "")
        + (f" over {features['tile_size_um']:g} µm" if "tile_size_um" in features else "")
    )
    if not features.get("sites_agree", True):
        text += f"; **the sites disagree**: {features.get('sites')}"
    elif not features.get("files_agree", True):
        text += "; **some files of a site state otherwise**"
    return text


def describe_calibration(calibration: dict[str, Any] | None) -> str:
    """One line on the temperature and conformal threshold the sites agreed on (``calibration.json``)."""
    if not calibration:
        return "none"
    if not calibration.get("calibrated"):
        return f"none ({calibration.get('why', 'unknown')})"
    return (
        f"temperature {calibration['temperature']:.3g} (validation NLL {calibration['nll_before']:.3f} → "
        f"{calibration['nll_after']:.3f}); conformal threshold {calibration['threshold']:.3f} for "
        f"{100 * calibration['coverage']:.0f} % coverage, from {calibration['patients']} validation patients at "
        f"{', '.join(calibration['sites'])}"
    )


def render_model_card(card: dict[str, Any]) -> str:
    """A short human-readable model card (Markdown) from the card dictionary."""
    cfg = card["config"]
    lines = [
        f"# Model card: {cfg['model']} trained with FedProx (μ = {cfg['proximal_mu']})",
        "",
        f"- rounds: {card['rounds']} of {cfg['num_server_rounds']}, "
        + (
            f"{cfg['local_steps']} optimizer steps at every site each"
            if cfg.get("local_steps")
            else f"{cfg['local_epochs']} local epoch(s) each"
        ),
        f"- model: `{cfg['model']}`, in_dim {cfg['in_dim']}, {cfg['num_classes']} classes",
        f"- sites that took part: {', '.join(card['sites']) or 'none'}",
        f"- seeds: run {cfg['seed']}, split {cfg['split_seed']}",
        f"- weights: `{card['model_file']}`; round log: `{card['round_log']}`"
        if card.get("model_file")
        else f"- weights: none, no site trained; round log: `{card['round_log']}`",
        f"- fedpath {card['fedpath_version']}, Flower {card['flwr_version']}",
        f"- features: {describe_features(card.get('features') or {})}",
        f"- calibration: {describe_calibration(card.get('calibration'))}",
        f"- presented weights: {card['selection']} (rule: {card.get('selection_rule')})"
        if card.get("selection")
        else "- presented weights: none",
        "",
        "## Validation metrics of the presented model (each site's validation patients)",
        "",
        "A site sends metrics only for at least its k validation patients (its `min-report-patients`, default "
        "10 at a hospital, 1 in a simulation); below that, only the count: n/a.",
        "",
        "| site | patients | AUROC | balanced accuracy | loss |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]

    def fmt(x: Any) -> str:
        return "n/a" if x is None else f"{x:.3f}" if isinstance(x, float) else str(x)

    if card.get("no_site_trained"):
        lines[1:1] = ["", f"**Not a trained model.** {card['no_site_trained']}"]
    for site, m in sorted(card["final_evaluation"]["sites"].items()):
        lines.append(
            f"| {site} | {fmt(m.get('patients'))} | {fmt(m.get('auroc'))} | "
            f"{fmt(m.get('balanced_accuracy'))} | {fmt(m.get('loss'))} |"
        )
    agg = card["final_evaluation"]["aggregate"]
    lines.append(
        f"| **weighted mean** | | {fmt(agg.get('auroc'))} | {fmt(agg.get('balanced_accuracy'))} | "
        f"{fmt(agg.get('loss'))} |"
    )
    privacy = card.get("privacy", {})
    if privacy.get("settings", {}).get("per_patient_dp"):
        st = privacy["settings"]
        lines += [
            "",
            "## Differential privacy (per patient, at each site)",
            "",
            f"DP-SGD with Opacus: clipping norm {st['clip']}, noise multiplier {st['noise_multiplier']}, "
            f"target ε {st['target_epsilon']}, δ {st['delta']}, {st['expected_patients_per_step']} expected "
            f"patients per step, budget {st['budget']}. ε is cumulative over every round in each site's own "
            "ledger (RDP accountant); validation metrics are released without DP.",
            "",
            "| site | ε after each round trained | exhausted from round | δ |",
            "| --- | --- | ---: | ---: |",
        ]
        sites = sorted(set(privacy["epsilon_by_site_and_round"]) | set(privacy["exhausted_from_round"]))
        for site in sites:
            rounds = privacy["epsilon_by_site_and_round"].get(site, {})
            spent = ", ".join(f"r{r}: {e:.2f}" for r, e in sorted(rounds.items(), key=lambda x: int(x[0])))
            delta = privacy.get("delta_by_site", {}).get(site)
            lines.append(
                f"| {site} | {spent or '—'} | {privacy['exhausted_from_round'].get(site, '—')} | "
                f"{'—' if delta is None else f'{delta:.3g}'} |"
            )
    client_level = privacy.get("client_level")
    if client_level:
        st = client_level["settings"]
        spent = ", ".join(f"r{r}: {e:.2f}" for r, e in sorted(client_level["epsilon_by_round"].items()))
        lines += [
            "",
            "## Client-level differential privacy (at the coordinator)",
            "",
            f"Each site's update clipped to norm {st['clip']}, Gaussian noise with multiplier "
            f"{st['noise_multiplier']} on the mean, every site weighted equally; the unit is a whole site, "
            f"δ = {st['delta']}. ε after each round: {spent}. With a handful of sites this guarantee costs "
            "most of the model's accuracy; per-patient DP at each site is the useful one.",
        ]
    if card.get("rejected"):
        lines += ["", "## Rejected or failed updates", ""]
        lines += [f"- round {r['round']}, site {r['site']}: {r['reason']}" for r in card["rejected"]]
    lines += ["", "## Run config", "", "```json", json.dumps(cfg, indent=2, sort_keys=True), "```", ""]
    return "\n".join(lines)
