"""Tile encoders: any timm model by name, with weights from a file or an offline Hugging Face cache.

Names are timm's: ``resnet50``, ``vit_small_patch16_224.augreg_in21k``, ``hf-hub:MahmoodLab/uni``. Weights come
from, in order: ``--weights PATH`` (a state dict: .safetensors, .pth, .bin), the local Hugging Face cache
(``HF_HUB_CACHE``, ``HF_HOME/hub`` or ``~/.cache/huggingface/hub``; looked up on disk only, never downloaded),
or ``--random-init`` (tests and demos; recorded in every feature file). With none of them: `EncoderError` at once.
Input normalisation (mean, std) comes from the model's pretrained config.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from timm.data import resolve_data_config

from fedpath.common.units import TilePixels

HF_PREFIX = "hf-hub:"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
RANDOM_INIT_SEED = 0


class EncoderError(Exception):
    """An encoder that cannot be built: unknown name, no weights, weights that do not fit the model."""


@dataclass
class Encoder:
    """A tile encoder ready to run: uint8 tiles (B, 3, H, W) in, float32 features (B, dim) out.

    mean, std: per-channel normalisation on the 0-1 scale; weights_sha256: of the weights file, or of the
    initial parameters for a random init; amp_dtype: autocast dtype on GPU, None for full precision.
    """

    name: str
    model: torch.nn.Module
    dim: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    weights_sha256: str
    weights_source: str
    random_init: bool
    device: torch.device
    amp_dtype: torch.dtype | None
    _scale: torch.Tensor = field(init=False, repr=False)
    _shift: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        std = torch.tensor(self.std, dtype=torch.float32).view(1, 3, 1, 1)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(1, 3, 1, 1)
        # (x/255 − mean)/std = x·scale − shift: one multiply and one subtract per batch
        self._scale = (1.0 / (255.0 * std)).to(self.device)
        self._shift = (mean / std).to(self.device)

    @torch.inference_mode()
    def embed(self, tiles: torch.Tensor) -> torch.Tensor:
        """Features (B, dim) float32 on the CPU of uint8 RGB tiles (B, 3, H, W) on any device."""
        x = tiles.to(self.device, non_blocking=True).float()
        x = x.mul_(self._scale).sub_(self._shift)
        if self.amp_dtype is not None:
            with torch.autocast(device_type=self.device.type, dtype=self.amp_dtype):
                out = self.model(x)
        else:
            out = self.model(x)
        return out.float().cpu()


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` picks cuda, then mps, then cpu; any other name is passed to torch.device."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_state(model: torch.nn.Module) -> str:
    """Hex SHA-256 of a model's parameters and buffers (names, shapes and values, in name order)."""
    digest = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(str(tuple(value.shape)).encode())
        digest.update(np.ascontiguousarray(value.detach().cpu().numpy()).tobytes())
    return digest.hexdigest()


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache folder, read from the environment at call time."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "huggingface" / "hub"


def cached_hf_file(repo_id: str, filenames: tuple[str, ...]) -> Path | None:
    """The first of `filenames` in the local cache of `repo_id` (``org/name[@revision]``), or None. No network."""
    from huggingface_hub import try_to_load_from_cache

    repo, _, revision = repo_id.partition("@")
    for filename in filenames:
        found = try_to_load_from_cache(repo, filename, cache_dir=hf_cache_dir(), revision=revision or None)
        if isinstance(found, str):
            return Path(found)
    return None


def _unknown_model(name: str) -> EncoderError:
    close = difflib.get_close_matches(name, timm.list_models(), n=8, cutoff=0.6)
    hint = (
        f"close names: {', '.join(close)}"
        if close
        else "list them with python -c 'import timm; print(timm.list_models())'"
    )
    return EncoderError(f"unknown timm model '{name}'; {hint}")


def _hf_model_config(name: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(architecture, pretrained_cfg, model_args) of ``hf-hub:org/repo`` from its cached config.json."""
    from timm.models._hub import load_model_config_from_path

    repo = name[len(HF_PREFIX) :]
    config = cached_hf_file(repo, ("config.json",))
    if config is None:
        raise EncoderError(
            f"encoder '{name}': its config.json is not in the Hugging Face cache ({hf_cache_dir()}) and nothing "
            "is downloaded at run time. On a machine with network, fill the cache (huggingface-cli download "
            f"{repo}; accept the model's licence first if gated) and copy it here (set HF_HOME), or name the "
            "timm architecture instead (e.g. --encoder vit_large_patch16_224 --model-kwargs '{...}' --weights PATH)."
        )
    cfg, arch, model_args = load_model_config_from_path(config.parent)
    cfg = {k: v for k, v in cfg.items() if k not in ("source", "file")}
    return arch, cfg, dict(model_args)


def _weights_hint(name: str, hub_id: str | None) -> str:
    cache = f", pre-fill the Hugging Face cache ({hf_cache_dir()}) with '{hub_id}'" if hub_id else ""
    return (
        f"encoder '{name}' has no weights here: pass --weights PATH (a state dict file){cache}, or pass "
        "--random-init for tests and demos (its features mean nothing). Nothing is downloaded at run time."
    )


def load_encoder(
    name: str,
    *,
    tile_px: TilePixels,
    weights: Path | None = None,
    random_init: bool = False,
    model_kwargs: Mapping[str, Any] | None = None,
    device: str = "auto",
    amp: bool = True,
) -> Encoder:
    """Build encoder `name` for `tile_px`-px tiles, load its weights and check it runs on one dummy tile.

    amp: autocast (bfloat16 on CUDA where supported, else float16) on a GPU; never on the CPU.
    """
    if weights is not None and random_init:
        raise EncoderError("--weights and --random-init exclude each other; pick one")
    if weights is not None and not Path(weights).is_file():
        raise EncoderError(f"weights file does not exist: {weights}")
    kwargs: dict[str, Any] = dict(model_kwargs or {})
    if name.startswith(HF_PREFIX):
        arch, cfg, model_args = _hf_model_config(name)
        kwargs = {**model_args, **kwargs}
        hub_id: str | None = name[len(HF_PREFIX) :]
    else:
        arch = name
        if not timm.is_model(name):
            raise _unknown_model(name)
        base_cfg = timm.models.get_pretrained_cfg(name)
        cfg = base_cfg.to_dict() if base_cfg is not None else {}
        hub_id = cfg.get("hf_hub_id")

    if random_init:
        weights_file: Path | None = None
        source = "random-init"
    elif weights is not None:
        weights_file, source = Path(weights), str(weights)
    else:
        weights_file = cached_hf_file(hub_id, WEIGHT_FILES) if hub_id else None
        if weights_file is None:
            raise EncoderError(_weights_hint(name, hub_id))
        source = f"hf-cache:{hub_id}"

    create: dict[str, Any] = {"num_classes": 0, **kwargs}
    try:
        if weights_file is None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(RANDOM_INIT_SEED)
                model = timm.create_model(arch, pretrained=False, pretrained_cfg=cfg or None, **create)
        else:
            # timm's own loader: unwraps checkpoints, adapts keys, drops the classifier head for num_classes=0
            file_cfg = {**cfg, "file": str(weights_file), "hf_hub_id": None, "url": None, "state_dict": None}
            model = timm.create_model(arch, pretrained=True, pretrained_cfg=file_cfg, **create)
    except (RuntimeError, KeyError, ValueError, TypeError, OSError) as err:
        raise EncoderError(f"encoder '{name}' cannot be built from {source}: {err}") from err
    sha = sha256_state(model) if weights_file is None else sha256_file(weights_file)

    dev = resolve_device(device)
    model = model.eval().to(dev)
    data_cfg = resolve_data_config({}, model=model)
    mean = tuple(float(v) for v in data_cfg["mean"])
    std = tuple(float(v) for v in data_cfg["std"])
    amp_dtype: torch.dtype | None = None
    if amp and dev.type == "cuda":
        amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    elif amp and dev.type == "mps":
        amp_dtype = torch.float16
    encoder = Encoder(
        name=name,
        model=model,
        dim=0,
        mean=(mean[0], mean[1], mean[2]),
        std=(std[0], std[1], std[2]),
        weights_sha256=sha,
        weights_source=source,
        random_init=weights_file is None,
        device=dev,
        amp_dtype=amp_dtype,
    )
    try:
        probe = encoder.embed(torch.zeros(1, 3, tile_px, tile_px, dtype=torch.uint8))
    except Exception as err:
        raise EncoderError(
            f"encoder '{name}' does not run on {tile_px}x{tile_px} px tiles ({type(err).__name__}: {err}); "
            "use its input size with --tile-px or a model that takes any size"
        ) from err
    if probe.ndim != 2:
        raise EncoderError(
            f"encoder '{name}' returns shape {tuple(probe.shape)} per batch, not (batch, features)"
        )
    encoder.dim = int(probe.shape[1])
    return encoder


def parse_model_kwargs(text: str | None) -> dict[str, Any]:
    """Keyword arguments for timm.create_model from a JSON object string (``--model-kwargs``)."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise EncoderError(f"--model-kwargs is not JSON ({err}): {text}") from err
    if not isinstance(value, dict):
        raise EncoderError(f"--model-kwargs must be a JSON object like '{{\"img_size\": 64}}', got {text}")
    return value
