"""The service core: workflow files, the runner, the artifact store, W&B tracking and the `rlhf` CLI.

Importing it sets how the process's OpenMP threads (torch's CPU threads) wait for work, which must happen
before torch loads: `OMP_WAIT_POLICY=PASSIVE` unless the environment says otherwise. Waiting threads then
sleep instead of spinning, so two processes on a small machine do not take each other's cores: spinning,
each runs several times slower than alone (measured with `bench/generation_limit.py`, README)."""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
