#!/usr/bin/env bash
# One command for a machine with an NVIDIA GPU: build the extension in place,
# run the cuda-marked tests, then every GPU benchmark; everything lands in one
# folder, with a log per stage and suite.json (exit status and seconds per stage).
#
#   benchmarks/gpu_suite.sh [OUT_DIR]      (default benchmarks/results/<device>[_quick])
#
# Environment:
#   PYTHON                 interpreter (default: .venv/bin/python if it has CUDA PyTorch, else python3,
#                          else .venv/bin/python)
#   BUDGET_S               total seconds (default 1500; QUICK=1: 300). A stage gets what is
#                          left, capped by its own limit; a stage that no longer fits is not
#                          started and the suite says where it stopped.
#   QUICK=1                build, cuda tests, then the benchmarks' --quick modes (~5 minutes)
#   TORCH_CUDA_ARCH_LIST   default: the local GPU's arch (e.g. 9.0a on an H100)
#   MAX_JOBS               default: nproc
#   CUDA_HOME              default: the toolkit of the nvcc on PATH
#   TEST_PATHS             test files or folders for the cuda-marked tests (default tests)
#   DRY_RUN=1              no GPU needed: every stage's command runs on the CPU in quick mode
#                          (build skipped when the extension already imports), to check the
#                          script itself (DRY_RUN_ONLY: its benchmark stages, default dp,sampling,model)
# Nothing is installed and nothing is fetched: PyTorch, pytest and (for plots) matplotlib
# must already be there.
set -u -o pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
START=$(date +%s)
QUICK=${QUICK:-0}
DRY_RUN=${DRY_RUN:-0}
if [[ $QUICK == 1 || $DRY_RUN == 1 ]]; then BUDGET_S=${BUDGET_S:-300}; else BUDGET_S=${BUDGET_S:-1500}; fi

if [[ -z ${PYTHON:-} ]]; then
    PYTHON=python3  # .venv's when it has CUDA PyTorch, or when python3 has no PyTorch at all
    if [[ -x .venv/bin/python ]] && .venv/bin/python -c "import torch" 2>/dev/null; then
        if .venv/bin/python -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null ||
            ! python3 -c "import torch" 2>/dev/null; then
            PYTHON=.venv/bin/python
        fi
    fi
fi
if ! "$PYTHON" -c "import torch" 2>/dev/null; then
    echo "gpu_suite: $PYTHON cannot import torch; set PYTHON to an interpreter with PyTorch" >&2
    exit 2
fi
if [[ $DRY_RUN == 1 ]]; then
    DEVICE=cpu
elif "$PYTHON" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    DEVICE=cuda
else
    echo "gpu_suite: PyTorch sees no CUDA GPU (DRY_RUN=1 checks the script on a CPU)" >&2
    exit 2
fi
SLUG=$(cd benchmarks && "$PYTHON" -c "import torch, common; print(common.device_tag(torch.device('$DEVICE')))")
[[ $QUICK == 1 || $DRY_RUN == 1 ]] && SLUG="${SLUG}_quick"
OUT=${1:-benchmarks/results/$SLUG}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
SUITE_TSV="$OUT/suite.tsv"
: >"$SUITE_TSV"
STOPPED_AT=""

elapsed() { echo $(($(date +%s) - START)); }

# stage NAME LIMIT_S CMD...: run CMD with its output in $OUT/NAME.log, within LIMIT_S and
# what is left of the budget; record "NAME rc seconds" (rc 124: stopped at its limit).
stage() {
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET_S - $(elapsed)))
    if ((left < 30)); then
        [[ -z $STOPPED_AT ]] && STOPPED_AT=$name
        printf '%s\tnot-run\t0\n' "$name" >>"$SUITE_TSV"
        echo "== $name: not run (time budget spent)"
        return
    fi
    ((limit > left)) && limit=$left
    echo "== $name (limit ${limit}s): $*"
    local t0 rc
    t0=$(date +%s)
    timeout --kill-after=15 "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    printf '%s\t%s\t%s\n' "$name" "$rc" "$(($(date +%s) - t0))" >>"$SUITE_TSV"
    if ((rc == 124 || rc == 137)); then
        echo "   $name: stopped at its time limit (${limit}s); see $OUT/$name.log"
        [[ -z $STOPPED_AT ]] && STOPPED_AT=$name
    elif ((rc != 0)); then
        echo "   $name: exit status $rc; last lines of $OUT/$name.log:"
        tail -n 15 "$OUT/$name.log" | sed 's/^/     /'
    else
        echo "   $name: ok ($(($(date +%s) - t0))s)"
    fi
}

# -- 0. the machine -------------------------------------------------------------------------
{
    echo "date: $(date -u +%FT%TZ)  commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
    echo "python: $PYTHON ($("$PYTHON" --version 2>&1))  quick: $QUICK  dry run: $DRY_RUN  budget: ${BUDGET_S}s"
    "$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    command -v nvcc >/dev/null && nvcc --version | tail -n 2
} 2>&1 | tee "$OUT/machine.log"

# -- 1. build ---------------------------------------------------------------------------------
if [[ $DEVICE == cuda ]]; then
    if [[ -z ${TORCH_CUDA_ARCH_LIST:-} ]]; then
        TORCH_CUDA_ARCH_LIST=$("$PYTHON" -c "import torch; M, m = torch.cuda.get_device_capability(); print(f'{M}.{m}' + ('a' if M >= 9 else ''))")
    fi
    if [[ -z ${CUDA_HOME:-} ]] && command -v nvcc >/dev/null; then
        CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
    fi
    export TORCH_CUDA_ARCH_LIST CUDA_HOME=${CUDA_HOME:-} DDT_FAST_BUILD_CUDA=1
    export MAX_JOBS=${MAX_JOBS:-$(nproc)}
    echo "building for TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST with CUDA_HOME=$CUDA_HOME, MAX_JOBS=$MAX_JOBS"
    stage build 900 "$PYTHON" setup.py build_ext --inplace
elif "$PYTHON" -c "import ddt_fast, sys; sys.exit(not ddt_fast._extension.available())" 2>/dev/null; then
    printf 'build\tskipped\t0\n' >>"$SUITE_TSV"
    echo "== build: skipped (dry run; the extension already imports)"
else
    stage build 900 "$PYTHON" setup.py build_ext --inplace
fi
"$PYTHON" -c "import ddt_fast, json; print(json.dumps(ddt_fast.info(), indent=1, default=str))" 2>&1 | tee "$OUT/info.log"

# -- 2. cuda-marked tests -----------------------------------------------------------------------
TEST_LIMIT=900
[[ $QUICK == 1 || $DRY_RUN == 1 ]] && TEST_LIMIT=240
stage cuda_tests "$TEST_LIMIT" "$PYTHON" -m pytest -m cuda -p no:cacheprovider -q -rs \
    --continue-on-collection-errors --junitxml "$OUT/cuda_tests.xml" ${TEST_PATHS:-tests}
grep -E "passed|failed|error|skipped|no tests ran" "$OUT/cuda_tests.log" | tail -n 1 | sed 's/^/   /'
# Record the ops whose cuda tests all passed as GPU-verified at the digest of the code just
# built (ddt_fast/gpu_verified.json; commit it); a dry run only prints the statuses.
if [[ $DEVICE == cuda && -s "$OUT/cuda_tests.xml" ]]; then
    SUMMARY=$(grep -E "passed|failed" "$OUT/cuda_tests.log" | tail -n 1 | tr -d '=' | xargs)
    stage record_verified 60 "$PYTHON" -m ddt_fast.ops.verified record --junit "$OUT/cuda_tests.xml" \
        --suite "pytest -m cuda: ${SUMMARY:-see cuda_tests.log}" --commit "$(git rev-parse --short HEAD 2>/dev/null)"
fi
"$PYTHON" -m ddt_fast.ops.verified 2>&1 | tee "$OUT/verified.log" | sed 's/^/   /'
cp ddt_fast/gpu_verified.json "$OUT/gpu_verified.json"  # the records travel with the results

# -- 3. benchmarks ------------------------------------------------------------------------------
BENCH_ARGS=(--out "$OUT" --device "$DEVICE")
if [[ $DRY_RUN == 1 ]]; then
    BENCH_ARGS+=(--quick --only "${DRY_RUN_ONLY:-dp,sampling,model}")
elif [[ $QUICK == 1 ]]; then
    BENCH_ARGS+=(--quick --stage-timeout 150)
else
    BENCH_ARGS+=(--stage-timeout 600)
fi
LEFT=$((BUDGET_S - $(elapsed) - 20))
stage benchmarks "$LEFT" "$PYTHON" benchmarks/run_all.py "${BENCH_ARGS[@]}" --budget "$((LEFT - 15))"
grep -E "^== |rc |stopped early" "$OUT/benchmarks.log" | grep -v "^== .*: /" | sed 's/^/   /'

# -- summary ------------------------------------------------------------------------------------
"$PYTHON" - "$OUT" "$STOPPED_AT" "$(elapsed)" "$BUDGET_S" <<'EOF'
import json, os, sys
out, stopped, total, budget = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
stages = {}
with open(os.path.join(out, "suite.tsv")) as f:
    for line in f:
        name, rc, secs = line.rstrip("\n").split("\t")
        stages[name] = {"rc": int(rc) if rc.lstrip("-").isdigit() else rc, "seconds": int(secs), "log": f"{name}.log"}
bench = {}
if os.path.exists(os.path.join(out, "summary.json")):
    with open(os.path.join(out, "summary.json")) as f:
        bench = json.load(f)
stopped = stopped or bench.get("stopped_at") or ""
suite = {"stages": stages, "benchmarks": bench.get("stages", {}), "stopped_at": stopped or None,
         "seconds": total, "budget_s": budget}
with open(os.path.join(out, "suite.json"), "w") as f:
    json.dump(suite, f, indent=1)
print("\n== gpu_suite summary (" + out + ")")
print(f"{'stage':22s} {'rc':>8s} {'seconds':>8s}")
for name, s in stages.items():
    print(f"{name:22s} {str(s['rc']):>8s} {s['seconds']:8d}")
for name, s in bench.get("stages", {}).items():
    print(f"  bench {name:16s} {str(s.get('rc')):>8s} {str(s.get('seconds', '-')):>8s} {s.get('skipped', '')}")
print(f"total {total}s of {budget}s" + (f"; STOPPED EARLY at stage: {stopped}" if stopped else ""))
failed = [n for n, s in stages.items() if s["rc"] not in (0, "skipped")]
print("failed or unfinished: " + (", ".join(failed) if failed else "none"))
sys.exit(1 if failed else 0)
EOF
