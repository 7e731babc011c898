"""One drawn image: the type every part passes around (rollouts to rewards, eval to scorers), and the one
conversion from a backbone's codes to the uint8 pixels that scorers, PNG files and the report see."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Sample:
    key: str                 # unique within a suite run, e.g. "00012/0003" (prompt index / image index)
    metadata: dict           # GenEval-format metadata (or dense metadata) of the prompt, with at least "prompt"
    image: np.ndarray        # [H, W, 3] uint8 RGB
    prompt_index: int = 0
    seed: int = 0            # the global sample index its random stream was seeded with
    codes: np.ndarray | None = None   # [N] the image tokens it was decoded from, where it was drawn here

    @property
    def prompt(self) -> str:
        return str(self.metadata.get("prompt", ""))


def images_from_codes(backbone, codes: torch.LongTensor) -> np.ndarray:
    """[B, H, W, 3] uint8 RGB of a batch of codes: the backbone's decode in [0, 1], clamped, x255, rounded to
    nearest (the same pixels a PNG of it holds, so scoring a file and scoring the rollout agree)."""
    with torch.no_grad():
        pixels = backbone.decode(codes).clamp(0, 1).mul(255).round().byte()
    return pixels.permute(0, 2, 3, 1).cpu().numpy()
