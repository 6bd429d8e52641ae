"""Which site this node is, and its bags: resolved from the node config (deployment) or the partition id
(simulation).

Deployment: the site's own `flower-supernode --node-config 'manifest="/data/cohort.csv" site="H1"'` names
the manifest and the site (``site`` may be left out when the manifest holds one site). The manifest path
is never taken from the run config here: the coordinator must not choose which files a hospital reads.

Simulation: Flower's engine gives each node only ``partition-id`` and ``num-partitions``; node k plays the
k-th site (in order of first appearance) of the run config's ``manifest``.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from fedpath.common.bags import Bag, bags_from_manifest, feature_dim
from fedpath.common.features import FeatureFileError, common_provenance, inspect_features, provenance
from fedpath.common.manifest import Manifest, load_manifest, split_patients
from fedpath.common.runconfig import RunConfig


class SiteConfigError(ValueError):
    """Node or run config that does not identify a usable site; the message says what to set."""


class IncompatibleSite(SiteConfigError):
    """The run's model does not fit the site's data (feature dimension, classes or weights)."""


@dataclass(frozen=True)
class SiteRef:
    """A manifest file and the name of one of its sites."""

    manifest: Path
    site: str


@dataclass(frozen=True)
class SiteData:
    """One site's patient-level bags: training and validation (test patients are never touched here)."""

    name: str
    train: list[Bag]
    val: list[Bag]
    slides_train: int
    in_dim: int
    num_classes: int
    classes: tuple[str, ...] = ()  # the site's class labels in index order
    # what the training features state they were made with (`common_provenance`): sent with training replies
    features: dict[str, str | int | float] = field(default_factory=dict)


def choose_site(manifest: Manifest, site: str, *, how: str) -> str:
    """`site` if the manifest holds it; when no site is named, the manifest's only site. `how` tells the
    user how to name one when the manifest holds several."""
    sites = manifest.sites
    if not site:
        if len(sites) != 1:
            raise SiteConfigError(f"{manifest.path} holds sites {', '.join(sites)}: {how}")
        return sites[0]
    if site not in sites:
        raise SiteConfigError(f"{manifest.path} has no site '{site}'; its sites are {', '.join(sites)}")
    return site


def resolve_site(node_config: Mapping[str, object], run: RunConfig) -> SiteRef:
    """The manifest and site this node plays (see the module docstring)."""
    if "manifest" in node_config:
        manifest = Path(str(node_config["manifest"])).expanduser()
        site = choose_site(
            load_manifest(manifest, check_files=False),
            str(node_config.get("site", "")),
            how='name this node\'s site with --node-config \'manifest="..." site="NAME"\'',
        )
        return SiteRef(manifest, site)
    if "partition-id" in node_config:
        if not run.manifest:
            raise SiteConfigError(
                "simulation node without a manifest: set run config 'manifest' to the cohort manifest "
                "(`fedpath simulate --manifest` does this)"
            )
        sites = load_manifest(run.manifest, check_files=False).sites
        pid = int(node_config["partition-id"])  # type: ignore[call-overload]
        partitions = int(node_config.get("num-partitions", len(sites)))  # type: ignore[call-overload]
        if partitions != len(sites) or not 0 <= pid < len(sites):
            raise SiteConfigError(
                f"the simulation has {partitions} nodes but {run.manifest} has {len(sites)} sites "
                f"({', '.join(sites)}); run it with num-supernodes={len(sites)}"
            )
        return SiteRef(Path(run.manifest), sites[pid])
    raise SiteConfigError(
        "this node has no site settings: start it with `fedpath site start --manifest M --site S` or "
        'flower-supernode --node-config \'manifest="/path/manifest.csv" site="NAME"\''
    )


def load_site(ref: SiteRef, run: RunConfig) -> SiteData:
    """Load the site's manifest rows, split its patients as every engine does, and build bags.

    The split is `split_patients` over the whole manifest, so a simulated site and the baselines built
    from the same manifest see identical training, validation and test patients.
    """
    classes = tuple(run.class_labels) if run.classes else ()
    return _load_site(
        ref.manifest.resolve(), ref.site, run.val_fraction, run.test_fraction, run.split_seed, classes
    )


@functools.lru_cache(maxsize=8)
def _load_site(
    manifest_path: Path, site: str, val: float, test: float, seed: int, classes: tuple[str, ...] = ()
) -> SiteData:
    # Cached: a simulation actor plays the same site in every round; the bags hold paths, not features.
    manifest = load_manifest(manifest_path)
    if classes:  # the run states its classes: index them in its order (a site may hold only some of them)
        outside = [c for c in manifest.classes if c not in classes]
        if outside:
            raise IncompatibleSite(
                f"site '{site}' has the labels {outside}, which are not among the run's classes {list(classes)}: "
                "the same class must have the same label at every site"
            )
        manifest = load_manifest(manifest_path, classes=classes)
    if site not in manifest.sites:
        raise SiteConfigError(f"{manifest_path}: no site '{site}'; its sites are {', '.join(manifest.sites)}")
    split = split_patients(manifest, val=val, test=test, seed=seed)[site]
    train_manifest = manifest.for_patients(split.train)
    train = bags_from_manifest(train_manifest)
    val_bags = bags_from_manifest(manifest.for_patients(split.val))
    if not train:
        raise SiteConfigError(f"site '{site}' in {manifest_path} has no training patients")
    return SiteData(
        name=site,
        train=train,
        val=val_bags,
        slides_train=len(train_manifest.slides),
        in_dim=_feature_dim(manifest),
        num_classes=manifest.num_classes,
        classes=tuple(manifest.classes),
        features=_provenance(train),
    )


def _provenance(bags: list[Bag]) -> dict[str, str | int | float]:
    """The training features' provenance from their headers; an unreadable file is left to training, which
    fails on it with the file named in the site's log."""
    stated = []
    for path in (p for bag in bags for p in bag.paths):
        try:
            stated.append(provenance(inspect_features(path)))
        except FeatureFileError:
            continue
    return common_provenance(stated)


def _feature_dim(manifest: Manifest) -> int:
    try:
        return feature_dim(manifest)
    except FeatureFileError as err:
        raise SiteConfigError(str(err)) from err


def check_compatible(site: SiteData, run: RunConfig) -> None:
    """The site's data must fit the run's model: same feature dimension, number of classes and (where the run
    states them) class labels."""
    if site.in_dim != run.in_dim:
        raise IncompatibleSite(
            f"site '{site.name}' has {site.in_dim}-dimensional features but the run's model expects "
            f"in-dim={run.in_dim}: extract with the federation's encoder or fix the run config"
        )
    if site.num_classes != run.num_classes:
        raise IncompatibleSite(
            f"site '{site.name}' has {site.num_classes} label classes but the run expects "
            f"num-classes={run.num_classes}"
        )
    stated = [c for c in run.classes.split(",") if c]
    if stated and site.classes and list(site.classes) != stated:
        raise IncompatibleSite(
            f"site '{site.name}' has the labels {list(site.classes)} but the run's classes are {stated} "
            "(in index order): the same class must have the same label at every site"
        )
