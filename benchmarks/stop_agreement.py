"""What the per-step stop agreement costs: ``StopRequests.agree`` (pipeline/stopping.py), the
all-reduce MAX of one int32 and its read-back, which every rank makes at every step boundary.

    python benchmarks/stop_agreement.py [--processes 2] [--calls 2000] [--backend gloo|nccl]

Starts the processes itself (no launcher), joins them over the backend (gloo on CPU, nccl with
one GPU per process), and prints the median and the 99th percentile per call on rank 0. Compare
with a training step: the quickstart on 2 CPU processes takes about 270 ms per step (README,
"Scaling out"), a GPU step of the CIFAR-10 preset about 190 ms.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.stopping import StopRequests


class _Accelerator:
    def __init__(self, device: torch.device, processes: int) -> None:
        self.device, self.num_processes = device, processes


def _worker(rank: int, processes: int, calls: int, backend: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(backend, rank=rank, world_size=processes)
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    accelerator = _Accelerator(device, processes)
    for _ in range(50):  # warm-up: connections, allocations
        StopRequests.agree(accelerator, 0)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        StopRequests.agree(accelerator, 0)
        times.append(time.perf_counter() - start)
    if rank == 0:
        times.sort()
        print(f"{processes} processes, {backend}: median {statistics.median(times) * 1e6:.0f} us, "
              f"p99 {times[int(0.99 * len(times))] * 1e6:.0f} us per agreement ({calls} calls)")  # fmt: skip
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.set_num_threads(1)
    mp.spawn(_worker, args=(args.processes, args.calls, args.backend, port), nprocs=args.processes)


if __name__ == "__main__":
    main()
