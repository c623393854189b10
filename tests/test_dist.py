"""DDP on CPU with gloo: spawn, torchrun and srun-style launches, equivalence with one
process, and a job that loses a rank."""
import signal
import subprocess
import sys
import time

import pytest
import torch

import data
import dist
import monitor
from conftest import ROOT, TINY, run_script, script_env, write_squad, write_wikitext

NO_DROPOUT = ["--dropout", "0", "--epochs", "1", "--lr", "1"]


def _weights(path):
    return torch.load(path, weights_only=True)["model"]


def _max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_first_slurm_host_and_launcher_env():
    assert dist.first_slurm_host("gpu[03-05,9],cpu1") == "gpu03"
    assert dist.first_slurm_host("node7") == "node7"
    assert dist.first_slurm_host("a[1,2],b[3-4]") == "a1"
    env = dict(SLURM_PROCID="3", SLURM_NTASKS="8", SLURM_LOCALID="1",
               SLURM_JOB_NODELIST="n[10-11]", SLURM_JOB_ID="123456")
    assert dist.launcher_env(env) == (3, 8, 1, "n10", str(20000 + 123456 % 20000))
    assert dist.launcher_env(dict(env, MASTER_ADDR="h", MASTER_PORT="7")) == (3, 8, 1, "h", "7")
    assert dist.launcher_env(dict(env, SLURM_NTASKS="1")) is None  # one task: spawn mode
    assert dist.launcher_env(dict(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1")) == (1, 2, 1, "127.0.0.1", "29500")


def test_two_processes_match_one_with_the_same_global_batch(tmp_path):
    """One epoch of mlm_task.py: 1 process with batch 8 vs 2 processes (spawn) with 4 each.

    The data, the masks and the loss normalisation are the same by construction, and
    dropout is 0, so the only difference is the order of floating-point additions in
    the gradient all-reduce: ~1e-7 relative per step. After an epoch of SGD steps the
    weights agree to 1e-5 (they are O(1)).
    """
    wt = write_wikitext(tmp_path / "wt", (300, 40, 40))
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    args = ["--data-dir", wt, *TINY, *NO_DROPOUT]
    a = run_script("mlm_task.py", *args, "--batch_size", "8", cwd=one)
    b = run_script("mlm_task.py", *args, "--batch_size", "4", "--parallel", "DDP",
                   "--world_size", "2", cwd=two)
    assert "DDP: 2 processes, backend gloo" in b.stdout
    assert _max_diff(_weights(one / "full_mlm_model.pt"), _weights(two / "full_mlm_model.pt")) < 1e-5
    valid = lambda d: [r["loss"] for r in monitor.read_results(d / "mlm_loss.jsonl")
                       if r["record"] == "valid"]
    assert valid(one) == pytest.approx(valid(two), rel=1e-4)  # all-reduced validation


def test_qa_under_torchrun_matches_one_process(tmp_path):
    wt = write_wikitext(tmp_path / "wt", (150, 30, 30))
    run_script("mlm_task.py", "--data-dir", wt, *TINY, "--dry-run", cwd=tmp_path)
    write_squad(tmp_path / "train.json", copies=16)  # 144 questions: 9 global batches of 16
    write_squad(tmp_path / "dev.json", prefix="d")
    qa = ["--bert-model", "mlm_bert.pt", "--train-file", "train.json", "--dev-file", "dev.json",
          "--bptt", "48", "--log-interval", "1", *NO_DROPOUT]
    run_script("qa_task.py", *qa, "--batch_size", "16", "--save", "one.pt",
               "--predictions", "one.json", cwd=tmp_path)
    env = script_env()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(dist.free_port()), str(ROOT / "qa_task.py"), *qa,
                           "--batch_size", "8", "--save", "two.pt", "--predictions", "two.json"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr
    assert proc.stdout.count("| end of epoch") == 1  # rank 0 alone prints
    assert _max_diff(_weights(tmp_path / "one.pt"), _weights(tmp_path / "two.pt")) < 1e-5
    assert (tmp_path / "one.json").read_text() == (tmp_path / "two.json").read_text()


def _slurm_ranks(tmp_path, args, world=2, only=None):
    """Start mlm_task.py as srun would: one process per task with SLURM_* variables."""
    port = dist.free_port()
    env = script_env(SLURM_NTASKS=str(world), SLURM_JOB_ID=str(port), SLURM_JOB_NODELIST="localhost")
    env.pop("MASTER_PORT", None)
    env["MASTER_PORT"] = str(port)  # the derived port may be taken on a shared machine
    procs = []
    for rank in range(world) if only is None else only:
        procs.append(subprocess.Popen(
            [sys.executable, str(ROOT / "mlm_task.py"), *map(str, args)], cwd=tmp_path,
            env=dict(env, SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank)),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def test_fake_slurm_job_joins(tmp_path):
    wt = write_wikitext(tmp_path / "wt", (150, 30, 30))
    procs = _slurm_ranks(tmp_path, ["--data-dir", wt, *TINY, "--dry-run"])
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert "DDP: 2 processes, backend gloo, rendezvous localhost:" in outs[0][0]
    assert outs[1][0] == ""  # only rank 0 prints
    assert (tmp_path / "mlm_bert.pt").is_file()


def test_a_dead_rank_stops_the_job(tmp_path):
    wt = write_wikitext(tmp_path / "wt", (3000, 30, 30))
    args = ["--data-dir", wt, *TINY, "--log-interval", "1", "--epochs", "50", "--dist-timeout", "30"]
    rank0, rank1 = _slurm_ranks(tmp_path, args)
    line = ""
    while "| epoch" not in line:
        line = rank0.stdout.readline()
        assert line or rank0.poll() is None, rank0.stderr.read()
    rank1.send_signal(signal.SIGKILL)
    start = time.time()
    rank0.wait(timeout=120)
    assert rank0.returncode not in (0, None)
    assert time.time() - start < 60
    assert "lost the other processes" in rank0.stderr.read()


def test_a_rank_that_never_joins_times_out(tmp_path):
    wt = write_wikitext(tmp_path / "wt", (100, 30, 30))
    (rank0,) = _slurm_ranks(tmp_path, ["--data-dir", wt, *TINY, "--dry-run", "--dist-timeout", "5"],
                            only=[0])
    start = time.time()
    rank0.wait(timeout=120)
    assert rank0.returncode != 0 and time.time() - start < 90


def test_one_sharding_policy():
    """dist.shard_range cuts a global batch as torch.tensor_split does; Batches serves each
    rank its share and rows_of says which rows those are, so that a sharded evaluation
    (squad.Evaluator) can put the gathered rows back in order."""
    for n in range(0, 12):
        for world in (1, 2, 3, 5):
            parts = torch.arange(n).tensor_split(world)
            assert [list(range(*dist.shard_range(n, r, world))) for r in range(world)] == \
                   [p.tolist() for p in parts]
    rows = torch.arange(23)
    served = {r: torch.cat([b for (b,) in data.Batches(rows, batch_size=4, rank=r, world=3)])
              for r in range(3)}
    for r in range(3):
        assert torch.equal(served[r], data.Batches(rows, batch_size=4, rank=r, world=3).rows_of(r))
    assert sorted(torch.cat(list(served.values())).tolist()) == list(range(23))  # each row once
    assert max(len(v) for v in served.values()) <= 9  # 23 rows over 3 ranks: a third each
    ctx = dist.Context(rank=1, world=2)
    assert ctx.rows(7) == slice(4, 7) and ctx.shard(True) == dict(rank=1, world=2, drop_last=True)


def test_a_one_process_job_trains_without_the_ddp_wrapper(tmp_path):
    """torchrun --nproc_per_node 1 (a process group of one): no DDP around the model, which
    under torch.compile would cut the graph at its gradient buckets (two processes keep DDP:
    the tests above, whose results equal one process's, need its gradient averaging)."""
    import torch.distributed as tdist
    from types import SimpleNamespace
    args = SimpleNamespace(compile=None, seed=3)
    model = torch.nn.Linear(4, 2)
    tdist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert dist.wrap(model, args, dist.Context(rank=0, world=1)) is model
    finally:
        tdist.destroy_process_group()
    assert dist.wrap(model, args, dist.Context(rank=0, world=1)) is model  # no group at all


# ----------------------------------------------------------------- the token store in a job

def _torchrun(tmp_path, args, nnodes=1, nproc=2, endpoint=None, node=None):
    """A torchrun launcher of mlm_task.py: one machine (nnodes 1), or one of nnodes
    launchers meeting at a c10d rendezvous endpoint, as on a cluster."""
    where = (["--nproc_per_node", str(nproc), "--master_port", str(dist.free_port())] if nnodes == 1
             else ["--nnodes", str(nnodes), "--nproc_per_node", str(nproc), "--rdzv_backend", "c10d",
                   "--rdzv_endpoint", endpoint, "--rdzv_id", "bench-test"])
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *where,
                             str(ROOT / "mlm_task.py"), *map(str, args), "--parallel", "DDP"],
                            cwd=tmp_path, env=script_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_a_job_builds_its_vocabulary_and_token_store_once(tmp_path):
    """Two processes on one machine, and two 'nodes' (launchers) sharing a disk: rank 0
    alone counts the vocabulary and tokenizes; two nodes with a disk each: each node's
    first process builds the store on its own disk."""
    wt = write_wikitext(tmp_path / "wt", (150, 30, 30))
    args = ["--data-dir", wt, *TINY[:-2], "--cache-dir", "cache", "--dry-run"]
    proc = _torchrun(tmp_path, args)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, out + err
    assert out.count("| vocabulary: ") == 1 and "built from the WikiText2 train split" in out
    assert out.count("built from WikiText2") == 3  # train, valid, test: once each
    endpoint = f"127.0.0.1:{dist.free_port()}"
    for disks, builds in ((["shared", "shared"], 3), (["disk0", "disk1"], 6)):
        nodes = [_torchrun(tmp_path, ["--data-dir", wt, *TINY[:-2], "--cache-dir", disk, "--dry-run"],
                           nnodes=2, nproc=1, endpoint=endpoint) for disk in disks]
        outs = [p.communicate(timeout=300) for p in nodes]
        assert [p.returncode for p in nodes] == [0, 0], outs
        assert sum(o.count("built from WikiText2") for o, _ in outs) == builds, outs
        endpoint = f"127.0.0.1:{dist.free_port()}"


def test_resume_on_another_number_of_processes(tmp_path):
    """Two processes (4 rows each) stopped by SIGUSR1 (srun sends it to every task), resumed
    by one process (8 rows): the same weights as one process throughout, whatever step the
    signal stopped them at (shuffled blocks, no batch replayed)."""
    wt = write_wikitext(tmp_path / "wt", (1200, 40, 40))
    common = ["--data-dir", wt, *TINY[:-2], "--cache-dir", tmp_path / "cache", *NO_DROPOUT,
              "--epochs", "2", "--log-interval", "1"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    whole.mkdir(), parts.mkdir()
    run_script("mlm_task.py", *common, "--batch_size", "8", cwd=whole)
    ranks = _slurm_ranks(parts, [*common, "--batch_size", "4", "--parallel", "DDP"])
    line = ""
    while "| epoch   1 |     3/" not in line:
        line = ranks[0].stdout.readline()
        assert line or ranks[0].poll() is None, ranks[0].stderr.read()
    for p in ranks:
        p.send_signal(signal.SIGUSR1)
    outs = [p.communicate(timeout=120) for p in ranks]
    assert [p.returncode for p in ranks] == [128 + signal.SIGUSR1] * 2, outs
    state = torch.load(parts / "mlm_state.pt", weights_only=True)
    assert 3 <= state["step"] and (state["epoch"], state["step"]) < (2, 150)
    resumed = run_script("mlm_task.py", *common, "--batch_size", "8", "--resume", cwd=parts)
    assert f"resuming from mlm_state.pt: epoch {state['epoch']}, {state['step']} batches done" \
        in resumed.stdout
    assert _max_diff(_weights(whole / "full_mlm_model.pt"), _weights(parts / "full_mlm_model.pt")) < 1e-5
    valid = lambda d: [r["loss"] for r in monitor.read_results(d / "mlm_loss.jsonl")
                       if r["record"] == "valid"]
    assert valid(whole) == pytest.approx(valid(parts), rel=1e-4)
