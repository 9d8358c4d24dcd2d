"""The random-perturbation baseline: Gaussian noise on the trainable weights after fine-tuning."""

from __future__ import annotations

import torch

from panacea_platform.algorithms.interface import Tensors, TrainableWeights


def gaussian_perturbation(weights: TrainableWeights, sigma: float, seed: int) -> Tensors:
    # A generator of its own, so the noise depends on the seed alone and not on
    # how much randomness training consumed.
    generator = torch.Generator().manual_seed(seed)
    return [sigma * torch.randn(shape, generator=generator) for shape in weights.weight_shapes()]
