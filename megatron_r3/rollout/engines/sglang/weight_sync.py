"""Trainer -> SGLang weight sync (SGLang 0.5.23's endpoints): the distributed path and the disk path.

Distributed (``--weight-sync distributed``, servers and trainer share a NCCL fabric)
    Once: ``POST /init_weights_update_group {master_address, master_port, rank_offset, world_size, group_name,
    backend}`` on every server, while trainer rank 0 joins the same group as its rank 0 (it hosts the TCP store
    rendezvous at ``master_address:master_port``). The group is *not* the trainer's default group: it is created
    the way SGLang creates its side (``rendezvous`` + ``PrefixStore(group_name)`` + a new process group), so both
    ends agree on the store keys. Ranks: trainer 0, server i's workers ``rank_offset_i .. + tp_size_i - 1``.
    Per update: ``POST /pause_generation`` -> ``GET /flush_cache`` -> ``POST /begin_weight_update`` -> for each
    bucket ``POST /update_weights_from_distributed {names, dtypes, shapes, group_name, flush_cache, weight_version}``
    (in background threads: the server answers only once it has received the tensors) and a broadcast of each tensor
    from trainer rank 0 in the same order -> ``POST /end_weight_update`` -> ``GET /flush_cache`` -> ``POST
    /continue_generation`` -> ``GET /model_info`` must report the new ``weight_version``. SGLang 0.5.23 refuses
    ``/update_weights_from_distributed`` outside a begin/end session (HTTP 400, "must run between
    begin_weight_update() and end_weight_update()") *without* entering the receive, so rank 0 never blocks on a
    broadcast the server refused: it polls its asynchronous broadcast and the server's reply together and fails
    with the server's message at once (the abandoned group is torn down and rebuilt at the next sync). The session
    is closed on failure too (``end_weight_update``, then ``continue_generation``), best effort.

Disk (``--weight-sync disk``, no shared fabric; ``--weight-sync-dir`` on storage the servers can read)
    ``save_hf_checkpoint`` into ``DIR/.incoming-<pid>`` (safetensors + config.json), renamed atomically to
    ``DIR/weights-v<version>``, then ``POST /update_weights_from_disk {model_path, load_format, weight_version}``
    on every server (no session needed), then the version check; older ``weights-v*`` directories are removed.

Every trainer rank walks the export (it drives the TP/EP/PP gathers); only rank 0 talks to servers. An error on
rank 0 does not stop the walk (the other ranks are inside its collectives); at the end rank 0's error is broadcast
and raised on every rank alike, as :class:`WeightSyncError`. Tensor names are HF checkpoint names
(``export_hf_buckets``), cast to the rollout dtype on the exporting ranks.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import shutil
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional
from urllib.parse import urlparse

import torch
import torch.distributed as dist

from megatron_r3.model.safetensors_writer import write_hf_directory
from megatron_r3.platform import collectives
from megatron_r3.platform.buckets import iter_buckets
from megatron_r3.platform.dtypes import torch_dtype
from megatron_r3.platform.parallel_context import ParallelContext
from megatron_r3.rollout.base import WeightSyncError
from megatron_r3.rollout.engines.sglang.http import SGLangHTTPError
from megatron_r3.rollout.engines.sglang.protocol import (
    check_success,
    init_weights_update_group_payload,
    update_weights_from_disk_payload,
    update_weights_from_distributed_payload,
    weight_version_of,
)

logger = logging.getLogger("megatron_r3.rollout.engines.sglang.weight_sync")

WEIGHTS_DIR_PATTERN = re.compile(r"^weights-v(\d+)$")


@dataclass
class WeightSyncSettings:
    mode: str = "distributed"  # "distributed" | "disk"
    dtype: torch.dtype = torch.bfloat16  # the dtype the tensors travel in (the server's --dtype)
    bucket_bytes: int = 512 * 1024**2
    backend: str = "auto"  # "nccl" | "gloo" | "auto" (nccl with CUDA)
    master_address: Optional[str] = None  # reachable from the servers; default: the address routing to them
    master_port: int = 0  # 0: a free port
    group_name: str = field(default_factory=lambda: f"megatron_r3_weights_{uuid.uuid4().hex[:8]}")
    timeout_s: float = 600.0  # group set-up, per-bucket transfer, disk load
    directory: Optional[str] = None  # disk path: shared storage
    load_format: Optional[str] = None  # disk path: SGLang's load_format (None: the server's own)
    verify_version: bool = True

    def __post_init__(self):
        if self.mode not in ("distributed", "disk"):
            raise ValueError(f"weight sync mode must be 'distributed' or 'disk', got {self.mode!r}")
        self.dtype = torch_dtype(self.dtype)
        if self.backend not in ("auto", "nccl", "gloo"):
            raise ValueError(f"weight sync backend must be auto, nccl or gloo, got {self.backend!r}")
        if self.bucket_bytes < 1:
            raise ValueError(f"bucket_bytes must be positive, got {self.bucket_bytes}")

    def resolved_backend(self) -> str:
        if self.backend == "auto":
            return "nccl" if torch.cuda.is_available() else "gloo"
        return self.backend


# ================================================================================================ process group
def init_custom_process_group(
    *, backend: str, init_method: str, world_size: int, rank: int, group_name: str, timeout_s: float
):
    """A process group outside the default one, created the way SGLang creates its end of the weight update group
    (``rendezvous`` -> ``PrefixStore(group_name, store)`` -> ``_new_process_group_helper``), so the two sides meet
    on the same store keys. Rank 0 hosts the TCP store; it builds it directly rather than through ``rendezvous``,
    which under torchrun (``TORCHELASTIC_USE_AGENT_STORE``) would only connect to an agent store that does not
    exist at this address. Uses torch-internal helpers, as SGLang does."""
    from torch.distributed.distributed_c10d import (
        Backend,
        PrefixStore,
        _new_process_group_helper,
        _world,
        rendezvous,
    )

    timeout = datetime.timedelta(seconds=timeout_s)
    if rank == 0:
        url = urlparse(init_method)
        if url.scheme != "tcp" or not url.hostname or not url.port:
            raise ValueError(f"init_method must be tcp://HOST:PORT, got {init_method!r}")
        store = dist.TCPStore(url.hostname, url.port, world_size, True, timeout, wait_for_workers=False,
                              multi_tenant=True)
    else:
        store, rank, world_size = next(rendezvous(init_method, rank, world_size, timeout=timeout))
    store.set_timeout(timeout)
    store = PrefixStore(group_name, store)
    group, _ = _new_process_group_helper(world_size, rank, [], Backend(backend), store, group_name=group_name,
                                         timeout=timeout)
    _world.pg_group_ranks[group] = {i: i for i in range(world_size)}
    return group


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def local_address_towards(url: str) -> str:
    """This host's address on the route to ``url``'s host (what the server must dial to reach our TCP store)."""
    host = urlparse(url).hostname or "127.0.0.1"
    if host in ("localhost", "127.0.0.1", "::1"):
        return "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect((host, 9))  # no packet is sent for UDP connect
            return sock.getsockname()[0]
        except OSError:
            return socket.gethostbyname(socket.gethostname())


# ================================================================================================ distributed path
class DistributedWeightSender:
    """Rank 0's side of the distributed path for one :class:`~megatron_r3.rollout.engines.sglang.engine.SGLangEngine`."""

    def __init__(self, engine, settings: WeightSyncSettings):
        self.engine, self.settings = engine, settings
        self.backend = settings.resolved_backend()
        self.group = None
        self.group_name = settings.group_name
        self.generation = 0  # groups built so far: each gets its own name (a dropped one may linger on a server)
        self.world_size = 0
        self.version: Optional[str] = None
        self.session_open = False

    # -- set-up
    def ensure_group(self) -> None:
        if self.group is not None:
            return
        engine, s = self.engine, self.settings
        self.group_name = s.group_name if self.generation == 0 else f"{s.group_name}_{self.generation}"
        self.generation += 1
        address = s.master_address or local_address_towards(engine.urls[0])
        port = s.master_port or _free_port()
        replicated = [url for url, facts in zip(engine.urls, engine.facts) if facts.dp_size > 1]
        if replicated:
            raise WeightSyncError(
                f"{', '.join(replicated)} run with --dp-size > 1: the weight update group is laid out per "
                "tensor-parallel worker; start one server per replica instead (tools/launch_sglang.py does)"
            )
        staged = [url for url, facts in zip(engine.urls, engine.facts) if facts.pp_size > 1]
        if staged:
            raise WeightSyncError(
                f"{', '.join(staged)} run with --pp-size > 1: SGLang 0.5.23 numbers weight-update ranks rank_offset + "
                "tp_rank (no pipeline term) and fills only each stage's layers with routes; use --pp-size 1"
            )
        ranks = [facts.weight_sync_ranks for facts in engine.facts]
        self.world_size = 1 + sum(ranks)
        offsets = [1 + sum(ranks[:i]) for i in range(len(ranks))]
        payloads = [
            init_weights_update_group_payload(master_address=address, master_port=port, rank_offset=offset,
                                              world_size=self.world_size, group_name=self.group_name,
                                              backend=self.backend)
            for offset in offsets
        ]
        # the servers' endpoint blocks until every rank has joined, so it runs beside our own join
        request = _BackgroundRequest(lambda: engine.on_all("POST", "/init_weights_update_group", payloads=payloads,
                                                           timeout=s.timeout_s, retries=0))
        try:
            group = init_custom_process_group(backend=self.backend, init_method=f"tcp://{address}:{port}",
                                              world_size=self.world_size, rank=0, group_name=self.group_name,
                                              timeout_s=s.timeout_s)
        except Exception as error:
            request.wait(5)
            raise WeightSyncError(
                f"joining the weight update group at {address}:{port} (world {self.world_size}, servers "
                f"{engine.urls}) failed: {error}; servers said: {request.said()}"
            ) from error
        if not request.wait(s.timeout_s) or request.error is not None:
            dist.destroy_process_group(group)
            raise WeightSyncError(f"/init_weights_update_group failed: {request.error or 'no reply in time'}")
        for url, body in zip(engine.urls, request.bodies):
            check_success(body, f"{url} /init_weights_update_group")
        self.group = group
        logger.info("weight update group %s: %d ranks via %s:%d (%s)", self.group_name, self.world_size, address, port,
                    self.backend)

    # -- one update
    def begin(self, version: str) -> None:
        dead = self.engine.drop_dead_servers()
        if dead and self.group is not None:  # the group holds ranks of a dead server: build one without them
            self._drop_group()
        self.ensure_group()
        self.version = version
        self.engine.on_all("POST", "/pause_generation", json={})
        self.engine.on_all("GET", "/flush_cache")
        self.session_open = True  # from here on, a failure closes it (on every server, best effort)
        try:
            bodies = self.engine.on_all("POST", "/begin_weight_update", json={}, retries=0)
        except Exception as error:  # noqa: BLE001 - one message naming the server
            raise WeightSyncError(f"/begin_weight_update refused: {error}") from error
        for url, body in zip(self.engine.urls, bodies):
            check_success(body, f"{url} /begin_weight_update")

    def send_bucket(self, bucket: Iterable[tuple[str, torch.Tensor]]) -> None:
        engine, s = self.engine, self.settings
        device = torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")
        names, tensors = [], []
        for name, tensor in bucket:
            names.append(name)
            tensors.append(tensor.detach().to(device=device, dtype=s.dtype).contiguous())
        if not names:
            return
        payload = update_weights_from_distributed_payload(names, tensors, group_name=self.group_name,
                                                          flush_cache=False, weight_version=self.version)
        # the servers receive the broadcast while their request is open
        request = _BackgroundRequest(lambda: engine.on_all("POST", "/update_weights_from_distributed", json=payload,
                                                           timeout=s.timeout_s, retries=0))
        try:
            works = [collectives.broadcast(tensor, src=0, group=self.group, async_op=True) for tensor in tensors]
            self._await_broadcast(works, request, names)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        except WeightSyncError:
            raise
        except Exception as error:
            request.wait(5)
            raise WeightSyncError(
                f"broadcasting {len(names)} tensors ({names[0]} ...) failed: {error}; servers said: "
                f"{request.said()}"
            ) from error
        if not request.wait(s.timeout_s):
            raise WeightSyncError(f"/update_weights_from_distributed: no reply within {s.timeout_s:g} s")
        if request.error is not None:
            raise WeightSyncError(f"/update_weights_from_distributed failed: {request.error}")
        for url, body in zip(engine.urls, request.bodies):
            check_success(body, f"{url} /update_weights_from_distributed")

    def _await_broadcast(self, works, request: "_BackgroundRequest", names: list) -> None:
        """Wait for rank 0's broadcasts, but give up at once when a server answers before receiving them (a
        refusal: SGLang answers 400 without entering the receive, so the broadcast would wait for the group's
        timeout). The group is then unusable (a half-done collective): it is dropped and rebuilt next sync."""
        deadline = time.monotonic() + self.settings.timeout_s
        while not all(work.is_completed() for work in works):
            if request.wait(0.02):
                refused = request.error is not None or any(
                    not (isinstance(body, dict) and body.get("success", True)) for body in request.bodies or [])
                if not refused:
                    break  # every server received the tensors: our side of the broadcast completes
                self._drop_group()
                said = request.error if request.error is not None else request.bodies
                raise WeightSyncError(
                    f"/update_weights_from_distributed refused by the servers before receiving the {len(names)} "
                    f"tensors ({names[0]} ...): {said}")
            if time.monotonic() > deadline:
                self._drop_group()
                raise WeightSyncError(f"broadcast of {len(names)} tensors ({names[0]} ...) not received within "
                                      f"{self.settings.timeout_s:g} s; servers said: {request.said()}")
        for work in works:
            work.wait()

    def _drop_group(self) -> None:
        group, self.group = self.group, None
        if group is not None:
            try:
                dist.destroy_process_group(group)
            except Exception as error:  # noqa: BLE001 - best effort: the group is abandoned anyway
                logger.info("dropping the weight update group: %s", error)
            try:
                self.engine.on_all("POST", "/destroy_weights_update_group",
                                   json={"group_name": self.group_name}, timeout=10.0, retries=0)
            except Exception as error:  # noqa: BLE001 - best effort
                logger.info("destroy_weights_update_group: %s", error)

    def finish(self) -> None:
        try:
            bodies = self.engine.on_all("POST", "/end_weight_update", json={}, retries=0)
        except Exception as error:  # noqa: BLE001 - one message naming the server
            raise WeightSyncError(f"/end_weight_update refused: {error}") from error
        self.session_open = False
        for url, body in zip(self.engine.urls, bodies):
            check_success(body, f"{url} /end_weight_update")
        self.engine.on_all("GET", "/flush_cache")
        self.engine.on_all("POST", "/continue_generation", json={})
        self.engine.record_weight_version(self.version)
        if self.settings.verify_version:
            verify_weight_version(self.engine, self.version)

    def abort(self) -> None:
        """After a failed update: close the session and do not leave the servers paused (best effort)."""
        if self.session_open:
            self.session_open = False
            try:
                self.engine.on_all("POST", "/end_weight_update", json={}, retries=0, timeout=30.0)
            except Exception as error:  # noqa: BLE001 - best effort
                logger.warning("end_weight_update after a failed weight update: %s", error)
        try:
            self.engine.on_all("POST", "/continue_generation", json={}, retries=0)
        except Exception as error:  # noqa: BLE001 - best effort
            logger.warning("continue_generation after a failed weight update: %s", error)

    def close(self) -> None:
        if self.group is None:
            return
        try:
            self.engine.on_all("POST", "/destroy_weights_update_group", json={"group_name": self.group_name},
                               timeout=10.0, retries=0)
        except Exception as error:  # noqa: BLE001 - older servers lack the endpoint; the group dies with us
            logger.info("destroy_weights_update_group: %s", error)
        try:
            dist.destroy_process_group(self.group)
        finally:
            self.group = None


class _BackgroundRequest:
    """A blocking server request run in a daemon thread while this process joins the collective it waits on."""

    def __init__(self, call) -> None:
        self.bodies: Any = None
        self.error: Optional[BaseException] = None

        def run() -> None:
            try:
                self.bodies = call()
            except BaseException as error:  # noqa: BLE001 - reported by the caller
                self.error = error

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def wait(self, timeout_s: float) -> bool:
        """True once the request has finished (replied or failed) within `timeout_s`."""
        self._thread.join(timeout=timeout_s)
        return not self._thread.is_alive()

    def said(self):
        """What the servers answered so far, for an error message."""
        return self.error or self.bodies


def verify_weight_version(engine, version: Optional[str]) -> None:
    """Every server must report ``version`` as ``weight_version`` on ``GET /model_info`` (SGLang 0.5.23; the alias
    ``/get_model_info`` is tried when ``/model_info`` is missing). A server that reports no version fails: a missing
    endpoint never skips the check."""
    if version is None:
        return
    for url in engine.urls:
        try:
            body = engine.call(url, "GET", "/model_info")
        except SGLangHTTPError as error:
            if error.status not in (404, 405):
                raise
            body = engine.call(url, "GET", "/get_model_info")
        reported = weight_version_of(body)
        if reported is None:
            raise WeightSyncError(f"{url} /model_info reports no weight_version (reply {str(body)[:200]}); cannot "
                                  f"verify the update to {version!r}")
        if reported != version:
            raise WeightSyncError(f"{url} reports weight version {reported!r} after the update to {version!r}")


# ================================================================================================ disk path
class DiskWeightPublisher:
    """Rank 0's side of the disk path: versioned directories under ``settings.directory``."""

    def __init__(self, engine, settings: WeightSyncSettings):
        if not settings.directory:
            raise WeightSyncError("--weight-sync disk needs --weight-sync-dir (a directory every server can read)")
        self.engine, self.settings = engine, settings
        self.root = os.path.abspath(settings.directory)

    def incoming(self) -> str:
        """A fresh temporary directory to write the next version into."""
        path = os.path.join(self.root, f".incoming-{os.getpid()}")
        shutil.rmtree(path, ignore_errors=True)
        os.makedirs(self.root, exist_ok=True)
        return path

    def publish(self, incoming: str, version: str) -> str:
        final = os.path.join(self.root, f"weights-v{version}")
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(incoming, final)  # atomic: a server never sees a half-written version
        self.engine.drop_dead_servers()
        payload = update_weights_from_disk_payload(final, load_format=self.settings.load_format,
                                                   weight_version=version)
        bodies = self.engine.on_all("POST", "/update_weights_from_disk", json=payload, timeout=self.settings.timeout_s,
                                    retries=0)
        for url, body in zip(self.engine.urls, bodies):
            check_success(body, f"{url} /update_weights_from_disk {final}")
        self.engine.record_weight_version(version)
        if self.settings.verify_version:
            verify_weight_version(self.engine, version)
        for name in os.listdir(self.root):
            match = WEIGHTS_DIR_PATTERN.match(name)
            if match and name != os.path.basename(final):
                shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)
        return final


# ================================================================================================ drivers
def push_named_tensors(engine, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """Single process: full (HF name, tensor) pairs to every server of ``engine``. Returns the new version."""
    settings = engine.weight_sync
    version = engine.next_weight_version()
    if settings.mode == "disk":
        publisher = DiskWeightPublisher(engine, settings)
        incoming = publisher.incoming()
        write_hf_directory(((name, tensor.to(settings.dtype)) for name, tensor in named_tensors), incoming,
                           hf_config=engine.hf_config, dtype=settings.dtype)
        publisher.publish(incoming, version)
        return version
    sender = engine.weight_sender()
    try:
        sender.begin(version)
        # sized in the dtype they travel in (send_bucket casts)
        for bucket in iter_buckets(named_tensors, settings.bucket_bytes,
                                   lambda _name, tensor: tensor.numel() * settings.dtype.itemsize):
            sender.send_bucket(bucket)
        sender.finish()
    except BaseException:
        sender.abort()
        raise
    return version


def sync_policy_weights(engine, chunks, arch, hf_config, parallel: ParallelContext,
                        settings: Optional[WeightSyncSettings] = None) -> None:
    """The trainer's sync: every rank calls it with its ``parallel`` context (``engine`` is the SGLang engine on
    rank 0, None elsewhere). Rank 0's outcome (it alone talks to the servers) and every rank's own export errors
    are agreed on the host group: all ranks raise the same :class:`WeightSyncError`, or none does."""
    from megatron_r3.model.weights import export_hf_buckets, save_hf_checkpoint

    settings = settings or (engine.weight_sync if engine is not None else WeightSyncSettings())
    error: Optional[BaseException] = None
    version = engine.next_weight_version() if engine is not None else None

    def guarded(fn, *args):
        nonlocal error
        if error is None:
            try:
                return fn(*args)
            except Exception as exc:  # noqa: BLE001 - made collective below
                error = exc
        return None

    if settings.mode == "distributed":
        sender = engine.weight_sender() if engine is not None else None
        if sender is not None:
            guarded(sender.begin, version)
        for bucket in export_hf_buckets(chunks, arch, parallel, bucket_bytes=settings.bucket_bytes,
                                        dtype=settings.dtype):
            if sender is not None and error is None:
                guarded(sender.send_bucket, bucket)
        if sender is not None:
            if error is None:
                guarded(sender.finish)
            if error is not None:  # also when finish itself failed: close the session, resume generation
                sender.abort()
    else:
        publisher = incoming = None
        if engine is not None:
            publisher = guarded(DiskWeightPublisher, engine, settings)
            incoming = guarded(publisher.incoming) if publisher is not None else None
        target = incoming or os.path.join(os.path.abspath(settings.directory or "."), ".incoming-unused")
        try:
            save_hf_checkpoint(chunks, arch, hf_config, target, parallel, dtype=settings.dtype)
        except Exception as exc:  # noqa: BLE001 - made collective below
            error = error or exc
        if engine is not None and incoming is not None:
            guarded(publisher.publish, incoming, version)
    collectives.raise_if_any_rank_failed(error, parallel.host_group, what="weight sync to SGLang",
                                         error_type=WeightSyncError)
