"""Defences, registered by name. Lazy entries keep `import` cheap."""

from panacea_platform.registry import Registry

DEFENCES: Registry = Registry("defence")
DEFENCES.register("sft", "panacea_platform.algorithms.defences:Defence")
DEFENCES.register("random_perturbation", "panacea_platform.algorithms.defences:RandomPerturbation")
DEFENCES.register("panacea", "panacea_platform.algorithms.defences:Panacea")


def build_defence(config):
    return DEFENCES.get(config.defence).from_config(config)
