"""Service mode: keep a workflow running, triggered by annotation progress.

`rlhf serve WORKFLOW` runs the workflow, and whenever it stops at a waiting stage (a `collect` below
its threshold) runs it again when Argilla says a record was completed (a webhook to a local listener,
`annotation/webhooks.py`, registered once the annotation server is up), or at the latest after an
interval: polling is the fallback where the server cannot call this machine (an external server) or
refuses the webhook. Stages upstream are cached, `collect` always rereads the
annotation server, and when its threshold is met and its rankings changed, the stages downstream
(reward model, policy, evaluation) run. Then it waits again for new rankings.

Every decision is logged with its reason. SIGTERM or Ctrl-C stops it cleanly: a stage interrupted
mid-run publishes nothing (its checkpoints stay for the next run), and a finished one is complete.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

from rich.console import Console

from pipeline.runner import Runner, StageResult
from pipeline.store import Store
from pipeline.workflow import Workflow


class Service:
    def __init__(
        self,
        workflow: Workflow,
        store: Store,
        console: Console,
        interval: float = 30.0,
        allow_rejected: bool = False,
        webhooks: bool = True,
    ):
        self.workflow = workflow
        self.store = store
        self.console = console
        self.interval = interval
        self.allow_rejected = allow_rejected
        self.stopping = threading.Event()
        self.wake = threading.Event()
        """Set by an Argilla event (or by `stop`): run the next cycle now."""
        self.webhooks = webhooks
        self.listener: Any = None
        self._webhook_note = ""
        self._last_state = ""

    def log(self, message: str) -> None:
        self.console.print(f"[dim]{datetime.now().strftime('%Y-%m-%d %H:%M:%S')}[/] {message}")

    def serve(
        self, max_cycles: int | None = None, on_cycle: Callable[[list[StageResult]], None] | None = None
    ) -> None:
        """Poll until stopped (or for `max_cycles` cycles)."""
        self.log(
            f"serving workflow {self.workflow.name} ({self.workflow.file}); polling every {self.interval:g} s"
        )
        cycle = 0
        while not self.stopping.is_set() and (max_cycles is None or cycle < max_cycles):
            cycle += 1
            try:
                results = self.cycle()
            except Exception as err:  # a failed stage is reported; the service waits for new input
                self.log(f"[red]failed[/]: {type(err).__name__}: {err}; retrying after the next interval")
                results = []
            if on_cycle is not None:
                on_cycle(results)
            self._listen()
            if self.wake.wait(self.interval) and not self.stopping.is_set():
                time.sleep(0.5)  # one cycle for a burst of events
            self.wake.clear()
        self.close()
        self.log("stopped")

    def stop(self) -> None:
        self.stopping.set()
        self.wake.set()

    def close(self) -> None:
        """Delete the webhook and stop its listener."""
        if self.listener is not None:
            self.listener.close()
            self.listener = None

    def _listen(self) -> None:
        """Once the annotation server runs: register a webhook for its events (else keep polling, and say
        why, once)."""
        if not self.webhooks or self.listener is not None:
            return
        from annotation import server, webhooks

        try:
            connection = server.connect()
        except server.ArgillaServerError:
            return  # not started yet: the annotate stage starts it
        if not webhooks.reachable(connection):
            note = f"webhooks: {connection.url} is on another machine and cannot call this one; polling every {self.interval:g} s"
        else:
            listener = webhooks.Listener(self._event)
            try:
                listener.register(connection, webhooks.description(str(self.workflow.file)))
            except server.ArgillaServerError as err:
                listener.close()
                note = f"webhooks: the server refused the webhook ({err}); polling every {self.interval:g} s"
            else:
                self.listener = listener
                note = f"webhooks: Argilla calls {listener.url} on {', '.join(webhooks.EVENTS)}"
        if note != self._webhook_note:
            self.log(note)
            self._webhook_note = note

    def _event(self, event: str) -> None:
        self.log(f"event {event} from Argilla: running the workflow")
        self.wake.set()

    def cycle(self) -> list[StageResult]:
        """One pass over the workflow; logs what ran and why."""
        runner = Runner(
            self.workflow, self.store, console=Console(quiet=True), allow_rejected=self.allow_rejected
        )
        results = runner.run()
        ran = [r for r in results if r.status == "ran"]
        waiting = next((r for r in results if r.status == "waiting"), None)
        if ran:
            cause = self._cause(results)
            for result in ran:
                refs = ", ".join(a.ref for a in result.artifacts.values())
                self.log(f"ran {result.stage} -> {refs} in {result.seconds:.1f} s ({cause})")
        if waiting is not None:
            self._state(f"waiting at {waiting.stage}: {waiting.message}", ran)
        elif not ran:
            self._state("up to date: every stage cached; waiting for new rankings", ran)
        return results

    def _state(self, message: str, ran: list[StageResult]) -> None:
        """Log a waiting state when it is news (not at every poll)."""
        if ran or message != self._last_state:
            self.log(message)
        self._last_state = message

    def _cause(self, results: list[StageResult]) -> str:
        """Why stages ran this cycle: the first stage whose output changed."""
        first = next(r for r in results if r.status == "ran")
        metrics = next(iter(first.artifacts.values())).manifest.get("metrics", {}) if first.artifacts else {}
        ranked = metrics.get("records_ranked")
        if ranked is not None:
            return f"triggered by {first.stage}: {ranked} records ranked, threshold met, new rankings"
        return f"triggered by {first.stage}: new or changed inputs"


def run_service(service: Service) -> None:
    """Serve until SIGTERM/Ctrl-C (raised as KeyboardInterrupt by the CLI's signal handler)."""
    try:
        service.serve()
    except KeyboardInterrupt:
        service.stop()
        service.close()
        service.log("stopped on signal: nothing half-written was published")
