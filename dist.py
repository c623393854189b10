"""Where this process stands in a job: launchers, the process group, and the one
sharding policy every task uses.

    python mlm_task.py --parallel DDP --world_size 2          # spawns 2 local processes
    torchrun --nproc_per_node 8 mlm_task.py --parallel DDP    # RANK, WORLD_SIZE, LOCAL_RANK
    srun python mlm_task.py --parallel DDP                    # SLURM_PROCID, SLURM_NTASKS, ...

All three end in `setup`, which returns a `Context`: rank, world size, local rank and
device, with the collective helpers the tasks need. One process alone is rank 0 of 1,
and then every helper is a no-op. The sharding policy (`shard_range`): a global batch of
rows is cut into `world` contiguous slices, rank r takes slice r, so a job of any size
trains on the same global batches.
"""
import datetime
import gc
import os
import re
import signal
import socket
import sys
import traceback

import torch
import torch.distributed as tdist
import torch.multiprocessing as mp
import torch.nn as nn

from utils import UserError, describe_error, seed_everything


def shard_range(n, rank, world):
    """(lo, hi): rank's contiguous share of n rows, the first n % world ranks one larger
    (the split of torch.tensor_split)."""
    q, r = divmod(n, world)
    lo = rank * q + min(rank, r)
    return lo, lo + q + (1 if rank < r else 0)


class Context:
    """This process's place in a job and the device it runs on."""

    def __init__(self, rank=0, world=1, local=0, device=torch.device("cpu")):
        self.rank, self.world, self.local, self.device = rank, world, local, device
        self.control = None  # the process group of `any` (None: the default group)
        self.patient = None  # the process group of `once`, which waits up to a day
        self.held = []  # what the process keeps open while it runs (the run's lock)

    @property
    def main(self):
        """True on the process that prints and writes files (rank 0)."""
        return self.rank == 0

    def print0(self, *a, **k):
        if self.main:
            print(*a, **k, flush=True)

    def rows(self, n):
        """This rank's slice of a global batch of n rows (shard_range)."""
        return slice(*shard_range(n, self.rank, self.world))

    def shard(self, train):
        """data.Batches arguments for this rank's share; equal shares in training."""
        return dict(rank=self.rank, world=self.world, drop_last=train and self.world > 1)

    def all_sum(self, values):
        """Sum a list of floats over the ranks (itself alone without DDP)."""
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64,
                         device="cuda" if tdist.get_backend() == "nccl" else "cpu")
        tdist.all_reduce(t)
        return t.tolist()

    def gather(self, rows, counts):
        """[rows of rank 0, rows of rank 1, ...] on every rank: rows (counts[rank], ...) a
        CPU tensor, counts the number of rows of every rank (known to all)."""
        if self.world == 1:
            return [rows]
        device = "cuda" if tdist.get_backend() == "nccl" else "cpu"
        padded = rows.new_zeros((max(counts), *rows.shape[1:])).to(device)
        padded[:len(rows)] = rows.to(device)
        out = [torch.empty_like(padded) for _ in range(self.world)]
        tdist.all_gather(out, padded)
        return [t[:n].cpu() for t, n in zip(out, counts)]

    def barrier(self):
        if self.world > 1:
            tdist.barrier()

    def once(self, work, ready):
        """Run work() on rank 0 while the other ranks wait; then, on a node where ready()
        is false (it does not share rank 0's disk), its first process runs work() too.
        The waiting is on a group whose timeout is a day, not --dist-timeout: preparing a
        large corpus may take longer. An error in work() stops every rank."""
        if self.world == 1:
            work()
            return
        self._work_where(self.main, work)
        missing = not ready()
        if self._any_of(missing, self.patient):
            self._work_where(missing and self.local == 0, work)

    def _work_where(self, mine, work):
        error = None
        if mine:
            try:
                work()
            except Exception as e:
                error = e
        if self._any_of(error is not None, self.patient):
            if error is None:
                raise UserError("another process of the job failed; see its message")
            if not self.main:  # only rank 0 prints errors at the end: say it here
                print(f"rank {self.rank}: {error}", file=sys.stderr, flush=True)
            raise error

    def _any_of(self, flag, group):
        t = torch.tensor([float(flag)])
        tdist.all_reduce(t, group=group)
        return t.item() > 0

    def any(self, flag):
        """True on every rank when flag is true on any. Asked at every optimizer step (has
        a signal come?): under NCCL it travels on a CPU (gloo) group, so that asking does
        not make the host wait for the GPU."""
        if self.world == 1:
            return bool(flag)
        return self._any_of(flag, self.control)


def first_slurm_host(nodelist):
    """The first host of a SLURM node list: 'gpu[03-05,9],cpu1' -> 'gpu03'."""
    first = re.split(r",(?![^\[]*\])", nodelist.strip())[0]
    m = re.match(r"([^\[]*)\[([^\]]*)\]", first)
    return m.group(1) + re.split(r"[-,]", m.group(2))[0] if m else first


def launcher_env(env):
    """(rank, world, local rank, address, port) set by torchrun or srun, else None."""
    if "RANK" in env and "WORLD_SIZE" in env:
        return (int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                env.get("MASTER_ADDR", "127.0.0.1"), env.get("MASTER_PORT", "29500"))
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        addr = env.get("MASTER_ADDR") or first_slurm_host(env.get("SLURM_JOB_NODELIST", ""))
        # one port per job, so that jobs sharing a node do not collide
        port = env.get("MASTER_PORT") or str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)
        return (int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]),
                int(env.get("SLURM_LOCALID", 0)), addr or "127.0.0.1", port)
    return None


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup(args, banner=""):
    """The Context of this process: device, process group and seeds, after printing
    banner and the device.

    torchrun (RANK, WORLD_SIZE, LOCAL_RANK), srun (SLURM_PROCID, SLURM_NTASKS,
    SLURM_LOCALID, first host of SLURM_JOB_NODELIST) and the processes `cli` starts all
    end here: NCCL with one GPU per process on CUDA, gloo on CPU.
    """
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but CUDA is not available; use --device cpu")
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    ctx = Context(device=torch.device("cuda" if use_cuda else "cpu"))
    launch = launcher_env(os.environ)
    if launch and (launch[1] > 1 or args.parallel == "DDP"):
        rank, world, local, addr, port = launch
        if use_cuda:
            if local >= torch.cuda.device_count():
                raise UserError(f"local rank {local} has no GPU ({torch.cuda.device_count()} "
                                "visible); start one process per GPU")
            torch.cuda.set_device(local)
            ctx.device = torch.device("cuda", local)
        tdist.init_process_group("nccl" if use_cuda else "gloo",
                                 init_method=f"tcp://{addr}:{port}", rank=rank, world_size=world,
                                 timeout=datetime.timedelta(seconds=args.dist_timeout))
        ctx.rank, ctx.world, ctx.local = rank, world, local
        if use_cuda:
            ctx.control = tdist.new_group(backend="gloo")
        ctx.patient = tdist.new_group(backend="gloo", timeout=datetime.timedelta(days=1))
        ctx.print0(f"| DDP: {world} process{'es' if world > 1 else ' (trains without the DDP wrapper)'}, "
                   f"backend {tdist.get_backend()}, rendezvous {addr}:{port}")
    ctx.print0(f"| {banner + ' | ' if banner else ''}device: {ctx.device}")
    seed_everything(args.seed)
    return ctx


def wrap(model, args, ctx):
    """torch.compile (--compile) and DDP (when distributed over several processes) around
    model, whose parameters they share. Dropout then draws per rank. A job of one
    process trains without DDP: it has nothing to synchronise, and under torch.compile
    the wrapper would split the compiled graph at its gradient buckets (about 20 pieces
    at BERT-base sizes), each a separate call from the host."""
    if args.compile:
        model = torch.compile(model, mode=None if args.compile == "default" else args.compile)
    if not tdist.is_initialized():
        return model
    torch.manual_seed(args.seed + ctx.rank)
    if ctx.world == 1:
        return model
    device_ids = [ctx.local] if next(model.parameters()).is_cuda else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


class Stopped(Exception):
    """Raised after a signal asked the run to stop and its state was saved."""

    def __init__(self, signum):
        super().__init__(f"stopped by signal {signum}")
        self.signum = signum


def cli(main, parser, errors=()):
    """Run main(args), in --world_size local processes for --parallel DDP under plain
    python. A user mistake (UserError or one of errors) becomes one line on stderr and
    exit status 2."""
    args = parser.parse_args()
    if args.parallel == "DDP" and launcher_env(os.environ) is None and args.world_size > 1:
        port = free_port()
        try:
            processes = mp.spawn(_spawned, args=(main, args, port, errors, parser.prog),
                                 nprocs=args.world_size, join=False)
            while True:
                try:
                    if processes.join():
                        break
                except KeyboardInterrupt:
                    continue  # Ctrl-C reached the processes too: they stop on their own
        except mp.ProcessExitedException as e:  # a rank failed; spawn has stopped the rest
            sys.exit(e.exit_code if e.exit_code and e.exit_code > 0 else 1)
        except mp.ProcessRaisedException as e:
            print(f"{parser.prog}: error: a DDP process failed:\n{e}", file=sys.stderr)
            sys.exit(1)
        return
    _run(main, args, errors, parser.prog)


def _spawned(rank, main, args, port, errors, prog):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(args.world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    _run(main, args, errors, prog)


def _run(main, args, errors, prog):
    try:
        main(args)
        if tdist.is_initialized():
            tdist.barrier()  # every rank is done before the process group goes
    except Stopped as e:
        sys.exit(128 + e.signum)  # the shell's convention for "ended by a signal"
    except KeyboardInterrupt:  # Ctrl-C outside training, or a second one: files stay whole
        if not tdist.is_initialized() or tdist.get_rank() == 0:
            print(f"\n{prog}: interrupted (Ctrl-C); every file is whole: as it was, or written "
                  "to the end", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
    except (UserError, *errors) as e:
        if not tdist.is_initialized() or tdist.get_rank() == 0:
            print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except (tdist.DistError, RuntimeError) as e:
        if not tdist.is_initialized() or tdist.get_world_size() == 1:
            raise
        if not isinstance(e, tdist.DistError):
            traceback.print_exc()  # may be a bug of its own, not only a lost peer
        # Another process of the job died or stopped answering: say so and stop, do not hang.
        print(f"{prog}: error: rank {tdist.get_rank()} lost the other processes of the job "
              f"({describe_error(e, 200)}); see their logs", file=sys.stderr)
        sys.exit(1)
    finally:
        if tdist.is_initialized():
            # Free what main left (DDP's reducer holds the process group) while the group
            # and the interpreter are alive: freed at exit instead, gloo's threads may abort.
            gc.collect()
            tdist.destroy_process_group()
