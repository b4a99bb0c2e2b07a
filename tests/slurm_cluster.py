"""A real Slurm on this one host for the tests: munged, slurmctld and two slurmd, from Debian's
slurm-wlm and munge (`make test` installs them when run as root).

Two nodes, n1 and n2, share the host: each slurmd is started for its own node name (``-N``) and
listens on its own port, both at 127.0.0.1. A job of ``--nodes=2`` then gets two nodes, SLURM_NODEID
0 and 1 and a two-name SLURM_JOB_NODELIST, as on a real cluster. Everything (config, munge key and
socket, state, spool, logs) lives in one temporary directory, every port is a free one, and the
daemons run in the foreground as this process's children, so that stopping them leaves nothing.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import free_port

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "scontrol", "sinfo", "squeue", "scancel", "srun")
NODES = ("n1", "n2")
# GPUs as far as Slurm can tell: per node, character devices named nvidia0, nvidia1 (copies of
# /dev/null; Slurm wants a device file for a GPU). A job's --gres=gpu:N then sets
# SLURM_GPUS_ON_NODE as on a GPU cluster, which slurm/launch.sh reads. Nothing opens them.
GPUS = 2


def missing_binaries() -> list[str]:
    search = f"{os.environ.get('PATH', '')}{os.pathsep}/usr/sbin{os.pathsep}/sbin"
    return [name for name in DAEMONS + CLIENTS if shutil.which(name, path=search) is None]


class SlurmCluster:
    """``with SlurmCluster() as cluster:`` a running two-node Slurm; ``cluster.env`` points its
    commands (and the jobs' own srun and scontrol) at it through SLURM_CONF."""

    def __init__(self) -> None:
        # In /tmp, not pytest's deeper temporary directories: munge's socket path must fit the
        # 108 bytes of a Unix socket address.
        self.dir = Path(tempfile.mkdtemp(prefix="slurm-"))
        self.dir.chmod(0o755)  # munged wants its socket's directory open to all (the key stays 0400)
        self.conf = self.dir / "slurm.conf"
        self.env = os.environ | {"SLURM_CONF": str(self.conf)}
        self.processes: list[subprocess.Popen] = []
        self._search = f"{os.environ.get('PATH', '')}{os.pathsep}/usr/sbin{os.pathsep}/sbin"

    def _which(self, name: str) -> str:
        return shutil.which(name, path=self._search)

    def write_config(self) -> None:
        for sub in ("state", "log", *(f"spool/{node}" for node in NODES)):
            (self.dir / sub).mkdir(parents=True)
        key = self.dir / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)  # munged refuses a key others can read
        ports = {"ctld": free_port(), **{node: free_port() for node in NODES}}
        nodes = "\n".join(
            f"NodeName={node} NodeHostname={socket.gethostname()} NodeAddr=127.0.0.1 Port={ports[node]} "
            f"CPUs={os.cpu_count()} Gres=gpu:{GPUS} State=UNKNOWN"
            for node in NODES
        )
        for index in range(GPUS):
            os.mknod(self.dir / f"nvidia{index}", 0o666 | stat.S_IFCHR, os.makedev(1, 3))  # /dev/null's numbers
        devices = f"{self.dir}/nvidia[0-{GPUS - 1}]"
        # gres.conf is read from slurm.conf's directory.
        (self.dir / "gres.conf").write_text(f"AutoDetect=off\nNodeName={','.join(NODES)} Name=gpu File={devices}\n")
        self.conf.write_text(f"""\
ClusterName=tests
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ports['ctld']}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s).
AuthInfo=socket={self.dir / 'munge.socket'},cred_expire=10
StateSaveLocation={self.dir / 'state'}
SlurmdSpoolDir={self.dir / 'spool'}/%n
SlurmctldPidFile={self.dir / 'slurmctld.pid'}
SlurmdPidFile={self.dir / 'slurmd'}.%n.pid
SlurmctldLogFile={self.dir / 'log' / 'slurmctld.log'}
SlurmdLogFile={self.dir / 'log'}/slurmd.%n.log
# Process tracking by parentage and no CPU binding: no cgroups needed, any container will do.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
GresTypes=gpu
# Finished jobs stay visible to scontrol for 10 minutes; a cancelled job's processes get 5 s.
MinJobAge=600
KillWait=5
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
{nodes}
PartitionName=tests Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")

    def _start(self, *command: str) -> None:
        with open(self.dir / "log" / f"{Path(command[0]).name}-{len(self.processes)}.out", "wb") as log:
            self.processes.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self.env))

    def start(self) -> None:
        self.write_config()
        self._start(self._which("munged"), "--foreground", f"--key-file={self.dir / 'munge.key'}",
                    f"--socket={self.dir / 'munge.socket'}", f"--pid-file={self.dir / 'munged.pid'}",
                    f"--seed-file={self.dir / 'munged.seed'}",
                    f"--log-file={self.dir / 'log' / 'munged.log'}")  # fmt: skip
        self._wait(lambda: (self.dir / "munge.socket").exists(), "munged's socket")
        self._start(self._which("slurmctld"), "-D", "-f", str(self.conf))
        for node in NODES:
            self._start(self._which("slurmd"), "-D", "-f", str(self.conf), "-N", node)
        idle = [word for node in NODES for word in (node, "idle")]
        self._wait(lambda: self.run("sinfo", "-N", "-h", "-o", "%N %t", check=False).stdout.split() == idle,
                   "both nodes idle in sinfo")  # fmt: skip

    def _wait(self, ready, what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                return
            dead = [p.args[0] for p in self.processes if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{dead} exited while waiting for {what}\n{self.logs()}")
            time.sleep(0.2)
        raise RuntimeError(f"timed out waiting for {what}\n{self.logs()}")

    def run(self, *command: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run([self._which(command[0]), *command[1:]], capture_output=True, text=True, env=self.env,
                              check=check, timeout=60, **kwargs)  # fmt: skip

    def submit(self, *arguments: str, env: dict | None = None, cwd: Path | None = None) -> str:
        """``sbatch --parsable ...``: the job id."""
        result = subprocess.run([self._which("sbatch"), "--parsable", *arguments], capture_output=True, text=True,
                                env=self.env | (env or {}), cwd=cwd, timeout=60, check=False)  # fmt: skip
        assert result.returncode == 0, f"sbatch failed: {result.stderr}"
        return result.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job``'s fields (JobState, Restarts, ExitCode, ...)."""
        text = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def wait(self, job_id: str, timeout: float = 300) -> dict[str, str]:
        """Until the job has ended for good (a requeued job goes back to PENDING, then runs again)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            fields = self.job(job_id)
            if fields["JobState"] not in ("PENDING", "RUNNING", "COMPLETING", "CONFIGURING", "REQUEUED",
                                          "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING", "SUSPENDED"):  # fmt: skip
                return fields
            time.sleep(0.5)
        self.run("scancel", job_id, check=False)
        raise AssertionError(f"job {job_id} still {self.job(job_id)['JobState']} after {timeout} s\n{self.logs()}")

    def logs(self, lines: int = 30) -> str:
        parts = []
        for path in sorted((self.dir / "log").glob("*")):
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {path.name}\n" + "\n".join(tail))
        return "\n".join(parts)

    def stop(self) -> None:
        # Jobs first, so that no slurmstepd (which slurmd starts detached) outlives its slurmd.
        if self.conf.exists() and all(p.poll() is None for p in self.processes):
            self.run("scancel", "--partition=tests", check=False)
            try:
                self._wait(lambda: not self.run("squeue", "-h", check=False).stdout.strip(), "no jobs left", timeout=60)
            except RuntimeError:
                pass
        for process in reversed(self.processes):  # slurmd, slurmctld, then munged
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> SlurmCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


@pytest.fixture(scope="session", name="slurm_cluster")
def slurm_cluster_fixture():
    missing = missing_binaries()
    if missing:
        pytest.skip(f"Slurm is not installed (no {', '.join(missing)}): `make test` installs Debian's slurm-wlm "
                    "and munge when run as root; elsewhere, apt-get install slurm-wlm munge")  # fmt: skip
    if os.geteuid() != 0:
        pytest.skip("a Slurm of one's own needs root here: slurmd starts jobs as their user (run the tests as root)")
    with SlurmCluster() as cluster:
        yield cluster
