"""SMAX (JaxMARL's pure-JAX StarCraft micromanagement), all copies in one jitted call.

``jaxmarl.make("HeuristicEnemySMAX", scenario=map_name_to_scenario(map_name))``: the
allies are the learning agents, the enemies follow JaxMARL's built-in heuristic.
``n_envs`` copies are stepped by ONE ``jax.jit(jax.vmap(...))`` call per ``step``; the
auto-reset is composed inside it (``step_env`` then a fresh ``reset`` selected with
``jnp.where`` on done) so the last observation / world state of every finished episode is
returned as well (``final_obs`` / ``final_state``).

What SMAX does (jaxmarl 0.2.0), and how it maps onto ``envs.base.EnvStep``:

* Actions (allies): ``0..3`` move (diagonal directions), ``4`` stop, ``5 + j`` attack
  enemy ``j``; ``n_actions = n_enemies + 5``. There is no separate no-op as in SMAC:
  *stop* (4) is always available, and it is the ONLY available action of a dead unit.
  Unavailable actions are harmless if taken (an out-of-range attack does nothing, dead
  units neither move nor shoot), but policies should respect ``avail_actions``.
* Dead allies: ``active`` False; their observation is all zeros (SMAX blanks it);
  avail = stop only.
* Reward: one team reward, identical for every ally (dead ones included): the enemy
  team's health lost this step (normalised) plus ``won_battle_bonus`` (1.0) on a win.
* Episode end: SMAX's ``dones["__all__"]`` = an entire team dead OR time limit. We
  split it into ``terminated`` (some team wiped out) and ``truncated`` (time limit, both
  teams still alive: bootstrap). A win = every enemy dead with at least one ally alive;
  both teams dying in the same step is a draw (terminated, win_rate 0).
* Time limit: ``is_terminal`` compares the step counter BEFORE it is incremented with
  ``max_steps`` (100), so a time-limited SMAX episode lasts ``max_steps + 1`` = 101
  steps. We keep SMAX's dynamics unchanged and report ``spec.episode_limit = 101``.
* ``world_state`` (the global state): per unit (allies then enemies) health fraction,
  x, y, weapon cooldown, unit-type one-hot (zeros for dead units), then every unit's
  team and type id.

Seeding: copy ``k`` draws from ``PRNGKey(seed + k)``, so its trajectory depends on neither
``n_envs`` nor ``--n_env_workers``. ``get_state`` returns the whole vmapped state pytree,
the PRNG keys and the episode counters as numpy arrays (picklable); after ``set_state``
the run continues bit-identically.
"""
from __future__ import annotations

import os
import sys
from typing import Any

import numpy as np

from envs.base import AgentSpec, EnvError, EnvSpec, EnvStep, StepBuffers, VecEnv
from utils.errors import ConfigError

# SMAX scenarios in jaxmarl 0.2.0 (``MAP_NAME_TO_SCENARIO``); listed here so that checking
# a configuration does not import JAX. tests/test_smax_env.py checks they all exist.
MAPS = ("3m", "2s3z", "3s5z", "5m_vs_6m", "8m", "10m_vs_11m", "25m", "27m_vs_30m",
        "3s5z_vs_3s6z", "3s_vs_5z", "6h_vs_8z",
        "smacv2_5_units", "smacv2_10_units", "smacv2_20_units")

STOP_ACTION = 4  # SMAX's "stop": always available; the only action of a dead unit


def task_name(values: dict[str, Any]) -> str:
    return str(values["map_name"])


def check_task(values: dict[str, Any]) -> None:
    map_name = values["map_name"]
    if map_name not in MAPS:
        raise ConfigError(f"unknown SMAX map {map_name!r} (known: {', '.join(MAPS)})", field="map_name")


def _import_jaxmarl():
    """Import jaxmarl quietly and without side effects on the caller's streams.

    jaxmarl prints notices on import and one of its modules resets sys.stdout/stderr to
    the process originals (breaking redirections such as pytest's capture): undo both.
    Compiled SMAX steps are cached on disk (``HARL_JAX_CACHE``, default
    ``~/.cache/harl-lite/jax``; empty disables) so later runs skip most compile time.
    """
    saved = sys.stdout, sys.stderr
    sys.stdout.flush()
    saved_fd = os.dup(1)  # jaxmarl prints to the real stdout: silence the descriptor
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        import jax
        import jaxmarl
    finally:
        sys.stdout.flush()
        os.dup2(saved_fd, 1)
        os.close(saved_fd)
        os.close(devnull)
        sys.stdout, sys.stderr = saved
    cache = os.environ.get("HARL_JAX_CACHE", os.path.expanduser("~/.cache/harl-lite/jax"))
    if cache and not jax.config.jax_compilation_cache_dir:
        try:
            os.makedirs(cache, exist_ok=True)
            jax.config.update("jax_compilation_cache_dir", cache)
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
        except OSError:
            pass
    return jax, jaxmarl


def _strong(tree):
    """Same dtypes without JAX's weak typing (avoids a recompile on the second call)."""
    import jax

    return jax.tree.map(lambda x: jax.lax.convert_element_type(x, x.dtype), tree)


class SMAXVecEnv(VecEnv):
    """``n_envs`` SMAX copies of one map, stepped by one jitted, vmapped call.

    Buffers (EnvStep arrays are views of these, overwritten by the next call),
    E = n_envs, N = allies, D = obs_dim, S = state_dim, A = n_actions:
        _obs, _final_obs  [N, E, D] float32   (obs[i] is the contiguous block [E, D])
        _avail            [N, E, A] bool
        _state, _final_state [E, S] float32
        _reward [E] float32, _terminated/_truncated [E] bool, _active [E, N] bool
    """

    def __init__(self, map_name: str, n_envs: int, seed: int, **env_kwargs):
        jax, jaxmarl = _import_jaxmarl()
        import jax.numpy as jnp
        from jaxmarl.environments.smax import map_name_to_scenario

        check_task({"map_name": map_name})
        self._jax, self._jnp = jax, jnp
        self.map_name = map_name
        self.n_envs = int(n_envs)
        self._seed = int(seed)
        env = jaxmarl.make("HeuristicEnemySMAX", scenario=map_name_to_scenario(map_name),
                           **env_kwargs)
        self._env = env
        self._agents = list(env.agents)  # allies only
        self.n_allies = len(self._agents)
        n_actions = int(env.action_space(self._agents[0]).n)
        obs_dim = int(env.observation_space(self._agents[0]).shape[0])
        state_dim = int(env.state_size)
        self.spec = EnvSpec(
            name=f"smax/{map_name}",
            agents=tuple(AgentSpec(obs_dim, "discrete", n_actions) for _ in self._agents),
            state_dim=state_dim,
            episode_limit=int(env.max_steps) + 1,
            episode_metrics=("win_rate",))

        self._reset_fn = jax.jit(self._batched(jax.vmap(self._reset_one)))
        self._step_fn = jax.jit(self._batched(jax.vmap(self._step_one)))
        keys = self._initial_keys(self._seed)
        _, state_shapes, _ = jax.eval_shape(self._reset_fn, keys)
        self._treedef = jax.tree.structure(state_shapes)
        self._leaf_shapes = [(s.shape, s.dtype) for s in jax.tree.leaves(state_shapes)]

        E, N, D, S, A = self.n_envs, self.n_allies, obs_dim, state_dim, n_actions
        self._buf = StepBuffers(self.spec, self.n_envs)  # EnvStep arrays (views)
        self._won = np.zeros(E, bool)
        self._actions = np.zeros((E, N), np.int32)
        self._elapsed = np.zeros(E, np.int64)
        self._episode_return = np.zeros(E, np.float64)
        self._keys = keys  # [E, 2] uint32, one PRNG key per copy
        self._env_state = None  # vmapped SMAX state pytree (leaves [E, ...])

    # -- the jitted functions (per copy; vmapped and jitted in __init__) -------------------
    def _stack(self, obs: dict) -> Any:
        return self._jnp.stack([obs[a] for a in self._agents])  # [N, D]

    def _views(self, env_state, obs_stack, world_state) -> dict:
        jnp = self._jnp
        avail = self._env.get_avail_actions(env_state)
        return {"obs": obs_stack, "state": world_state.astype(jnp.float32),
                "avail": self._stack(avail).astype(bool),
                "active": env_state.state.unit_alive[: self.n_allies]}

    def _reset_one(self, key):
        """key [2] -> (key', env_state, {obs [N, D], state [S], avail [N, A], active [N]})."""
        key, reset_key = self._jax.random.split(key)
        obs, env_state = self._env.reset(reset_key)
        env_state = _strong(env_state)
        return key, env_state, self._views(env_state, self._stack(obs), obs["world_state"])

    def _step_one(self, key, env_state, actions):
        """key [2], state, actions [N] int32 -> (key', state', outputs of one copy).

        Outputs: the next step's views (post auto-reset) plus reward [], terminated [],
        truncated [], won [], final_obs [N, D] and final_state [S] (pre-reset, valid on done).
        """
        jax, jnp = self._jax, self._jnp
        key, step_key, reset_key = jax.random.split(key, 3)
        obs, nxt, rewards, dones, _ = self._env.step_env(
            step_key, env_state, {a: actions[i] for i, a in enumerate(self._agents)})
        done = dones["__all__"]
        alive = nxt.state.unit_alive
        allies_alive = jnp.any(alive[: self.n_allies])
        enemies_alive = jnp.any(alive[self.n_allies:])
        terminated = done & ~(allies_alive & enemies_alive)
        final_obs, final_state = self._stack(obs), obs["world_state"].astype(jnp.float32)

        reset_obs, reset_state = self._env.reset(reset_key)
        reset_state = _strong(reset_state)
        new_state = jax.tree.map(lambda r, s: jnp.where(done, r, s), reset_state, nxt)
        new_obs = jnp.where(done, self._stack(reset_obs), final_obs)
        new_world = jnp.where(done, reset_obs["world_state"].astype(jnp.float32), final_state)
        out = self._views(new_state, new_obs, new_world)
        out.update(reward=rewards[self._agents[0]].astype(jnp.float32), terminated=terminated,
                   truncated=done & ~terminated, won=~enemies_alive & allies_alive,
                   final_obs=final_obs, final_state=final_state)
        return key, new_state, out

    def _batched(self, fn):
        """Wrap a vmapped fn so per-agent outputs come agent-major ([N, E, ...])."""
        jnp = self._jnp

        def wrapped(*args):
            key, state, out = fn(*args)
            for name in ("obs", "avail", "final_obs"):
                if name in out:
                    out[name] = jnp.swapaxes(out[name], 0, 1)
            return key, state, out
        return wrapped

    # -- host side -------------------------------------------------------------------------
    def _initial_keys(self, seed: int):
        # Copy k's key depends on the integer seed + k alone (the VecEnv contract), so an env
        # worker holding copies [first, ...) with seed + first draws the same keys as one
        # in-process env. (fold_in(PRNGKey(seed), k) did not: it depended on the split.)
        seeds = np.array([(int(seed) + k) % 2**32 for k in range(self.n_envs)], dtype=np.uint32)
        return self._jax.vmap(self._jax.random.PRNGKey)(self._jnp.asarray(seeds))

    def _copy_out(self, out: dict) -> None:
        out = self._jax.device_get(out)
        np.copyto(self._buf.obs_block, out["obs"])
        np.copyto(self._buf.avail_block, out["avail"])
        np.copyto(self._buf.state, out["state"])
        np.copyto(self._buf.active, out["active"])
        if "reward" in out:
            np.copyto(self._buf.reward, out["reward"])
            np.copyto(self._buf.terminated, out["terminated"])
            np.copyto(self._buf.truncated, out["truncated"])
            np.copyto(self._won, out["won"])
            np.copyto(self._buf.final_obs_block, out["final_obs"])
            np.copyto(self._buf.final_state, out["final_state"])
        else:
            self._buf.clear_flags()

    def _env_step(self, completed=None) -> EnvStep:
        return self._buf.step(completed)

    def reset(self, seed: int | None = None) -> EnvStep:
        if seed is not None:
            self._seed = int(seed)
        self._keys, self._env_state, out = self._reset_fn(self._initial_keys(self._seed))
        self._copy_out(out)
        self._buf.final_obs_block[:] = 0
        self._buf.final_state[:] = 0
        self._elapsed[:] = 0
        self._episode_return[:] = 0
        return self._env_step()

    def step(self, actions: list[np.ndarray]) -> EnvStep:
        """actions[i]: [E] integer array (agent i's action per copy)."""
        if self._env_state is None:
            raise RuntimeError("SMAXVecEnv.step called before reset()")
        for i, a in enumerate(actions):
            self._actions[:, i] = a  # one cast-copy into the [E, N] int32 buffer
        if self._actions.min() < 0 or self._actions.max() >= self.spec.agents[0].action_dim:
            # JAX would clamp an out-of-range index silently (and aim at the wrong unit).
            raise ValueError(f"SMAX {self.map_name} actions must lie in "
                             f"[0, {self.spec.agents[0].action_dim}); got {self._actions.min()}.."
                             f"{self._actions.max()}")
        try:
            self._keys, self._env_state, out = self._step_fn(self._keys, self._env_state,
                                                              self._actions)
            self._copy_out(out)
        except Exception as exc:  # JAX runtime failure: all copies share one call
            raise EnvError(f"SMAX {self.map_name} step failed: {type(exc).__name__}: {exc}") from exc
        self._elapsed += 1
        self._episode_return += self._buf.reward
        completed = []
        for k in np.flatnonzero(self._buf.terminated | self._buf.truncated):
            completed.append({"env": int(k), "return": float(self._episode_return[k]),
                              "length": int(self._elapsed[k]),
                              "win_rate": 1.0 if self._won[k] else 0.0})
            self._elapsed[k] = 0
            self._episode_return[k] = 0.0
        return self._env_step(completed)

    def get_state(self) -> dict[str, Any]:
        if self._env_state is None:
            raise RuntimeError("SMAXVecEnv.get_state called before reset()")
        leaves = [np.array(x) for x in self._jax.tree.leaves(self._env_state)]
        return {"family": "smax", "map_name": self.map_name, "n_envs": self.n_envs,
                "seed": self._seed, "keys": np.array(self._keys), "env_state": leaves,
                "elapsed": self._elapsed.copy(), "episode_return": self._episode_return.copy(),
                "obs": self._buf.obs_block.copy(), "state": self._buf.state.copy(),
                "avail": self._buf.avail_block.copy(), "active": self._buf.active.copy()}

    def set_state(self, snapshot: dict[str, Any]) -> EnvStep:
        jnp = self._jnp
        if snapshot.get("map_name") != self.map_name or snapshot.get("n_envs") != self.n_envs:
            raise ValueError(f"snapshot is for smax/{snapshot.get('map_name')} with "
                             f"{snapshot.get('n_envs')} envs; this env is smax/{self.map_name} "
                             f"with {self.n_envs}")
        leaves = snapshot["env_state"]
        if [(np.shape(x), np.asarray(x).dtype) for x in leaves] != self._leaf_shapes:
            raise ValueError("snapshot's SMAX state does not match this jaxmarl version / map")
        self._env_state = self._jax.tree.unflatten(self._treedef, [jnp.asarray(x) for x in leaves])
        self._keys = jnp.asarray(snapshot["keys"], dtype=jnp.uint32)
        self._seed = int(snapshot["seed"])
        self._elapsed[:] = snapshot["elapsed"]
        self._episode_return[:] = snapshot["episode_return"]
        self._buf.obs_block[:] = snapshot["obs"]
        self._buf.state[:] = snapshot["state"]
        self._buf.avail_block[:] = snapshot["avail"]
        self._buf.active[:] = snapshot["active"]
        self._buf.clear_flags()
        return self._env_step()

    # -- rendering ---------------------------------------------------------------------------
    def render(self, env_index: int = 0, size: int = 320) -> np.ndarray:
        """RGB frame [size, size, 3] uint8 of copy ``env_index``: a top view of the map.

        Allies blue, enemies red; dead units are not drawn; a unit's disc has its type's
        radius (enlarged for visibility) and is more opaque the more health it has.
        """
        if self._env_state is None:
            raise RuntimeError("SMAXVecEnv.render called before reset()")
        inner = self._env_state.state
        pos, alive, health, types = (np.asarray(x[env_index]) for x in (
            inner.unit_positions, inner.unit_alive, inner.unit_health, inner.unit_types))
        env = self._env
        max_health = np.asarray(env.unit_type_health)[types]
        radii = np.asarray(env.unit_type_radiuses)[types]
        scale = size / max(env.map_width, env.map_height)
        img = np.full((size, size, 3), 235.0, np.float32)
        colors = {0: np.array([40.0, 90.0, 220.0]), 1: np.array([220.0, 50.0, 40.0])}
        for u in np.flatnonzero(alive):
            cx, cy = pos[u, 0] * scale, size - pos[u, 1] * scale  # y axis points up
            r = max(3.0, 2.0 * radii[u] * scale)
            x0, x1 = int(max(cx - r, 0)), int(min(cx + r + 1, size))
            y0, y1 = int(max(cy - r, 0)), int(min(cy + r + 1, size))
            if x0 >= x1 or y0 >= y1:
                continue
            yy, xx = np.mgrid[y0:y1, x0:x1]
            disc = (xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2 <= r * r
            alpha = 0.25 + 0.75 * float(np.clip(health[u] / max_health[u], 0.0, 1.0))
            patch = img[y0:y1, x0:x1]
            color = colors[int(u >= self.n_allies)]
            patch[disc] = (1 - alpha) * patch[disc] + alpha * color
        return img.astype(np.uint8)


def make_vec_env(config, n_envs: int, seed: int, evaluation: bool = False,
                 render_mode: str | None = None, **env_kwargs) -> VecEnv:
    """``env_kwargs`` go to ``jaxmarl.make`` (e.g. ``max_steps``); ``render_mode`` is
    accepted for symmetry with other families (``render`` always works)."""
    return SMAXVecEnv(config.map_name, n_envs=n_envs, seed=seed, **env_kwargs)
