"""``accelerate launch`` that passes on the trainers' exit code: ``python slurm/accelerate_launch.py
--config_file ... pipeline/train.py ...`` takes exactly ``accelerate launch``'s arguments.

A launch of more than one process goes through torchrun, which reports any process that exits
non-zero as ``ChildFailedError``: ``accelerate launch`` then exits 1, whatever the code was. A
trainer that stopped on a signal or a time limit exits 75 after its checkpoint (resumable), and
slurm/train.sbatch must tell that from a bug. torchrun also lists the processes it stopped itself
(SIGTERM) once one had exited, so the processes killed by a signal are left out: when those that
exited by themselves did so with one and the same code, this exits with that code, otherwise 1.
One process (no torchrun) raises ``CalledProcessError`` with the trainer's code: that code too.
"""

from __future__ import annotations

import subprocess
import sys


def main(argv: list[str] | None = None) -> int:
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = launch_command_parser().parse_args(argv)
    try:
        launch_command(args)
    except subprocess.CalledProcessError as err:
        return err.returncode if err.returncode > 0 else 128 - err.returncode  # killed: 128 + signal, as a shell says
    except ChildFailedError as err:
        print(err, file=sys.stderr)  # torchrun's table: which rank exited with what, where
        # A negative code is a signal (-15: SIGTERM from torchrun when another process ended first).
        codes = {failure.exitcode for failure in err.failures.values() if failure.exitcode > 0}
        return codes.pop() if len(codes) == 1 else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
