"""Defences, registered by name. Lazy entries keep `import` cheap."""

from panacea_platform.registry import Registry

DEFENCES: Registry = Registry("defence")
DEFENCES.register("sft", "panacea_platform.algorithms.defences:Defence")
DEFENCES.register("random_perturbation", "panacea_platform.algorithms.defences:RandomPerturbation")
DEFENCES.register("panacea", "panacea_platform.algorithms.defences:Panacea")
DEFENCES.register("panacea_end_masked", "panacea_platform.algorithms.panacea_end_masked:PanaceaEndMasked")
DEFENCES.register("vaccine", "panacea_platform.algorithms.baselines:Vaccine")
DEFENCES.register("repnoise", "panacea_platform.algorithms.baselines:RepNoise")
DEFENCES.register("booster", "panacea_platform.algorithms.baselines:Booster")
DEFENCES.register("lisa", "panacea_platform.algorithms.baselines:Lisa")
DEFENCES.register("antidote", "panacea_platform.algorithms.baselines:Antidote")


def build_defence(config):
    return DEFENCES.get(config.defence).from_config(config)
