"""The entrypoint `flows/pipeline.py:synthetic_instruction_tuner` that deployments registered
before sit_prefect/ existed still name; new ones name sit_prefect/flows.py."""

from sit_prefect.flows import synthetic_instruction_tuner  # noqa: F401
