"""MLflow's system metrics (CPU, memory, disk, network; NVIDIA or AMD GPUs when their libraries
are installed), sampled by MLflow's own monitors but logged through our tracker.

MLflow's ``log_system_metrics`` thread logs straight to the server and ends for good at the
first failed request, so an outage would stop the system metrics for the rest of the run. Here
the samples go into the tracker's spool like every other metric (names ``system/...``, as
MLflow's; the step is the sample's number, continued on resume).
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

log = logging.getLogger(__name__)

PREFIX = "system/"


def _monitors() -> list:
    from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
    from mlflow.system_metrics.metrics.disk_monitor import DiskMonitor
    from mlflow.system_metrics.metrics.network_monitor import NetworkMonitor

    monitors = [CPUMonitor(), DiskMonitor(), NetworkMonitor()]
    try:  # NVIDIA, through pynvml (nvidia-ml-py)
        from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor

        monitors.append(GPUMonitor())
    except Exception:
        try:  # AMD, through pyrsmi
            from mlflow.system_metrics.metrics.rocm_monitor import ROCMMonitor

            monitors.append(ROCMMonitor())
        except Exception:
            log.info("no GPU system metrics (they need nvidia-ml-py for NVIDIA GPUs, pyrsmi for AMD ones)")
    return monitors


class SystemMetricsSampler:
    """A daemon thread: every ``interval`` seconds, one sample to ``log(metrics, step)``. Any
    failure ends the sampling with a warning, never the training."""

    def __init__(self, log_metrics: Callable[[dict[str, float], int], None], interval: float, first_step: int) -> None:
        self.log_metrics, self.interval, self.step = log_metrics, interval, first_step
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        try:
            monitors = _monitors()
        except Exception as exn:  # psutil missing, or a monitor failing to start
            log.warning("no system metrics: %r (they need psutil)", exn)
            return
        self._thread = threading.Thread(target=self._run, args=(monitors,), name="system-metrics", daemon=True)
        self._thread.start()

    def _run(self, monitors: list) -> None:
        try:
            for monitor in monitors:
                monitor.collect_metrics()  # primes psutil's CPU counters: the first reading is from here
                monitor.clear_metrics()
            while not self._stop.wait(self.interval):
                metrics = {}
                for monitor in monitors:
                    monitor.collect_metrics()
                    metrics.update(monitor.aggregate_metrics())
                    monitor.clear_metrics()
                self.log_metrics({PREFIX + k: v for k, v in metrics.items()}, self.step)
                self.step += 1
        except Exception as exn:
            log.warning("system metrics stopped: %r", exn)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
