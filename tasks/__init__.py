import os

# Prefect's server tries to send usage telemetry; offline (and on private VMs) that only logs errors.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
