"""One process per device: joining the group, and a backend that splits its work over the ranks.

``DistributedBackend`` wraps any backend (torch, onnxruntime, tensorrt: the
seam is unchanged).  Every rank runs the same sampling loop on identical
tensors and passes the whole batch; the wrapper computes only this rank's
share and all-gathers the rest, so guidance and the Euler step run on the
same numbers everywhere and the video equals the one-process video:

- DiT calls: the S sequences (chunks x cond/uncond) are placed by
  ``parallel_plan.place_sequences``, the same function ``tm-run plan``
  prints; a group of d > 1 ranks shares each sequence's tokens (Ulysses,
  torch backend only);
- text: encoded on the group's first rank and broadcast;
- VAE encode/decode: the stage's chunks spread over the ranks.

Faults: every rank beats a heartbeat into the rendezvous store and marks
there when it waits in a collective.  When a collective fails (a peer's
socket closed, or nothing arrived within the timeout) the rank reads the
store and names, in one line, the rank that died (no heartbeat, its process
gone), does not answer (no heartbeat, its process stopped or out of reach:
SIGSTOP, Ctrl-Z, a host that vanished) or hangs (alive, but not waiting in
any collective when the others gave up).

Network: a single-host run (the master address is a loopback address, as
our launcher's always is) listens on loopback only: the rendezvous store is
handed a socket bound there (TCPStore's own server binds every interface),
and gloo's and NCCL's sockets are put on the loopback interface.  A run
across hosts (torchrun with a routable master address) listens where the
user's master address says; torchrun's own agent store is torchrun's.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta

import torch

from ..errors import TempoMasterError
from ..parallel_plan import Placement, balanced_shares, place_sequences
from .backends.base import Backend

STORE_HOSTED_ENV = "TEMPOMASTER_STORE_HOSTED"  # set by our launcher, which hosts the store itself
_HEARTBEAT_SECONDS = 0.5
_DEAD_AFTER_SECONDS = 3.0


class WorkerError(TempoMasterError, RuntimeError):
    """A rank failed, died or hangs; the message names it. Nothing was written."""

    exit_code = 1

    def __init__(self, message: str, culprit: int | None = None):
        super().__init__(message)
        self.culprit = culprit


def torchrun_environment() -> bool:
    """True inside a process that torchrun (or any env:// launcher) started."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


# ----------------------------------------------------------------------------
# The world and its groups
# ----------------------------------------------------------------------------


@dataclass
class World:
    """This process's membership: rank, device, the store, and the groups made so far."""

    rank: int
    size: int
    local_rank: int
    device: torch.device
    store: object  # torch.distributed.Store
    timeout: float
    backend: str
    _groups: dict = field(default_factory=dict)
    _beat: threading.Event | None = None

    def group(self, ranks: tuple[int, ...]):
        """The process group of ``ranks`` (global); every rank must ask for the same groups in the same order."""
        import torch.distributed as dist

        ranks = tuple(ranks)
        if ranks not in self._groups:
            if len(ranks) == self.size:
                self._groups[ranks] = dist.group.WORLD
            else:
                self._groups[ranks] = dist.new_group(list(ranks), timeout=timedelta(seconds=self.timeout))
        return self._groups[ranks]

    def close(self) -> None:
        import torch.distributed as dist

        if self._beat is not None:
            self._beat.set()
        if dist.is_initialized():
            dist.destroy_process_group()


# ----------------------------------------------------------------------------
# Where the run listens
# ----------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    """True when every address ``host`` resolves to is a loopback one (127.0.0.0/8, ::1): a single-host run."""
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError):
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


def loopback_interface() -> str:
    """The name of this machine's loopback interface (Linux: the one flagged IFF_LOOPBACK; ``lo`` by default)."""
    try:
        for name in sorted(os.listdir("/sys/class/net")):
            with open(f"/sys/class/net/{name}/flags") as fh:
                if int(fh.read().strip(), 16) & 0x8:  # IFF_LOOPBACK
                    return name
    except (OSError, ValueError):
        pass
    return "lo"


def keep_collectives_on_loopback(force: bool) -> None:
    """gloo's and NCCL's own listening sockets on the loopback interface.

    ``force``: our launcher's ranks, always on one host, override any
    GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME of the user's shell; under
    torchrun with a loopback master address a value the user set is kept.
    """
    interface = loopback_interface()
    for name in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        if force:
            os.environ[name] = interface
        else:
            os.environ.setdefault(name, interface)


def host_store(host: str, port: int, world_size: int | None, timeout: float):
    """The rendezvous store's server, listening on ``host`` only when it is a loopback address.

    torch's TCPStore server binds every interface whatever host it is given;
    handed an already-listening socket (``master_listen_fd``) it serves on
    that one.  A routable ``host`` (a run across machines) keeps torch's own
    binding: the master address is then the user's choice.
    """
    import torch.distributed as dist

    if not is_loopback(host):
        return dist.TCPStore(
            host, port, world_size, is_master=True, timeout=timedelta(seconds=timeout), wait_for_workers=False
        )
    family, _, _, _, address = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)[0]
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(address)
        listener.listen(128)
        bound_port = listener.getsockname()[1]
    except OSError:
        listener.close()
        raise
    fd = listener.detach()  # the store owns and closes it from here on
    try:
        return dist.TCPStore(
            host,
            bound_port,
            world_size,
            is_master=True,
            timeout=timedelta(seconds=timeout),
            wait_for_workers=False,
            master_listen_fd=fd,
        )
    except BaseException:
        os.close(fd)
        raise


def _connect_store(rank: int, world_size: int, timeout: float):
    import torch.distributed as dist

    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    # torchrun's agent, or our launcher, already hosts the store; plain env:// has rank 0 host it.
    hosted = os.environ.get(STORE_HOSTED_ENV) == "1" or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    if rank == 0 and not hosted:
        return host_store(host, port, world_size, timeout)
    return dist.TCPStore(
        host, port, world_size, is_master=False, timeout=timedelta(seconds=timeout), wait_for_workers=False
    )


def join_from_env(timeout: float = 600.0, device: str | torch.device | None = None) -> World:
    """Join the group that RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT describe (torchrun's environment).

    The device is ``device``, else cuda:LOCAL_RANK when CUDA is there, else
    the CPU; NCCL on GPUs, gloo on CPUs.  Collectives give up after
    ``timeout`` seconds.
    """
    import torch.distributed as dist

    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if device is None:
        device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if is_loopback(os.environ["MASTER_ADDR"]):  # one host: nothing of the run listens beyond it
        keep_collectives_on_loopback(force=os.environ.get(STORE_HOSTED_ENV) == "1")
    if backend == "nccl":
        # A timed-out NCCL collective then raises in this process (as gloo's do) instead of the
        # watchdog aborting it, so the rank at fault can be named.
        os.environ.setdefault("TORCH_NCCL_BLOCKING_WAIT", "1")
    store = _connect_store(rank, size, timeout)
    dist.init_process_group(
        backend,
        store=dist.PrefixStore("tempomaster/pg", store),
        rank=rank,
        world_size=size,
        timeout=timedelta(seconds=timeout),
    )
    world = World(rank, size, local_rank, device, store, timeout, backend)
    store.set(f"tm/process/{rank}", f"{pid_namespace()} {os.getpid()}")  # whom a peer looks at when it is silent
    world._beat = _start_heartbeat(store, rank)
    return world


def pid_namespace() -> str:
    """Where a pid means the same process: this boot of this machine and this pid namespace (Linux), else the host name."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            return f"{fh.read().strip()}/{os.readlink('/proc/self/ns/pid')}".replace(" ", "")
    except OSError:
        return socket.gethostname().replace(" ", "")


def process_state(record: str) -> str:
    """``gone``, ``stopped``, ``alive``, or ``unknown`` (another machine or pid namespace) for a rank's
    "NAMESPACE PID" record."""
    namespace, _, pid = record.partition(" ")
    if namespace != pid_namespace() or not pid.isdigit():
        return "unknown"
    try:
        with open(f"/proc/{pid}/stat") as fh:
            state = fh.read().rpartition(")")[2].split()[0]  # the field after "(comm)"
    except (OSError, IndexError):
        return "gone"
    return {"Z": "gone", "X": "gone", "T": "stopped", "t": "stopped"}.get(state, "alive")


def _start_heartbeat(store, rank: int) -> threading.Event:
    """A thread that stamps the time under tm/alive/RANK: a dead process stops, a hung one goes on."""
    stop = threading.Event()

    def beat():
        while not stop.is_set():
            try:
                store.set(f"tm/alive/{rank}", repr(time.time()))
            except Exception:  # the store is gone: the run is over anyway
                return
            stop.wait(_HEARTBEAT_SECONDS)

    store.set(f"tm/alive/{rank}", repr(time.time()))
    threading.Thread(target=beat, name=f"tm-heartbeat-{rank}", daemon=True).start()
    return stop


@dataclass
class RankGroup:
    """The ranks that make one video together (consecutive global ranks)."""

    world: World
    ranks: tuple[int, ...]

    @property
    def size(self) -> int:
        return len(self.ranks)

    @property
    def index(self) -> int:
        return self.ranks.index(self.world.rank)

    @property
    def pg(self):
        return self.world.group(self.ranks)

    def subgroup(self, local_ranks: tuple[int, ...]):
        return self.world.group(tuple(self.ranks[i] for i in local_ranks))

    @contextmanager
    def exchange(self, what: str):
        """Around every blocking collective: mark this rank as waiting in the store, and turn a
        failure into one line naming the rank at fault (dead: no heartbeat; hung: not waiting)."""
        store, rank = self.world.store, self.world.rank
        store.set(f"tm/state/{rank}", f"wait {what}")
        start = time.monotonic()
        try:
            yield
        except WorkerError:
            raise
        except Exception as err:
            store.set(f"tm/state/{rank}", "failed")
            raise self.diagnose(what, err, time.monotonic() - start) from None
        store.set(f"tm/state/{rank}", "run")

    def diagnose(self, what: str, err: BaseException, waited: float) -> WorkerError:
        store, me, timeout = self.world.store, self.world.rank, self.world.timeout
        timed_out = waited >= 0.9 * timeout
        # A peer's death shows at once (its sockets close) but its heartbeat needs a moment to go stale.
        deadline = time.monotonic() + (0 if timed_out else _DEAD_AFTER_SECONDS + 2 * _HEARTBEAT_SECONDS)
        while True:
            silent, running = [], []
            try:
                now = time.time()
                for r in self.ranks:
                    if r == me:
                        continue
                    alive = float(store.get(f"tm/alive/{r}").decode()) if store.check([f"tm/alive/{r}"]) else 0.0
                    state = store.get(f"tm/state/{r}").decode() if store.check([f"tm/state/{r}"]) else "run"
                    if now - alive > _DEAD_AFTER_SECONDS:
                        process = store.get(f"tm/process/{r}").decode() if store.check([f"tm/process/{r}"]) else ""
                        silent.append((r, now - alive, process_state(process), process.partition(" ")[2]))
                    elif state == "run":
                        running.append(r)
            except Exception:
                return WorkerError(
                    f"rank {me} lost the rendezvous store during {what}: the process hosting it died", None
                )
            if silent:
                return self._silent_rank(what, timed_out, *silent[0])
            if time.monotonic() >= deadline:
                if running and timed_out:
                    return WorkerError(
                        f"rank {running[0]} hangs: it did not reach {what} within {timeout:g} s; rank {me} stopped",
                        running[0],
                    )
                first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                return WorkerError(f"rank {me}: {what} failed: {first}", None)
            time.sleep(_HEARTBEAT_SECONDS)

    def _silent_rank(self, what: str, timed_out: bool, rank: int, quiet: float, process: str, pid: str) -> WorkerError:
        """A rank without a heartbeat: dead (its process gone, or its sockets closed at once), or not
        answering (its process stopped, or the collective timed out with nothing known of it)."""
        me = self.world.rank
        if process == "stopped":
            return WorkerError(
                f"rank {rank} does not answer during {what}: its process {pid} is stopped "
                f"(SIGSTOP or Ctrl-Z; no heartbeat for {quiet:.0f} s); rank {me} stopped",
                rank,
            )
        if process == "gone" or (process == "unknown" and not timed_out):
            return WorkerError(f"rank {rank} died during {what}; rank {me} stopped", rank)
        if process == "alive":
            return WorkerError(
                f"rank {rank} does not answer during {what}: its process {pid} runs but sent no "
                f"heartbeat for {quiet:.0f} s; rank {me} stopped",
                rank,
            )
        return WorkerError(
            f"rank {rank} does not answer during {what}: no heartbeat for {quiet:.0f} s "
            f"(its process stopped, or its host unreachable); rank {me} stopped",
            rank,
        )


def _watched_sequence_parallel(group: RankGroup, pg, rank: int, size: int):
    """The DiT's Ulysses hook with each exchange marked in the store like the others."""
    from ..models.dit import SequenceParallel

    class Watched(SequenceParallel):
        def tokens_to_heads(self, x, tokens):
            with group.exchange("a sequence-parallel all-to-all"):
                return super().tokens_to_heads(x, tokens)

        def heads_to_tokens(self, x):
            with group.exchange("a sequence-parallel all-to-all"):
                return super().heads_to_tokens(x)

        def gather_tokens(self, x, tokens):
            with group.exchange("a sequence-parallel gather"):
                return super().gather_tokens(x, tokens)

    return Watched(pg, rank, size)


# ----------------------------------------------------------------------------
# The backend
# ----------------------------------------------------------------------------


def supports_sequence_parallel(backend: Backend) -> bool:
    """Only the torch backend runs the DiT with the Ulysses hook; engines fall back to chunk/CFG split."""
    from .backends.torch import TorchBackend

    return isinstance(backend, TorchBackend)


class DistributedBackend(Backend):
    """Any backend, its work shared by the ranks of a ``RankGroup``; same calls, same results on every rank."""

    def __init__(self, inner: Backend, group: RankGroup, sequence_parallel: bool = True):
        self.inner = inner
        self.group = group
        self.info = inner.info
        self.device = inner.device
        self.name = inner.name if group.size == 1 else f"{inner.name} x{group.size}"
        self.vae_batch = group.size  # one chunk per rank in each VAE call
        self.sequence_parallel = sequence_parallel and supports_sequence_parallel(inner)
        self.num_heads = inner.dit.cfg.num_heads if self.sequence_parallel else 1
        # NCCL moves device memory, gloo host memory.
        self.comm_device = inner.device if group.world.backend == "nccl" else torch.device("cpu")
        self.calls = 0
        self.placements: list[Placement] = []  # one per DiT call: what this run did, to compare with the plan

    def placement(self, sequences: int, tokens: int) -> Placement:
        return place_sequences(sequences, self.group.size, self.num_heads, self.sequence_parallel, tokens)

    # -- gathering -----------------------------------------------------------

    def _gather(
        self, mine: torch.Tensor | None, shares: list[tuple[int, int]], owners: list[int], shape
    ) -> torch.Tensor:
        """Rows ``shares[k]`` of the result come from group rank ``owners[k]``: all-gather, float32."""
        import torch.distributed as dist

        longest = max(b - a for a, b in shares)
        buf = torch.zeros((longest, *shape[1:]), dtype=torch.float32, device=self.comm_device)
        if mine is not None:
            buf[: mine.shape[0]] = mine.to(self.comm_device, torch.float32)
        pieces = [torch.empty_like(buf) for _ in range(self.group.size)]
        dist.all_gather(pieces, buf, group=self.group.pg)
        out = torch.empty(tuple(shape), dtype=torch.float32, device=self.comm_device)
        for (a, b), owner in zip(shares, owners):
            out[a:b] = pieces[owner][: b - a]
        return out.to(self.inner.device)

    def _split_batch(self, fn, batch: torch.Tensor, out_shape, what: str) -> torch.Tensor:
        """Run ``fn`` on this rank's consecutive share of the batch; every rank gets the whole result."""
        if self.group.size == 1:
            return fn(batch)
        n = batch.shape[0]
        parts = min(n, self.group.size)
        shares = balanced_shares(n, parts)
        me = self.group.index
        mine = fn(batch[shares[me][0] : shares[me][1]]) if me < parts else None
        with self.group.exchange(f"the {what} gather"):
            return self._gather(mine, shares, list(range(parts)), out_shape)

    # -- the seam ------------------------------------------------------------

    def encode_text(self, ids, mask):
        import torch.distributed as dist

        if self.group.size == 1:
            return self.inner.encode_text(ids, mask)
        if self.group.index == 0:
            emb = self.inner.encode_text(ids, mask).to(self.comm_device, torch.float32).contiguous()
        else:
            emb = torch.empty(
                (ids.shape[0], ids.shape[1], self.info.text_dim), dtype=torch.float32, device=self.comm_device
            )
        with self.group.exchange("the text broadcast"):
            dist.broadcast(emb, src=self.group.ranks[0], group=self.group.pg)
        return emb.to(self.inner.device)

    def velocity(self, x, y, timestep, context, rope_cos, rope_sin):
        if self.group.size == 1:
            return self.inner.velocity(x, y, timestep, context, rope_cos, rope_sin)
        p = self.placement(x.shape[0], rope_cos.shape[1])
        self.placements.append(p)
        me = self.group.index
        a, b = p.sequences_of(me)
        self.calls += 1
        mine = None
        if b > a:
            s = slice(a, b)
            if p.sp_degree == 1:
                mine = self.inner.velocity(x[s], y[s], timestep, context[s], rope_cos[s], rope_sin[s])
            else:
                mine = self._velocity_sequence_parallel(p, x[s], y[s], timestep, context[s], rope_cos[s], rope_sin[s])
        owners = [k * p.sp_degree for k in range(p.groups)]  # each group's first rank sends its rows
        with self.group.exchange(f"the gather of DiT call {self.calls}"):
            return self._gather(mine, list(p.shares), owners, x.shape)

    def _velocity_sequence_parallel(self, p: Placement, x, y, timestep, context, rope_cos, rope_sin):
        me = self.group.index
        k = p.group_of(me)
        sp = _watched_sequence_parallel(self.group, self.group.subgroup(p.group_ranks(k)), p.sp_rank(me), p.sp_degree)
        inner, dev = self.inner, self.inner.device
        with torch.inference_mode():
            return inner.dit(
                x.to(dev),
                y.to(dev),
                timestep.to(dev),
                context.to(dev),
                rope_cos.to(dev),
                rope_sin.to(dev),
                sequence_parallel=sp,
            )

    def vae_encode(self, video):
        n, _, frames, h, w = video.shape
        shape = (n, self.info.z_dim, (frames - 1) // 4 + 1, h // 8, w // 8)
        return self._split_batch(self.inner.vae_encode, video, shape, "VAE encode")

    def vae_decode(self, latents):
        n, _, f, h, w = latents.shape
        shape = (n, 3, 1 + 4 * (f - 1), 8 * h, 8 * w)
        return self._split_batch(self.inner.vae_decode, latents, shape, "VAE decode")

    def barrier(self, what: str = "barrier") -> None:
        """Every rank of the group got here (before rank 0 writes: no video from a broken run)."""
        import torch.distributed as dist

        if self.group.size > 1:
            with self.group.exchange(what):
                flag = torch.ones(1, device=self.comm_device)
                dist.all_reduce(flag, group=self.group.pg)
