#!/usr/bin/env bash
# bash bench/gpu_check.sh                         # from the repo root, on a machine with one CUDA GPU
# PYTHON=python3 DEADLINE_S=300 OUT=$OUT bash bench/gpu_check.sh   # a lent machine, no internet, .whl carried
#
# The GPU check, in at most 5 minutes (DEADLINE_S, default 300) on one H100/H200: nvidia-smi, the
# gpu-marked tests (tests/test_gpu.py: DeepSpeed ZeRO-2/ZeRO-3 bf16, LoRA under ZeRO-2, ZeRO-3
# with optimizer offload, each against the plain fp32 run; ~70 s on 2 idle CPU cores, up to 160 s
# here), then bench/throughput.py (plain PyTorch vs DeepSpeed ZeRO-2 vs ZeRO-3, bf16: tokens/s,
# MFU, ratios to plain): SmolLM2-135M's shape (up to 120 s), then base only if 60 s or more are left.
# Every part runs under `timeout`, each given what is left of the deadline (tests first), less
# 10 s kept for `timeout -k`'s grace, so the whole script ends within DEADLINE_S.
# Output, also echoed: $OUT if set, else ./gpu_check_out: nvidia-smi.txt, wheels.log, env.txt, pytest.log,
# throughput_smollm2.md, throughput_base.md, summary.txt (each written as it goes: what was
# measured before a failure or the deadline stays there).
# Exit status: 0 all passed; 1 tests failed or timed out; 2 no usable Python/CUDA (nothing
# was tested: a GPU check that skips everything must not pass); 3 tests passed but the
# benchmark failed (an arm raised, or the smollm2 run was cut or skipped). Benchmark numbers
# are printed, never judged.
#
# Python: $PYTHON if set, else .venv/bin/python, else (no .venv but wheels in ./.whl: a lent
# machine) python3; with neither .venv nor .whl it runs `make install` first (counted against
# the deadline). `make install` downloads from PyPI, and
# the lent device machines have no internet: there the environment has to come along with the
# repo copy (the venv carried, or, since a local venv is a CPU torch build of ~2 GB that can
# neither travel in a 64 MiB carry nor see a GPU, PYTHON=python3 -- the image's CUDA torch with
# transformers, peft and pytest -- plus the missing packages as wheels in ./.whl: deepspeed,
# hjson, pydantic, pydantic-core, annotated-types, typing-inspection, typing-extensions, all
# for CPython 3.12: `make gpu-wheels` fills it, ~5 MB; name .whl in the device run's carry).
# Wheels found in ./.whl are installed with --no-index into a temporary site dir first (by pip,
# or unpacked by Python's zipfile where that Python has no pip), put on PYTHONPATH ahead of the
# image's own packages.

set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

DEADLINE_S=${DEADLINE_S:-300}
OUT_DIR=${OUT:-./gpu_check_out}
mkdir -p "$OUT_DIR"
SUMMARY="$OUT_DIR/summary.txt"
: >"$SUMMARY"
export PYTHONUNBUFFERED=1 MLFLOW_DISABLE_TELEMETRY=true TRANSFORMERS_VERBOSITY=error HF_HUB_OFFLINE=1 \
    HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

GRACE_S=10   # what `timeout -k 10` may add after a part's limit, kept back from every budget
left() { echo $((DEADLINE_S - GRACE_S - SECONDS)); }
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
if [[ -z "${PYTHON:-}" && ! -x .venv/bin/python ]] && compgen -G ".whl/*.whl" >/dev/null; then
    PYTHON=python3   # a lent machine: the image's Python, plus the wheels below
    note "no .venv/bin/python, wheels in .whl: PYTHON=python3"
fi
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
    if timeout 30 "$PYTHON" -m pip --version >/dev/null 2>&1; then
        timeout "$(budget 90)" "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
            --disable-pip-version-check --target "$SITE" .whl/*.whl >"$OUT_DIR/wheels.log" 2>&1
    else  # no pip in that Python: a wheel is a zip of its site-packages files
        echo "no pip in $PYTHON: unpacking the wheels" >"$OUT_DIR/wheels.log"
        timeout "$(budget 90)" "$PYTHON" -c 'import sys, zipfile
for w in sys.argv[2:]:
    zipfile.ZipFile(w).extractall(sys.argv[1])' "$SITE" .whl/*.whl >>"$OUT_DIR/wheels.log" 2>&1
    fi
    wheels_rc=$?
    if ((wheels_rc != 0)); then
        cat "$OUT_DIR/wheels.log"
        note "FAIL: installing the wheels in .whl failed (exit $wheels_rc)"
        exit 2
    fi
    wheels=(.whl/*.whl)
    note "wheels: ${wheels[*]#.whl/} -> $SITE"
fi
# the repo itself importable without an install (trainables, orchestrator), then the wheels
export PYTHONPATH="$PWD${SITE:+:$SITE}${PYTHONPATH:+:$PYTHONPATH}"

if ! timeout "$(budget 90)" "$PYTHON" - >"$OUT_DIR/env.txt" 2>&1 <<'EOF'
import platform, sys
import torch
print("python", platform.python_version(), sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0), "bf16", torch.cuda.is_bf16_supported())
missing = []
for name in ("transformers", "peft", "deepspeed", "pydantic", "pytest", "trainables", "orchestrator.spec.toyworld"):
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
t=$(budget 160)
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

# --- 4. throughput: plain PyTorch vs DeepSpeed ZeRO-2 vs ZeRO-3, bf16, same global batch -----
# 16 x 512 tokens a step, 5 warm-up + 20 timed steps per arm, the three arms in one process.
# smollm2 (SmolLM2-135M's shape, random init) first, the part that must run: a budget of up to
# 120 s, ~55 s expected (imports, three model builds and two DeepSpeed starts ~35 s; 25 steps of
# ~0.1 s plain, ~0.15 s ZeRO-2, ~0.3-0.6 s ZeRO-3: none of these measured yet). Then base (~271M)
# with what is left, only if 60 s or more are: on the 2026-11-27 H200 run plain took 78 ms a step
# and ZeRO-2 123 ms, so ~45-50 s with ZeRO-3. Estimated in all: setup ~15 s + tests ~150 s +
# smollm2 ~55 s + base ~50 s = ~270 s of the 290 s budget; if the tests run long, base is cut or
# skipped, never smollm2. throughput.py prints each arm's row as soon as it is measured, and the
# rows go to summary.txt whatever the exit, so a failed, hung or timed-out later arm keeps the
# earlier ones. Exit 3 when smollm2 fails, is cut or is skipped, or base fails; base cut by the
# deadline is noted, not failed.
bench_rc=0
bench() {   # size, budget cap (s), least time worth starting (s), required (1/0)
    local size=$1 cap=$2 least=$3 required=$4 t rc
    t=$(budget "$cap")
    if ((t < least)); then
        note "throughput $size: skipped, ${t}s left before the deadline (needs ${least}s)"
        ((required)) && bench_rc=3
        return
    fi
    note "throughput --model-size $size --arms plain,zero2,zero3 (timeout ${t}s)"
    timeout -k 10 "$t" "$PYTHON" bench/throughput.py --model-size "$size" --arms plain,zero2,zero3 \
        --batch 16 --seq 512 --warmup 5 --steps 20 2>&1 | tee "$OUT_DIR/throughput_$size.md"
    rc=${PIPESTATUS[0]}
    grep -E "^card:|^model:|^\| \(|^ratio|^FAILED" "$OUT_DIR/throughput_$size.md" >>"$SUMMARY"
    if ((rc == 124 || rc == 137)); then
        note "throughput $size: cut by its ${t}s timeout (the rows above were measured before it)"
        ((required)) && bench_rc=3
    elif ((rc != 0)); then
        note "throughput $size: exited $rc"
        bench_rc=3
    fi
}
bench smollm2 120 40 1
bench base 100 60 0

note "done in ${SECONDS}s"
if ((test_rc != 0)); then
    exit 1
fi
exit "$bench_rc"
