"""Physical units as types (after STAMP's `types.py`): a value's unit is part of its name and its type."""

from typing import NewType

Microns = NewType("Microns", float)
"""A length in micrometres."""

MicronsPerPixel = NewType("MicronsPerPixel", float)
"""A resolution: micrometres per pixel (a slide's MPP at level 0, or a tile's after resizing)."""

SlidePixels = NewType("SlidePixels", int)
"""A length in level-0 pixels of a slide."""

TilePixels = NewType("TilePixels", int)
"""A length in pixels of a tile as the encoder sees it (after resizing)."""
