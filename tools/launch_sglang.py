"""Start SGLang servers for R3 rollouts on this node, wait until they are healthy, write the address file.

    python tools/launch_sglang.py --model-path /models/Qwen3-30B-A3B --gpus 8 --tp-size 4 \\
        --address-file /shared/run/sglang_addresses [--dry-run]
    python tools/launch_sglang.py --standin --model-path configs/models/qwen3_moe_tiny.json --num-servers 2 \\
        --address-file /tmp/addresses.txt          # the protocol stand-in (tests, laptops: no GPU, no SGLang)

Each server ``i`` gets GPUs ``i*tp .. (i+1)*tp - 1`` of this node (``CUDA_VISIBLE_DEVICES``) and port
``base_port + i`` and runs ``python -m sglang.launch_server`` with the flags R3 needs:

* ``--enable-return-routed-experts``: without it SGLang silently returns no routes;
* ``--enable-deterministic-inference`` by default (``--no-deterministic`` to drop it): SGLang 0.5.23 honours the
  per-sample ``sampling_seed`` the trainer sends *only* with it and otherwise ignores it silently;
* ``--dtype`` (bf16 by default; the trainer sends weights in ``--rollout-dtype``), ``--mem-fraction-static``,
  ``--random-seed``.

The radix (prefix) cache stays on unless ``--radix-cache off``: SGLang stores routes per KV slot, so a prefix-cache
hit returns the routes recorded when that cached KV was computed -- the routes that produced the KV the sample
attended to, the right ones for R3 (tests/sglang_contract shows it with SGLang's own capture code).

Refused extra flags (known to break routes in SGLang 0.5.23): ``--chunked-prefill-size -1`` (crashes on long prompts),
``--enable-eplb`` / ``--ep-num-redundant-experts`` (untested with route capture here; 0.5.23 captures logical ids
before the EPLB remap, so this is caution, not a known break),
``--disaggregation-mode`` (wrong prompt rows under prefill/decode disaggregation), ``--pp-size`` > 1 (no routes with
pipeline parallelism). Do not put sgl-router in front of the servers (it drops ``return_routed_experts``): the
trainer balances over the listed servers itself.

Address file: one ``http://HOST:PORT`` per line, written atomically once every server answers ``/health``. When
``--address-file`` names a directory (it exists, or ends with ``/``), the file is ``DIR/<hostname>.txt``, so that
every SGLang node of a multi-node job writes its own and the trainer reads the directory. The launcher then stays
in the foreground supervising its servers: when one exits, or on SIGTERM/SIGINT, it stops the others, removes its
address file and exits (the exit code of the first server to fail, else 0).
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

REFUSED = {
    "--enable-eplb": ("EPLB is untested with route capture here (0.5.23 captures logical ids before the "
                      "logical->physical remap, so this is caution, not a known break)"),
    "--disaggregation-mode": "prefill/decode disaggregation returns wrong prompt rows",
}


def refuse_bad_extra(extra: Sequence[str]) -> None:
    """Raise ValueError for extra SGLang flags known to break route replay."""
    items = list(extra)
    for index, item in enumerate(items):
        flag, _, inline = item.partition("=")
        value = inline or (items[index + 1] if index + 1 < len(items) else "")
        if flag in REFUSED:
            raise ValueError(f"refusing {flag}: {REFUSED[flag]}")
        if flag == "--chunked-prefill-size" and value.strip() == "-1":
            raise ValueError("refusing --chunked-prefill-size -1: routed-experts capture crashes on long prompts")
        if flag == "--ep-num-redundant-experts" and value.strip() not in ("", "0"):
            raise ValueError("refusing --ep-num-redundant-experts: untested with route capture here (0.5.23 captures "
                             "logical ids before the EPLB remap, so this is caution, not a known break)")
        if flag in ("--pp-size", "--pipeline-parallel-size") and value.strip() not in ("", "1"):
            raise ValueError(f"refusing {flag} {value}: SGLang returns no routed experts with pipeline parallelism")
        if flag == "--enable-return-routed-experts":
            raise ValueError("--enable-return-routed-experts is always passed; do not repeat it")


def visible_gpus(count: Optional[int]) -> list[str]:
    """This node's GPU ids: CUDA_VISIBLE_DEVICES if set, else 0..count-1 (count from --gpus or nvidia-smi)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env:
        ids = [g.strip() for g in env.split(",") if g.strip()]
        return ids[:count] if count else ids
    if count is None:
        try:
            out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
            count = sum(1 for line in out.splitlines() if line.startswith("GPU "))
        except (OSError, subprocess.SubprocessError):
            count = 0
    return [str(i) for i in range(count)]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def server_command(opts, port: int) -> list[str]:
    if opts.standin:
        cmd = [sys.executable, "-m", "tests.sglang_standin", "--model-path", opts.model_path, "--host", opts.host,
               "--port", str(port), "--dtype", opts.dtype, "--random-seed", str(opts.random_seed),
               "--enable-return-routed-experts"]
        if opts.max_running_requests:
            cmd += ["--max-running-requests", str(opts.max_running_requests)]
        return cmd + list(opts.extra)
    cmd = [opts.python, "-m", "sglang.launch_server", "--model-path", opts.model_path, "--host", opts.host,
           "--port", str(port), "--tp-size", str(opts.tp_size), "--dtype", opts.dtype,
           "--mem-fraction-static", str(opts.mem_fraction_static), "--random-seed", str(opts.random_seed),
           "--enable-return-routed-experts"]
    if opts.radix_cache == "off":
        cmd.append("--disable-radix-cache")
    if opts.trust_remote_code:
        cmd.append("--trust-remote-code")
    if opts.deterministic:
        cmd.append("--enable-deterministic-inference")
    if opts.max_running_requests:
        cmd += ["--max-running-requests", str(opts.max_running_requests)]
    return cmd + list(opts.extra)


def plan(opts) -> list[dict]:
    """One entry per server: command, environment overrides, port, advertised URL."""
    if opts.standin:
        count = opts.num_servers or 1
        groups = [[] for _ in range(count)]
    else:
        gpus = visible_gpus(opts.gpus)
        if not gpus:
            raise ValueError("no GPUs visible: set --gpus N (or CUDA_VISIBLE_DEVICES), or use --standin")
        if len(gpus) % opts.tp_size:
            raise ValueError(f"{len(gpus)} GPUs do not split into servers of --tp-size {opts.tp_size}")
        count = opts.num_servers or len(gpus) // opts.tp_size
        if count * opts.tp_size > len(gpus):
            raise ValueError(f"{count} servers x TP {opts.tp_size} need {count * opts.tp_size} GPUs, "
                             f"{len(gpus)} visible")
        groups = [gpus[i * opts.tp_size : (i + 1) * opts.tp_size] for i in range(count)]
    servers = []
    for index, group in enumerate(groups):
        port = opts.base_port + index if opts.base_port else free_port()
        env = {"CUDA_VISIBLE_DEVICES": ",".join(group)} if group else {}
        servers.append({"index": index, "port": port, "env": env, "cmd": server_command(opts, port),
                        "url": f"http://{opts.advertise_host}:{port}", "local": f"http://127.0.0.1:{port}"})
    return servers


def address_path(address_file: str) -> str:
    if address_file.endswith(os.sep) or os.path.isdir(address_file):
        return os.path.join(address_file, f"{socket.gethostname()}.txt")
    return address_file


def write_addresses(path: str, urls: Sequence[str]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    temp = f"{path}.tmp-{os.getpid()}"
    with open(temp, "w") as handle:
        handle.write("".join(url + "\n" for url in urls))
    os.replace(temp, path)  # readers never see a partial file


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=5) as reply:
            return reply.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def run(opts) -> int:
    refuse_bad_extra(opts.extra)
    servers = plan(opts)
    path = address_path(opts.address_file) if opts.address_file else None
    if opts.dry_run:
        for server in servers:
            env = " ".join(f"{k}={v}" for k, v in server["env"].items())
            print(f"[server {server['index']}] {env + ' ' if env else ''}{shlex.join(server['cmd'])}")
        print(f"address file {path or '(none)'}:")
        for server in servers:
            print(f"  {server['url']}")
        return 0
    procs: list[subprocess.Popen] = []
    stopping = {"signal": None}

    def stop(signum, _frame):
        stopping["signal"] = signum

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    env_base = dict(os.environ)
    if opts.standin:
        env_base["PYTHONPATH"] = REPO + os.pathsep + env_base.get("PYTHONPATH", "")
        env_base.setdefault("OMP_NUM_THREADS", "1")
    log_dir = opts.log_dir
    if log_dir:
        os.makedirs(log_dir, exist_ok=True)
    code = 0
    try:
        for server in servers:
            out = None
            if log_dir:
                out = open(os.path.join(log_dir, f"sglang-{socket.gethostname()}-{server['port']}.log"), "w")
            procs.append(subprocess.Popen(server["cmd"], env={**env_base, **server["env"]}, cwd=REPO, stdout=out,
                                          stderr=subprocess.STDOUT if out else None))
            print(f"launch_sglang: started server {server['index']} (pid {procs[-1].pid}) on port {server['port']}",
                  flush=True)
        deadline = time.monotonic() + opts.wait_timeout
        pending = set(range(len(servers)))
        while pending:
            for index in list(pending):
                if procs[index].poll() is not None:
                    print(f"launch_sglang: server {index} exited with {procs[index].returncode} before it was "
                          "healthy", file=sys.stderr, flush=True)
                    return procs[index].returncode or 1
                if healthy(servers[index]["local"]):
                    pending.discard(index)
            if stopping["signal"] is not None:
                return 0
            if pending and time.monotonic() > deadline:
                print(f"launch_sglang: servers {sorted(pending)} not healthy after {opts.wait_timeout:g} s",
                      file=sys.stderr, flush=True)
                return 1
            if pending:
                time.sleep(1.0)
        if path:
            write_addresses(path, [server["url"] for server in servers])
        print(f"launch_sglang: {len(servers)} server(s) healthy: {', '.join(s['url'] for s in servers)}"
              + (f"; addresses in {path}" if path else ""), flush=True)
        while stopping["signal"] is None:
            for index, proc in enumerate(procs):
                if proc.poll() is not None:
                    print(f"launch_sglang: server {index} exited with {proc.returncode}", file=sys.stderr, flush=True)
                    code = proc.returncode or 1
                    stopping["signal"] = "exit"
                    break
            time.sleep(0.5)
        return code
    finally:
        if path and os.path.exists(path):
            os.remove(path)
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", required=True, help="HF checkpoint directory (stand-in: also a config.json)")
    parser.add_argument("--tp-size", type=int, default=1, help="GPUs per server")
    parser.add_argument("--gpus", type=int, default=None,
                        help="GPUs of this node to use (default: CUDA_VISIBLE_DEVICES or every GPU)")
    parser.add_argument("--num-servers", type=int, default=None, help="default: GPUs / TP (stand-in: 1)")
    parser.add_argument("--host", default="0.0.0.0", help="address the servers bind")
    parser.add_argument("--advertise-host", default=None,
                        help="host name written into the address file (default: this host's name; 127.0.0.1 "
                             "for --standin)")
    parser.add_argument("--base-port", type=int, default=30000, help="port of server 0 (0: free ports)")
    parser.add_argument("--address-file", default=None, help="file, or directory for <hostname>.txt")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--mem-fraction-static", type=float, default=0.8)
    parser.add_argument("--random-seed", type=int, default=1234)
    parser.add_argument("--max-running-requests", type=int, default=None)
    parser.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=True,
                        help="--enable-deterministic-inference (default on: SGLang ignores sampling_seed without it)")
    parser.add_argument("--radix-cache", choices=("on", "off"), default="on",
                        help="off: --disable-radix-cache (not needed for correct routes; costs prefix reuse)")
    parser.add_argument("--trust-remote-code", action="store_true")
    parser.add_argument("--python", default=sys.executable, help="interpreter with SGLang installed")
    parser.add_argument("--wait-timeout", type=float, default=1800.0, help="seconds to wait for /health")
    parser.add_argument("--log-dir", default=None, help="one log file per server (default: inherit stdout)")
    parser.add_argument("--standin", action="store_true",
                        help="start the protocol stand-in (tests/sglang_standin) instead of SGLang")
    parser.add_argument("--dry-run", action="store_true", help="print the commands and addresses, start nothing")
    parser.add_argument("extra", nargs=argparse.REMAINDER,
                        help="after '--': extra flags for every server (SGLang's, or the stand-in's --fault ...)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    opts = build_parser().parse_args(argv)
    opts.extra = [item for item in opts.extra if item != "--"] if opts.extra and opts.extra[0] == "--" \
        else list(opts.extra or [])
    if opts.tp_size < 1:
        raise SystemExit("--tp-size must be >= 1")
    if opts.standin:
        if opts.tp_size != 1:
            raise SystemExit("--standin serves with --tp-size 1")
        if opts.host == "0.0.0.0":
            opts.host = "127.0.0.1"
    if opts.advertise_host is None:
        opts.advertise_host = "127.0.0.1" if opts.host in ("127.0.0.1", "localhost") else socket.gethostname()
    try:
        return run(opts)
    except ValueError as error:
        print(f"launch_sglang: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
