import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "data" / "sample" / "persona_train.jsonl"
PROMPTS = ROOT / "data" / "sample" / "test_prompts.json"

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# Short retry delays, read by tasks/ at import: fault tests then finish in seconds.
os.environ.setdefault("LORA_PIPELINE_RETRIES", "2")
os.environ.setdefault("LORA_PIPELINE_RETRY_DELAY", "0.2")
# Tests must not pick the tinker backend because the developer has a key exported.
os.environ.pop("TINKER_API_KEY", None)
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield


@pytest.fixture
def small_data(tmp_path) -> Path:
    """The first 40 sample conversations: enough for a few batches, quick to render."""
    path = tmp_path / "small.jsonl"
    path.write_text("".join(SAMPLE.read_text().splitlines(keepends=True)[:40]))
    return path
