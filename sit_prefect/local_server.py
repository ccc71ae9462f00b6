"""Prefect's temporary local server: started in time, with a message while it comes up.

Without PREFECT_API_URL, Prefect starts a temporary server in a subprocess on the first flow
call and gives it PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS (20 s by default) to answer.
On a cold, slow machine its first start (importing the server, then creating and migrating a
SQLite database in an empty PREFECT_HOME) took over 30 s, so a user's very first run died with
a bare timeout. Three things here keep that from happening:
  - a startup timeout that fits a cold start (set in sit_prefect/__init__.py unless the user set one);
  - a database migrated once, when sit is installed, and copied into an empty PREFECT_HOME
    (a new Colab runtime, a new VM resuming from Drive), so only an import remains at start;
  - a line every few seconds saying what sit is waiting for, and one clear error instead of a
    traceback if the server never answers.
"""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from sit_core.errors import SitError
from sit_core.engine.models import cache_root

log = logging.getLogger("sit")

DEFAULT_STARTUP_TIMEOUT_S = 600
NOTICE_EVERY_S = 10.0
DATABASE = "prefect.db"


def uses_temporary_server() -> bool:
    return not os.environ.get("PREFECT_API_URL")


def prefect_home() -> Path:
    """Read from the environment now, as the server's subprocess will: Prefect's own settings
    object is fixed when prefect is first imported."""
    from prefect.settings import Settings

    return Path(Settings().home).expanduser()


def _uses_default_database() -> bool:
    return not any(os.environ.get(v) for v in ("PREFECT_SERVER_DATABASE_CONNECTION_URL",
                                                "PREFECT_API_DATABASE_CONNECTION_URL"))


def template_database() -> Path:
    """Keyed by Prefect's version: another version's schema would need migrating anyway."""
    import prefect

    return cache_root() / "prefect" / prefect.__version__ / DATABASE


def check_prefect_home() -> Path:
    """PREFECT_HOME must be writable (Prefect keeps its database and settings there)."""
    home = prefect_home()
    try:
        home.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=home, prefix=".sit-write-check-"):
            pass
    except OSError as err:
        raise SitError(f"PREFECT_HOME {home} is not writable ({err.strerror})",
                       "point it at a directory you can write on local disk, e.g. export PREFECT_HOME=$HOME/.prefect "
                       "(not Google Drive: SQLite must not live on a FUSE mount)") from None
    return home


def seed_database() -> bool:
    """Copy the prepared database into an empty PREFECT_HOME. Returns whether it copied."""
    if not (uses_temporary_server() and _uses_default_database()):
        return False
    target, template = prefect_home() / DATABASE, template_database()
    if target.exists() or not template.exists():
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{DATABASE}.{os.getpid()}")
    shutil.copyfile(template, partial)
    try:
        os.link(partial, target)  # never over a database another process created meanwhile
    except FileExistsError:
        pass
    finally:
        partial.unlink(missing_ok=True)
    return True


def prepare_database() -> Path:
    """Create the template: start a temporary server on an empty home, let it migrate and
    register its blocks, stop it, and keep a consistent copy (SQLite's backup, WAL included)."""
    template = template_database()
    if template.exists():
        return template
    home = Path(tempfile.mkdtemp(prefix="sit-prefect-home-"))
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    code = ("from prefect.server.api.server import SubprocessASGIServer as S; s = S(); "
            f"s.start(timeout={DEFAULT_STARTUP_TIMEOUT_S}); s.stop()")
    subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True)
    template.parent.mkdir(parents=True, exist_ok=True)
    partial = template.with_name(f".{DATABASE}.{os.getpid()}")
    with sqlite3.connect(home / DATABASE) as source, sqlite3.connect(partial) as copy:
        source.backup(copy)
    os.replace(partial, template)
    shutil.rmtree(home, ignore_errors=True)
    return template


def _say(message: str, *args) -> None:
    """To the "sit" logger where someone listens to it (`sit run`'s console, a flow run's log),
    else to stderr: a Colab cell calling a flow has no handler on it before the flow starts."""
    if log.hasHandlers():
        log.info(message, *args)
    else:
        print(message % args, file=sys.stderr, flush=True)


def announce_while_starting(until: threading.Event) -> None:
    """Say what is being waited for, every NOTICE_EVERY_S seconds, until the server answers."""
    started = time.monotonic()
    while not until.wait(NOTICE_EVERY_S):
        _say("still waiting for Prefect's temporary local server (%.0f s): it imports the Prefect server and, in a "
             "new PREFECT_HOME, creates its database; set PREFECT_API_URL to use a running server instead",
             time.monotonic() - started)


def start_temporary_server() -> str | None:
    """Start Prefect's temporary server now (the flow reuses it), so a slow start is announced
    and a failed one is a SitError. Returns its API URL, or None when PREFECT_API_URL is set."""
    if not uses_temporary_server():
        return None
    check_prefect_home()
    if seed_database():
        _say("new PREFECT_HOME %s: seeded with the Prefect database prepared at install", prefect_home())
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

    server = SubprocessASGIServer()
    if server.running:
        return server.api_url
    up = threading.Event()
    threading.Thread(target=announce_while_starting, args=(up,),
                     daemon=True, name="sit-server-notice").start()
    try:
        server.start()
    except RuntimeError as err:
        raise SitError(
            f"Prefect's temporary server did not answer within "
            f"{PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()} s ({str(err)[:300]})",
            "rerun the same command (finished work is kept); on a very slow machine raise "
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, or start `sit server` once and export "
            "PREFECT_API_URL=http://127.0.0.1:4200/api") from None
    finally:
        up.set()
    return server.api_url
