"""pretrain_grpo.py with a planted layout bug, for a one-off check that the layout test catches a real one.

    LAYOUT_TEST_SCRIPT=tests/e2e/planted_layout_bug.py .venv/bin/python -m pytest -q \\
        "tests/e2e/test_grpo_cli.py::test_layouts_reproduce_single_process_metrics[tp2pp2-R3-flags0]"

The bug: megatron's `finalize_model_grads` skips `_allreduce_non_tensor_model_parallel_grads`, the all-reduce over
the tensor-parallel group of the gradients of parameters that sequence parallelism replicates (layer norms, q/k norms,
routers): each TP rank then keeps the gradient of its half of the sequence only. This is the kind of error a
missing or wrong reduction in a layout produces; nothing here is used by CI or by the trainer.

Recorded 2026-12-01 (2-core AMD EPYC, the command above, fp32 rollout engine as in the test): the test fails at
step 0,
    AssertionError: (('tp2pp2', 'R3'), 0, 'train/ppo_kl', 0.6180388554930687, 0.6134954020380974)
Deviation from the one-process run in units of the test's tolerance (1e-3 * |want| + 1e-6):
    step 0: ppo_kl 7.4x, grad_norm 11.7x (the rollout and the first update's forward come before the first wrong
            gradient)
    step 1: loss 164x, ppo_kl 164x, grad_norm 232x, r3/rollout_train_logp_abs_diff 35568x, k3 1139x, entropy 20.5x,
            replay/routing_agreement 25x
Without the planted bug the same test (and the other layouts and THD) used at most 14% of the tolerance.
"""

import os
import runpy
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

import megatron.core.distributed  # noqa: E402,F401  (the package's `finalize_model_grads` is the function)

finalize = sys.modules["megatron.core.distributed.finalize_model_grads"]
assert callable(finalize._allreduce_non_tensor_model_parallel_grads)
finalize._allreduce_non_tensor_model_parallel_grads = lambda *args, **kwargs: None
sys.argv[0] = os.path.join(REPO, "pretrain_grpo.py")
runpy.run_path(sys.argv[0], run_name="__main__")
