"""Prefect tasks: thin wrappers over lora_pipeline that add names, logging and artifacts."""
