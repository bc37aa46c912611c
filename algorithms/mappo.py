"""MAPPO baseline (Yu et al., 2022): PPO-clip on a centralised V(s), every agent updated
at once from the same data (no M factor), parameters shared by default
(``share_param``, which needs identical agent spaces)."""
from algorithms.happo import HAPPO


class MAPPO(HAPPO):
    name = "mappo"
    # The shared-parameter baseline of Yu et al. 2022; unequal agents need --no-share_param.
    defaults = {"share_param": True}
    sequential = False
