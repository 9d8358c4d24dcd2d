"""The end-masked Panacea variant's settings, beside its step (panacea_end_masked.py). Defaults: Panacea's."""

from pydantic import Field

from panacea_platform.config_base import Section


class PanaceaEndMaskedConfig(Section):
    rho: float = Field(1.0, ge=0, description="Perturbation radius (global L2 norm of eps), as Panacea's.")
    lam: float = Field(
        1e-3, ge=0, alias="lambda", description="Weight of the harmful-loss increase term, as Panacea's."
    )
    harmful_loss_clamp: float = Field(5.0, gt=0, description="The end-masked h(w + eps) is clamped from above here.")
