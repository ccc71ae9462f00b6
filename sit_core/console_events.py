"""Stage events for a console: a stage started, made progress, finished (status, wall time,
cache hit).

The one channel is the standard logger "sit.console". The orchestration layer emits one
record per event, with its details as a dict in `record.sit_event` (`kind` is "started",
"progress" or "finished"); `sit run` installs a handler that renders them on the terminal
(sit_cli/console.py). Why a logger rather than a callback registry: it reaches the handler from
whatever thread Prefect runs a task in, it needs nothing threaded through the tasks'
parameters (those are part of Prefect's cache inputs), and without a handler (a notebook
calling the flow) an event costs a log record and shows nothing.

"sit.console" does not propagate to "sit": that logger carries Prefect's console and API
handlers (PREFECT_LOGGING_EXTRA_LOGGERS in sit_prefect/__init__.py), and these events are not log
lines for the flow run — the UI has each stage's task run and its progress artifact, and the
task logs its own start and finish. So progress never goes to Prefect's API as log lines.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Iterator

LOGGER_NAME = "sit.console"
log = logging.getLogger(LOGGER_NAME)
log.propagate = False
log.setLevel(logging.INFO)


def _emit(kind: str, stage: str, message: str, *args, **details) -> None:
    log.info(message, *args, extra={"sit_event": {"kind": kind, "stage": stage, **details}})


def stage_started(stage: str) -> None:
    _emit("started", stage, "%s: started", stage)


def stage_progress(stage: str, done: int, total: int) -> None:
    _emit("progress", stage, "%s: %d of %d", stage, done, total, done=int(done), total=int(total))


def stage_finished(stage: str, status: str, seconds: float, cached: bool = False) -> None:
    _emit("finished", stage, "%s: %s %s %.1fs%s", stage, status, "in" if status == "done" else "after", seconds,
          " (cached)" if cached else "", status=status, seconds=float(seconds), cached=bool(cached))


@contextlib.contextmanager
def timed_stage(stage: str) -> Iterator[dict]:
    """Emit `started`, run the block, emit `finished` with the block's wall time. The block
    fills in the yielded dict's "status" and "cached"; a block that raises finishes the stage
    as "failed" ("interrupted" for Ctrl-C)."""
    outcome = {"status": "failed", "cached": False}
    start = time.monotonic()
    stage_started(stage)
    try:
        yield outcome
    except KeyboardInterrupt:
        outcome["status"] = "interrupted"
        raise
    except BaseException:
        outcome["status"] = "failed"
        raise
    finally:
        stage_finished(stage, outcome["status"], time.monotonic() - start, outcome["cached"])
