"""Prefect's environment, set before prefect is first imported (every module of this package runs it first)."""

import logging
import os

# Prefect's server tries to send usage telemetry; offline (and on private VMs) that only logs errors.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# An empty PREFECT_API_URL (`export PREFECT_API_URL=` to "unset" it) is not unset to Prefect: its
# events worker fails on every event and floods the log with tracebacks. Empty means unset: a
# temporary local server, as the README says.
if os.environ.get("PREFECT_API_URL") == "":
    del os.environ["PREFECT_API_URL"]
# sit_core logs through the standard "sit" logger (a stall, a hub retry, a DDP launch command).
# Prefect attaches its console and API handlers to the loggers named here, so those lines reach
# the terminal and the flow run's logs in the UI. (The flows do not use log_prints: it captures
# prints that libraries send to a redirected stdout, such as dill's bytecode scan when datasets
# hashes a function, and floods the run log with disassembly.)
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "sit")
logging.getLogger("sit").setLevel(logging.INFO)
# Prefect's 20 s for its temporary server to answer is shorter than a cold first start on a
# slow machine (sit_prefect/local_server.py); a value the user set is kept.
from .local_server import DEFAULT_STARTUP_TIMEOUT_S  # noqa: E402  (imports no Prefect)

os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", str(DEFAULT_STARTUP_TIMEOUT_S))
