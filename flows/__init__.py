"""Prefect flows: `lora-pipeline` (prepare -> train -> evaluate -> report) and one flow per
CLI subcommand."""
