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
_ANSWER_SECONDS = 10.0


class BatchMember(tune.Trainable):
    """One trial of a batched Ray study: joins a batch server with its config, then reports
    one epoch per ``step``. Tune's ``reuse_actors`` reuses the process for the next trial."""

    def setup(self, config: dict[str, Any], servers: list[Any]) -> None:
        self._servers = servers
        self._server: Any = None
        self._join(config)

    def reset_config(self, new_config: dict[str, Any]) -> bool:
        self._join(new_config)
        return True

    def step(self) -> dict[str, Any]:
        return ray.get(self._server.epoch.remote(self._key))

    def cleanup(self) -> None:
        # Tune stops this process: its slot is free (a process dropped while it started may hold one).
        if self._server is not None:
            self._server.leave.remote(self._key)

    def _join(self, config: dict[str, Any]) -> None:
        """A slot on the server with the most free ones (spreading the trials over the servers)."""
        context = ray.get_runtime_context()
        process_id = context.get_actor_id()
        # This trial in this process: Tune may start a trial in two processes and drop one.
        self._key = f"{self.trial_id}@{process_id}"
        deadline = time.monotonic() + JOIN_SECONDS
        while True:
            # A server that does not answer (restarting after its node died) is skipped this time.
            asked = {server.free_slots.remote(): server for server in self._servers}
            answered, _ = ray.wait(list(asked), num_returns=len(asked), timeout=_ANSWER_SECONDS)
            free = sorted(((ray.get(ref), asked[ref]) for ref in answered), key=lambda pair: -pair[0])
            for slots, server in free:
                if slots > 0 and ray.get(server.join.remote(self._key, self.trial_id, config, process_id, context.current_actor)):
                    self._server = server
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"no batch server had a free slot for {JOIN_SECONDS:g} s")
            time.sleep(_RETRY_SECONDS)


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
