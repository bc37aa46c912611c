"""Algorithms by ``--algo`` name."""
from algorithms.happo import HAPPO
from algorithms.hatrpo import HATRPO
from algorithms.ippo import IPPO
from algorithms.mappo import MAPPO

ALGORITHM_CLASSES = {"happo": HAPPO, "hatrpo": HATRPO, "mappo": MAPPO, "ippo": IPPO}


def make_algorithm(config, spec, device):
    # train/config.py's ALGORITHMS (checked by --algo, kept free of torch) lists the same names;
    # tests/test_cli.py checks the two agree.
    return ALGORITHM_CLASSES[config.algo](config, spec, device)
