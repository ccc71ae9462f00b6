"""Prefect's environment, set before prefect is first imported (flows/ imports this too)."""

import os

# Prefect's server tries to send usage telemetry; offline (and on private VMs) that only logs errors.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# An empty PREFECT_API_URL (`export PREFECT_API_URL=` to "unset" it) is not unset to Prefect: its
# events worker fails on every event and floods the log with tracebacks. Empty means unset: a
# temporary local server, as the README says.
if os.environ.get("PREFECT_API_URL") == "":
    del os.environ["PREFECT_API_URL"]
