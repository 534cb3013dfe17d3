"""Wall time of ``exfx.calibrate`` on 1 and on 2 torch.distributed ranks (gloo, 1 thread each), same data.

Run:  python -m benchmarks.calibrate_distributed [--ranks 1 2] [--repeats 3] [--images 500] [--batch 50]

The task is ``exfx demo``'s: the bundled SmallCNN, its first ``--images`` bundled
Fashion-MNIST images in batches of ``--batch``, a 1-point budget at 99% bootstrap
confidence. Each measurement launches one ``torchrun --nproc-per-node N`` (the
command a user types, printed below); every rank takes its contiguous block of
the batches (``exfx.shard_batches``) and calibrates, and rank 0 reports the
time of the ``calibrate`` call between two barriers (process start and imports
not included) and the plan. Launches alternate between rank counts, repeat after
repeat, so that a change in the machine's load hits every count alike. The table
gives the median over repeats, the spread (min-max), the speedup against 1 rank,
and whether the plan is identical to the 1-rank plan (every site's parameters
and the calibration record, time excluded). The load average is printed before
and after: on a shared machine the spread is the noise.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import exfx

BUDGET, CONFIDENCE = 0.01, 0.99


def _accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    return (outputs.argmax(-1) == targets).float().mean().item()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun_command(ranks: int, images: int, batch: int, out: Path) -> list[str]:
    """The launch of one measurement: torchrun, as a user types it, on this module in worker mode."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--master-addr",
            "127.0.0.1", "--master-port", str(_free_port()), "-m", "benchmarks.calibrate_distributed", "--worker",
            "--images", str(images), "--batch", str(batch), "--out", str(out)]


def worker(images: int, batch: int, out: Path) -> None:
    """One rank: calibrate on this rank's block of the batches; rank 0 writes the time and the plan."""
    import torch.distributed as dist

    from exfx.demo import load_demo_images, load_demo_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    x, y = load_demo_images()
    batches = [(x[i:i + batch], y[i:i + batch]) for i in range(0, images, batch)]
    model = load_demo_model()
    shard = exfx.shard_batches(batches)
    dist.barrier()
    started = time.perf_counter()
    plan = exfx.calibrate(model, (x[:8],), shard, _accuracy, BUDGET, confidence=CONFIDENCE, progress=False)
    dist.barrier()
    seconds = time.perf_counter() - started
    if dist.get_rank() == 0:
        record = {k: v for k, v in plan.meta["calibration"].items() if k != "seconds"}
        sites = {name: params.to_dict() for name, params in sorted(plan.sites.items())}
        out.write_text(json.dumps({"seconds": seconds, "plan": {"sites": sites, "calibration": record}}))
    dist.destroy_process_group()


def measure(ranks: int, images: int, batch: int, folder: Path) -> dict[str, Any]:
    out = folder / f"ranks{ranks}.json"
    root = str(Path(exfx.__file__).resolve().parent.parent)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    finished = subprocess.run(torchrun_command(ranks, images, batch, out), capture_output=True, text=True, env=env,
                              cwd=root)
    if finished.returncode != 0:
        raise RuntimeError(f"torchrun with {ranks} rank(s) failed:\n{finished.stderr[-4000:]}")
    return json.loads(out.read_text())


def _load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} ({os.cpu_count()} CPUs)"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--ranks", nargs="*", type=int, default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--images", type=int, default=500, help="calibration images (of the 1,000 bundled)")
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--worker", action="store_true", help="internal: run as one torchrun rank")
    parser.add_argument("--out", type=Path, help="internal: where rank 0 writes its result")
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.images, args.batch, args.out)
        return
    counts = sorted(set(args.ranks))
    launch = torchrun_command(2, args.images, args.batch, Path("OUT"))[3:]  # after: python -m torch.distributed.run
    print(f"each measurement: OMP_NUM_THREADS=1 torchrun {' '.join(launch)}")
    print(f"before: {_load()}", flush=True)
    seconds: dict[int, list[float]] = {n: [] for n in counts}
    plans: dict[int, list[Any]] = {n: [] for n in counts}
    with tempfile.TemporaryDirectory() as folder:
        for repeat in range(args.repeats):
            for n in counts if repeat % 2 == 0 else counts[::-1]:  # interleaved, alternating order
                result = measure(n, args.images, args.batch, Path(folder))
                seconds[n].append(result["seconds"])
                plans[n].append(result["plan"])
                print(f"repeat {repeat}: {n} rank(s) {result['seconds']:.2f} s", flush=True)
    print(f"after: {_load()}")
    reference, base = plans[counts[0]][0], statistics.median(seconds[counts[0]])
    print(f"\n{args.images} images in batches of {args.batch}, budget {BUDGET}, confidence {CONFIDENCE}, "
          f"{args.repeats} repeats, 1 thread per rank; plan: {reference['calibration']}")
    print("| ranks | calibrate wall s (median) | min-max s | speedup vs 1 rank | plan identical to 1 rank |")
    print("|---|---|---|---|---|")
    for n in counts:
        median = statistics.median(seconds[n])
        identical = all(plan == reference for plan in plans[n])
        print(f"| {n} | {median:.2f} | {min(seconds[n]):.2f}-{max(seconds[n]):.2f} | {base / median:.2f}x | "
              f"{'yes' if identical else 'no'} |")


if __name__ == "__main__":
    main()
