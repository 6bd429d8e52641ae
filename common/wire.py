"""Model weights on the wire: torch state dicts to and from Flower's `ArrayRecord`, losslessly.

Also the checks a coordinator applies to an update before aggregating it (finite values, expected names
and shapes), kept here because both sides must agree on what a valid update is.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import ArrayRecord
from torch import nn


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
