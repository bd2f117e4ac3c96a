"""Fixtures shared by the unit tests."""

import pytest


@pytest.fixture(scope="module")
def world_of_one():
    """A world of one with megatron's parallel state (model builders and specs ask for ranks), torn down afterwards
    if this module created it: other unit tests check behaviour without a process group."""
    import torch.distributed as dist

    from megatron_r3.platform.distributed import ParallelSizes, destroy, initialize_model_parallel

    created = not dist.is_initialized()
    initialize_model_parallel(ParallelSizes())
    yield
    if created:
        destroy()
