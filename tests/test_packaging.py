"""What `pip install` puts into site-packages: the core and the Prefect layer under the
project's own name, nothing generic at the top level."""

import shutil
import subprocess
import sys
import zipfile

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow  # builds a wheel


def test_the_wheel_installs_one_top_level_package(tmp_path):
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    source = tmp_path / "src"
    for name in tracked.split():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(source)], check=True, capture_output=True)
    [wheel] = (tmp_path / "dist").glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"lora_pipeline", "lora_pipeline-0.1.0.dist-info"}
    for module in ("flows/pipeline.py", "flows/sweep.py", "flows/cli.py", "tasks/train.py", "deployments/serve.py"):
        assert f"lora_pipeline/{module}" in names, module
    entry_points = zipfile.ZipFile(wheel).read("lora_pipeline-0.1.0.dist-info/entry_points.txt").decode()
    assert "lora-pipeline = lora_pipeline.flows.cli:main" in entry_points
