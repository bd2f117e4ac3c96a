"""The SGLang engine's flags (``--sglang-*``, ``--weight-sync*``) as one dataclass, the only place their defaults are
written. :meth:`SGLangEngineConfig.client_config` and :meth:`SGLangEngineConfig.weight_sync_settings` turn them into
the settings of the HTTP client (:mod:`~megatron_r3.rollout.engines.sglang.http`) and of the weight sync
(:mod:`~megatron_r3.rollout.engines.sglang.weight_sync`). No torch at import: the command line is checked first."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional


@dataclass
class SGLangEngineConfig:
    """SGLang rollout engine: client, weight sync (--rollout-engine sglang; see megatron_r3/rollout/engines/sglang/)."""

    sglang_url: Optional[list[str]] = field(default=None, metadata={"argparse_meta": {"nargs": "*"}})
    """SGLang server URL(s)."""
    sglang_address_file: Optional[str] = None
    """File with one SGLang URL per line (written by tools/launch_sglang.py)."""
    weight_sync: Literal["distributed", "disk"] = "distributed"
    """How SGLang receives new weights."""
    sglang_max_concurrency: int = 64
    """Most /generate requests in flight over all SGLang servers."""
    sglang_request_size: int = 1
    """Samples per /generate request: 1 = one request per sample (default); N > 1 = SGLang's batch form with N samples; 0 = the whole step in one request."""
    sglang_request_timeout: float = 600.0
    """Read timeout (s) of a /generate request; a timeout is retried."""
    sglang_connect_timeout: float = 10.0
    """Connect timeout (s) of any call."""
    sglang_rollout_deadline: Optional[float] = None
    """Seconds one rollout (all its /generate requests) may take; default derived from the work: 300 s + samples x max new tokens / 100 tokens/s. Past it the run fails naming the servers still owing replies."""
    sglang_max_retries: int = 3
    """Retries of a request after a connection error, timeout, HTTP 5xx or abort (never 4xx)."""
    sglang_retry_backoff: float = 1.0
    """First retry delay (s); doubled per retry, at most 30 s."""
    sglang_startup_timeout: float = 300.0
    """How long to wait (s) for the address file and for every server's /health."""
    weight_sync_dir: Optional[str] = None
    """--weight-sync disk: directory on storage every SGLang server can read."""
    weight_sync_bucket_mb: float = 512
    """--weight-sync distributed: tensors per /update_weights_from_distributed call, in MiB."""
    weight_sync_backend: Literal["auto", "nccl", "gloo"] = "auto"
    """Backend of the trainer-rank-0 + servers weight update group (auto: nccl with CUDA)."""
    weight_sync_master_address: Optional[str] = None
    """Address of trainer rank 0 that the servers dial (default: the local address that routes to the first server)."""
    weight_sync_master_port: int = 0
    """Port of the weight update group's TCP store on trainer rank 0 (0: a free port)."""
    weight_sync_timeout: float = 600.0
    """Timeout (s) of the weight update group and of each weight update call."""
    weight_sync_load_format: Optional[str] = None
    """--weight-sync disk: SGLang load_format (default: the server's own)."""

    def check(self) -> None:
        """Parse-time checks (one-line ValueError naming the flag and the fix)."""
        if not (self.sglang_url or self.sglang_address_file):
            raise ValueError("--rollout-engine sglang needs --sglang-url URL [URL ...] or --sglang-address-file FILE")
        if self.weight_sync == "disk" and not self.weight_sync_dir:
            raise ValueError("--weight-sync disk needs --weight-sync-dir DIR (storage every SGLang server can read)")

    def client_config(self):
        """The HTTP client's settings (:class:`~megatron_r3.rollout.engines.sglang.http.SGLangClientConfig`)."""
        from megatron_r3.rollout.engines.sglang.http import SGLangClientConfig

        return SGLangClientConfig(
            max_concurrency=self.sglang_max_concurrency,
            request_size=self.sglang_request_size,
            request_timeout_s=self.sglang_request_timeout,
            connect_timeout_s=self.sglang_connect_timeout,
            max_retries=self.sglang_max_retries,
            retry_backoff_s=self.sglang_retry_backoff,
            startup_timeout_s=self.sglang_startup_timeout,
            rollout_deadline_s=self.sglang_rollout_deadline,  # None: derived from the work
        )

    def weight_sync_settings(self, dtype: str):
        """The weight sync's settings; ``dtype`` (the shared ``--rollout-dtype``) is what the tensors travel in."""
        from megatron_r3.rollout.engines.sglang.weight_sync import WeightSyncSettings

        return WeightSyncSettings(
            mode=self.weight_sync,
            dtype=dtype,
            bucket_bytes=int(self.weight_sync_bucket_mb * 1024**2),
            backend=self.weight_sync_backend,
            master_address=self.weight_sync_master_address,
            master_port=self.weight_sync_master_port,
            timeout_s=self.weight_sync_timeout,
            directory=self.weight_sync_dir,
            load_format=self.weight_sync_load_format,
        )
