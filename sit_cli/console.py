"""`sit run`'s terminal: sit's own lines and one progress bar; everything else in a log file.

On the terminal during `sit run`:
  - a line when each stage starts and when it finishes (status, wall time, cached or not);
    on a TTY a live progress bar for the running stage, without one (CI logs, a pipe) plain
    lines only, no control codes, with a progress line every 10% or 30 s;
  - sit's own log lines (the "sit" logger: a hub retry, a stall, a note on kept batches),
    and, printed by sit_cli/main.py after the run, SitError messages and the closing table.
Everything else (library warnings, the tqdm bars of datasets, transformers and lm-eval,
Prefect's own log lines, the output of subprocesses such as the `accelerate launch` training
ranks) goes to <run_dir>/logs/sit-run-<UTC time>.log, named at the start. `sit run -v` shows
it on the terminal as well. A crash prints the end of that log and its path.

How: while the run lasts, file descriptors 1 and 2 point at a pipe and a thread copies what
comes out of it into the log file. Only a redirect at the OS level catches C-level writes,
subprocesses, and libraries holding their own reference to sys.stderr (tqdm, Prefect's console
handler); sit writes to duplicates of the original descriptors. The pipe, rather than
pointing the descriptors at the file, is where secrets are masked (sit_core.secrets.redact):
install_log_redaction() covers log records only, and a print or a subprocess's stderr would
otherwise reach the file as written.

The stage events arrive on the "sit.console" logger (sit_core/console_events.py).
Prefect's API log handler is untouched: the UI gets the same logs and artifacts as before.
"""

from __future__ import annotations

import atexit
import datetime as _dt
import logging
import os
import re
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Callable, TextIO

from sit_core.console_events import LOGGER_NAME
from sit_core.errors import SitError
from sit_core.secrets import install_log_redaction, redact

LOG_DIR = "logs"
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[()][A-Za-z0-9]|\x1b[=>]")


def new_log_path(run_dir: Path) -> Path:
    """<run_dir>/logs/sit-run-<UTC time>.log, created empty (a SitError if it cannot be)."""
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = Path(run_dir) / LOG_DIR / f"sit-run-{stamp}.log"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():  # two runs started in the same second (the second is refused by the lock)
            path = path.with_name(f"sit-run-{stamp}-{os.getpid()}.log")
        path.touch()
    except OSError as e:
        raise SitError(f"cannot write the run's log file {path}: {e.strerror or e}",
                       "free some space on that disk or choose another --run-dir") from None
    return path


def format_seconds(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m {int(seconds % 60):02d}s"
    return f"{int(seconds // 3600)}h {int(seconds % 3600 // 60):02d}m"


def _fileno(stream) -> int | None:
    try:
        return stream.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError
        return None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class _Capture:
    """File descriptors 1 and 2 into a pipe; a thread copies the pipe, redacted, into the
    log file (and to `tee` as well, for -v)."""

    # Written into the pipe by stop(): once the thread has seen it, everything written before
    # the redirect ended is in the log file. (EOF would say so too, but processes that
    # inherited the pipe keep it open: Prefect's temporary server lives until the interpreter exits.)
    _DRAINED = b"\0sit-console-drained\0"

    def __init__(self, log_path: Path, tee: Callable[[bytes], None] | None = None):
        self.log_path = log_path
        self._log = open(log_path, "ab", buffering=0)
        self._lock = threading.Lock()
        self._tee = tee
        self._drained = threading.Event()

    def start(self) -> "_Capture":
        _flush_std()
        r, self._w = os.pipe()
        self._thread = threading.Thread(target=self._pump, args=(r,), daemon=True, name="sit-log-copy")
        self._thread.start()
        os.dup2(self._w, 1)
        os.dup2(self._w, 2)
        return self

    def stop(self, saved: tuple[int, int], timeout_s: float = 10.0) -> None:
        """Point fds 1 and 2 back at `saved` and wait until the log holds what came before."""
        _flush_std()
        try:
            os.write(self._w, self._DRAINED)
        except OSError:  # the copying thread is gone (it never is, short of a bug): nothing to wait for
            self._drained.set()
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(self._w)
        self._drained.wait(timeout_s)
        with self._lock:
            self._tee = None  # whatever still arrives (from a process that inherited the pipe) is for the log only

    def append(self, text: str) -> None:
        """Into the log file after stop() (the copying thread may have closed its handle)."""
        try:
            with open(self.log_path, "ab") as f:
                f.write(redact(text).encode("utf-8", "replace"))
        except OSError:
            pass

    def write(self, text: str) -> None:
        """sit's own lines, into the log file only."""
        self._to_log(redact(text).encode("utf-8", "replace"))

    def _to_log(self, data: bytes) -> None:
        with self._lock:
            try:
                self._log.write(data)
            except (OSError, ValueError):  # a full disk, or closed: keep draining the pipe regardless
                pass

    def _out(self, data: bytes) -> None:
        if not data:
            return
        data = redact(data.decode("utf-8", "surrogateescape")).encode("utf-8", "surrogateescape")
        with self._lock:
            try:
                self._log.write(data)
            except (OSError, ValueError):  # a full disk: keep draining the pipe regardless
                pass
            if self._tee is not None:
                try:
                    self._tee(data)
                except (OSError, ValueError):  # the terminal went away: the log still gets everything
                    self._tee = None

    def _pump(self, r: int) -> None:
        # Redaction works on whole lines (split at \n and \r, which tqdm ends its updates with),
        # so a token is never cut in two. A line without either that grows past 64 KiB is cut
        # at a space, keeping its last 256 bytes back.
        pending = b""
        try:
            while chunk := os.read(r, 65536):
                pending += chunk
                while (at := pending.find(self._DRAINED)) >= 0:
                    self._out(pending[:at])
                    pending = pending[at + len(self._DRAINED):]
                    self._drained.set()
                cut = max(pending.rfind(b"\n"), pending.rfind(b"\r")) + 1
                if not cut and len(pending) > 65536:
                    cut = pending.rfind(b" ", 0, len(pending) - 256) + 1 or len(pending) - 256
                if cut:
                    self._out(pending[:cut])
                    pending = pending[cut:]
            self._out(pending)
        finally:
            os.close(r)
            self._drained.set()
            with self._lock:
                self._log.close()


def _flush_std() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):
            pass


class _View:
    """The stage events on the terminal: a rich live bar on a TTY, plain lines otherwise."""

    PLAIN_EVERY_S = 30.0

    def __init__(self, stream: TextIO, live: bool):
        self.stream = stream
        self.stages: dict[str, dict] = {}  # stage -> {"status", "seconds", "cached"}
        self._lock = threading.RLock()
        self._plain: dict[str, tuple[int, float]] = {}  # stage -> (last 10% step shown, its time)
        self._progress = self._task = None
        self._rich = None
        if live:
            from rich.console import Console

            self._rich = Console(file=stream, highlight=False)

    def line(self, text: str, style: str | None = None) -> None:
        with self._lock:
            if self._rich is not None:  # above the live bar, if one is showing
                self._rich.print(text, style=style, markup=False, highlight=False, soft_wrap=True)
            else:
                self.stream.write(text + "\n")
                self.stream.flush()

    def event(self, event: dict) -> None:
        kind, stage = event.get("kind"), event.get("stage")
        with self._lock:
            if kind == "started":
                self.stages[stage] = {"status": "running"}
                self.line(f"{stage}: started", style="bold")
                self._start_bar(stage)
                self._plain[stage] = (0, time.monotonic())
            elif kind == "progress":
                self._progress_to(stage, event["done"], event["total"])
            elif kind == "finished":
                self._stop_bar()
                status, seconds, cached = event["status"], event["seconds"], event["cached"]
                self.stages[stage] = {"status": status, "seconds": seconds, "cached": cached}
                word = "in" if status == "done" else "after"
                self.line(f"{stage}: {status} {word} {format_seconds(seconds)}{' (cached)' if cached else ''}",
                          style={"done": "green"}.get(status, "red" if status == "failed" else "yellow"))

    def _start_bar(self, stage: str) -> None:
        if self._rich is None:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        # redirect_stdout/stderr off: rich would otherwise swap sys.stdout and sys.stderr for
        # proxies that print library output above the bar, on the terminal.
        self._progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TimeElapsedColumn(), console=self._rich, transient=True,
                                  redirect_stdout=False, redirect_stderr=False)
        self._task = self._progress.add_task(stage, total=None)
        self._progress.start()

    def _stop_bar(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = self._task = None

    def _progress_to(self, stage: str, done: int, total: int) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=done, total=total or None)
            return
        if self._rich is not None or not total or done >= total:
            return  # the finish line says the rest
        step, shown_at = self._plain.get(stage, (0, time.monotonic()))
        now = time.monotonic()
        if int(10 * done / total) > step or now - shown_at >= self.PLAIN_EVERY_S:
            self._plain[stage] = (int(10 * done / total), now)
            self.line(f"{stage}: {done} of {total} ({100 * done // total}%)")

    def close(self) -> None:
        with self._lock:
            self._stop_bar()


class _EventHandler(logging.Handler):
    """Renders "sit.console" records (sit_core/console_events.py) on the terminal."""

    def __init__(self, view: _View, capture: _Capture):
        super().__init__(logging.INFO)
        self.view, self.capture = view, capture

    def emit(self, record: logging.LogRecord) -> None:
        try:
            event = getattr(record, "sit_event", None)
            if event is None:
                return
            if event.get("kind") != "progress":
                self.capture.write(f"sit: {record.getMessage()}\n")  # the log file reads in order too
            self.view.event(event)
        except Exception:  # noqa: BLE001 - a display problem must not stop the run
            self.handleError(record)


class _SitLogHandler(logging.Handler):
    """sit's own log lines (the "sit" logger and its children) on the terminal.

    Once Prefect is imported, its console handler (on the root logger) writes them into the
    log file too; before that, this handler does. With -v that console line is on the terminal
    already, so this one stays quiet then."""

    def __init__(self, view: _View, capture: _Capture, verbose: bool):
        super().__init__(logging.INFO)
        self.view, self.capture, self.verbose = view, capture, verbose

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = redact(record.getMessage())
            if record.levelno >= logging.WARNING:
                text = f"{record.levelname.lower()}: {text}"
            prefect_prints = _prefect_console_on(logging.getLogger(record.name))
            if not prefect_prints:
                self.capture.write(f"{record.name}: {text}\n")
            if not (self.verbose and prefect_prints):
                self.view.line(text, style="yellow" if record.levelno >= logging.WARNING else None)
        except Exception:  # noqa: BLE001
            self.handleError(record)


def _prefect_console_on(logger: logging.Logger | None) -> bool:
    """Whether Prefect's console handler (on the root logger, once Prefect is imported)
    receives this logger's records."""
    while logger is not None:
        if any(type(h).__name__ == "PrefectConsoleHandler" for h in logger.handlers):
            return True
        logger = logger.parent if logger.propagate else None
    return False


def _not_a_crash(exc_type) -> bool:
    """SitError (main.py prints its problem and fix), the CLI's own exits, Ctrl-C."""
    import typer

    return issubclass(exc_type, (SitError, KeyboardInterrupt, SystemExit, typer.Exit, typer.Abort))


class RunConsole:
    """The terminal of one `sit run`, as a context manager:

        with RunConsole(run_dir, verbose=False, console=console) as run_console:
            ...run the flow...
        run_console.stages   # {stage: {"status", "seconds", "cached"}} for the closing table

    `console` (the CLI's rich Console) is pointed at the terminal while the run lasts.
    """

    TAIL_LINES = 25

    def __init__(self, run_dir: Path, *, verbose: bool = False, console=None):
        self.run_dir, self.verbose, self._console = Path(run_dir), verbose, console
        self.stages: dict[str, dict] = {}
        self.log_path: Path | None = None

    def __enter__(self) -> "RunConsole":
        self.log_path = new_log_path(self.run_dir)
        install_log_redaction()  # registers the token, so redact() knows it even when it is not hf_-shaped
        if logging.getLogger("sit").level == logging.NOTSET:
            logging.getLogger("sit").setLevel(logging.INFO)  # as sit_prefect/__init__.py sets it, before Prefect is imported
        # "Real" streams are the process's own fds 1 and 2. Under typer's CliRunner or pytest's
        # capture, sys.stdout/sys.stderr are other streams: those are the terminal then.
        self._real = _fileno(sys.stderr) == 2 and _fileno(sys.stdout) == 1
        self._saved = (os.dup(1), os.dup(2))
        if self._real:
            encoding = getattr(sys.stderr, "encoding", None) or "utf-8"
            self._term = open(os.dup(self._saved[1]), "w", encoding=encoding, errors="replace", buffering=1)
            tee = (lambda data: _write_all(self._saved[1], data)) if self.verbose else None
        else:
            self._term = term = sys.stderr  # bound now: sys.stderr itself is pointed at the pipe below
            tee = (lambda data: (term.write(data.decode("utf-8", "replace")), term.flush())) if self.verbose else None
        self._capture = _Capture(self.log_path, tee)
        self._capture.write(f"sit run started {_dt.datetime.now(_dt.timezone.utc).isoformat(timespec='seconds')} "
                            f"(pid {os.getpid()}): {' '.join(sys.argv)}\n")
        self._capture.start()
        if not self._real:  # and point those at the pipe too, so Python-level writes go to the log as well
            self._std = (sys.stdout, sys.stderr)
            sys.stdout, sys.stderr = (open(fd, "w", buffering=1, closefd=False, encoding="utf-8", errors="replace")
                                      for fd in (1, 2))
        self._view = _View(self._term, live=_isatty(self._term) and not self.verbose)
        self.stages = self._view.stages
        self._handlers = [(logging.getLogger(LOGGER_NAME), _EventHandler(self._view, self._capture)),
                          (logging.getLogger("sit"), _SitLogHandler(self._view, self._capture, self.verbose))]
        for logger, handler in self._handlers:
            logger.addHandler(handler)
        if self._console is not None:
            self._console_file, self._console.file = self._console._file, self._term
        self._view.line(f"log: {self.log_path}" + ("" if self.verbose else
                        "  (library warnings, progress bars, Prefect's log; -v shows them here)"), style="dim")
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._view.close()
        for logger, handler in self._handlers:
            logger.removeHandler(handler)
        # Ctrl-C reaches Prefect's temporary server too (the same process group), so what comes
        # out of the flow is often the API call that failed next, not the KeyboardInterrupt: a
        # stage that ended "interrupted" says what happened.
        interrupted = exc_type is not None and (issubclass(exc_type, KeyboardInterrupt) or any(
            s.get("status") == "interrupted" for s in self.stages.values()))
        crash = exc_type is not None and not interrupted and not _not_a_crash(exc_type)
        if not self._real:
            for stream in (sys.stdout, sys.stderr):
                stream.close()  # flushes into the pipe; fds 1 and 2 stay open (closefd=False)
            sys.stdout, sys.stderr = self._std
        self._capture.stop(self._saved)
        if crash or interrupted:
            tail = self.tail()
            self._capture.append("".join(traceback.format_exception(exc_type, exc, tb)))
        if crash:
            self._view.line("sit run stopped on an unexpected error; the end of its log:", style="bold red")
            for line in tail:
                self._view.line(f"  {line}", style="dim")
            self._view.line(f"full log: {self.log_path}", style="bold")
        elif interrupted:
            self._view.line(f"interrupted: run the same command again to resume (log: {self.log_path})",
                            style="yellow")
        if self._console is not None:
            self._console.file = self._console_file
        if self._real:
            self._term.close()
            if interrupted and not self.verbose:
                # Nothing more of sit's to show (exit 130 prints nothing), and Prefect's threads,
                # whose server Ctrl-C stopped too, report the logs they cannot send: to the log file.
                _to_file_at_exit(self.log_path)
            elif not self.verbose:
                # Prefect stops its temporary server at interpreter exit and logs that; this
                # handler, registered after Prefect's, runs before it and keeps that in the log
                # file (appended as is: those are log records, already redacted).
                atexit.register(_to_file_at_exit, self.log_path)
        for fd in self._saved:
            os.close(fd)
        if interrupted:
            import typer

            raise typer.Exit(130) from None  # 128 + SIGINT, without a traceback
        return False

    def tail(self) -> list[str]:
        """The last lines of the log as a terminal would show them (a bar's last state, no
        control codes)."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - 65536))
                text = f.read().decode("utf-8", "replace")
        except OSError:
            return []
        lines = [_ANSI.sub("", line.rsplit("\r", 1)[-1]).rstrip() for line in text.split("\n")]
        return [line for line in lines if line.strip()][-self.TAIL_LINES:]


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _to_file_at_exit(log_path: Path) -> None:
    _flush_std()
    try:
        fd = os.open(log_path, os.O_WRONLY | os.O_APPEND)
    except OSError:
        return
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
