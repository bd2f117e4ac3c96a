"""Fixtures shared by the unit tests."""

import pytest


@pytest.fixture(scope="module")
def world_of_one():
    """A world of one with megatron's parallel state (model builders and specs ask for ranks), torn down afterwards
    if this module created it: other unit tests check behaviour without a process group. Yields this rank's
    `ParallelContext`."""
    import torch.distributed as dist

    from megatron_r3.platform.distributed import destroy, initialize_model_parallel
    from megatron_r3.platform.parallel_context import ParallelSizes

    created = not dist.is_initialized()
    yield initialize_model_parallel(ParallelSizes())
    if created:
        destroy()
