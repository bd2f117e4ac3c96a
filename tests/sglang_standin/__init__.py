"""A stand-in SGLang server for tests: SGLang's HTTP protocol served by the embedded HF engine (see server.py)."""

from tests.sglang_standin.server import Faults, StandinConfig, StandinServer, start_in_thread, start_subprocess

__all__ = ["Faults", "StandinConfig", "StandinServer", "start_in_thread", "start_subprocess"]
