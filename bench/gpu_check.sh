#!/usr/bin/env bash
# bash bench/gpu_check.sh          # from the repo root, on a machine with one CUDA GPU
#
# The GPU check, in at most 8 minutes (DEADLINE_S) on one H100/H200 once the environment is in
# place: nvidia-smi, the gpu-marked tests (tests/test_gpu.py: DeepSpeed ZeRO-2/ZeRO-3 bf16, LoRA
# under ZeRO-2, ZeRO-3 with optimizer offload, each against the plain fp32 run), then
# bench/throughput.py (plain PyTorch vs DeepSpeed ZeRO-2 bf16: tokens/s, MFU, their ratio).
# Every part runs under `timeout`, each given what is left of the deadline (tests first).
# Output, also echoed: $OUT if set, else ./gpu_check_out: nvidia-smi.txt, env.txt, pytest.log,
# throughput_base.md, throughput_small.md, summary.txt.
# Exit status: 0 all passed; 1 tests failed or timed out; 2 no usable Python/CUDA (nothing
# was tested: a GPU check that skips everything must not pass); 3 tests passed but the
# benchmark failed. Benchmark numbers are printed, never judged.
#
# Python: $PYTHON if set, else .venv/bin/python; when .venv/bin/python is missing it runs
# `make install` first (counted against the deadline). `make install` downloads from PyPI, and
# the lent device machines have no internet: there the environment has to come along with the
# repo copy (the venv carried, or, since a local venv is a CPU torch build of ~2 GB that can
# neither travel in a 64 MiB carry nor see a GPU, PYTHON=python3 -- the image's CUDA torch with
# transformers, peft and pytest -- plus the missing packages as wheels in ./.whl: deepspeed,
# hjson, pydantic, pydantic-core, annotated-types, typing-inspection, all for CPython 3.12).
# Wheels found in ./.whl are installed with --no-index into a temporary site dir first.

set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

DEADLINE_S=${DEADLINE_S:-480}
OUT_DIR=${OUT:-./gpu_check_out}
mkdir -p "$OUT_DIR"
SUMMARY="$OUT_DIR/summary.txt"
: >"$SUMMARY"
export PYTHONUNBUFFERED=1 MLFLOW_DISABLE_TELEMETRY=true TRANSFORMERS_VERBOSITY=error HF_HUB_OFFLINE=1 \
    HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

left() { echo $((DEADLINE_S - SECONDS)); }
# at most $1 seconds, never past the deadline, and never 0 (`timeout 0` would mean no limit)
budget() {
    local l
    l=$(left)
    ((l < 1)) && l=1
    ((l < $1)) && echo "$l" || echo "$1"
}
note() { echo "$*" | tee -a "$SUMMARY"; }

# --- 1. the card ----------------------------------------------------------------------
{
    timeout 20 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit,temperature.gpu \
        --format=csv || echo "nvidia-smi: not found or failed"
    timeout 20 nvidia-smi || true
} 2>&1 | tee "$OUT_DIR/nvidia-smi.txt"

# --- 2. the Python that runs it -------------------------------------------------------
if [[ -z "${PYTHON:-}" ]]; then
    if [[ ! -x .venv/bin/python ]]; then
        note "no .venv/bin/python: running make install (needs PyPI; $(left)s left)"
        if ! timeout "$(budget 300)" make install >"$OUT_DIR/install.log" 2>&1; then
            tail -20 "$OUT_DIR/install.log"
            note "FAIL: make install failed (no internet?). Set PYTHON=python3 and bring wheels in ./.whl"
            exit 2
        fi
    fi
    PYTHON=.venv/bin/python
fi
SITE=""
if compgen -G ".whl/*.whl" >/dev/null; then
    SITE=$(mktemp -d /tmp/gpu_check_site.XXXX)
    if ! timeout "$(budget 120)" "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
            --target "$SITE" .whl/*.whl; then
        note "FAIL: installing the wheels in .whl failed"
        exit 2
    fi
fi
# the repo itself importable without an install (trainables, orchestrator), then the wheels
export PYTHONPATH="$PWD${SITE:+:$SITE}${PYTHONPATH:+:$PYTHONPATH}"

if ! timeout "$(budget 120)" "$PYTHON" - >"$OUT_DIR/env.txt" 2>&1 <<'EOF'
import platform, sys
import torch
print("python", platform.python_version(), sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0), "bf16", torch.cuda.is_bf16_supported())
missing = []
for name in ("transformers", "peft", "deepspeed", "pydantic", "pytest", "trainables", "orchestrator.toyworld"):
    try:
        mod = __import__(name, fromlist=["_"])
        print(name, getattr(mod, "__version__", ""))
    except Exception as e:  # noqa: BLE001 - report every missing piece, not the first
        missing.append(f"{name} ({type(e).__name__}: {e})")
if missing:
    sys.exit("cannot import: " + "; ".join(missing))
if not torch.cuda.is_available():
    sys.exit("torch.cuda.is_available() is False: this Python cannot see a GPU")
EOF
then
    cat "$OUT_DIR/env.txt"
    note "FAIL: $PYTHON cannot run the GPU check (see env.txt): nothing was tested"
    exit 2
fi
cat "$OUT_DIR/env.txt"

# --- 3. the gpu-marked tests ----------------------------------------------------------
tests=(tests/test_gpu.py)   # the only file with gpu-marked tests
t=$(budget 270)
note "pytest -m gpu ${tests[*]} (timeout ${t}s)"
timeout -k 10 "$t" "$PYTHON" -m pytest -q -m gpu -p no:cacheprovider "${tests[@]}" 2>&1 | tee "$OUT_DIR/pytest.log"
test_rc=${PIPESTATUS[0]}
grep -E "passed|failed|error|skipped" "$OUT_DIR/pytest.log" | tail -1 >>"$SUMMARY"
if ((test_rc == 124 || test_rc == 137)); then
    note "FAIL: tests timed out after ${t}s"
elif ((test_rc != 0)); then
    note "FAIL: tests exited $test_rc"
elif grep -q "skipped" "$OUT_DIR/pytest.log"; then
    note "FAIL: some gpu tests were skipped on a machine with CUDA"
    test_rc=1
else
    note "tests: ok"
fi

# --- 4. throughput: plain PyTorch vs DeepSpeed ZeRO-2 bf16, same global batch ----------
# base (~271M parameters): 16 x 512 tokens a step, 10 warm-up + 100 timed steps per arm. Not yet
# measured on a GPU: 1.2e13 FLOPs a step is ~35 ms at 35% MFU of an H100, so a run should take
# well under its 150 s, imports and DeepSpeed's start included; small (~134M) after it if time is left.
bench_rc=0
for size in base small; do
    t=$(budget 150)
    if ((t < 45)); then
        note "throughput $size: skipped, the deadline is near"
        continue
    fi
    note "throughput --model-size $size (timeout ${t}s)"
    timeout -k 10 "$t" "$PYTHON" bench/throughput.py --model-size "$size" --batch 16 --seq 512 --warmup 10 \
        --steps 100 2>&1 | tee "$OUT_DIR/throughput_$size.md"
    rc=${PIPESTATUS[0]}
    if ((rc != 0)); then
        note "throughput $size: exited $rc"
        bench_rc=3
    else
        grep -E "^card:|^\| \(|^ratio" "$OUT_DIR/throughput_$size.md" >>"$SUMMARY"
    fi
done

note "done in ${SECONDS}s"
if ((test_rc != 0)); then
    exit 1
fi
exit "$bench_rc"
