"""What `fedpath manifest check --deep` checks beyond the manifest's own rows: every feature file and slide.

Every feature file is opened: readable HDF5 in a layout fedpath reads, at least one tile, and (deep) every
value finite. Across the cohort, every file must have one feature dimension and state one encoder, weights
checksum and tile size (`fedpath.common.features.provenance`): a file that differs from what most files state
is named with both values. Every slide path named must exist. Each problem names the manifest's line and the
file, as the manifest's own problems do (`Problem`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

from fedpath.common.features import (
    FeatureFileError,
    common_provenance,
    inspect_features,
    provenance,
    provenance_mismatch,
    read_feature_matrix,
)
from fedpath.common.manifest import Manifest, Problem


def check_files(
    manifest: Manifest, *, read_values: bool = True, progress: Callable[[int], object] | None = None
) -> list[Problem]:
    """Problems of the manifest's feature files and slide paths (see the module docstring); `read_values`
    False checks headers only (the cheap part, run before a federation starts)."""
    problems: list[Problem] = []
    dims: dict[int, int] = {}  # line → feature dimension
    stated: dict[int, dict[str, str | int | float]] = {}
    for record in manifest.slides:
        if record.slide is not None and not record.slide.exists():
            problems.append(Problem(record.line, "slide", f"{record.slide}: slide file does not exist"))
        if record.features is None:
            if progress is not None:
                progress(1)
            continue
        try:
            info = inspect_features(record.features)
            if info.n_tiles < 1:
                raise FeatureFileError(
                    f"{record.features}: holds no tiles; re-extract slide '{record.slide_id}'"
                )
            if read_values:
                read_feature_matrix(record.features, layout=info.layout)
        except FeatureFileError as err:
            problems.append(Problem(record.line, "features", str(err)))
        else:
            dims[record.line] = info.dim
            stated[record.line] = provenance(info)
        if progress is not None:
            progress(1)
    if dims:
        usual, _ = Counter(dims.values()).most_common(1)[0]
        first = min(line for line, d in dims.items() if d == usual)
        for line, dim in sorted(dims.items()):
            if dim != usual:
                problems.append(
                    Problem(
                        line,
                        "features",
                        f"{dim}-dimensional features, but {usual} in most files (e.g. line {first})",
                    )
                )
    if stated:
        usual_stated = common_provenance(stated.values())
        for line, found in sorted(stated.items()):
            differ = provenance_mismatch(usual_stated, found)
            if differ:
                text = "; ".join(d.replace("model ", "most files ") for d in differ)
                problems.append(Problem(line, "features", f"made otherwise than most files: {text}"))
    return sorted(problems, key=lambda p: (p.line or 0, p.column or ""))


def file_problems_text(manifest_path: Path, problems: list[Problem]) -> str:
    return "\n".join(p.render(manifest_path) for p in problems)


def precheck(manifest: Manifest) -> str | None:
    """The cheap part (headers and paths, no feature values), run before a federation or a grid starts: a
    message naming every problem and what to run next, or None."""
    problems = check_files(manifest, read_values=False)
    if not problems:
        return None
    return (
        f"{len(problems)} problem(s) in the cohort's files; nothing was started:\n"
        f"{file_problems_text(manifest.path, problems)}\n"
        f"fix them (`fedpath manifest check --deep {manifest.path}` checks every value too)"
    )
