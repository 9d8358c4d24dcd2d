"""Random perturbation's settings, beside its code (random_perturbation.py): Panacea's control arm."""

from pydantic import Field

from panacea_platform.config_base import Section


class RandomPerturbationConfig(Section):
    sigma: float = Field(
        0.01, ge=0, description="Std of the Gaussian noise added to the trainable weights after training."
    )
