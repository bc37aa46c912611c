"""The replay buffer of the off-policy family (HATD3 / HADDPG / MATD3 / MADDPG): n-step
returns that bootstrap a time-limit cut and not a termination, allocation-free sampling,
and an incremental, crash-safe on-disk format for exact resume.

Memory layout
-------------
Everything is preallocated on the run's device as a ring of ``S = capacity // E`` slots of
``E`` rows: one slot per vector env step, one row per env copy, flattened so that row
``r = slot * E + env``. The same copy's next transition is then row ``r + E`` (mod
``R = S * E``), which is what makes n-step windows a fixed stride. Per row (lists are per
agent, since agents may differ in sizes):

    obs[i]       [R, obs_dim_i]  float32  agent i's observation before the step
    actions[i]   [R, act_dim_i]  float32  agent i's action, as executed
    state        [R, state_dim]  float32  the global state before the step
    reward       [R]             float32  the shared reward of the step
    terminated   [R]             bool     the episode ended for real at this step
    done         [R]             bool     it ended at all: terminated or truncated
    next_state   [R, state_dim]  float32  the state after the step; where ``done``, the
                                          episode's final state (``EnvStep.final_state``,
                                          from before the env's auto-reset)
    next_obs[i]  [R, obs_dim_i]  float32  likewise per agent

Storing ``next_*`` costs a second copy of the observations, but it is what lets a
transition that ends an episode keep that episode's last observation while the slot after
it already holds the next episode's first one.

n-step returns
--------------
Computed when sampling, for a window of ``n`` consecutive transitions of one env copy
starting at the sampled row (``n_step_returns``): rewards are summed with ``gamma**j`` up to
and including the first transition that ends the episode; the window's later rows (the
next episode, after the auto-reset) are masked out. With ``k`` transitions summed, the
target bootstraps from ``next_state`` / ``next_obs`` of the k-th one with discount
``gamma**k``: for a window that runs its full length that is the state ``n`` steps on; for
one cut by a time limit it is the final state of the episode; a termination gives
discount 0. A row is sampled only once its whole window has been written, so the newest
``n - 1`` slots wait.

On-disk format (``write_chunks`` / ``save`` / ``load``)
------------------------------------------------------
A directory of immutable chunk files plus a manifest:

    chunk-<c:05d>-<generation:08d>.pt   torch.save of {field: CPU tensor} holding rows
                                        [c * chunk_rows, min((c + 1) * chunk_rows, R)) of
                                        every field; field names ``obs.<i>``,
                                        ``actions.<i>``, ``state``, ``reward``,
                                        ``terminated``, ``done``, ``next_state``,
                                        ``next_obs.<i>``

The manifest is a small dict: ``format``, the layout (``rows``, ``envs``, ``chunk_rows``,
``fields``: name -> [shape, dtype]), the ring cursor (``pos``: next slot to write,
``size``: slots filled), the sampling generator's state, the ``generation`` of the save
and ``chunks``: chunk index -> file name. Chunks never written are absent (zeros on load).

A save writes only the chunks written to since the previous save, each under the new
generation's name, never over a file an earlier manifest names. The manifest is written
last and atomically (temp file, fsync, ``os.replace``): by ``save`` as ``manifest.pt`` in
the directory; the off-policy runner instead puts it inside ``checkpoints/last.pt``, so the
buffer and the rest of the run's state change with one rename. Only then are the files
no manifest names removed (``prune``). A crash at any point before the rename leaves the
previous manifest and every chunk file it names untouched.
"""
from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from envs.base import EnvSpec, EnvStep
from utils.checkpoint import CheckpointError, atomic_write_bytes

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.pt"
CHUNK_ROWS = 16_384  # ~5.6 MB per chunk for HalfCheetah 2x3 (342 bytes a row)
_CHUNK_FILE = re.compile(r"chunk-(\d{5})-(\d{8})\.pt")


class ReplayBatch(NamedTuple):
    """One sampled mini-batch, B = batch_size. The tensors are the buffer's own, reused by
    the next ``sample()``: consume (or copy) them first."""

    obs: list[torch.Tensor]  # [B, obs_dim_i]
    actions: list[torch.Tensor]  # [B, act_dim_i]
    state: torch.Tensor  # [B, state_dim]
    returns: torch.Tensor  # [B] n-step discounted reward sum
    discount: torch.Tensor  # [B] gamma**k on the bootstrap value, 0 after a termination
    next_state: torch.Tensor  # [B, state_dim] the state to bootstrap from
    next_obs: list[torch.Tensor]  # [B, obs_dim_i]


def n_step_returns(rewards: torch.Tensor, terminated: torch.Tensor, done: torch.Tensor, gamma: float,
                   proper_time_limits: bool = True, powers: torch.Tensor | None = None,
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """n-step returns of windows of consecutive transitions of one env copy.

    rewards [B, n] float; terminated, done [B, n] bool (``done`` = terminated or truncated),
    column 0 the sampled transition. Returns ``(returns [B], discount [B], last [B] int64)``:

        alive_j  = no episode end among transitions 0..j-1     (alive_0 = 1)
        returns  = sum_j gamma**j * alive_j * rewards_j
        k        = sum_j alive_j                               (1..n transitions summed)
        last     = k - 1, the window column to bootstrap after (its next_state / next_obs)
        discount = gamma**k * (1 - terminated_last)

    A truncation (time limit) at ``last`` keeps ``gamma**k``: the target bootstraps from
    the episode's final state. With ``proper_time_limits`` False a truncation counts as a
    termination.
    """
    B, n = rewards.shape
    alive = torch.ones_like(rewards)
    if n > 1:
        alive[:, 1:] = torch.cumprod((~done[:, :-1]).to(rewards.dtype), dim=1)
    if powers is None:
        powers = torch.pow(gamma, torch.arange(n, device=rewards.device, dtype=rewards.dtype))
    returns = (rewards * alive * powers).sum(1)
    k = alive.sum(1)
    last = k.long() - 1
    ended = (terminated if proper_time_limits else done).gather(1, last.unsqueeze(1)).squeeze(1)
    discount = torch.pow(gamma, k) * (~ended).to(rewards.dtype)
    return returns, discount, last


class ReplayBuffer:
    """Ring buffer of ``capacity // n_envs`` vector steps (see the module docstring)."""

    def __init__(self, spec: EnvSpec, capacity: int, n_envs: int, n_step: int, gamma: float,
                 batch_size: int, device: torch.device | str, seed: int,
                 proper_time_limits: bool = True, chunk_rows: int = CHUNK_ROWS):
        E, N = n_envs, spec.n_agents
        self.slots = capacity // E
        if self.slots < n_step:
            raise ValueError(f"a buffer of {capacity} transitions holds {self.slots} steps of {E} envs; "
                             f"{n_step}-step returns need at least {n_step}")
        self.n_envs, self.n_agents, self.n_step, self.gamma = E, N, n_step, gamma
        self.batch_size, self.device = batch_size, torch.device(device)
        self.proper_time_limits = proper_time_limits
        self.rows = self.slots * E
        self.chunk_rows = chunk_rows
        R = self.rows

        def z(*shape, dtype=torch.float32):
            return torch.zeros(*shape, dtype=dtype, device=self.device)

        # name -> storage [R, ...]; the order fixes the chunk files' contents
        self.fields: dict[str, torch.Tensor] = {}
        for i, a in enumerate(spec.agents):
            self.fields[f"obs.{i}"] = z(R, a.obs_dim)
        for i, a in enumerate(spec.agents):
            self.fields[f"actions.{i}"] = z(R, a.action_dim)
        self.fields["state"] = z(R, spec.state_dim)
        self.fields["reward"] = z(R)
        self.fields["terminated"] = z(R, dtype=torch.bool)
        self.fields["done"] = z(R, dtype=torch.bool)
        self.fields["next_state"] = z(R, spec.state_dim)
        for i, a in enumerate(spec.agents):
            self.fields[f"next_obs.{i}"] = z(R, a.obs_dim)
        f = self.fields
        self.obs = [f[f"obs.{i}"] for i in range(N)]
        self.actions = [f[f"actions.{i}"] for i in range(N)]
        self.next_obs = [f[f"next_obs.{i}"] for i in range(N)]
        self.pos = 0  # next slot to write
        self.size = 0  # slots filled
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(int(seed))

        # Sampling works in these preallocated tensors (index_select / randint with out=).
        B = batch_size
        self._draw = torch.empty(B, dtype=torch.int64, device=self.device)
        self._rows = torch.empty(B, dtype=torch.int64, device=self.device)
        self._window = torch.empty(B, n_step, dtype=torch.int64, device=self.device)
        self._offsets = torch.arange(n_step, device=self.device) * E  # [n] rows between steps
        self._powers = torch.pow(gamma, torch.arange(n_step, device=self.device, dtype=torch.float32))
        self._boot_rows = torch.empty(B, dtype=torch.int64, device=self.device)
        self._w_reward = z(B * n_step)
        self._w_terminated = z(B * n_step, dtype=torch.bool)
        self._w_done = z(B * n_step, dtype=torch.bool)
        self._batch = ReplayBatch(
            obs=[z(B, t.shape[1]) for t in self.obs], actions=[z(B, t.shape[1]) for t in self.actions],
            state=z(B, spec.state_dim), returns=z(B), discount=z(B), next_state=z(B, spec.state_dim),
            next_obs=[z(B, t.shape[1]) for t in self.next_obs])

        # Incremental saving: chunks written since the last save, and the file of each chunk.
        self._dirty: set[int] = set()
        self._files: dict[int, str] = {}
        self._generation = 0

    # -- writing -------------------------------------------------------------------------------
    def add(self, obs: list[torch.Tensor], state: torch.Tensor, actions: list[torch.Tensor],
            step: EnvStep) -> None:
        """Store one vector step: ``obs[i]`` [E, obs_dim_i], ``state`` [E, state_dim] and
        ``actions[i]`` [E, act_dim_i] from before the step (any device; copied), ``step`` the
        ``EnvStep`` these actions produced (numpy; its arrays may be the env's own buffers)."""
        E = self.n_envs
        r0 = self.pos * E
        rows = slice(r0, r0 + E)
        for dst, src in zip(self.obs, obs):
            dst[rows].copy_(src)
        for dst, src in zip(self.actions, actions):
            dst[rows].copy_(src)
        f = self.fields
        f["state"][rows].copy_(state)
        f["reward"][rows].copy_(torch.from_numpy(step.reward))
        f["terminated"][rows].copy_(torch.from_numpy(step.terminated))
        done = step.terminated | step.truncated
        f["done"][rows].copy_(torch.from_numpy(done))
        f["next_state"][rows].copy_(torch.from_numpy(step.state))
        for dst, src in zip(self.next_obs, step.obs):
            dst[rows].copy_(torch.from_numpy(src))
        if done.any():  # after the auto-reset step.obs opens the next episode: keep the last one
            ended = np.flatnonzero(done)
            at = torch.from_numpy(ended + r0).to(self.device)
            f["next_state"].index_copy_(0, at, torch.from_numpy(step.final_state[ended]).to(self.device))
            for dst, src in zip(self.next_obs, step.final_obs):
                dst.index_copy_(0, at, torch.from_numpy(src[ended]).to(self.device))
        first, last = r0 // self.chunk_rows, (r0 + E - 1) // self.chunk_rows
        self._dirty.add(first)
        if last != first:  # a slot straddles two chunks
            self._dirty.update(range(first + 1, last + 1))
        self.pos = (self.pos + 1) % self.slots
        self.size = min(self.size + 1, self.slots)

    @property
    def cursor(self) -> tuple[int, int]:
        """(next slot to write, slots filled): what a rolled-back iteration restores."""
        return self.pos, self.size

    def set_cursor(self, cursor: tuple[int, int]) -> None:
        """Roll the ring back to ``cursor``. Rows written since are left in place: the
        replayed steps write the same rows again before anything samples them."""
        self.pos, self.size = int(cursor[0]), int(cursor[1])

    # -- sampling ------------------------------------------------------------------------------
    @property
    def max_sampleable(self) -> int:
        """``sampleable`` once the ring is full."""
        return (self.slots - self.n_step + 1) * self.n_envs

    @property
    def sampleable(self) -> int:
        """Rows whose whole n-step window is written."""
        return max(0, self.size - self.n_step + 1) * self.n_envs

    def sample(self) -> ReplayBatch:
        """``batch_size`` rows drawn uniformly (with replacement) among the ``sampleable``
        ones, with their n-step targets (``gather``)."""
        available = self.sampleable
        if available < self.batch_size:
            raise ValueError(f"the buffer has {available} sampleable transitions, fewer than a batch "
                             f"of {self.batch_size}")
        torch.randint(0, available, (self.batch_size,), generator=self.generator, out=self._draw)
        oldest = (self.pos - self.size) % self.slots  # the k-th sampleable row is the k-th oldest
        torch.add(self._draw, oldest * self.n_envs, out=self._rows).remainder_(self.rows)
        return self.gather(self._rows)

    def gather(self, rows: torch.Tensor) -> ReplayBatch:
        """The transitions at ``rows`` [batch_size] (int64, on the buffer's device) with
        their n-step returns, discounts and bootstrap state (``n_step_returns``)."""
        B, n, R = self.batch_size, self.n_step, self.rows
        torch.add(rows.unsqueeze(1), self._offsets, out=self._window).remainder_(R)  # [B, n]
        window = self._window.view(-1)
        f = self.fields
        torch.index_select(f["reward"], 0, window, out=self._w_reward)
        torch.index_select(f["terminated"], 0, window, out=self._w_terminated)
        torch.index_select(f["done"], 0, window, out=self._w_done)
        returns, discount, last = n_step_returns(self._w_reward.view(B, n), self._w_terminated.view(B, n),
                                                 self._w_done.view(B, n), self.gamma, self.proper_time_limits,
                                                 self._powers)
        torch.gather(self._window, 1, last.unsqueeze(1), out=self._boot_rows.unsqueeze(1))
        batch, boot = self._batch, self._boot_rows
        batch.returns.copy_(returns)
        batch.discount.copy_(discount)
        for src, dst in zip(self.obs, batch.obs):
            torch.index_select(src, 0, rows, out=dst)
        for src, dst in zip(self.actions, batch.actions):
            torch.index_select(src, 0, rows, out=dst)
        torch.index_select(f["state"], 0, rows, out=batch.state)
        torch.index_select(f["next_state"], 0, boot, out=batch.next_state)
        for src, dst in zip(self.next_obs, batch.next_obs):
            torch.index_select(src, 0, boot, out=dst)
        return batch

    # -- saving and loading ----------------------------------------------------------------------
    def _layout(self) -> dict[str, Any]:
        return {"rows": self.rows, "envs": self.n_envs, "chunk_rows": self.chunk_rows,
                "fields": {k: [list(v.shape), str(v.dtype)] for k, v in self.fields.items()}}

    def write_chunks(self, directory: Path, cursor: tuple[int, int] | None = None) -> dict[str, Any]:
        """Write the chunks changed since the last save into ``directory`` under a new
        generation and return the manifest that names them (not yet committed: see
        ``save``). ``cursor``: the ring position to record (default: the current one)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        generation = self._generation + 1
        files = dict(self._files)
        for c in sorted(self._dirty):
            rows = slice(c * self.chunk_rows, min((c + 1) * self.chunk_rows, self.rows))
            data = io.BytesIO()
            # A copy, not a view: torch.save writes a view's whole storage (the entire buffer).
            torch.save({k: v[rows].to("cpu", copy=True) for k, v in self.fields.items()}, data)
            name = f"chunk-{c:05d}-{generation:08d}.pt"
            atomic_write_bytes(directory / name, data.getvalue())
            files[c] = name
        # Only now, every write done: a failed write leaves these chunks marked to write again.
        self._dirty.clear()
        self._files, self._generation = files, generation
        pos, size = self.cursor if cursor is None else cursor
        return {"format": FORMAT_VERSION, **self._layout(), "pos": int(pos), "size": int(size),
                "generation": generation, "chunks": dict(files), "sample_rng": self.generator.get_state()}

    @staticmethod
    def prune(directory: Path, manifest: dict[str, Any]) -> None:
        """Remove chunk files ``manifest`` (committed) does not name: left by earlier saves
        or by a save that died before its commit."""
        keep = set(manifest["chunks"].values())
        for path in Path(directory).glob("chunk-*.pt"):
            if _CHUNK_FILE.fullmatch(path.name) and path.name not in keep:
                path.unlink(missing_ok=True)

    def save(self, directory: Path) -> dict[str, Any]:
        """Standalone save: changed chunks, then ``manifest.pt`` atomically, then prune."""
        manifest = self.write_chunks(directory)
        data = io.BytesIO()
        torch.save(manifest, data)
        atomic_write_bytes(Path(directory) / MANIFEST_NAME, data.getvalue())
        self.prune(directory, manifest)
        return manifest

    @staticmethod
    def read_manifest(directory: Path) -> dict[str, Any]:
        path = Path(directory) / MANIFEST_NAME
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise CheckpointError(f"no replay buffer manifest at {path}") from None
        except Exception as exc:  # truncated or garbage files raise many types
            raise CheckpointError(f"replay buffer manifest {path} is unreadable ({type(exc).__name__})") from None

    def load(self, directory: Path, manifest: dict[str, Any] | None = None) -> None:
        """Restore the buffer saved in ``directory`` (``manifest``: the committed one; by
        default ``manifest.pt`` there). Raises CheckpointError naming what does not fit."""
        directory = Path(directory)
        if manifest is None:
            manifest = self.read_manifest(directory)
        if manifest.get("format") != FORMAT_VERSION:
            raise CheckpointError(f"replay buffer in {directory} has format {manifest.get('format')!r}, "
                                  f"this code reads {FORMAT_VERSION}")
        layout = self._layout()
        for key, value in layout.items():
            if manifest.get(key) != value:
                raise CheckpointError(f"replay buffer in {directory} was saved with {key} {manifest.get(key)!r}; "
                                      f"this run's buffer has {value!r} (same --buffer_size, "
                                      "--n_rollout_threads and task needed)")
        for tensor in self.fields.values():
            tensor.zero_()
        for c, name in manifest["chunks"].items():
            path = directory / name
            try:
                chunk = torch.load(path, map_location="cpu", weights_only=True)
            except FileNotFoundError:
                raise CheckpointError(f"replay chunk {path} is missing: the checkpoint is incomplete") from None
            except Exception as exc:
                raise CheckpointError(f"replay chunk {path} is unreadable ({type(exc).__name__})") from None
            rows = slice(int(c) * self.chunk_rows, min((int(c) + 1) * self.chunk_rows, self.rows))
            for key, tensor in self.fields.items():
                tensor[rows].copy_(chunk[key])
        self.pos, self.size = int(manifest["pos"]), int(manifest["size"])
        self.generator.set_state(manifest["sample_rng"])
        self._files = {int(c): name for c, name in manifest["chunks"].items()}
        self._generation = int(manifest["generation"])
        self._dirty.clear()
