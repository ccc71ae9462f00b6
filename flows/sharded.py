"""The entrypoint `flows/sharded.py:synthetic_instruction_tuner_sharded` that deployments
registered before sit_prefect/ existed still name; new ones name sit_prefect/flows.py."""

from sit_prefect.flows import synthetic_instruction_tuner_sharded  # noqa: F401
