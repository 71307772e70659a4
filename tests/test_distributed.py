"""`reslab train` under torchrun (issue 25), on this CPU machine with gloo: the same command on 1
or 2 ranks trains the same global batches in the same order with the same augmentation; with
--sync-bn 2 ranks x 64 equal 1 process x 128; only rank 0 writes; a worker killed with kill -9
under --max-restarts, or a SIGTERM and the same command again, ends bitwise equal to an
uninterrupted run; two agents on localhost train what one agent with two processes trains."""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_dataset, write_image_folder
from reslab.data.augment import index_batch
from reslab.distributed import SyncBatchNorm2d, World, resume_notes, sync_batch_norm
from reslab.models import build_model
from reslab.recipes import Recipe
from reslab.runfolder import RunFolder
from reslab.step import Window, build_step, make_optimizer

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("quiet_machine")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str, nproc: int = 2, extra: tuple[str, ...] = (), wait: bool = True,
             env: dict[str, str] | None = None, reslab: bool = False):
    """`torchrun --nproc-per-node N [extra] -m reslab ARGS` on localhost, or with reslab=True
    `reslab torchrun --nproc-per-node N [extra] ARGS`."""
    options = ["--nproc-per-node", str(nproc),
               *(extra or ("--master-addr", "127.0.0.1", "--master-port", str(_port())))]
    cmd = [sys.executable, "-m", "reslab", "torchrun", *options, *args] if reslab else \
        [sys.executable, "-m", "torch.distributed.run", *options, "-m", "reslab", *args]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    if not wait:
        return proc
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, out + err
    return out, err


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("dist") / "imgs",
                              make_dataset(n_train=256, n_test=64, classes=4))


TRAIN = ["train", "resnet8", "--iterations", "50", "--batch-size", "128", "--precision", "fp32",
         "--eval-every", "25", "--log-every", "5", "--checkpoint-every", "10", "--no-progress",
         "--deterministic"]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model.safetensors"))


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").open()]


def _files(run: Path) -> list[str]:
    return sorted(str(p.relative_to(run)) for p in run.rglob("*") if "tb" not in p.parts)


# ---------------------------------------------------------------------------------------------
# In one process: the data a rank trains on is its slice of the global batch, augmented alike


def test_the_ranks_slices_of_a_step_are_the_single_process_step():
    data = make_dataset(n_train=64, channels=3)
    recipe = replace(Recipe(), batch_size=16, precision="fp32")
    mean = data.train_images.float().mean(0) / 255
    inputs = {}

    def capture(world: World) -> torch.Tensor:
        torch.manual_seed(0)
        model = build_model("resnet8", num_classes=3)
        window = Window.start(torch.device("cpu"), warmup=False, warmup_window=20)
        step = build_step(model, make_optimizer(model, recipe, torch.device("cpu")),
                          data.train_images, data.train_labels, mean, None, recipe, window,
                          compile_model=False, compile_mode=None, cuda_graphs=None, world=world)
        seen = []
        step.forward = lambda x: (seen.append(x.clone()), model(x))[1]
        part = world.shard(16) if world.size > 1 else None
        step(index_batch(data.train_images, data.train_labels, torch.arange(16).flip(0), 7,
                         pad=recipe.pad, seed=recipe.seed, part=part), 7)
        return torch.cat(seen)

    inputs["one"] = capture(World())
    halves = [capture(World(rank, 2)) for rank in (0, 1)]
    assert torch.equal(torch.cat(halves), inputs["one"])  # same images, crops and flips
    with pytest.raises(ValueError, match="batch size 16 does not divide among 3 ranks"):
        World(0, 3).shard(16)


def test_cpu_sync_batch_norm_without_a_group_is_batch_norm():
    bn = torch.nn.BatchNorm2d(4)
    torch.nn.init.uniform_(bn.weight)
    model = sync_batch_norm(torch.nn.Sequential(bn), torch.device("cpu"))
    assert isinstance(model[0], SyncBatchNorm2d)
    assert torch.equal(model[0].weight, bn.weight)
    x = torch.randn(8, 4, 5, 5)
    assert torch.allclose(model(x), torch.nn.functional.batch_norm(
        x, None, None, bn.weight, bn.bias, training=True), atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Under torchrun (gloo)


def _distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], kind: str = "") -> float:
    """The largest relative L2 distance ||a - b|| / ||a|| over the float tensors (names with
    `kind`)."""
    return max(((a[k].float() - b[k].float()).norm() / a[k].float().norm()).item()
               for k in a if a[k].is_floating_point() and kind in k)


def test_two_ranks_with_sync_bn_equal_one_process_and_only_rank_0_writes(folder, tmp_path):
    one, two, per_rank = tmp_path / "one", tmp_path / "two", tmp_path / "per-rank"
    torchrun(*TRAIN, "--data", str(folder), "--out", str(one), "--sync-bn", nproc=1)
    out, _ = torchrun(*TRAIN, "--data", str(folder), "--out", str(two), "--sync-bn")
    assert "2 ranks, 64 images each of the global batch of 128, BN synchronised" in out
    torchrun(*TRAIN, "--data", str(folder), "--out", str(per_rank))
    a, b, c = _weights(one), _weights(two), _weights(per_rank)
    # Tolerance: the two runs sum in another order (oneDNN convolves 64 images, not 128; BN's
    # sums are all-reduced halves), ~1e-7 relative per operation. BN biases' gradients are sums
    # with heavy cancellation, so after one step they already differ by up to 4e-3 relative
    # (measured; the conv weights' by 6e-5), and 50 steps of SGD at lr 0.1 with momentum on 256
    # images amplify this to 2% (conv weights) and 5% (BN, running statistics included).
    # Per-rank BN statistics, the default, train another net: 14% and 30% or more.
    assert _distance(a, b, "conv") < 0.04 and _distance(a, b) < 0.08
    assert _distance(a, c, "conv") > 0.08 and _distance(a, c) > 0.2  # the test can fail
    for r1, r2 in zip(_records(one), _records(two), strict=True):
        assert r1["step"] == r2["step"]
        assert abs(r1["train_error"] - r2["train_error"]) * 128 * 5 <= 1  # within one image
        if "test_error" in r1:
            assert abs(r1["test_error"] - r2["test_error"]) * 64 <= 1
    assert _files(one) == _files(two)  # rank 1 wrote nothing of its own
    env = json.loads((two / "env.json").read_text())
    assert env["world_size"] == 2 and json.loads((one / "env.json").read_text())["world_size"] == 1


# Checkpoints every 10 iterations, log lines every 3: a checkpoint (or a stop) falls inside an
# open logging window, whose sums over both ranks it must keep.
OFF_GRID = [*TRAIN[:TRAIN.index("--log-every") + 1], "3",
            *TRAIN[TRAIN.index("--log-every") + 2:]]


@pytest.fixture(scope="module")
def off_grid_ref(folder, tmp_path_factory):
    """An uninterrupted 2-rank run of OFF_GRID: what every interrupted one must end as."""
    ref = tmp_path_factory.mktemp("off-grid") / "ref"
    torchrun(*OFF_GRID, "--data", str(folder), "--out", str(ref))
    return ref


def test_sigterm_and_kill_9_under_max_restarts_end_bitwise_equal(folder, off_grid_ref, tmp_path):
    ref, cut, killed = off_grid_ref, tmp_path / "cut", tmp_path / "killed"
    # SIGTERM to the launcher: every rank stops after the same step, one checkpoint, exit 143.
    proc = torchrun(*OFF_GRID, "--data", str(folder), "--out", str(cut), wait=False)
    _wait_for(cut, 20, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    # The hint and env.json name the launcher's command (torchrun's agent), not the worker's.
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    assert proc.returncode != 0 and "Resume with the same command: " + shlex.join(launcher) in err
    assert json.loads((cut / "env.json").read_text())["command"][:5] == launcher
    torchrun(*OFF_GRID, "--data", str(folder), "--out", str(cut))
    # kill -9 of one worker: torchrun restarts the group, which resumes from the checkpoint.
    proc = torchrun(*OFF_GRID, "--data", str(folder), "--out", str(killed), wait=False,
                    extra=("--max-restarts", "1", "--master-addr", "127.0.0.1",
                           "--master-port", str(_port())))
    _wait_for(killed, 20, proc)
    worker = _a_worker(proc.pid)
    os.kill(worker, signal.SIGKILL)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, out + err
    assert "resuming" in out
    w = _weights(ref)
    for run in (cut, killed):
        assert all(torch.equal(w[k], _weights(run)[k]) for k in w), run
        assert _records(run) == _records(ref), run  # --deterministic: no times to differ


def test_two_agents_on_localhost_train_what_one_agent_with_two_processes_trains(
        folder, off_grid_ref, tmp_path):
    """And a worker killed with kill -9 under --max-restarts 1 costs one restart: the agents
    count their restarts apart, so the restarted group cannot be named by either's count."""
    one, two = off_grid_ref, tmp_path / "two-agents"
    port = _port()
    agents = [torchrun(*OFF_GRID, "--data", str(folder), "--out", str(two), nproc=1, wait=False,
                       extra=("--nnodes", "2", "--node-rank", str(n), "--rdzv-backend", "c10d",
                              "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "reslab",
                              "--max-restarts", "1"))
              for n in (0, 1)]
    _wait_for(two, 20, agents[0])
    os.kill(_a_worker(agents[1].pid), signal.SIGKILL)
    for agent in agents:
        out, err = agent.communicate(timeout=600)
        assert agent.returncode == 0, out + err
    w = _weights(one)
    assert all(torch.equal(w[k], _weights(two)[k]) for k in w)
    assert _records(two) == _records(one)


def test_a_killed_agent_stops_its_workers_with_a_checkpoint(folder, off_grid_ref, tmp_path):
    """kill -9 of torchrun's agent: its workers get SIGTERM from the kernel and stop after the
    same step with a checkpoint, instead of training on unsupervised; the same command then
    ends as an uninterrupted run."""
    ref, run = off_grid_ref, tmp_path / "run"
    proc = torchrun(*OFF_GRID, "--data", str(folder), "--out", str(run), wait=False, reslab=True)
    _wait_for(run, 20, proc)
    workers = [int(pid) for pid in
               Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
    os.kill(proc.pid, signal.SIGKILL)
    _, err = proc.communicate(timeout=120)  # the pipes close when the workers have exited
    assert not any(_running(pid) for pid in workers)
    # The launcher here is `reslab torchrun`: the hint and env.json name it.
    assert "Resume with the same command: reslab torchrun --nproc-per-node 2" in err, err
    assert json.loads((run / "env.json").read_text())["command"][:2] == ["reslab", "torchrun"]
    assert not (run / "summary.json").exists()  # stopped, not trained to the end
    stopped_at = max(int(p.stem.split("-")[1]) for p in run.glob("checkpoint-*.pt"))
    assert 20 <= stopped_at < 50
    torchrun(*OFF_GRID, "--data", str(folder), "--out", str(run), reslab=True)
    w = _weights(ref)
    assert all(torch.equal(w[k], _weights(run)[k]) for k in w)
    assert _records(run) == _records(ref)


def _running(pid: int) -> bool:
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


@pytest.mark.parametrize("rank", [0, 1])
def test_ranks_that_never_meet_stop_after_the_rendezvous_timeout_in_one_line(folder, tmp_path,
                                                                             rank):
    """A wrong port (nothing listens there) or a rank that never starts: a clear error after
    --rendezvous-timeout, not torch's silent 30 minutes; nothing is written."""
    port = _port()
    r = subprocess.run(
        [sys.executable, "-m", "reslab", *TRAIN, "--data", str(folder), "--out",
         str(tmp_path / "run"), "--rendezvous-timeout", "2"], cwd=REPO, capture_output=True,
        text=True, timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1", "RANK": str(rank), "WORLD_SIZE": "2",
             "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"reslab train: error: rank {rank} of 2 did not meet the other ranks at "
        f"127.0.0.1:{port} within 2 s"), r.stderr
    assert "--rendezvous-timeout" in lines[0]
    assert not (tmp_path / "run").exists()


def test_a_user_error_under_torchrun_prints_once_and_is_not_retried(folder, tmp_path):
    # An error every rank meets: one line, from rank 0. torchrun itself exits 1 and reports
    # the failure at length; `reslab torchrun` exits 2 with that line alone.
    line = ("reslab train: error: the batch size 127 does not divide among 2 ranks; use a "
            "--batch-size that is a multiple of 2")
    for reslab in (False, True):
        proc = torchrun(*TRAIN, "--data", str(folder), "--out", str(tmp_path / "odd"),
                        "--batch-size", "127", wait=False, reslab=reslab)
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == (2 if reslab else 1), err
        assert [e for e in err.splitlines() if "reslab train: error:" in e] == [line], err
        if reslab:
            assert err.splitlines() == [line], err
    assert not (tmp_path / "odd").exists()
    # A folder in use: each restart --max-restarts grants meets the refusal at once, never
    # "nothing to do" with exit 0 once the other process is done; nothing is written.
    run = tmp_path / "busy"
    with RunFolder(run).lock():
        before = _files(run)
        proc = torchrun(*TRAIN, "--data", str(folder), "--out", str(run), wait=False,
                        extra=("--max-restarts", "2", "--master-addr", "127.0.0.1",
                               "--master-port", str(_port())))
        out, err = proc.communicate(timeout=300)
        assert _files(run) == before
    assert proc.returncode != 0 and "nothing to do" not in out
    errors = [line for line in err.splitlines() if "reslab train: error:" in line]
    assert len(errors) == 3, err  # the first attempt and two restarts, one line each
    assert "is in use by another reslab process" in errors[0]
    assert all("met before torchrun restarted the ranks" in e for e in errors[1:])


@pytest.mark.parametrize("backend", ["static", "c10d"])
def test_reslab_torchrun_agents_that_never_meet_end_in_one_line(folder, tmp_path, backend):
    """A wrong port between two agents: torchrun waits 600 s, then prints a traceback and exits
    1; `reslab torchrun` waits --rendezvous-timeout and says so in one line, exit 2."""
    ports = (_port(), _port())
    agents = []
    for node in (0, 1):  # each agent given another port: they cannot meet
        where = (("--master-addr", "127.0.0.1", "--master-port", str(ports[node]))
                 if backend == "static" else
                 ("--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{ports[node]}",
                  "--rdzv-id", "never"))
        extra = ("--nnodes", "2", *(("--node-rank", str(node)) if backend == "static" else ()),
                 *where)
        agents.append(torchrun(*TRAIN, "--data", str(folder), "--out", str(tmp_path / "run"),
                               "--rendezvous-timeout", "3", nproc=1, extra=extra, wait=False,
                               reslab=True))
    for node, agent in enumerate(agents):
        _, err = agent.communicate(timeout=120)
        assert agent.returncode == 2, err
        lines = err.splitlines()
        assert len(lines) == 1 and lines[0].startswith(
            f"reslab torchrun: error: the agents did not meet at 127.0.0.1:{ports[node]} "
            "within 3 s"), err
        assert lines[0].endswith("or wait longer with --rendezvous-timeout"), err
    assert not (tmp_path / "run").exists()


def test_resume_notes_name_what_changes_for_bn():
    one, two, two_sync = ({"world_size": 1, "sync_bn": False}, {"world_size": 2, "sync_bn": False},
                          {"world_size": 2, "sync_bn": True})
    assert resume_notes([two], 2, False) == []  # a first start
    assert resume_notes([two, two], 2, False) == []
    assert resume_notes([two_sync, one], 1, False) == []  # one process: the batch's statistics
    [note] = resume_notes([two, two_sync], 2, True)
    assert note.startswith("note: BN statistics were computed per rank until now, over the "
                           "global batch from here (--sync-bn given)")
    [note] = resume_notes([two_sync, two], 2, False)
    assert "over the global batch until now, per rank from here (--sync-bn left out)" in note
    [note] = resume_notes([one, two], 2, False)
    assert note.startswith("note: trained on 1 rank(s) until now, 2 from here")


def _wait_for(run: Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        metrics = run / "metrics.jsonl"
        if metrics.exists():
            lines = metrics.read_text().splitlines()
            if lines and json.loads(lines[-1])["step"] >= step:
                return
        time.sleep(0.05)
    raise AssertionError(f"{run} did not reach iteration {step}")


def _a_worker(launcher: int) -> int:
    """The pid of one of torchrun's worker processes (a child of the launcher)."""
    children = Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split()
    return int(children[-1])


def test_accumulation_composes_with_ranks(folder, tmp_path):
    """2 ranks x 2 micro-batches of 32 and 1 process x 4 micro-batches of 32 train on the same
    micro-batches, each with its own BN statistics: the same net, up to summation order."""
    args = [*TRAIN[:2], "--iterations", "10", *TRAIN[4:], "--data", str(folder)]
    one, two = tmp_path / "one", tmp_path / "two"
    torchrun(*args, "--out", str(one), "--accumulate", "4", nproc=1)
    torchrun(*args, "--out", str(two), "--accumulate", "2")
    a, b = _weights(one), _weights(two)
    params = [k for k in a if "running" not in k and "num_batches" not in k]
    # Measured 1e-7: the same micro-batches, summed in another order.
    assert _distance({k: a[k] for k in params}, {k: b[k] for k in params}) < 1e-5
    # BN's running statistics are rank 0's, updated by its 2 micro-batches a step, not by 4.
    assert int(a["bn1.num_batches_tracked"]) == 40 and int(b["bn1.num_batches_tracked"]) == 20
    for r1, r2 in zip(_records(one), _records(two), strict=True):
        assert abs(r1["train_error"] - r2["train_error"]) * 128 * 5 <= 1


def test_a_streamed_tree_under_torchrun_then_extended_on_one_process(tmp_path):
    from test_imagenet import photo_tree

    tree = photo_tree(tmp_path / "photos", train=4, val=2)
    run = tmp_path / "run"
    args = ["train", "resnet8", "--data", str(tree), "--out", str(run), "--recipe", "imagenet",
            "--batch-size", "8", "--workers", "0", "--eval-every", "2", "--no-progress"]
    out, _ = torchrun(*args, "--iterations", "4")
    assert "2 ranks, 4 images each of the global batch of 8" in out
    records = _records(run)
    assert [r["step"] for r in records if "test_top5_error" in r] == [2, 4]
    # Resumed on one process for two more iterations (the plateau schedule has no milestones).
    r = subprocess.run([sys.executable, "-m", "reslab", *args, "--iterations", "6"], cwd=REPO,
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "note: trained on 2 rank(s) until now, 1 from here" in r.stdout
    assert json.loads((run / "summary.json").read_text())["iterations"] == 6
    assert (run / "model.4.safetensors").exists()
