"""Model weights on the wire: torch state dicts to and from Flower's `ArrayRecord`, losslessly.

Also the checks a coordinator applies to an update before aggregating it (finite values, expected names
and shapes), kept here because both sides must agree on what a valid update is.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, MetricRecord
from torch import nn

from fedpath.common.standardize import FeatureMoments

# A site's reply to the standardisation query: the tile count in its MetricRecord, the per-dimension sums in
# its ArrayRecord (float64).
MOMENTS_COUNT = "tiles"
MOMENTS_TOTAL = "sum"
MOMENTS_SQUARES = "sum-of-squares"


def model_to_arrays(model: nn.Module) -> ArrayRecord:
    """The model's full state dict (parameters and buffers) as an ArrayRecord, dtypes and shapes kept."""
    return ArrayRecord({k: v.detach().cpu() for k, v in model.state_dict().items()})


def load_arrays(model: nn.Module, arrays: ArrayRecord) -> nn.Module:
    """Load an ArrayRecord into `model` (strict: names must match exactly). Returns the model."""
    state = {k: torch.as_tensor(v) for k, v in arrays.to_torch_state_dict().items()}
    model.load_state_dict(state, strict=True)
    return model


def arrays_nbytes(arrays: ArrayRecord) -> int:
    """Bytes of array payload (what travels, before framing)."""
    return sum(len(a.data) for a in arrays.values())


def update_problems(update: ArrayRecord, reference: ArrayRecord) -> list[str]:
    """Why `update` cannot be aggregated with `reference`'s layout: missing/extra names, shapes, NaN/Inf.

    An empty list means the update is acceptable.
    """
    problems = []
    missing = sorted(set(reference) - set(update))
    extra = sorted(set(update) - set(reference))
    if missing:
        problems.append(f"missing arrays {missing[:5]}")
    if extra:  # counted, not named: the names come from the sender and may say anything
        problems.append(f"{len(extra)} unexpected array(s)")
    for name in sorted(set(reference) & set(update)):
        ref, got = reference[name], update[name]
        if tuple(ref.shape) != tuple(got.shape):
            problems.append(f"'{name}' has shape {tuple(got.shape)}, expected {tuple(ref.shape)}")
            continue
        values = got.numpy()
        if np.issubdtype(values.dtype, np.floating) and not np.isfinite(values).all():
            problems.append(f"'{name}' contains NaN or Inf")
    return problems


def moments_to_arrays(moments: FeatureMoments) -> ArrayRecord:
    """A site's feature moments as the ArrayRecord of its statistics reply (its count goes in the metrics)."""
    return ArrayRecord({MOMENTS_TOTAL: Array(moments.total), MOMENTS_SQUARES: Array(moments.squares)})


def moments_from_reply(arrays: ArrayRecord, metrics: MetricRecord, dim: int) -> FeatureMoments:
    """The moments in a site's statistics reply; ValueError when they are malformed (wrong names, shape,
    dtype, a non-finite value or a count below 1), so one odd site cannot skew every site's features."""
    if set(arrays) != {MOMENTS_TOTAL, MOMENTS_SQUARES}:
        raise ValueError(f"expected arrays {MOMENTS_TOTAL!r} and {MOMENTS_SQUARES!r}")
    total, squares = arrays[MOMENTS_TOTAL].numpy(), arrays[MOMENTS_SQUARES].numpy()
    count = metrics.get(MOMENTS_COUNT)
    if not isinstance(count, int) or count < 1:
        raise ValueError(f"metric {MOMENTS_COUNT!r} must be a positive integer")
    for name, values in ((MOMENTS_TOTAL, total), (MOMENTS_SQUARES, squares)):
        if values.shape != (dim,) or not np.issubdtype(values.dtype, np.floating):
            raise ValueError(f"{name!r} must be {dim} floats, got {values.dtype} {values.shape}")
        if not np.isfinite(values).all():
            raise ValueError(f"{name!r} holds NaN or Inf")
    if (squares < 0).any():
        raise ValueError(f"{MOMENTS_SQUARES!r} holds negative values")
    return FeatureMoments(int(count), total.astype(np.float64), squares.astype(np.float64))


CALIBRATION_NLL = "calibration-nll"
CALIBRATION_HISTOGRAM = "calibration-histogram"


def calibration_to_arrays(nll: np.ndarray, histogram: np.ndarray) -> ArrayRecord:
    """A site's calibration aggregates (`fedpath.common.calibration.site_statistics`) as an ArrayRecord."""
    return ArrayRecord(
        {
            CALIBRATION_NLL: Array(np.asarray(nll, np.float64)),
            CALIBRATION_HISTOGRAM: Array(np.asarray(histogram, np.int64)),
        }
    )


def calibration_from_reply(
    arrays: ArrayRecord, temperatures: int, bins: int
) -> tuple[np.ndarray, np.ndarray]:
    """The aggregates in a site's calibration reply; ValueError when malformed (names, shapes, dtypes, values:
    NLL sums finite and ≥ 0, counts ≥ 0 and the same total at every temperature)."""
    if set(arrays) != {CALIBRATION_NLL, CALIBRATION_HISTOGRAM}:
        raise ValueError(f"expected arrays {CALIBRATION_NLL!r} and {CALIBRATION_HISTOGRAM!r}")
    nll, hist = arrays[CALIBRATION_NLL].numpy(), arrays[CALIBRATION_HISTOGRAM].numpy()
    if (
        nll.shape != (temperatures,)
        or not np.issubdtype(nll.dtype, np.floating)
        or not np.isfinite(nll).all()
    ):
        raise ValueError(f"{CALIBRATION_NLL!r} must be {temperatures} finite floats")
    if (nll < 0).any():
        raise ValueError(f"{CALIBRATION_NLL!r} holds negative sums")
    if hist.shape != (temperatures, bins) or not np.issubdtype(hist.dtype, np.integer) or (hist < 0).any():
        raise ValueError(f"{CALIBRATION_HISTOGRAM!r} must be {temperatures}×{bins} counts")
    totals = hist.sum(axis=1)
    if (totals != totals[0]).any():
        raise ValueError(f"{CALIBRATION_HISTOGRAM!r} counts differ between temperatures")
    return nll.astype(np.float64), hist.astype(np.int64)
