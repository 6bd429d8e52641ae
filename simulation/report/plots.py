"""Plots on matplotlib's Agg canvas (imported only here)."""

from __future__ import annotations

import io
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from fedpath.common.metrics import (
    Estimate,
    reliability_curve,
    roc_curve,
)

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
from fedpath.simulation.report.analysis import (
    Analysis,
)
from fedpath.simulation.report.contract import (
    PROTOCOLS,
    SHORT_LABELS,
)

# --- plots (matplotlib's Agg canvas, imported only here) ----------------------------------------------------


def method_colours(methods: Sequence[str]) -> dict[str, tuple[float, float, float, float]]:
    """One colour per method, the same in every plot."""
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(methods) <= 10 else "tab20"]
    return {m: cmap(i % cmap.N) for i, m in enumerate(methods)}


def _new_figure(
    n_axes: int, *, ncols: int = 3, size: tuple[float, float] = (4.6, 3.6)
) -> tuple[Figure, list[Axes]]:
    from matplotlib.figure import Figure

    ncols = min(ncols, n_axes)
    nrows = math.ceil(n_axes / ncols)
    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows), layout="constrained")
    axes = [fig.add_subplot(nrows, ncols, i + 1) for i in range(n_axes)]
    return fig, axes


def _png(fig: Figure, axes: Sequence[Axes]) -> bytes:
    """The figure as PNG, with one legend (methods) outside the axes on the right."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    handles: dict[str, Any] = {}
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, h)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="outside right center", fontsize="small")
    buf = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buf)
    return buf.getvalue()


def _yerr(e: Estimate) -> tuple[float, float]:
    """Error-bar lengths below and above the estimate (0 where the CI is unknown)."""
    if not (math.isfinite(e.low) and math.isfinite(e.high)):
        return (0.0, 0.0)
    return (max(0.0, e.value - e.low), max(0.0, e.high - e.value))


def plot_auroc_by_site(analysis: Analysis, protocol: str, colours: Mapping[str, Any]) -> bytes:
    """AUROC (mean over seeds) with its 95% CI per test site, one marker per method."""
    sites = analysis.sites(protocol)
    methods = [m for m in analysis.methods if (protocol, m) in analysis.overall]
    fig, (ax,) = _new_figure(1, size=(max(6.0, 1.2 * len(sites) + 3), 4.2))
    width = 0.8 / max(len(methods), 1)
    for j, m in enumerate(methods):
        xs, ys, err = [], [], []
        for i, site in enumerate(sites):
            s = analysis.per_site.get((protocol, m, site))
            if s is None or not math.isfinite(s.auroc.value):
                continue
            xs.append(i - 0.4 + width * (j + 0.5))
            ys.append(s.auroc.value)
            err.append(_yerr(s.auroc))
        if xs:
            ax.errorbar(xs, ys, yerr=np.array(err).T, fmt="o", color=colours[m], label=m, capsize=3)
    ax.axhline(0.5, color="grey", ls=":", lw=1, label="chance (0.5)")
    ax.set_xticks(range(len(sites)), sites)
    ax.set_xlabel("held-out site (not used in training)" if protocol == "loso" else "test site")
    ax.set_ylabel("AUROC (mean over seeds, 95% CI)")
    ax.set_ylim(0.0, 1.02)
    ax.set_title(f"AUROC per site: {SHORT_LABELS[protocol]}")
    ax.grid(axis="y", alpha=0.3)
    return _png(fig, [ax])


def plot_roc(analysis: Analysis, protocol: str, colours: Mapping[str, Any]) -> bytes:
    """ROC curve per test site and method; over seeds, the true-positive rates are averaged at each FPR."""
    sites = analysis.sites(protocol)
    fig, axes = _new_figure(len(sites))
    grid = np.linspace(0, 1, 101)
    for ax, site in zip(axes, sites, strict=True):
        for m in analysis.methods:
            runs = [
                e
                for e in analysis.evals
                if (e.protocol, e.method, e.test_site) == (protocol, m, site) and math.isfinite(e.auroc)
            ]
            if runs:
                tpr = np.mean([np.interp(grid, *roc_curve(e.labels, e.probs)) for e in runs], axis=0)
                ax.plot(np.r_[0.0, grid], np.r_[0.0, tpr], color=colours[m], label=m, lw=1.5)
        ax.plot([0, 1], [0, 1], color="grey", ls=":", lw=1, label="chance")
        ax.set_title(f"{site} ({analysis.site_patients(protocol, site)} patients)")
        ax.set_xlabel("false-positive rate (1 − specificity)")
        ax.set_ylabel("true-positive rate (sensitivity)")
        ax.set_aspect("equal")
    fig.suptitle(f"ROC curves, mean over seeds: {SHORT_LABELS[protocol]}")
    return _png(fig, axes)


def plot_reliability(analysis: Analysis, colours: Mapping[str, Any]) -> bytes:
    """Reliability diagram per protocol: observed accuracy against the model's confidence, all sites and seeds
    pooled; a calibrated model lies on the diagonal."""
    protocols = analysis.protocols
    fig, axes = _new_figure(len(protocols), ncols=2, size=(5.2, 4.6))
    for ax, protocol in zip(axes, protocols, strict=True):
        for m in analysis.methods:
            runs = [e for e in analysis.evals if (e.protocol, e.method) == (protocol, m)]
            if runs:
                conf, acc, _ = reliability_curve(
                    np.concatenate([e.labels for e in runs]), np.concatenate([e.probs for e in runs])
                )
                ax.plot(conf, acc, "o-", color=colours[m], label=m, lw=1.2, ms=4)
        ax.plot([0, 1], [0, 1], color="grey", ls=":", lw=1, label="perfect calibration")
        ax.set_xlabel("predicted confidence (probability of the predicted class)")
        ax.set_ylabel("observed accuracy")
        ax.set_title(f"Calibration: {SHORT_LABELS[protocol]}")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
    return _png(fig, axes)


def plot_convergence(analysis: Analysis, colours: Mapping[str, Any]) -> bytes:
    """Each rounds.csv metric per server round and method: mean over seeds and held-out sites, band ± 1 SD."""
    from matplotlib.ticker import MaxNLocator

    panels = sorted(
        {(r.metric, r.protocol) for r in analysis.rounds}, key=lambda k: (k[0], PROTOCOLS.index(k[1]))
    )
    fig, axes = _new_figure(len(panels), ncols=2, size=(5.4, 3.8))
    for ax, (metric, protocol) in zip(axes, panels, strict=True):
        for m in [*analysis.methods, *sorted({r.method for r in analysis.rounds} - set(analysis.methods))]:
            values: dict[int, list[float]] = defaultdict(list)
            for r in analysis.rounds:
                if (r.metric, r.protocol, r.method) == (metric, protocol, m):
                    values[r.round].append(r.value)
            if not values:
                continue
            rounds = sorted(values)
            mean = np.array([np.mean(values[k]) for k in rounds])
            sd = np.array([np.std(values[k]) for k in rounds])
            colour = colours.get(m, "black")
            ax.plot(rounds, mean, "o-", color=colour, label=m, lw=1.5, ms=3)
            ax.fill_between(rounds, mean - sd, mean + sd, color=colour, alpha=0.15, lw=0)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("server round")
        ax.set_ylabel(metric)
        ax.set_title(f"{metric}: {SHORT_LABELS[protocol]}")
        ax.grid(alpha=0.3)
    return _png(fig, axes)


def plot_privacy_utility(analysis: Analysis, colours: Mapping[str, Any]) -> bytes:
    """AUROC (mean over sites and seeds, 95% CI) against the privacy budget ε, log scale; ε = ∞ is the same
    method without DP. Solid lines: unseen hospitals; dashed: internal validation."""
    fig, (ax,) = _new_figure(1, size=(7.0, 4.4))
    all_eps = [s.epsilon for s in analysis.overall.values() if s.epsilon is not None]
    x_inf = max(all_eps) * 4
    styles = {"loso": "-", "internal": "--", "official": "-.", "cv": ":"}
    for protocol in analysis.protocols:
        for _, points, reference in analysis.dp_curves(protocol):
            shown = [*points, *([reference] if reference else [])]
            xs = [s.epsilon or x_inf for s in shown]
            ax.plot(xs, [s.auroc.value for s in shown], styles[protocol], color="0.45", lw=1, zorder=1)
            for x, s in zip(xs, shown, strict=True):
                yerr = np.array([_yerr(s.auroc)]).T
                ax.errorbar(
                    [x],
                    [s.auroc.value],
                    yerr=yerr,
                    fmt="o",
                    color=colours[s.method],
                    label=s.method,
                    capsize=3,
                )
    ax.set_xscale("log")
    ticks = sorted(set(all_eps))
    ax.set_xticks([*ticks, x_inf], [f"{t:g}" for t in ticks] + ["∞ (no DP)"])
    ax.minorticks_off()
    ax.set_xlabel("privacy budget ε (smaller = stronger privacy)")
    ax.set_ylabel("AUROC (mean over sites and seeds, 95% CI)")
    ax.set_title("Privacy–utility: what differential privacy costs in AUROC")
    ax.grid(alpha=0.3)
    for protocol in analysis.protocols:
        ax.plot([], [], styles[protocol], color="0.45", label=SHORT_LABELS[protocol])
    return _png(fig, [ax])
