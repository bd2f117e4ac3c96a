"""The megatron flag snapshot the preflight reads (megatron_r3/train/megatron_flags.txt) is the installed parser's."""

import argparse

from megatron_r3.platform.python_compat import apply_python_compat
from megatron_r3.train.preflight import megatron_flag_dests, megatron_version


def test_snapshot_matches_the_installed_megatron_parser():
    apply_python_compat()
    from megatron.training.arguments import add_megatron_arguments

    parser = argparse.ArgumentParser(add_help=False)
    add_megatron_arguments(parser)
    snapshot = megatron_flag_dests()
    assert snapshot is not None, (f"megatron_flags.txt was taken from another megatron-core than {megatron_version()}"
                                  f"; rewrite it: python -m megatron_r3.train.preflight --write-megatron-flags")
    assert snapshot == {action.dest for action in parser._actions}
