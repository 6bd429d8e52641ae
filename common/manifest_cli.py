"""`fedpath manifest check FILE`: validate a cohort manifest and print a per-site summary."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedpath.common.cli import Command


def _add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    check = sub.add_parser(
        "check",
        help="validate a manifest; print slides, patients and label counts per site",
        description="Validate a cohort manifest (CSV: slide_id, patient_id, site, label, features and/or "
        "slide). Prints a per-site summary, or every problem with its line and column and exits 1.",
    )
    check.add_argument("file", help="the manifest CSV")
    add_class_options(check)
    check.add_argument(
        "--require", choices=["features", "slide"], help="demand this path column on every row"
    )
    check.add_argument("--no-file-check", action="store_true", help="do not check that feature files exist")
    check.add_argument(
        "--deep",
        action="store_true",
        help="open every feature file (readable, tiles, finite values, one dimension and one encoder across "
        "the cohort) and check every slide path",
    )


def add_class_options(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """--classes and --positive, as `manifest check`, `simulate` and `compare` take them."""
    p.add_argument(
        "--classes",
        metavar="A,B",
        help="classes in index order (default: as found, sorted)",
    )
    p.add_argument("--positive", metavar="X", help="the positive class of a two-class task (default: 2nd)")


def declared_classes(args: argparse.Namespace, manifest: Path | None) -> tuple[str, ...] | None:
    """The class order of --classes and --positive (None when neither is given); --positive alone takes the
    labels found in `manifest`, and needs --classes where there is none (the coordinator sees no labels)."""
    from fedpath.common.cli import UserError
    from fedpath.common.manifest import ManifestError, class_order, load_manifest

    if not args.classes and not args.positive:
        return None
    if manifest is None and not args.classes:
        raise UserError("--positive needs --classes A,B here: the coordinator sees no labels")
    given = args.classes.split(",") if args.classes else None
    try:
        found = [] if given or manifest is None else list(load_manifest(manifest, check_files=False).classes)
        return class_order(found, classes=given, positive=args.positive)
    except ManifestError as err:
        raise UserError(f"invalid manifest:\n{err}") from err
    except ValueError as err:
        raise UserError(str(err)) from err


def classes_line(classes: tuple[str, ...]) -> str:
    """How the summaries state a task's classes: binary, with its positive class; or each against the rest."""
    if len(classes) == 2:
        return f"classes {list(classes)}, positive class '{classes[1]}'"
    return f"classes {list(classes)} (no positive class: each class is reported against the rest)"


def format_summary(manifest: object) -> str:
    from fedpath.common.manifest import Manifest

    assert isinstance(manifest, Manifest)
    rows = manifest.summary()
    header = ["site", "slides", "patients", *(f"label {c}" for c in manifest.classes)]
    table = [
        [r.site, str(r.slides), str(r.patients), *(str(r.label_counts[c]) for c in manifest.classes)]
        for r in rows
    ]
    total = [
        "total",
        str(len(manifest.slides)),
        str(len(manifest.patients())),
        *(str(sum(r.label_counts[c] for r in rows)) for c in manifest.classes),
    ]
    widths = [max(len(x) for x in col) for col in zip(header, *table, total, strict=True)]

    def fmt(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    lines = [fmt(header), *(fmt(r) for r in table), fmt(total)]
    return "\n".join(lines)


def _run(args: argparse.Namespace) -> int:
    from fedpath.common.manifest import ManifestError, load_manifest

    classes = declared_classes(args, Path(args.file))
    try:
        manifest = load_manifest(
            args.file, classes=classes, require=args.require, check_files=not args.no_file_check
        )
    except ManifestError as err:
        print(f"{len(err.problems)} problem(s) in {args.file}:\n{err}", file=sys.stderr)
        return 1
    print(format_summary(manifest))
    if args.deep:
        from tqdm import tqdm

        from fedpath.common.cohortcheck import check_files, file_problems_text

        with tqdm(total=len(manifest.slides), unit="slide", desc="deep check", disable=None) as bar:
            problems = check_files(manifest, progress=bar.update)
        if problems:
            print(f"{len(problems)} problem(s) in the files of {args.file}:", file=sys.stderr)
            print(file_problems_text(manifest.path, problems), file=sys.stderr)
            return 1
    checked = " (every feature file read, every slide path found)" if args.deep else ""
    print(f"\n{args.file}: OK{checked}, {len(manifest.sites)} sites, {classes_line(manifest.classes)}")
    return 0


COMMAND = Command(
    name="manifest",
    help="check a cohort manifest",
    add_arguments=_add_arguments,
    run=_run,
)
