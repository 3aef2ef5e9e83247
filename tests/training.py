"""The TrainSettings of the tests' trainings, written once."""

from pathlib import Path

from lora_pipeline.settings import TrainSettings

# Small, fast trainings: 4 steps of 4 examples with a checkpoint half-way, at a rate that moves
# the loss within those few steps.
SHORT_RUN = {"batch": 4, "max_steps": 4, "save_every": 2, "learning_rate": 5e-4}


def training_settings(data: str | Path, output_dir: str | Path, /, *, cli_defaults: bool = False,
                      **changes) -> TrainSettings:
    """A run of `data` into `output_dir` on the local engine (a test may set TINKER_API_KEY without
    meaning Tinker): SHORT_RUN, or with `cli_defaults` TrainSettings' own defaults (what a command
    that sets none of them gets, for the tests of refusals), then `changes`, `data` among them if
    a test gives another."""
    return TrainSettings(**{"data": str(data), "output_dir": str(output_dir), "backend": "local",
                            **({} if cli_defaults else SHORT_RUN), **changes})
