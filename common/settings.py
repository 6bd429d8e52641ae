"""The training settings that every way of training shares, declared once.

A federated run (`RunConfig`, read by the coordinator and every site from Flower's run config), a comparison
(`CompareConfig`: local, pooled and federated methods under one budget) and the options of `fedpath run`,
`simulate`, `compare` and `demo` all take these fields from here: name, type, bounds, default and help. A
site's local training settings are built from them by one function (`fedpath.client.training.local_config`).
Changing a default is a one-line change here (and in ``[tool.flwr.app.config]``, which a test holds equal).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class TrainingSettings(BaseModel):
    """Model, local work per round, optimiser, patient split and DP-SGD settings (flat: a run config is flat)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field("abmil", description="MIL aggregator")
    local_epochs: int = Field(1, ge=1, description="epochs a round when local_steps is 0")
    local_steps: int = Field(5, ge=0, description="optimizer steps per site and round")
    standardize: bool = Field(True, description="standardise features (the training sites' mean and SD)")
    lr: float = Field(3e-3, gt=0, description="AdamW learning rate")
    weight_decay: float = Field(1e-4, ge=0, description="AdamW weight decay")
    batch_size: int = Field(8, ge=1, description="bags (patients) per optimisation step")
    max_tiles: int = Field(512, ge=0, description="random tiles per training bag, 0 = all")
    val_fraction: float = Field(0.15, ge=0, lt=1, description="validation share of each training site")
    test_fraction: float = Field(0.25, ge=0, lt=1, description="each site's test share (internal)")
    split_seed: int = Field(0, description="seed of the patient split")
    dp_clip: float = Field(1.0, gt=0, description="per-patient gradient clipping norm")
    dp_delta: float = Field(0.0, ge=0, lt=1, description="δ (0 = min(1e-5, 1/(100·patients at the site)))")
    dp_batch: int = Field(0, ge=0, description="expected patients per DP-SGD step (0 = batch_size)")
    dp_budget: float = Field(0.0, ge=0, description="lifetime ε budget per site (0 = the run's ε, else 8)")

    def training_settings(self) -> dict[str, object]:
        """This object's shared settings only (e.g. to pass a comparison's settings on to a run config)."""
        return {name: getattr(self, name) for name in TrainingSettings.model_fields}
