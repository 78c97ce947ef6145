"""The service core: workflow files, the runner, the artifact store, W&B tracking and the `rlhf` CLI."""
