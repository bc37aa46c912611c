"""Algorithms by ``--algo`` name."""
from algorithms.happo import HAPPO
from algorithms.hatrpo import HATRPO
from algorithms.ippo import IPPO
from algorithms.mappo import MAPPO

ALGORITHM_CLASSES = {"happo": HAPPO, "hatrpo": HATRPO, "mappo": MAPPO, "ippo": IPPO}


def make_algorithm(config, spec, device):
    return ALGORITHM_CLASSES[config.algo](config, spec, device)
