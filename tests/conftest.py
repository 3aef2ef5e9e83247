import atexit
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

# Under `pytest -n N`, each process and the commands it starts compute on its share of the
# cores: torch's threads, one per core in every process, would otherwise outnumber them, and an
# oversubscribed torch slows down many times over. Set before torch is imported.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    os.environ.setdefault("OMP_NUM_THREADS",
                          str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))

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
pytest_plugins = ["tiny_model"]  # its `tiny` fixture: a small random model folder
# Every process the tests start inherits this mark, however it was started: at the end, none
# may still be running (servers, workers, databases, commands killed half-way).
SESSION_MARK = "LORA_PIPELINE_TEST_SESSION"
os.environ[SESSION_MARK] = uuid.uuid4().hex
# A Prefect home of the session's own: the commands' temporary servers keep their database
# there, not in the developer's ~/.prefect, and sessions running side by side (pytest -n) do
# not share one SQLite file.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="lora-tests-prefect-")
atexit.register(shutil.rmtree, os.environ["PREFECT_HOME"], True)


@pytest.fixture(scope="session", autouse=True)
def nothing_left_behind():
    yield
    import psutil

    def ours() -> list:
        found = []
        for p in psutil.process_iter():
            try:
                if p.pid != os.getpid() and p.environ().get(SESSION_MARK) == os.environ[SESSION_MARK]:
                    found.append(" ".join(p.cmdline()))
            except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
                pass
        return found
    deadline = time.monotonic() + 20  # a stopped process may take a moment to go
    while (left := ours()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"processes the tests started are still running: {left}"


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


# The longest test files, longest first: `pytest -n 2 --dist loadfile --no-loadscope-reorder` hands
# out files in collection order, and starting the long ones first keeps both processes busy to the
# end. (Without that flag xdist sorts files by their number of tests: the many quick parametrised
# tests of test_render.py and test_data.py went first, and the long files last.)
LONGEST_FIRST = ("test_train.py", "test_cli.py", "test_resume.py", "test_service.py", "test_deployment.py",
                 "test_tinker.py", "test_served_elsewhere.py", "test_engine.py", "test_tinker_server.py",
                 "test_export.py", "test_init_from.py", "test_nightly.py", "test_flow.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
