"""One training run with and without torch.distributed, compared step by step.

    python scripts/check_ddp.py [--nproc 1] [--steps 40] [--preset small] [--device auto]
                                [--backend auto] [--json out.json]

The same `t2i-fast train` (a shapes dataset made in a temporary folder, batch 64, text
encoder trained with D, --sync-bn) runs once as one plain process and once under
`torchrun --standalone --nproc-per-node N`. On a GPU that is NCCL and the compiled engine's
CUDA graph with DDP's all-reduce captured in it (after its 11 warm-up steps), the path
tests/test_distributed.py cannot reach on the CPU; N = 1 is what a one-GPU machine can check.
It prints, and writes as JSON: each run's exit code, seconds and last images/s, any
"torch.compile failed" or "CUDA graph capture" warning (a part that fell back), and the
largest relative difference of each logged loss and score between the runs over all steps
and at the first. Both runs draw the same data and noise; with N = 1 the step is the same
arithmetic, so differences come from reduction order only. Exit status 1 when a run failed
or fell back.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from t2i_fast.prepare.shapes import make_shapes
from t2i_fast.run import Run

KEYS = ("d_loss", "g_loss", "d_real", "d_wrong", "d_fake")
FALLBACKS = ("torch.compile failed", "CUDA graph capture")


def launch(command: list[str], *, cwd: Path) -> dict:
    tick = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=cwd)
    output = done.stdout + done.stderr
    return {"command": command, "exit_code": done.returncode,
            "seconds": round(time.perf_counter() - tick, 1),
            "fallbacks": [line.strip() for line in output.splitlines()
                          if any(f in line for f in FALLBACKS)],
            "tail": output[-2000:] if done.returncode else ""}


def metrics(run: Path) -> list[dict]:
    return Run(run).metrics()


def compare(plain: list[dict], ddp: list[dict]) -> dict:
    def worst(rows: list[tuple[dict, dict]]) -> dict[str, float]:
        return {k: max((abs(a[k] - b[k]) / max(abs(a[k]), 1e-6) for a, b in rows
                        if k in a and k in b), default=float("nan")) for k in KEYS}

    pairs = list(zip(plain, ddp, strict=False))
    return {"steps_compared": len(pairs), "first_step": worst(pairs[:1]),
            "all_steps": worst(pairs)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", type=int, default=1, help="processes under torchrun")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="check_ddp_") as scratch:
        scratch = Path(scratch)
        data = scratch / "shapes.lmdb"
        make_shapes(out=data, n=64 * 20)
        options = ["train", "--data", str(data), "--preset", args.preset, "--batch-size", "64",
                   "--max-steps", str(args.steps), "--log-every", "1",
                   "--sample-every", str(10 * args.steps), "--checkpoint-every",
                   str(10 * args.steps), "--train-text-encoder", "--sync-bn",
                   "--device", args.device, "--backend", args.backend, "--loader-threads", "2"]
        # Outside the checkout: there "-m t2i_fast" would import the source tree rather than
        # the installed package with its built extension.
        runs = {
            "plain": launch([sys.executable, "-m", "t2i_fast", *options, "--run",
                             str(scratch / "plain")], cwd=scratch),
            "ddp": launch([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", str(args.nproc), "-m", "t2i_fast", "--",
                           *options, "--run", str(scratch / "ddp")], cwd=scratch),
        }
        rows = {name: metrics(scratch / name) for name in runs}
    for name, run in runs.items():
        run["images_per_s"] = rows[name][-1]["images_per_s"] if rows[name] else None
    result = {"nproc": args.nproc, "steps": args.steps, "preset": args.preset, "runs": runs,
              "difference": compare(rows["plain"], rows["ddp"])}
    ok = all(r["exit_code"] == 0 and not r["fallbacks"] for r in runs.values())
    result["ok"] = ok
    for name, run in runs.items():
        print(f"{name:6} exit {run['exit_code']} in {run['seconds']} s, "
              f"{run['images_per_s']} images/s, fallbacks: {run['fallbacks'] or 'none'}")
        if run["tail"]:
            print(run["tail"])
    difference = result["difference"]
    print(f"largest relative difference over {difference['steps_compared']} steps: "
          + ", ".join(f"{k} {v:.2e}" for k, v in difference["all_steps"].items())
          + "; first step: "
          + ", ".join(f"{k} {v:.2e}" for k, v in difference["first_step"].items()))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
