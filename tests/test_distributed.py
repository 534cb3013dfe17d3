"""Calibration under torch.distributed: 2 gloo ranks on loopback return one process's plan, bit for bit.

The 2-rank test launches this file under ``torchrun`` (``python -m torch.distributed.run``); run as a script,
it is the worker. The other tests check the pieces in one process: sharding, the shard-invariant neuron sample
the equality rests on, and the errors.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import exfx
from exfx.tune.distributed import Ranks, merge_samples, weights_digest
from exfx.tune.evaluation import tunable_sites
from exfx.tune.instrument import instrument, record_gains

from models import MLP

GLOO = dist.is_available() and dist.is_gloo_available()
BUDGETS = (0.005, 0.03)
OPTIONS = {"confidence": 0.9, "max_neurons": 20_000, "max_evals": 6, "progress": False}


def _agreement(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    return (outputs.argmax(-1) == targets).float().mean().item()


def _task() -> tuple[torch.nn.Module, tuple[torch.Tensor], list[tuple[torch.Tensor, torch.Tensor]]]:
    """The tests' MLP, 7 uneven batches (rank 0 gets 3, rank 1 gets 4), targets its own predictions."""
    torch.manual_seed(0)
    model = MLP().eval()
    x = torch.randn(350, 20, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model(x).argmax(-1)
    return model, (x[:4],), [(x[i:i + 50], y[i:i + 50]) for i in range(0, 350, 50)]


def _record(plans: dict[float, exfx.Plan]) -> dict[str, object]:
    """What must match across ranks and with one process: every plan's sites and calibration record."""
    return {str(budget): {"sites": {name: params.to_dict() for name, params in sorted(plan.sites.items())},
                          "calibration": {k: v for k, v in plan.meta["calibration"].items() if k != "seconds"}}
            for budget, plan in plans.items()}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow  # torchrun starts two processes that each import torch and exfx
@pytest.mark.skipif(not GLOO, reason="torch.distributed with the gloo backend is not available in this torch build")
def test_two_gloo_ranks_return_the_single_process_plan(tmp_path: Path) -> None:
    model, example, data = _task()
    torch.save({"model": model, "example": example, "data": data}, tmp_path / "task.pt")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(_free_port()), __file__, str(tmp_path)]
    # the workers import the exfx this test imports (a checkout need not be the installed one)
    root = str(Path(exfx.__file__).resolve().parent.parent)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    finished = subprocess.run(command, capture_output=True, text=True, timeout=180, env=env)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]

    single = _record(exfx.calibrate_budgets(model, example, data, _agreement, BUDGETS, distributed=False, **OPTIONS))
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert ranks[0]["plans"] == ranks[1]["plans"] == json.loads(json.dumps(single))
    assert any(p["enabled"] for p in single[str(BUDGETS[1])]["sites"].values())  # a plan that prunes
    for errors in (ranks[0]["errors"], ranks[1]["errors"]):
        assert "rank 1 passed calibrate argument seed=1 but rank 0 passed seed=0" in errors["seed"]
        assert "rank 1's model weights" in errors["weights"]


def _worker(folder: Path) -> None:
    """One rank: the two bad calls (each must raise on every rank), then the real one; writes what it saw."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    task = torch.load(folder / "task.pt", weights_only=False)
    model, example, shard = task["model"], task["example"], exfx.shard_batches(task["data"])
    errors = {}
    try:
        exfx.calibrate(model, example, shard, _agreement, 0.01, seed=rank, progress=False)
    except exfx.DistributedError as error:
        errors["seed"] = str(error)
    other = MLP().eval()
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        other.net[0].bias[0] += rank
    try:
        exfx.calibrate(other, example, shard, _agreement, 0.01, progress=False)
    except exfx.DistributedError as error:
        errors["weights"] = str(error)
    plans = exfx.calibrate_budgets(model, example, shard, _agreement, BUDGETS, **OPTIONS)
    (folder / f"rank{rank}.json").write_text(json.dumps({"plans": _record(plans), "errors": errors}))
    dist.barrier()  # no rank tears gloo down while another still has a collective in flight
    dist.destroy_process_group()


@pytest.mark.parametrize("cuts", [(1,), (3,), (2, 5), (1, 2, 3, 4, 5, 6)])
def test_shards_record_what_one_process_records(cuts: tuple[int, ...]) -> None:
    """The equality rests on this: each batch's sample depends on its index in the whole data only."""
    model, example, data = _task()
    analysis = exfx.analyse(model, example)
    checkpoints = {s.name: (8, 16) for s in tunable_sites(analysis, ((8, 16),))}

    def records(batches: list, first: int) -> dict:
        samples = instrument(analysis, batches, checkpoints, 5_000, 7, False, first_batch=first,
                             total_batches=len(data))
        record_gains(analysis, batches, samples, 7, False, first_batch=first)
        return samples

    whole = records(data, 0)
    bounds = (0, *cuts, len(data))
    merged = merge_samples([records(data[a:b], a) for a, b in zip(bounds, bounds[1:])])
    assert set(merged) == set(whole)
    for name, sample in whole.items():
        (stats, pre), (their_stats, their_pre) = sample.tensors(), merged[name].tensors()
        assert torch.equal(pre, their_pre) and torch.equal(torch.cat(sample.gains), torch.cat(merged[name].gains))
        assert all(torch.equal(stats[k][rule], their_stats[k][rule]) for k in stats for rule in stats[k])
        assert (sample.neurons, sample.cost, sample.ceiling) == (merged[name].neurons, merged[name].cost,
                                                                 merged[name].ceiling)
        assert all(torch.equal(a, b) for a, b in zip(sample.picks, merged[name].picks))


def test_shard_batches_cuts_contiguous_blocks_in_rank_order() -> None:
    batches = list(range(7))
    blocks = [exfx.shard_batches(batches, rank, 3) for rank in range(3)]
    assert blocks == [[0, 1], [2, 3], [4, 5, 6]]
    assert exfx.shard_batches(iter(batches)) == batches  # no process group: rank 0 of 1


@pytest.mark.parametrize("rank, world_size, match", [(2, 8, "rank 2: 7 batches cannot be shared by world_size=8"),
                                                     (3, 3, "0 <= rank < world_size"),
                                                     (0, 0, "0 <= rank < world_size")])
def test_shard_batches_rejects_more_ranks_than_batches(rank: int, world_size: int, match: str) -> None:
    with pytest.raises(exfx.DistributedError, match=match):
        exfx.shard_batches(list(range(7)), rank, world_size)


def test_distributed_true_needs_an_initialised_process_group() -> None:
    assert not (dist.is_available() and dist.is_initialized())
    assert Ranks.detect(None) == Ranks.detect(False) == Ranks(0, 1)
    model, example, data = _task()
    with pytest.raises(exfx.DistributedError, match="init_process_group"):
        exfx.calibrate(model, example, data, _agreement, 0.01, distributed=True)
    with pytest.raises(ValueError, match="distributed must be"):
        exfx.calibrate(model, example, data, _agreement, 0.01, distributed="yes")


def test_the_weights_digest_sees_one_changed_weight() -> None:
    model, example, _ = _task()
    analysis = exfx.analyse(model, example)
    before = weights_digest(analysis.graph_module)
    assert weights_digest(exfx.analyse(model, example).graph_module) == before
    with torch.no_grad():
        model.net[2].weight[3, 5] += 1e-6
    assert weights_digest(exfx.analyse(model, example).graph_module) != before


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
