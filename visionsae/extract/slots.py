"""Slots of a store -> image tensors for the backbone (the DataLoader's dataset)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from visionsae.images import READ_ERRORS, ImageSource


class SlotImages(torch.utils.data.Dataset):
    """Slot -> (image tensor, readable?, why not). Unreadable files become a blank image so that the
    batch keeps its shape; the store marks them valid = 0 and zeroes their rows."""

    def __init__(self, source: ImageSource, positions: np.ndarray, transform: Any, blank_CHW: torch.Tensor):
        self.source, self.positions, self.transform, self.blank_CHW = source, positions, transform, blank_CHW

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, slot: int) -> tuple[torch.Tensor, bool, str]:
        i = int(self.positions[slot])
        try:
            return self.transform(self.source.load(i)), True, ""
        except READ_ERRORS as err:
            return self.blank_CHW, False, f"{self.source.describe(i)} ({type(err).__name__}: {err})"
