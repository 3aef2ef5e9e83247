"""lora-pipeline core: data, rendering, engines, training, evaluation. No Prefect here."""

__version__ = "0.1.0"
