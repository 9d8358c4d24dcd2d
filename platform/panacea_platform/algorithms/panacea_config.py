"""Panacea's settings, beside its step (panacea.py). Defaults: this project's offline job's."""

from pydantic import Field

from panacea_platform.config_base import Section


class PanaceaConfig(Section):
    rho: float = Field(1.0, ge=0, description="Perturbation radius (global L2 norm of eps).")
    lam: float = Field(1e-3, ge=0, alias="lambda", description="Weight of the harmful-loss increase term.")
    harmful_loss_clamp: float = Field(5.0, gt=0, description="h(w + eps) is clamped from above at this value.")
    refresh_every: int = Field(
        1,
        ge=1,
        description="Compute H and eps on every k-th step and reuse them in between (2 passes a step "
        "instead of 3 there); the perturbed pass still runs every step. 1: the paper's step.",
    )
