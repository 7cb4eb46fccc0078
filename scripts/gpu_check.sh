#!/usr/bin/env bash
# The GPU machine's checks in one run: build t2i-fast from this tree against the packages
# that scripts/offline_packages.sh gathered (that machine has no network and no liblmdb),
# then the training-step benchmark (and the outside step in peer/ when there is one), the GPU
# tests, DDP on one GPU, the kernel benchmarks, the training-step profile and the loader
# benchmark. Each stage runs under a time limit with its log kept; a failed stage does not
# stop the later ones. RESULTS_DIR gets each benchmark's JSON, summary.json (every stage's
# exit code and seconds, the GPU, versions, commit) and logs.tar.gz.
#
#   bash scripts/gpu_check.sh RESULTS_DIR
#
# Environment: T2I_OFFLINE (default offline/), PYTHON (python3), T2I_DEADLINE (seconds for
# the whole run, 450), T2I_TESTS (the pytest arguments), T2I_COMMIT (when the tree has no
# .git), T2I_KEEP_LOGS=1 (leave the logs unpacked; the device tool returns only 8 files),
# T2I_BENCH_STEP_S (the step benchmark's limit, 170).
# Without CUDA it stops after the build and import check, with exit status 3.
# Stage commands are single-quoted on purpose: the stage's own bash expands them.
# shellcheck disable=SC2016
set -uo pipefail  # no -e: a failing stage is recorded, and the run goes on

if [ $# -ne 1 ]; then
  echo "usage: $0 RESULTS_DIR" >&2
  exit 2
fi
mkdir -p "$1/logs" || exit 2
results=$(cd "$1" && pwd)
offline=${T2I_OFFLINE:-$(dirname "$0")/../offline}
[ -d "$offline" ] && offline=$(cd "$offline" && pwd)
cd "$(dirname "$0")/.." || exit 2
logs=$results/logs
stages=$logs/stages.tsv
: >"$stages"
export PYTHON=${PYTHON:-python3} RESULTS=$results LOGS=$logs OFFLINE=$offline PYTHONUNBUFFERED=1
deadline=$(($(date +%s) + ${T2I_DEADLINE:-450}))
# Compiled kernels on the GPU, never the interpreter that CPU-only test runs use.
unset TRITON_INTERPRET

# stage NAME LIMIT_S COMMAND: COMMAND (a bash script line) under `timeout`, its output in
# logs/NAME.log; limits shrink to fit the deadline, and a stage with no time left is skipped.
stage() {
  local name=$1 limit=$2 command=$3 left start rc seconds
  left=$((deadline - $(date +%s)))
  if ((left < 20)); then
    printf '%s\tskipped\t0\t0\n' "$name" >>"$stages"
    echo "[$name] skipped: the run's deadline is near"
    return
  fi
  ((limit > left)) && limit=$left
  start=$(date +%s.%N)
  timeout --kill-after=10 "$limit" bash -c "$command" >"$logs/$name.log" 2>&1 </dev/null
  rc=$?
  seconds=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$seconds" "$limit" >>"$stages"
  echo "[$name] exit $rc in ${seconds}s (limit ${limit}s)"
}

# -- the libraries: the offline sysroot where there is one, else the system's ----------------
if [ -d "$OFFLINE/sysroot/usr/include" ]; then
  sysroot=$(cd "$OFFLINE/sysroot" && pwd)
  export LMDB_ROOT=$sysroot  # CMakeLists.txt looks here first
  export CMAKE_PREFIX_PATH=$sysroot/usr${CMAKE_PREFIX_PATH:+:$CMAKE_PREFIX_PATH}  # JPEG, ZLIB
  # At run time only the libraries the system lacks come from the sysroot, through a folder
  # of their own on LD_LIBRARY_PATH: the sysroot's zlib would replace the system's (which
  # every system has) in every process.
  runtime=$sysroot/runtime
  mkdir -p "$runtime"
  known=$({ ldconfig -p || /sbin/ldconfig -p; } 2>/dev/null)
  for soname in liblmdb.so.0 libjpeg.so.62; do
    if ! grep -q "^[[:space:]]*$soname " <<<"$known"; then
      ln -sfn "$sysroot/usr/lib/x86_64-linux-gnu/$soname" "$runtime/$soname"
    fi
  done
  export LD_LIBRARY_PATH=$runtime${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
else
  echo "no $OFFLINE/sysroot (scripts/offline_packages.sh makes it): using the system's libraries"
fi

stage info 60 '
  nvidia-smi || true
  "$PYTHON" -c "import sys, torch, triton; print(sys.version); print(torch.__version__, torch.version.cuda, triton.__version__, torch.cuda.is_available())"
  "$PYTHON" -m pip --version; cmake --version | head -n 1; g++ --version | head -n 1'

stage deps 90 '
  if "$PYTHON" -c "import lmdb" 2>/dev/null; then
    echo "py-lmdb is installed"
  else
    "$PYTHON" -m pip install --no-index --find-links "$OFFLINE/wheels" lmdb
  fi'

# The tests and scripts import t2i_fast from this tree (the current folder comes first on
# sys.path), so the built extension is copied here too; importing it from / checks that the
# installed one loads its libraries.
stage build 300 '
  set -e
  "$PYTHON" -m pip install -v --no-build-isolation --no-deps .
  cache=$(ls -td build/*/CMakeCache.txt | head -n 1)
  grep -E "^(LMDB_INCLUDE_DIR|LMDB_LIBRARY|JPEG_INCLUDE_DIR|JPEG_LIBRARY_RELEASE|ZLIB_INCLUDE_DIR|ZLIB_LIBRARY_RELEASE)[:=]" "$cache" | tee "$LOGS/libraries.txt"
  so=$(cd / && "$PYTHON" -c "import t2i_fast._C as c; print(c.__file__)")
  ldd "$so" | grep -E "lmdb|jpeg|libz" || true
  cp "$so" t2i_fast/'

if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' \
    2>/dev/null; then
  no_cuda=1
  echo "no CUDA device: the GPU stages (tests, benchmarks, profile) are skipped"
else
  no_cuda=0
  export T2I_TESTS=${T2I_TESTS:-tests/test_op_*.py tests/test_engine_cuda.py tests/test_loader.py tests/test_losses.py}
  # Triton compiles each kernel variant in the process that first needs it: workers
  # compile in parallel (pytest-xdist, when installed).
  workers=$("$PYTHON" -c "import xdist" 2>/dev/null && echo "-n 8")
  export T2I_WORKERS=${workers:-}
  # The whole step first, then the tests, then the layers; the benchmarks write their JSON
  # after every row, so a stage cut off by its limit keeps what it measured.
  # Eight rows at batch 64, then at 256, 3 x 100 timed steps each (the least the comparison
  # is read from); the compiles (three stock rows and two engines a batch size) take most of
  # the time, so 170 s holds about the batch-64 rows: T2I_BENCH_STEP_S=540 (with a
  # T2I_DEADLINE to match) gives the whole table. Rows cut off are missing from the JSON.
  stage bench_step "${T2I_BENCH_STEP_S:-170}" '"$PYTHON" scripts/bench_step.py --preset reed --batch-sizes 64,256 --steps 100 --repeats 3 --json "$RESULTS/bench_step.json"'
  # The outside yardstick (a plain step written apart from the project), when the git-ignored
  # peer/ folder holds it: on the same GPU, right after bench_step. It writes OUT/peer_step.json.
  if [ -f peer/peer_step.py ]; then
    stage peer_step 150 'OUT="$RESULTS" "$PYTHON" peer/peer_step.py eager compile_ro'
  fi
  stage tests 150 '"$PYTHON" -m pytest -v -rfE --durations=10 -p no:cacheprovider $T2I_WORKERS --junitxml="$LOGS/pytest.xml" $T2I_TESTS'
  # DDP (NCCL, one process) against a plain run: the CUDA graph with DDP's all-reduce in it.
  stage check_ddp 150 '"$PYTHON" scripts/check_ddp.py --nproc 1 --steps 40 --json "$RESULTS/check_ddp.json"'
  # The 4×4 and 8×8 layers only (split-K's), each measured in CUDA-graph replay for the
  # dispatch and timed per call and in-graph; the step's fused off/auto/on rows from bench_step.
  stage bench_kernels 120 '"$PYTHON" scripts/bench_kernels.py --batch 64 --no-compile --max-size 8 --step-json "$RESULTS/bench_step.json" --json "$RESULTS/bench_kernels.json"'
  stage profile_step 90 '"$PYTHON" scripts/profile_step.py --preset reed --batch-size 64 --json "$RESULTS/profile_step.json" --trace "$LOGS/profile_trace.json"'
  # G's pass with each upsampling (the paper's, the stock resize-convolution, ours), eager
  # and compiled: three small compiles.
  stage bench_upsample 90 '"$PYTHON" scripts/bench_upsample.py --preset reed --batch 64 --json "$RESULTS/bench_upsample.json"'
  # Its last line of output is its JSON; 3000 images and 2 epochs keep it near a minute.
  stage bench_loader 60 '"$PYTHON" scripts/bench_loader.py --n 3000 --epochs 2 >"$LOGS/bench_loader.out" && tail -n 1 "$LOGS/bench_loader.out" >"$RESULTS/bench_loader.json"'
fi

commit=${T2I_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
export COMMIT=$commit NO_CUDA=$no_cuda
"$PYTHON" - <<'EOF'
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

logs, results = Path(os.environ["LOGS"]), Path(os.environ["RESULTS"])


def status(rc: str) -> str:
    if rc == "skipped":
        return "skipped"
    return {"0": "ok", "124": "timeout", "137": "timeout"}.get(rc, "failed")


stages = []
for line in (logs / "stages.tsv").read_text().splitlines():
    name, rc, seconds, limit = line.split("\t")
    entry = {"name": name, "status": status(rc),
             "exit_code": None if rc == "skipped" else int(rc), "seconds": float(seconds),
             "limit_s": int(limit), "log": f"logs/{name}.log"}
    log = logs / f"{name}.log"
    if entry["status"] in ("failed", "timeout") and log.exists():
        entry["log_tail"] = log.read_text(errors="replace")[-1500:]
    stages.append(entry)


def command(*args: str) -> str | None:
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=60,
                              check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


gpu = command("nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
              "--format=csv,noheader")
try:
    import torch
    import triton
    versions = {"python": sys.version.split()[0], "torch": torch.__version__,
                "cuda": torch.version.cuda, "triton": triton.__version__,
                "cuda_available": torch.cuda.is_available()}
except ImportError as exc:
    versions = {"error": repr(exc)}
libraries = logs / "libraries.txt"
summary = {
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "commit": os.environ["COMMIT"],
    "gpu": [dict(zip(("name", "driver", "memory", "max_sm_clock"),
                     (field.strip() for field in row.split(",")), strict=False))
            for row in gpu.splitlines()] if gpu else None,
    **versions,
    "offline": os.environ["OFFLINE"],
    "libraries": libraries.read_text().split() if libraries.exists() else None,
    "gpu_stages_skipped_no_cuda": os.environ["NO_CUDA"] == "1",
    "stages": stages,
    "all_ok": all(s["status"] == "ok" for s in stages),
}
(results / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
EOF

if [ "${T2I_KEEP_LOGS:-0}" != 1 ]; then
  tar -czf "$results/logs.tar.gz" -C "$results" logs && rm -rf "${logs:?}"
fi
cat "$results/summary.json"
if ((no_cuda)); then
  echo "no CUDA device: only the build was checked" >&2
  exit 3
fi
grep -q '"all_ok": true' "$results/summary.json"
