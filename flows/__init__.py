import tasks  # noqa: F401 - sets Prefect's environment before prefect is imported
