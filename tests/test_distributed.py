"""Data-parallel replicas (torchrun's environment, torch.distributed with gloo on the CPU, two
processes on loopback): the one-process optimisation, exact sharded evaluation, resume, failure."""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from packing import colour_set
from reproduction import files
from reproduction.training import checkpoints, runfolder
from reproduction.config import DataConfig, RunConfig
from reproduction.data import PackedSet, load_stats, shard_range, train_batches
from reproduction.evaluate import final_metrics
from reproduction.optim import PaperSGD
from reproduction.training.distributed import replica_devices, scale_batch
from reproduction.training.loop import step_seed
from reproduction.train import main as train_main

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities")

WORLD = 2
# 7 images in global batches of 3: steps of 3, 3 and 1 images, split 2+1, 2+1 and 1+0 (a batch
# that does not divide by P, a partial last batch, an empty part). Dropout off: with it, each
# replica draws its own masks and only the distribution, not the value, matches one process.
# Biases 0: with the paper's biases of 1 the ReLU outputs are 1 + small, max-pool windows hold
# near-ties, and the replicas' other summation order flips a tie's gradient route (on AVX2's
# oneDNN kernels the weights then differed by 3e-5 and the velocities by 2.5e-3 of their scale).
SETTINGS = ["--set", "batch_size=3", "epochs=1", "seed=5", "dropout=0.0", "stuck_steps=10000", "init_bias=0.0"]


@pytest.fixture(scope="module")
def seven(tmp_path_factory):
    """4 classes of 32×32 images whose colour says the class; 7 train and 7 val images."""
    return colour_set(tmp_path_factory.mktemp("seven"), train=7, val=7, seed=1)


# ------------------------------------------------------------------ two processes on loopback

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_torchrun(rank: int, port: int) -> None:
    """What torchrun puts in each worker's environment (one node, WORLD processes); a new port
    for each start, as a new torchrun would pick."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # two processes on two cores


def _replica(rank: int, jobs: list[tuple[int, list[str], dict]], report: str) -> None:
    """One replica running the command line once per (port, argv, fault) in `jobs`, one after
    the other as successive torchrun jobs would, each with a port of its own. Writes the exit
    codes (or the errors raised) to report.<rank>, one a line. fault: {rank: ("interrupt" |
    "raise", after this many steps)}."""
    results = []
    for port, argv, fault in jobs:
        _as_torchrun(rank, port)
        results.append(_job(rank, argv, fault))
    Path(f"{report}.{rank}").write_text("\n".join(results))


def _job(rank: int, argv: list[str], fault: dict) -> str:
    original, calls = PaperSGD.step, []

    def step(self, *a, **k):
        out = original(self, *a, **k)
        calls.append(1)
        kind, after = fault[rank]
        if len(calls) == after:
            if kind == "interrupt":
                os.kill(os.getpid(), signal.SIGINT)  # as torchrun forwards a Ctrl-C
            else:
                raise RuntimeError("injected failure")
        return out

    if rank in fault:
        PaperSGD.step = step
    try:
        return str(train_main(argv))
    except Exception as e:  # reported to the test, as a rank's traceback would be
        return f"raised {type(e).__name__}: {e}"
    finally:
        PaperSGD.step = original


def _spawn(fn, *args, timeout: float) -> None:
    """Run fn(rank, *args) in WORLD processes; fail (not hang) if they outlive `timeout`."""
    context = mp.start_processes(fn, args=args, nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for p in context.processes:
                p.kill()
            pytest.fail(f"the replicas were still running after {timeout} s")


def _command(data: Path, out: Path) -> list[str]:
    return ["--data", str(data), "--out", str(out), "--devices", "cpu", "--workers", "0", *SETTINGS]


@pytest.fixture(scope="module")
def two(seven, tmp_path_factory):
    """Four jobs of two replicas, through the command line as torchrun starts it, in one pair of
    processes (starting processes costs ~10 s here): a run; the same run with a Ctrl-C reaching
    rank 1 alone after 2 steps; its resume; a run whose rank 1 fails at its first step.
    Returns the run folders and each job's result on each rank."""
    tmp = tmp_path_factory.mktemp("two")
    resume = ["--resume", "--out", str(tmp / "resumed"), "--devices", "cpu", "--workers", "0"]
    jobs = [(_command(seven, tmp / "straight"), {}),
            (_command(seven, tmp / "resumed"), {1: ("interrupt", 2)}),
            (resume, {}),
            (_command(seven, tmp / "failed"), {1: ("raise", 1)})]
    _spawn(_replica, [(_free_port(), argv, fault) for argv, fault in jobs], str(tmp / "codes"), timeout=150)
    codes = [Path(f"{tmp / 'codes'}.{rank}").read_text().split("\n") for rank in range(WORLD)]
    return {"straight": tmp / "straight", "resumed": tmp / "resumed", "codes": list(zip(*codes))}


# ------------------------------------------------------------------------------------ tests

def test_two_replicas_take_the_one_process_steps(seven, two, tmp_path):
    """Three steps (3, 3 and 1 images) of 2 replicas give the weights, velocity and metrics of
    one process with the same global batch, to float tolerance (dropout off)."""
    assert two["codes"][0] == ("0", "0")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert train_main(_command(seven, tmp_path / "one")) == 0
    finally:
        torch.set_num_threads(threads)
    one = checkpoints.load_checkpoint(tmp_path / "one" / checkpoints.CHECKPOINT)
    replicas = checkpoints.load_checkpoint(two["straight"] / checkpoints.CHECKPOINT)
    assert replicas["position"] == one["position"] | {"sums": replicas["position"]["sums"]}
    assert one["position"]["step"] == 3
    # Float tolerance: the replicas add the gradient in a different order (2 + 1 images, then
    # the average of two), so entries differ by rounding relative to the tensor's scale.
    close = lambda a, b: (a - b).abs().max() <= 1e-5 * b.abs().max()
    for key, value in one["model"].items():
        assert close(replicas["model"][key], value), key
    for i, state in one["optimizer"]["state"].items():
        assert close(replicas["optimizer"]["state"][i]["velocity"], state["velocity"]), i
    [row_one], [row_two] = runfolder.read_metrics(tmp_path / "one"), runfolder.read_metrics(two["straight"])  # rank 0 wrote once
    assert row_two["train_loss"] == pytest.approx(row_one["train_loss"], rel=1e-5)
    assert row_two["val_top1_error"] == row_one["val_top1_error"]
    meta = files.read_json(two["straight"] / "config.json")
    assert meta["distributed"] == {"world_size": 2, "backend": "gloo", "timeout_s": 600.0, "global_batch": 3}


def test_sharded_ten_patch_evaluation_equals_one_process(seven, two):
    """The two replicas' final.json against one process evaluating the same weights: 7 images in
    batches of 3, rank 0 takes batches 0 and 2 (the single image at the end), rank 1 batch 1.
    Counts add up exactly, the loss sum (which tells the images apart) to float rounding."""
    sharded = files.read_json(two["straight"] / "final.json")
    model, config = checkpoints.model_from_checkpoint(checkpoints.load_checkpoint(two["straight"] / checkpoints.CHECKPOINT))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = final_metrics(model, PackedSet(seven, "val"), load_stats(seven), config.data,
                            batch_size=3, workers=0)
    finally:
        torch.set_num_threads(threads)
    for protocol in ("centre", "ten_patch"):
        got, want = sharded[protocol], one[protocol]
        assert got["images"] == want["images"] == 7
        assert (got["top1_error"], got["top5_error"]) == (want["top1_error"], want["top5_error"])
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-6)


def test_interrupt_on_one_rank_then_resume_matches_the_uninterrupted_run(two):
    """A Ctrl-C reaching rank 1 alone after 2 steps: both ranks stop at that step and rank 0
    saves; a resume under 2 processes then ends bit-identical to the run never interrupted."""
    assert two["codes"][1] == ("130", "130") and two["codes"][2] == ("0", "0")
    out = two["resumed"]
    assert files.read_json(out / "config.json")["resumed"][0]["at"] == "epoch 1, batch 2 (step 2)"
    assert files.read_json(out / "config.json")["resumed"][0]["world_size"] == 2
    straight = checkpoints.load_checkpoint(two["straight"] / checkpoints.CHECKPOINT)
    resumed = checkpoints.load_checkpoint(out / checkpoints.CHECKPOINT)
    for key, value in straight["model"].items():
        assert torch.equal(resumed["model"][key], value), key
    drop = ("seconds", "img_per_s")
    strip = lambda rows: [{k: v for k, v in r.items() if k not in drop} for r in rows]
    assert strip(runfolder.read_metrics(out)) == strip(runfolder.read_metrics(two["straight"]))


def test_a_failing_rank_stops_the_others_with_a_message(two):
    """Rank 1 fails at step 1; rank 0, waiting for it in the gradient all_reduce, fails at once
    with gloo's message rather than waiting out the 600 s timeout (the fixture is bounded)."""
    rank0, rank1 = two["codes"][3]
    assert rank1 == "raised RuntimeError: injected failure"
    # gloo: "Connection closed by peer [...] typically caused by a remote worker crashing"
    assert rank0.startswith("raised RuntimeError") and "peer" in rank0


# ------------------------------------------------------------------- the rules, in one process

def test_replicas_together_see_the_one_process_batch(seven):
    """Same images, patches, flips and α: the parts of each batch concatenate to the batch."""
    data, stats = PackedSet(seven, "train"), load_stats(seven)
    kw = dict(batch_size=3, seed=5, epoch=1, workers=0)
    whole = list(train_batches(data, stats, DataConfig(), **kw))
    parts = [list(train_batches(data, stats, DataConfig(), shard=(r, WORLD), **kw)) for r in range(WORLD)]
    assert [len(y) for _, y in parts[1]] == [1, 1, 0]
    for k, (x, y) in enumerate(whole):
        assert torch.equal(torch.cat([p[k][0] for p in parts]), x)
        assert torch.equal(torch.cat([p[k][1] for p in parts]), y)


def test_shard_ranges_partition_every_batch():
    for n in range(0, 20):
        for world in (1, 2, 3, 8):
            bounds = [shard_range(n, r, world) for r in range(world)]
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
            assert max(b - a for a, b in bounds) - min(b - a for a, b in bounds) <= 1


def test_placement_rule():
    cuda = lambda *i: tuple(torch.device(f"cuda:{j}") for j in i)
    assert replica_devices(3, 4, towers=2, gpus=8) == cuda(6, 7)   # 4 replicas × 2 towers
    assert replica_devices(5, 8, towers=2, gpus=8) == cuda(5)      # 8 one-GPU replicas
    assert replica_devices(1, 4, towers=1, gpus=8) == cuda(1)
    assert replica_devices(0, 2, towers=2, gpus=0) == (torch.device("cpu"),)
    with pytest.raises(ValueError, match="--nproc_per_node=2"):
        replica_devices(0, 4, towers=2, gpus=2)


def test_dropout_masks_differ_between_replicas_and_rank_0_keeps_the_plain_stream():
    assert step_seed(0, 7, rank=0) == step_seed(0, 7)
    assert len({step_seed(0, 7, rank=r) for r in range(8)}) == 8


def test_a_larger_global_batch_scales_the_learning_rate_linearly():
    config, record = scale_batch(RunConfig(), 1024)
    assert config.train.batch_size == 1024 and config.train.lr == pytest.approx(0.08)
    assert record == {"global_batch": 1024, "base_batch": 128, "base_lr": 0.01, "lr": pytest.approx(0.08),
                      "rule": "linear: lr = base_lr * global_batch / base_batch"}
