"""The Ray trainable of a batched trial (``--batch-trials K`` with the Ray backend).

Each trial of a batched Ray study is a Tune trial of its own, so that Ray's searcher and
scheduler see it as they see a sequential trial; but it only asks a batch server
(``sofim_tune.backends.ray.BatchServer``, which trains up to K trials as one stacked model)
for one epoch at a time. Ray gives every trial a process of its own, so this module imports
nothing but Ray: a member's process then holds Ray's worker alone (about 0.2 GB and one
second of imports) instead of torch and the study's code (about 1 GB and five seconds).
Its classes travel to that process by value for the same reason (the package's
``__init__`` imports torch).
"""

from __future__ import annotations

import sys
import time
from typing import Any

import ray
from ray import cloudpickle, tune

# How long a member waits for a free slot: a trial that ended frees its slot a moment after
# Ray started the next one (the driver tells the server), or a server restarts after its node died.
JOIN_SECONDS = 600.0
_RETRY_SECONDS = 0.05


class BatchServerLost(RuntimeError):
    """The trial's batch server died, or stopped answering (it is stuck restarting, or its node
    is unreachable): the trial fails with this reason, and Ray retries it on a server that lives."""


class BatchMember(tune.Trainable):
    """One trial of a batched Ray study: joins a batch server with its config, then reports
    one epoch per ``step``. Tune's ``reuse_actors`` reuses the process for the next trial.

    A server answers a join or an epoch once its current round of training has ended, so a
    member waits for an answer as long as the server lives: after each epoch's budget (the
    longest step this member has taken) plus ``straggler_seconds`` without one, it asks
    whether the server is there, and a server that does not answer within
    ``straggler_seconds`` fails the trial (:class:`BatchServerLost`), as does one that died.
    """

    def setup(self, config: dict[str, Any], servers: list[Any], straggler_seconds: float) -> None:
        self._servers = servers
        self._margin = straggler_seconds
        self._epoch_budget = 0.0
        self._server: Any = None
        self._join(config)

    def reset_config(self, new_config: dict[str, Any]) -> bool:
        self._join(new_config)
        return True

    def step(self) -> dict[str, Any]:
        started = time.monotonic()
        try:
            result = self._answer(self._server, self._server.epoch.remote(self._key))
        except ray.exceptions.RayActorError as exc:
            raise BatchServerLost(f"the trial's batch server was lost during its epoch ({type(exc).__name__})") from None
        self._epoch_budget = max(self._epoch_budget, time.monotonic() - started)
        return result

    def cleanup(self) -> None:
        # Tune stops this process: its slot is free (a process dropped while it started may hold one).
        if self._server is not None:
            self._server.leave.remote(self._key)

    def _answer(self, server: Any, ref: Any) -> Any:
        """The server's answer to ``ref``, however long its rounds take while it lives.

        Raises:
            BatchServerLost: the server did not answer whether it is there within the margin.
            ray.exceptions.RayActorError: the server died.
        """
        while True:
            ready, _ = ray.wait([ref], timeout=self._epoch_budget + self._margin)
            if ready:
                return ray.get(ref)
            # No answer within an epoch's budget: a longer round than any before, or a server that is gone.
            there, _ = ray.wait([server.__ray_ready__.remote()], timeout=self._margin)
            if not there:
                raise BatchServerLost(f"the trial's batch server stopped answering for more than {self._epoch_budget + 2 * self._margin:.0f} s (it is restarting, or its node is unreachable)")

    def _join(self, config: dict[str, Any]) -> None:
        """A slot on the server with the most free ones (spreading the trials over the servers).

        A server that does not answer (restarting after its node died) is skipped this time, and
        one that died for good is skipped always.

        Raises:
            BatchServerLost: every server of the study died.
            RuntimeError: no server had a free slot for ``JOIN_SECONDS``.
        """
        context = ray.get_runtime_context()
        process_id = context.get_actor_id()
        # This trial in this process: Tune may start a trial in two processes and drop one.
        self._key = f"{self.trial_id}@{process_id}"
        deadline = time.monotonic() + JOIN_SECONDS
        alive = list(self._servers)
        while True:
            asked = {server.free_slots.remote(): server for server in alive}
            answered, _ = ray.wait(list(asked), num_returns=len(asked), timeout=self._margin)
            free = []
            for ref in answered:
                try:
                    free.append((ray.get(ref), asked[ref]))
                except ray.exceptions.ActorDiedError:
                    alive.remove(asked[ref])
                except ray.exceptions.RayActorError:
                    pass  # restarting: asked again next time
            if not alive:
                raise BatchServerLost("every batch server of the study died")
            for slots, server in sorted(free, key=lambda pair: -pair[0]):
                if slots > 0 and self._seated(server, config, process_id, context.current_actor):
                    self._server = server
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"no batch server had a free slot for {JOIN_SECONDS:g} s")
            time.sleep(_RETRY_SECONDS)

    def _seated(self, server: Any, config: dict[str, Any], process_id: str, process: Any) -> bool:
        """Whether ``server`` seated this trial; False when it has no slot left, or is lost or dead."""
        try:
            return bool(self._answer(server, server.join.remote(self._key, self.trial_id, config, process_id, process)))
        except (BatchServerLost, ray.exceptions.RayActorError):
            return False


class BatchServerActor:
    """The Ray actor of a batch server: the shell that members hold handles to.

    Ray loads an actor's class wherever a handle to it goes, so the class that members see
    imports nothing; the server itself (``sofim_tune.backends.ray.BatchServer``) is built
    in the actor's own process. The methods are the server's (see there).
    """

    def __init__(self, *args: Any) -> None:
        from sofim_tune.backends.ray import BatchServer  # torch and the study's code, in the server's process only

        self._server = BatchServer(*args)

    def free_slots(self) -> int:
        return self._server.free_slots()

    def join(self, member: str, trial_id: str, config: dict[str, Any], process_id: str, process: Any) -> bool:
        return self._server.join(member, trial_id, config, process_id, process)

    def leave(self, member: str) -> None:
        self._server.leave(member)

    def trial_ended(self, trial_id: str) -> None:
        self._server.trial_ended(trial_id)

    def epoch(self, member: str) -> dict[str, Any]:
        return self._server.epoch(member)


cloudpickle.register_pickle_by_value(sys.modules[__name__])
