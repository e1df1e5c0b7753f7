#!/usr/bin/env bash
# GPU acceptance: everything a new GPU machine should show, in one call of at most 7 minutes
# (sized for one H200), written as at most 8 files that `python -m benchmarks.readme` turns into
# the "GPU acceptance" section of docs/benchmarks.md.
#
#   bash benchmarks/gpu_acceptance.sh [--tiny] [OUT_DIR]     (default OUT_DIR: benchmarks/results/gpu-acceptance)
#
# Sections, in order, each under `timeout` with its own limit (plus what the sections before it
# left unused; the whole run stops by BUDGET_S), its stdout and stderr kept, a failing section
# never stopping the next:
#   doctor        python -m fastssl.doctor --json: versions + every component against its reference  -> doctor.json
#   kernels       fused vs eager vs torch.compile: SC and triplet fwd+bwd at B=4,096 D=128, InvP bank
#                 pass B=256 K=4,096 D=128 over N = 65,536 .. 1,281,167; bf16 and fp32         -> kernels.json
#   compiled      python -m fastssl.kernels.compiled --markdown (every kernel configuration for sm_90) -> compiled.md
#   pipelines     data pipelines per method at 96 px: DALI GPU vs DALI CPU vs DataLoader (benchmarks.pipelines) -> pipelines.json
#   train_losses  a few steps of sc and invp with loss.impl=fused vs eager, fp32 and bf16          -> train_losses.json
#   train_step    training images/s and data-stall per method, DALI GPU vs DataLoader             -> train_step.json
#   knn           kNN graph of 1,281,167 x 128 unit vectors: torch on the GPU and FAISS            -> knn.json
#   (all)         every section's command, output and timing                                   -> acceptance.log
#
# --tiny: small sizes, so that it runs on a CPU machine in a few minutes and writes every file;
# there the sections whose point is the GPU say "not available: no GPU" and keep what ran on the
# CPU instead (interpreted kernels, DALI CPU, FAISS CPU).  Python: $PYTHON, else python (python3)
# from PATH; the checkout is put first on PYTHONPATH (fastssl runs from it, no install needed).
# Section limits (seconds) can be set from the environment: LIMIT_DOCTOR, LIMIT_KERNELS, ...
# Exit status: 0 when every section finished (ok, or not available without a GPU), 1 otherwise.
set -u

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TINY=0
OUT=""
for arg in "$@"; do
    case "$arg" in
        --tiny) TINY=1 ;;
        -h|--help) sed -n '2,30p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) echo "gpu_acceptance.sh: unknown option $arg (use --tiny, OUT_DIR)" >&2; exit 2 ;;
        *) OUT="$arg" ;;
    esac
done
OUT="${OUT:-$ROOT/benchmarks/results/gpu-acceptance}"
PY="${PYTHON:-$(command -v python || command -v python3)}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
cd "$ROOT" || exit 2
mkdir -p "$OUT" || exit 2
OUT="$(cd "$OUT" && pwd)"
FILES="doctor.json kernels.json compiled.md pipelines.json train_losses.json train_step.json knn.json acceptance.log"
for f in $FILES; do rm -f "$OUT/$f"; done
SCR="$(mktemp -d "${TMPDIR:-/tmp}/fastssl-acceptance.XXXXXX")" || exit 2
trap 'rm -rf "$SCR"' EXIT
LOG="$OUT/acceptance.log"

read -r GPU GPUS FAISS_GPUS DEVICE < <("$PY" - <<'EOF' 2>/dev/null || echo "0 0 0 unknown"
import torch
from benchmarks.common import device_name
try:
    import faiss
    fg = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") and torch.cuda.is_available() else 0
except Exception:
    fg = 0
print(int(torch.cuda.is_available()), torch.cuda.device_count(), fg, device_name())
EOF
)
export PY SCR TINY GPU

# seconds: per-section limits (GPU run; --tiny: CPU-sized), and the whole run's budget
if [ "$TINY" = 1 ]; then
    L_DOCTOR=${LIMIT_DOCTOR:-150}; L_KERNELS=${LIMIT_KERNELS:-60}; L_COMPILED=${LIMIT_COMPILED:-60}
    L_PIPELINES=${LIMIT_PIPELINES:-100}; L_TRAIN_LOSSES=${LIMIT_TRAIN_LOSSES:-100}
    L_TRAIN_STEP=${LIMIT_TRAIN_STEP:-100}; L_KNN=${LIMIT_KNN:-40}; BUDGET_S=${BUDGET_S:-600}
else
    # (not yet calibrated on a GPU: sum 405 s, so 7 minutes hold with start-up; unused time carries over)
    L_DOCTOR=${LIMIT_DOCTOR:-70}; L_KERNELS=${LIMIT_KERNELS:-95}; L_COMPILED=${LIMIT_COMPILED:-20}
    L_PIPELINES=${LIMIT_PIPELINES:-65}; L_TRAIN_LOSSES=${LIMIT_TRAIN_LOSSES:-40}
    L_TRAIN_STEP=${LIMIT_TRAIN_STEP:-70}; L_KNN=${LIMIT_KNN:-45}; BUDGET_S=${BUDGET_S:-410}
fi
START=$SECONDS
SAVED=0           # seconds the sections so far left of their limits (the next one may use them)
SUMMARY=()

{
    echo "fastssl GPU acceptance: $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname 2>/dev/null || cat /proc/sys/kernel/hostname 2>/dev/null), device $DEVICE"
    echo "cuda $GPU ($GPUS GPUs), faiss GPUs $FAISS_GPUS, tiny $TINY, python $PY, budget ${BUDGET_S}s"
    if git -C "$ROOT" rev-parse --short HEAD >/dev/null 2>&1; then
        echo "git: $(git -C "$ROOT" rev-parse --short HEAD)$(git -C "$ROOT" diff --quiet HEAD 2>/dev/null || echo ' (+ uncommitted changes)')"
    fi
} | tee "$LOG"

# run_section NAME LIMIT GPU_NEEDED "what ran instead on a CPU" CMD...
run_section() {
    local name=$1 limit=$2 needs_gpu=$3 instead=$4
    shift 4
    local left=$(( BUDGET_S - (SECONDS - START) ))
    local t=$(( limit + SAVED ))
    (( t > left )) && t=$left
    mkdir -p "$SCR/$name"
    local t0=$SECONDS rc
    if (( t < 5 )); then
        echo "== $name: not run (the ${BUDGET_S}s budget is spent)" | tee -a "$LOG"
        rc=125
        : > "$SCR/$name.out"
        echo "not run: the ${BUDGET_S}s budget is spent" > "$SCR/$name.err"
    else
        echo "== $name (limit ${t}s): $*" | tee -a "$LOG"
        timeout -k 10 "$t" "$@" > "$SCR/$name.out" 2> "$SCR/$name.err"
        rc=$?
    fi
    local took=$(( SECONDS - t0 ))
    SAVED=$(( t - took )); (( SAVED < 0 )) && SAVED=0
    {
        echo "-- $name: exit $rc after ${took}s"
        echo "-- stdout:"; cat "$SCR/$name.out"
        echo "-- stderr:"; cat "$SCR/$name.err"
    } >> "$LOG"
    local line
    line=$("$PY" - "$name" "$rc" "$took" "$t" "$needs_gpu" "$instead" "$*" <<'EOF'
import glob, json, os, sys

name, rc, took, limit, needs_gpu, instead, command = sys.argv[1:8]
rc, took, limit = int(rc), int(took), int(limit)
scr, out, gpu, tiny = os.environ["SCR"], os.environ["OUT"], os.environ["GPU"] == "1", os.environ["TINY"] == "1"
err = open(os.path.join(scr, name + ".err"), errors="replace").read()
stdout = open(os.path.join(scr, name + ".out"), errors="replace").read()
lines = [l.strip() for l in err.splitlines() if l.strip()]
if rc == 0:
    status, why = "ok", ""
elif rc == 125:
    status, why = "not run", lines[-1] if lines else "not run"
elif rc in (124, 137):
    status, why = "timed out", f"timed out after {limit} s (results so far kept)"
else:
    status, why = "failed", f"exit {rc}" + (f": {lines[-1][:200]}" if lines else "")
env = {"section": name, "status": status, "why": why, "seconds": took, "limit_s": limit, "exit_code": rc,
       "command": command, "tiny": tiny, "device": os.environ.get("DEVICE", ""),
       "stderr_tail": "\n".join(err.rstrip().splitlines()[-25:]) if status != "ok" else ""}
if needs_gpu == "1" and not gpu:
    env.update(status="not available", why="no GPU", cpu_status=status, cpu_why=why, ran_instead=instead)

def suite(stem):
    """A suite's rows, markdown and environment from the scratch folder (write_results' files)."""
    j, m = os.path.join(scr, name, stem + ".json"), os.path.join(scr, name, stem + ".md")
    res = json.load(open(j)) if os.path.isfile(j) else {}
    md = open(m).read() if os.path.isfile(m) else ""
    md = md.split("\n", 1)[1].strip() if md.startswith("# ") else md.strip()
    return res.get("rows", []), md, res.get("environment")

if name == "doctor":
    p = os.path.join(scr, name, "doctor.json")
    doc = json.load(open(p)) if os.path.isfile(p) else {"components": []}
    if status == "failed" and rc == 1 and doc.get("complete"):
        env["why"] = doc.get("verdict", env["why"])  # "N of M components failed"
    doc.update(env)
    json.dump(doc, open(os.path.join(out, "doctor.json"), "w"), indent=2)
elif name == "compiled":
    head = "<!-- acceptance " + json.dumps({k: v for k, v in env.items() if k != "stderr_tail"}) + " -->\n"
    body = stdout.strip() if rc == 0 else (f"{status}: {why}\n\n```\n{env['stderr_tail']}\n```")
    open(os.path.join(out, "compiled.md"), "w").write(head + body + "\n")
else:
    stems = [os.path.basename(f)[:-5] for f in sorted(glob.glob(os.path.join(scr, name, "*.json")), key=os.path.getmtime)]
    rows, mds, environment = [], [], None
    for s in stems:
        r, md, e = suite(s)
        rows += r
        environment = environment or e
        if md:
            mds.append((f"##### {s}\n\n" if len(stems) > 1 else "") + md)
    env.update(rows=rows, markdown="\n\n".join(mds), environment=environment)
    if not stems and status == "ok":
        env.update(status="failed", why="the suite wrote no results")
    json.dump(env, open(os.path.join(out, name + ".json"), "w"), indent=2)
good = env["status"] == "ok" or (env["status"] == "not available" and env.get("cpu_status") == "ok")
open(os.path.join(scr, name + ".verdict"), "w").write("good" if good else "bad")
print(f"{name:13s} {env['status']}{': ' + env['why'] if env['why'] else ''}"
      + (f" (on the CPU instead: {env['cpu_status']}{': ' + env['cpu_why'] if env['cpu_why'] else ''})"
         if "cpu_status" in env else "") + f"  [{took}s of {limit}s]")
EOF
)
    [ -n "$line" ] || line="$name: could not write its result file (see acceptance.log)"
    echo "   $line" | tee -a "$LOG"
    SUMMARY+=("$line")
}
export OUT DEVICE

# pipelines: one benchmarks.pipelines run per method, each with a share of the section's time
pipelines_all() {
    local methods="sc layerwise invp splitbrain" rc=0 m n=4
    local per=$(( ${SECTION_T:-200} / n ))
    for m in $methods; do
        if [ "$TINY" = 1 ]; then
            timeout -k 5 "$per" "$PY" -m benchmarks.pipelines --method "$m" --sizes 32 --images 512 --batch 64 \
                --repeats 1 --workers 1 --out "$SCR/pipelines" || rc=$?
        else
            timeout -k 5 "$per" "$PY" -m benchmarks.pipelines --method "$m" --sizes 96 --images 2048 --batch 256 \
                --repeats 2 --out "$SCR/pipelines" || rc=$?
        fi
        [ "$rc" = 0 ] || echo "pipelines: $m exited $rc" >&2
    done
    return $rc
}
export -f pipelines_all

section_time() {  # the time run_section will give a section of limit $1
    local left=$(( BUDGET_S - (SECONDS - START) )) t=$(( $1 + SAVED ))
    (( t > left )) && t=$left
    echo $t
}

if [ "$TINY" = 1 ]; then
    run_section doctor "$L_DOCTOR" 0 "" \
        "$PY" -m fastssl.doctor --quick --jobs 2 --json "$SCR/doctor/doctor.json"
    run_section kernels "$L_KERNELS" 1 "tiny sizes on the CPU, fused kernels under the Triton interpreter, no torch.compile" \
        "$PY" -m benchmarks.kernels --tiny --out "$SCR/kernels"
    run_section compiled "$L_COMPILED" 0 "" \
        env -u TRITON_INTERPRET "$PY" -m fastssl.kernels.compiled --markdown
    export SECTION_T; SECTION_T=$(section_time "$L_PIPELINES")
    run_section pipelines "$L_PIPELINES" 1 "32 px, 512 images, DALI CPU vs DataLoader" bash -c pipelines_all
    run_section train_losses "$L_TRAIN_LOSSES" 1 "2 tiny steps on the CPU, fused kernels under the Triton interpreter" \
        "$PY" -m benchmarks.train_step --compare-impls --methods sc invp --precisions fp32 bf16 --steps 2 --jobs 2 \
        --out "$SCR/train_losses" data.builtin.num_train=256 data.builtin.num_test=64 data.batch_size=16 \
        model.width=16 data.num_workers=1
    run_section train_step "$L_TRAIN_STEP" 1 "sc, 4 tiny steps, DALI CPU vs DataLoader" \
        "$PY" -m benchmarks.train_step --methods sc --pipelines torch dali-cpu --steps 4 --out "$SCR/train_step" \
        data.batch_size=32 data.builtin.num_train=512 data.builtin.num_test=64 model.width=16 data.num_workers=1
    run_section knn "$L_KNN" 1 "N = 2,000 on the CPU (FAISS CPU, torch CPU, scikit-learn)" \
        "$PY" -m benchmarks.knn --n 2000 --repeats 1 --impls torch faiss-flat sklearn --out "$SCR/knn"
else
    run_section doctor "$L_DOCTOR" 0 "" \
        "$PY" -m fastssl.doctor --jobs 4 --timeout 60 --json "$SCR/doctor/doctor.json"
    T=$(section_time "$L_KERNELS")
    run_section kernels "$L_KERNELS" 1 "" \
        "$PY" -m benchmarks.kernels --sizes headline --dtypes bfloat16 float32 --repeats 20 \
        --time-budget $(( T > 30 ? T - 15 : T / 2 )) --out "$SCR/kernels"
    run_section compiled "$L_COMPILED" 0 "" \
        env -u TRITON_INTERPRET "$PY" -m fastssl.kernels.compiled --markdown
    export SECTION_T; SECTION_T=$(section_time "$L_PIPELINES")
    run_section pipelines "$L_PIPELINES" 1 "" bash -c pipelines_all
    run_section train_losses "$L_TRAIN_LOSSES" 1 "" \
        "$PY" -m benchmarks.train_step --compare-impls --methods sc invp --precisions fp32 bf16 --steps 5 --jobs 4 \
        --out "$SCR/train_losses"
    run_section train_step "$L_TRAIN_STEP" 1 "" \
        "$PY" -m benchmarks.train_step --methods sc layerwise invp splitbrain --pipelines dali-gpu torch --steps 16 \
        --out "$SCR/train_step" data.builtin.num_train=2048
    if [ "$FAISS_GPUS" -gt 0 ]; then KNN_IMPLS="torch faiss-flat"; else KNN_IMPLS="torch"; fi
    run_section knn "$L_KNN" 1 "" \
        "$PY" -m benchmarks.knn --n 1281167 --d 128 --k 5 --impls $KNN_IMPLS --repeats 1 --warmup 0 --out "$SCR/knn"
fi

{
    echo
    echo "== summary ($(( SECONDS - START ))s of ${BUDGET_S}s; files in $OUT)"
    for l in "${SUMMARY[@]}"; do echo "   $l"; done
} | tee -a "$LOG"
n=$(ls "$OUT" | wc -l)
echo "   $n files: $(cd "$OUT" && ls | tr '\n' ' ')" | tee -a "$LOG"
for f in "$SCR"/*.verdict; do
    [ "$(cat "$f")" = good ] || exit 1
done
[ -e "$SCR/knn.verdict" ] || exit 1
exit 0
