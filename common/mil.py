"""Attention-MIL aggregators, created by name from one registry (after timm's `register_model`).

Every model maps a padded batch of bags to class logits and per-tile attention:

    model(features: Float[Tensor, "batch tile feature"], mask: Bool[Tensor, "batch tile"]) -> MILOutput
    MILOutput.logits: Float[Tensor, "batch class"];  MILOutput.attention: Float[Tensor, "batch tile"]

`mask` is True for real tiles. Padding never changes a bag's output (in eval mode), and attention on padded
tiles is exactly zero. Every model first standardises its tiles with the mean and scale stored in its
`FeatureStandardizer` (buffers in the state dict; see fedpath.common.standardize).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import nn


class MILOutput(NamedTuple):
    logits: torch.Tensor  # (batch, classes)
    attention: torch.Tensor  # (batch, tiles), sums to 1 over a bag's real tiles


MILFactory = Callable[..., nn.Module]
_REGISTRY: dict[str, MILFactory] = {}


def register_mil(name: str) -> Callable[[MILFactory], MILFactory]:
    def decorate(factory: MILFactory) -> MILFactory:
        if name in _REGISTRY:
            raise ValueError(f"MIL model '{name}' is registered twice")
        _REGISTRY[name] = factory
        return factory

    return decorate


def list_mil() -> list[str]:
    return sorted(_REGISTRY)


def create_mil(name: str, *, in_dim: int, num_classes: int, **kwargs: Any) -> nn.Module:
    """Create a registered MIL aggregator; an unknown name lists the known ones."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown MIL model '{name}'; known: {', '.join(list_mil())}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    return _REGISTRY[name](in_dim=in_dim, num_classes=num_classes, **kwargs)


def initial_model(name: str, *, in_dim: int, num_classes: int, seed: int) -> nn.Module:
    """The round-0 model of a run or a baseline with training seed `seed`: every method starts from it."""
    torch.manual_seed(seed)
    return create_mil(name, in_dim=in_dim, num_classes=num_classes)


class FeatureStandardizer(nn.Module):
    """(features − mean) / scale over the last axis; identity until
    `fedpath.common.standardize.set_standardization` is called.

    Buffers: ``mean`` (D,), ``scale`` (D,), float32; part of the state dict, never trained."""

    mean: torch.Tensor
    scale: torch.Tensor

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(dim))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return (features - self.mean) / self.scale


def _masked_softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis where mask is True; masked entries get exactly zero weight."""
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)


@register_mil("abmil")
class GatedABMIL(nn.Module):
    """Gated attention MIL (Ilse, Tomczak & Welling, ICML 2018), as in CLAM-SB and FLamby's Camelyon16 head.

    in_dim: tile feature size D; hidden_dim: size after the tile projection; attention_dim: gate size.
    """

    def __init__(
        self,
        *,
        in_dim: int,
        num_classes: int,
        hidden_dim: int = 256,
        attention_dim: int = 128,
        dropout: float = 0.25,
    ) -> None:
        super().__init__()
        self.standardize = FeatureStandardizer(in_dim)
        self.project = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout))
        self.attention_v = nn.Linear(hidden_dim, attention_dim)
        self.attention_u = nn.Linear(hidden_dim, attention_dim)
        self.attention_w = nn.Linear(attention_dim, 1)
        self.classifier = nn.Linear(hidden_dim, num_classes)

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> MILOutput:
        h = self.project(self.standardize(features))  # (B, T, H)
        gate = torch.tanh(self.attention_v(h)) * torch.sigmoid(self.attention_u(h))
        weights = _masked_softmax(self.attention_w(gate).squeeze(-1), mask)  # (B, T)
        pooled = torch.einsum("bt,bth->bh", weights, h)
        return MILOutput(self.classifier(pooled), weights)


class _SelfAttention(nn.Module):
    """Multi-head self-attention with a key padding mask; returns the attention weights too."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-2, -1) / math.sqrt(d // self.heads)  # (B, heads, T, T)
        attn = _masked_softmax(scores, key_mask[:, None, None, :])
        out = (self.dropout(attn) @ v).transpose(1, 2).reshape(b, t, d)
        return self.out(out), attn


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _SelfAttention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim)
        )

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y, attn = self.attn(self.norm1(x), key_mask)
        x = x + y
        return x + self.mlp(self.norm2(x)), attn


@register_mil("transformer")
class TransformerMIL(nn.Module):
    """A small ViT over tiles with a class token (after STAMP's ViT aggregator); no positional encoding.

    Attention returned per tile is the class token's attention in the last layer, averaged over heads.
    Full self-attention costs O(tiles²) memory: cap tiles per bag (BagDataset max_tiles) for large bags.
    """

    def __init__(
        self,
        *,
        in_dim: int,
        num_classes: int,
        dim: int = 128,
        depth: int = 2,
        heads: int = 4,
        mlp_ratio: float = 2.0,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.standardize = FeatureStandardizer(in_dim)
        self.project = nn.Sequential(nn.Linear(in_dim, dim), nn.GELU())
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.blocks = nn.ModuleList([_Block(dim, heads, mlp_ratio, dropout) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.classifier = nn.Linear(dim, num_classes)

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> MILOutput:
        b = features.shape[0]
        tiles = self.project(self.standardize(features))
        tokens = torch.cat([self.cls_token.expand(b, -1, -1), tiles], dim=1)
        key_mask = torch.cat([torch.ones(b, 1, dtype=torch.bool, device=mask.device), mask], dim=1)
        attn = torch.empty(0)
        for block in self.blocks:
            tokens, attn = block(tokens, key_mask)
        cls_attention = attn[:, :, 0, 1:].mean(dim=1)  # (B, T): class token → tiles
        tile_attention = cls_attention / cls_attention.sum(dim=1, keepdim=True).clamp_min(1e-12)
        return MILOutput(self.classifier(self.norm(tokens[:, 0])), tile_attention)
