"""The processes of one `accelerate launch` / `torchrun` job, as the runner sees them.

Under such a launcher every process runs `rlhf run ... --only STAGE`. They agree on one workflow run
id and one cache decision, all call the stage function (which builds its own `Accelerator`), and only
the main process takes the staging lock, opens the W&B run and publishes the artifact. A single
process (the usual case) is a group of one, and every method here is then a no-op.
"""

from __future__ import annotations

import os
from typing import Any, TypeVar

T = TypeVar("T")


class Group:
    def __init__(self) -> None:
        self.size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self._state = None
        if self.size > 1:
            import torch
            from accelerate import PartialState

            # Joins the process group the launcher set up (gloo on CPU-only machines, which accelerate
            # only does when asked for the CPU).
            self._state = PartialState(cpu=not torch.cuda.is_available())

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self._state is not None:
            self._state.wait_for_everyone()

    def close(self) -> None:
        """Wait for every process, then leave the process group. Without this a process that finishes
        first (a cached stage takes milliseconds) can close its sockets while a peer is still inside a
        collective, and gloo aborts that peer (SIGABRT)."""
        if self._state is None:
            return
        import torch.distributed as dist

        self._state.wait_for_everyone()
        if dist.is_initialized():
            dist.destroy_process_group()
        self._state = None

    def share(self, value: T) -> T:
        """The main process's `value`, on every process."""
        if self._state is None:
            return value
        import torch.distributed as dist

        box: list[Any] = [value if self.main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]
