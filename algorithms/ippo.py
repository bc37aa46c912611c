"""IPPO baseline (de Witt et al., 2020): PPO-clip with decentralised critics V(o_i) on
each agent's local observation, all agents updated at once (no M factor)."""
from algorithms.happo import HAPPO


class IPPO(HAPPO):
    name = "ippo"
    defaults = {"share_param": True}  # as MAPPO
    sequential = False
    centralised_critic = False
