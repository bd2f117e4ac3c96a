"""The CLI with a crash injected into the last pipeline stage's update pass (run by test_stage_crash.py).

    RANK=r WORLD_SIZE=2 MASTER_ADDR=... MASTER_PORT=... python tests/e2e/stage_crash.py [CLI flags]

The injection lives here, in the test: the trainer's `update_pass` is wrapped so that the last stage raises after
the first stage has started the pipeline (it is then blocked in a receive from the failed stage).
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))


def main() -> None:
    from megatron.core import parallel_state

    import pretrain_grpo
    from megatron_r3.train import trainer

    original = trainer.update_pass

    def update_pass(*args, **kwargs):
        if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
            raise RuntimeError("injected crash on the last pipeline stage")
        return original(*args, **kwargs)

    trainer.update_pass = update_pass
    pretrain_grpo.run_cli(sys.argv[1:])


if __name__ == "__main__":
    main()
