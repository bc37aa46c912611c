"""Environment copies split over worker processes, exchanging arrays through shared memory.

``--n_env_workers W`` runs ``n_rollout_threads / W`` copies in each of W processes (each
an ordinary in-process ``VecEnv`` of its family), so stepping uses several cores. Actions
and every per-step array live in shared memory: a step is one small command per worker
over a pipe and a wait for its acknowledgement; no array is pickled. A worker that raises
or dies is reported as an ``EnvError`` naming the copy (or the worker's first copy) and its
seed; ``restart`` replaces a dead worker process.
"""
from __future__ import annotations

import math
import multiprocessing as mp
import signal
import time
import traceback
from multiprocessing import shared_memory
from typing import Any, Callable

import numpy as np
import psutil

from envs.base import EnvError, EnvStep, VecEnv


def _fields(spec) -> dict[str, tuple[tuple[int, ...], Any]]:
    """Name -> (shape after the env axis, dtype) of every shared per-step array."""
    fields: dict[str, tuple[tuple[int, ...], Any]] = {
        "state": ((spec.state_dim,), np.float32), "final_state": ((spec.state_dim,), np.float32),
        "reward": ((), np.float32), "terminated": ((), np.bool_), "truncated": ((), np.bool_),
        "active": ((spec.n_agents,), np.bool_)}
    for i, agent in enumerate(spec.agents):
        fields[f"obs{i}"] = ((agent.obs_dim,), np.float32)
        fields[f"final_obs{i}"] = ((agent.obs_dim,), np.float32)
        if agent.action_kind == "discrete":
            fields[f"avail{i}"] = ((agent.action_dim,), np.bool_)
            fields[f"action{i}"] = ((), np.int64)
        else:
            fields[f"action{i}"] = ((agent.action_dim,), np.float32)
    return fields


class _Shared:
    """One shared-memory block per field, viewed as [n_envs, ...] numpy arrays."""

    def __init__(self, fields, n_envs: int, names: dict[str, str] | None = None):
        self.blocks, self.arrays = {}, {}
        for name, (shape, dtype) in fields.items():
            size = max(int(np.prod((n_envs, *shape))) * np.dtype(dtype).itemsize, 1)
            if names is None:
                block = shared_memory.SharedMemory(create=True, size=size)
            else:
                # Spawned workers share the parent's resource tracker, so attaching
                # does not create a second owner; only the parent unlinks the block.
                block = shared_memory.SharedMemory(name=names[name])
            self.blocks[name] = block
            self.arrays[name] = np.ndarray((n_envs, *shape), dtype=dtype, buffer=block.buf)

    def names(self) -> dict[str, str]:
        return {k: b.name for k, b in self.blocks.items()}

    def close(self, unlink: bool) -> None:
        self.arrays.clear()
        for block in self.blocks.values():
            block.close()
            if unlink:
                block.unlink()


def _write(step: EnvStep, arrays: dict[str, np.ndarray], rows: slice, spec) -> None:
    arrays["state"][rows] = step.state
    arrays["final_state"][rows] = step.final_state
    arrays["reward"][rows] = step.reward
    arrays["terminated"][rows] = step.terminated
    arrays["truncated"][rows] = step.truncated
    arrays["active"][rows] = step.active
    for i in range(spec.n_agents):
        arrays[f"obs{i}"][rows] = step.obs[i]
        arrays[f"final_obs{i}"][rows] = step.final_obs[i]
        if step.avail_actions is not None:
            arrays[f"avail{i}"][rows] = step.avail_actions[i]


def _worker(make_env: Callable[[int, int], VecEnv], n_local: int, first: int, seed: int,
            shm_names: dict[str, str], n_envs: int, conn) -> None:
    """Worker loop: build ``n_local`` copies, answer commands until told to close."""
    env = None
    shared = None
    # Ctrl-C and a terminal's hangup reach the whole process group: the parent decides (it
    # checkpoints and then closes the workers), so a worker must not die of them mid-step.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        env = make_env(n_local, seed)
        shared = _Shared(_fields(env.spec), n_envs, shm_names)
        arrays, rows, spec = shared.arrays, slice(first, first + n_local), env.spec
        conn.send(("ok", None))
        while True:
            command, arg = conn.recv()
            if command == "step":
                actions = [arrays[f"action{i}"][rows] for i in range(spec.n_agents)]
                step = env.step(actions)
                _write(step, arrays, rows, spec)
                for record in step.completed:
                    record["env"] += first
                conn.send(("ok", step.completed))
            elif command in ("reset", "set_state"):
                step = env.reset(arg) if command == "reset" else env.set_state(arg)
                _write(step, arrays, rows, spec)
                conn.send(("ok", None))
            elif command == "get_state":
                conn.send(("ok", env.get_state()))
            elif command == "restart":
                env.restart(arg - first)
                _write(env.set_state(env.get_state()), arrays, rows, spec)
                conn.send(("ok", None))
            elif command == "render":
                conn.send(("ok", env.render(arg - first)))
            elif command == "close":
                conn.send(("ok", None))
                return
    except (KeyboardInterrupt, EOFError):
        return
    except Exception as exc:  # report to the parent, which raises EnvError
        index = getattr(exc, "env_index", None)
        try:
            conn.send(("error", (None if index is None else first + index,
                                 f"{type(exc).__name__}: {exc}", traceback.format_exc())))
        except (BrokenPipeError, OSError):
            pass
    finally:
        if shared is not None:
            shared.close(unlink=False)
        if env is not None:
            env.close()


def _kill_with_children(proc) -> None:
    """SIGKILL a worker and the processes it started (a simulator's own process, such as
    StarCraft II's, would otherwise live on without a parent)."""
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        children = []
    for child in children:
        try:
            child.kill()
        except psutil.Error:
            pass
    proc.kill()
    proc.join(timeout=5.0)


class WorkerVecEnv(VecEnv):
    """``n_envs`` copies over ``n_workers`` processes; same interface as an in-process VecEnv.

    ``make_env(n_local, seed)`` builds one worker's in-process VecEnv; worker ``w`` gets
    the copies ``[w * n_local, (w + 1) * n_local)`` and seed ``seed + w * n_local``.
    """

    def __init__(self, make_env: Callable[[int, int], VecEnv], n_envs: int, n_workers: int, seed: int,
                 timeout: float = 0.0):
        self.n_envs, self.n_workers = n_envs, n_workers
        self.timeout = timeout  # seconds to wait for one answer; 0 = forever
        self.n_local = n_envs // n_workers
        self._make_env, self._seed = make_env, seed
        probe = make_env(1, seed)  # the spec, without a round trip
        self.spec = probe.spec
        probe.close()
        self._shared = _Shared(_fields(self.spec), n_envs)
        self._ctx = mp.get_context("spawn")  # fork + JAX/torch threads is unsafe
        self._procs: list[Any] = [None] * n_workers
        self._conns: list[Any] = [None] * n_workers
        try:
            for w in range(n_workers):
                self._start(w)
        except BaseException:
            self.close()
            raise

    def _start(self, w: int) -> None:
        if self._conns[w] is not None:  # replacing a dead or killed worker
            self._conns[w].close()
        parent, child = self._ctx.Pipe()
        proc = self._ctx.Process(target=_worker, daemon=True, args=(
            self._make_env, self.n_local, w * self.n_local, self._seed + w * self.n_local,
            self._shared.names(), self.n_envs, child))
        proc.start()
        child.close()
        self._procs[w], self._conns[w] = proc, parent
        self._receive(w)

    def _receive(self, w: int):
        conn = self._conns[w]
        first = w * self.n_local
        deadline = time.monotonic() + self.timeout if self.timeout > 0 else math.inf
        try:
            while not conn.poll(1.0):
                if not self._procs[w].is_alive():
                    raise EOFError
                if time.monotonic() > deadline:  # hung: a live process that never answers
                    _kill_with_children(self._procs[w])
                    raise EnvError(f"{self._label(w)} did not answer within {self.timeout:g} s "
                                   "(--env_worker_timeout) and was killed", env_index=first,
                                   seed=self._seed + first)
            status, payload = conn.recv()
        except (EOFError, ConnectionResetError, BrokenPipeError, OSError):
            raise self._died(w) from None
        if status == "error":
            index, message, _ = payload
            # The worker exits after reporting: wait for it, so that whatever comes next
            # (set_state, reset, restart) sees a dead worker and replaces it.
            self._procs[w].join(timeout=10)
            if self._procs[w].is_alive():
                _kill_with_children(self._procs[w])
            if index is None:  # the env did not name a copy (e.g. SMAX: all copies share one call)
                raise EnvError(f"{self._label(w)} failed: {message}", seed=self._seed + first)
            raise EnvError(f"env {index} in worker {w} (seed {self._seed + index}) failed: {message}",
                           env_index=index, seed=self._seed + index)
        return payload

    def _broadcast(self, command: str, args: list[Any]) -> list[Any]:
        """Send to every worker, then collect every answer (all of them, even after a
        failure, so the pipes stay in step); raise the first failure afterwards."""
        sent = []
        for w, arg in enumerate(args):
            try:
                self._conns[w].send((command, arg))
                sent.append(w)
            except (BrokenPipeError, OSError):
                pass
        results, failure = [None] * self.n_workers, None
        for w in range(self.n_workers):
            try:
                if w not in sent:
                    raise self._died(w)
                results[w] = self._receive(w)
            except EnvError as exc:
                failure = failure or exc
        if failure is not None:
            raise failure
        return results

    def _label(self, w: int) -> str:
        """How messages name worker ``w``: its copies and their base seed."""
        first = w * self.n_local
        return f"env worker {w} (copies {first}..{first + self.n_local - 1}, seed {self._seed + first})"

    def _died(self, w: int) -> EnvError:
        first = w * self.n_local
        return EnvError(f"{self._label(w)} died (exit code {self._procs[w].exitcode})",
                        env_index=first, seed=self._seed + first)

    def _current(self, completed=None) -> EnvStep:
        a = self._shared.arrays
        n = self.spec.n_agents
        return EnvStep(obs=[a[f"obs{i}"] for i in range(n)], state=a["state"],
                       avail_actions=[a[f"avail{i}"] for i in range(n)] if self.spec.discrete else None,
                       reward=a["reward"], terminated=a["terminated"], truncated=a["truncated"],
                       active=a["active"], final_state=a["final_state"],
                       final_obs=[a[f"final_obs{i}"] for i in range(n)], completed=completed or [])

    def reset(self, seed: int | None = None) -> EnvStep:
        if seed is not None:
            self._seed = int(seed)
        self._replace_dead()
        self._broadcast("reset", [self._seed + w * self.n_local for w in range(self.n_workers)])
        return self._current()

    def step(self, actions: list[np.ndarray]) -> EnvStep:
        for i, a in enumerate(actions):
            self._shared.arrays[f"action{i}"][:] = a
        completed = [rec for recs in self._broadcast("step", [None] * self.n_workers) for rec in recs]
        return self._current(completed)

    def get_state(self) -> Any:
        states = self._broadcast("get_state", [None] * self.n_workers)
        return None if any(s is None for s in states) else {"workers": states, "seed": self._seed}

    def _replace_dead(self) -> None:
        for w in range(self.n_workers):
            if not self._procs[w].is_alive():
                self._start(w)

    def set_state(self, snapshot: Any) -> EnvStep:
        self._replace_dead()  # a dead worker is replaced before being restored
        self._seed = snapshot["seed"]
        self._broadcast("set_state", snapshot["workers"])
        return self._current()

    def restart(self, env_index: int) -> EnvStep:
        w = env_index // self.n_local
        if not self._procs[w].is_alive():
            self._start(w)
            self._conns[w].send(("reset", self._seed + w * self.n_local + 7919))
        else:
            self._conns[w].send(("restart", env_index))
        self._receive(w)
        return self._current()

    def render(self, env_index: int = 0) -> np.ndarray:
        w = env_index // self.n_local
        self._conns[w].send(("render", env_index))
        return self._receive(w)

    def close(self) -> None:
        for proc, conn in zip(self._procs, self._conns):
            if proc is None:
                continue
            try:
                if proc.is_alive():
                    conn.send(("close", None))
                    conn.poll(5.0) and conn.recv()
            except (BrokenPipeError, EOFError, OSError):
                pass
            proc.join(timeout=5.0)
            if proc.is_alive():  # hung: its simulator's own processes must not outlive it
                _kill_with_children(proc)
        self._shared.close(unlink=True)
