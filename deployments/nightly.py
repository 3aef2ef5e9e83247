"""The `lora-pipeline/nightly` deployment: the workflow's complete example, every night.

Served by a long-running process (`lora-pipeline serve`), which registers the deployment with
the Prefect server in PREFECT_API_URL and runs what it schedules. Stopping the process pauses
the schedule. The backend is pinned to tinker: a missing TINKER_API_KEY then fails the run
loudly instead of quietly training a small local model. For a trial on this machine:

    prefect deployment run lora-pipeline/nightly -p backend=local -p max_steps=4 -p dataset=FILE
"""

from flows.pipeline import lora_pipeline

CRON = "0 2 * * *"  # 02:00 every night, server time zone
PARAMETERS = {
    "dataset": "HuggingFaceH4/ultrachat_200k",
    "split": "train_sft",
    "max_examples": 10000,
    "batch": 64,
    "max_steps": 100,
    "rank": 16,
    "learning_rate": 1e-4,
    "save_every": 25,
    "output_dir": "checkpoints",
    "backend": "tinker",
    "compare_base": True,
}


def serve() -> None:
    lora_pipeline.serve(name="nightly", cron=CRON, parameters=PARAMETERS,
                        description="Nightly LoRA fine-tune on Tinker: prepare, train, test, report.")
