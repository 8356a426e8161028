"""A real one-node SLURM cluster for the tests: the session-scoped pytest fixture ``slurm_cluster``.

The fixture starts, as root, its own ``munged`` (private key and socket), ``slurmctld`` and ``slurmd``
from a ``slurm.conf`` written into a fresh temporary directory (state, spool, logs and pid files all
live there; the ports are picked free at run time), waits until the node is ``idle``, points
``SLURM_CONF`` at that file for the session (so ``sbatch``, ``srun`` and submitit find the cluster),
and at teardown cancels the jobs left on that cluster and stops exactly the daemons it started, by
the pids in their pid files.

It skips, with the reason, when the SLURM/munge binaries are missing (install them with
``.ci/install_slurm.sh``) or when not running as root.

Nothing here touches a system-wide SLURM or munge: a second test session on the same machine gets
its own directory, ports, munge socket and daemons.
"""

from __future__ import annotations

import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import pytest

INSTALL_HINT = (
    "run .ci/install_slurm.sh as root "
    "(it does: apt-get install -y slurmctld slurmd munge slurm-client)"
)
# Binaries the fixture (and submitit) needs; the daemons live in /usr/sbin, which a PATH may lack.
DAEMON_BINARIES = ("slurmctld", "slurmd", "munged")
CLIENT_BINARIES = ("sbatch", "srun", "sinfo", "squeue", "scancel", "scontrol", "munge", "unmunge")
_SBIN_DIRS = ("/usr/local/sbin", "/usr/sbin", "/sbin")

START_TIMEOUT_S = 60.0  # until the node shows `idle`
STOP_TIMEOUT_S = 30.0  # for leftover jobs to go, then for each daemon to exit

# Environment variables a surrounding SLURM allocation or a user's shell may carry and that would
# steer the clients away from this cluster (SBATCH_PARTITION=gpu, SLURM_JOB_ID=...). They are
# removed for the session and restored afterwards; SLURM_CONF is set to this cluster's file.
_SCRUB_PREFIXES = ("SLURM_", "SBATCH_", "SRUN_", "SALLOC_", "SQUEUE_", "SINFO_", "SCONTROL_")


def find_binary(name: str) -> str | None:
    """Path of a SLURM/munge binary on PATH or in the sbin directories, else None."""
    return shutil.which(name) or shutil.which(name, path=os.pathsep.join(_SBIN_DIRS))


def missing_requirements() -> str | None:
    """Why the cluster cannot start here (a skip reason), or None when it can."""
    missing = [b for b in DAEMON_BINARIES + CLIENT_BINARIES if find_binary(b) is None]
    if missing:
        return f"SLURM not installed: missing {', '.join(missing)}; {INSTALL_HINT}"
    if os.geteuid() != 0:
        return "the one-node SLURM cluster needs root (slurmd runs jobs as root; SlurmUser=root)"
    try:
        pwd.getpwnam("munge")
    except KeyError:
        return f"no 'munge' user (munged runs as it); {INSTALL_HINT}"
    return None


def free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports free right now (bound to port 0 together, then released)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        return f"<{path}: {e.strerror}>"
    return "\n".join(text.splitlines()[-lines:])


def _memory_mib() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    raise RuntimeError("no MemTotal in /proc/meminfo")


def _pid_alive(pid: int) -> bool:
    """True while `pid` runs (a zombie counts as gone: nobody may reap a daemonized process)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


class SlurmCluster:
    """A one-node SLURM cluster of this machine, its files all under `root`.

    Attributes: ``root`` (its directory), ``conf_path`` (its slurm.conf), ``env`` (an environment
    dict with ``SLURM_CONF`` set, for subprocesses), ``partition``, ``hostname`` (the node's name),
    ``cpus`` and ``memory_mb`` (what the node offers to jobs), ``ctld_port``, ``slurmd_port``.
    """

    def __init__(self, root: Path, partition: str = "debug") -> None:
        self.root = Path(root)
        self.partition = partition
        self.hostname = socket.gethostname().split(".")[0]
        self.cpus = max(2, min(os.cpu_count() or 1, len(os.sched_getaffinity(0))))
        self.memory_mb = max(1024, int(_memory_mib() * 0.9))
        self.conf_path = self.root / "slurm.conf"
        self.state_dir = self.root / "state"
        self.spool_dir = self.root / "spool"
        self.log_dir = self.root / "log"
        self.ctld_log = self.log_dir / "slurmctld.log"
        self.slurmd_log = self.log_dir / "slurmd.log"
        self.ctld_pid_file = self.root / "slurmctld.pid"
        self.slurmd_pid_file = self.root / "slurmd.pid"
        # munged insists that every directory up to its socket is searchable by all, and pytest's
        # base temp directory is root-only (0700): its files go in a short-named /tmp directory.
        self.munge_dir: Path | None = None
        self.munge_socket: Path | None = None
        self.munge_log: Path | None = None
        self.ctld_port = 0
        self.slurmd_port = 0
        self.env: dict[str, str] = {}
        self._bins = {b: find_binary(b) or b for b in DAEMON_BINARIES + CLIENT_BINARIES}
        # daemon name -> (pid, string that must be in its command line), for those WE started
        self._started: dict[str, tuple[int, str]] = {}
        self._saved_environ: dict[str, str] | None = None

    # ----------------------------------------------------------------------------------- helpers
    def run(
        self,
        cmd: str | Sequence[str],
        *,
        check: bool = True,
        timeout: float = 60.0,
        env: Mapping[str, str] | None = None,
        **kwargs,
    ) -> subprocess.CompletedProcess:
        """Runs a command against this cluster (``SLURM_CONF`` set), text output captured.

        `cmd` is an argument list or a string split like a shell would (no shell features). With
        `check`, a non-zero exit raises RuntimeError carrying the output and the daemon log tails.
        """
        args = shlex.split(cmd) if isinstance(cmd, str) else [str(a) for a in cmd]
        full_env = dict(self.env or os.environ)
        if env:
            full_env.update(env)
        proc = subprocess.run(
            args, env=full_env, capture_output=True, text=True, timeout=timeout, **kwargs
        )
        if check and proc.returncode != 0:
            raise RuntimeError(
                f"{shlex.join(args)} exited {proc.returncode}\n"
                f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}\n{self.log_tail()}"
            )
        return proc

    def log_tail(self, lines: int = 40) -> str:
        """The last `lines` lines of each daemon's log, for failure messages."""
        parts = [f"--- slurm cluster in {self.root} (SLURM_CONF={self.conf_path}) ---"]
        logs = [self.ctld_log, self.slurmd_log] + ([self.munge_log] if self.munge_log else [])
        for log in logs:
            parts.append(f"--- tail of {log} ---\n{_tail(log, lines)}")
        return "\n".join(parts)

    def node_state(self) -> str:
        """The node's state as sinfo prints it (``idle``, ``mixed``, ``allocated``, ``down*``...)."""
        proc = self.run(["sinfo", "-h", "-N", "-n", self.hostname, "-o", "%T"], check=False, timeout=20)
        return proc.stdout.strip() if proc.returncode == 0 else f"<sinfo failed: {proc.stderr.strip()}>"

    def job_ids(self) -> list[str]:
        """Ids of the jobs this cluster still knows as pending or running."""
        proc = self.run(["squeue", "-h", "-o", "%i"], check=False, timeout=20)
        return proc.stdout.split() if proc.returncode == 0 else []

    def job_info(self, job_id: str | int) -> str:
        """``scontrol show job`` for a job (state, reason, restarts), or why it is not available."""
        proc = self.run(["scontrol", "show", "job", str(job_id)], check=False, timeout=20)
        return (proc.stdout or proc.stderr).strip()

    # ----------------------------------------------------------------------------------- start
    def _write_conf(self) -> None:
        host = self.hostname
        lines = [
            "# one-node cluster written by tests/slurm_cluster.py",
            "ClusterName=rcka-test",
            # The node and controller are reached on the loopback address, whatever DNS says.
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={self.ctld_port}",
            f"SlurmdPort={self.slurmd_port}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # cred_expire: a requeued job is eligible again cred_expire + 1 s after the requeue
            # (default 120 s); 10 s keeps preemption tests quick.
            f"AuthInfo=socket={self.munge_socket},cred_expire=10",
            "SlurmUser=root",
            "SlurmdUser=root",
            f"StateSaveLocation={self.state_dir}",
            f"SlurmdSpoolDir={self.spool_dir}",
            f"SlurmctldLogFile={self.ctld_log}",
            f"SlurmdLogFile={self.slurmd_log}",
            f"SlurmctldPidFile={self.ctld_pid_file}",
            f"SlurmdPidFile={self.slurmd_pid_file}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            # No cgroups: plain process tracking, no task binding, no accounting database.
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "SwitchType=switch/none",
            "MpiDefault=none",
            # CPUs (not cores) are the unit, so a 2-task job fits on 2 CPUs whatever the topology;
            # memory is not a consumable resource (jobs may still ask --mem up to RealMemory).
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            # Use the node as configured even where slurmd detects less (1-CPU CI machines).
            "SlurmdParameters=config_overrides",
            # Start jobs as soon as they are submitted or eligible again (defaults: up to 3 s
            # after submission, and a pending job may wait for the 60 s main scheduling loop).
            "SchedulerParameters=batch_sched_delay=0,sched_interval=1",
            "ReturnToService=2",
            "JobRequeue=1",
            "KillWait=5",
            "InactiveLimit=0",
            "MinJobAge=300",
            "MailProg=/bin/true",
            f"NodeName={host} NodeAddr=127.0.0.1 NodeHostname={host} CPUs={self.cpus} "
            f"RealMemory={self.memory_mb} State=UNKNOWN",
            f"PartitionName={self.partition} Nodes={host} Default=YES MaxTime=INFINITE State=UP",
        ]
        self.conf_path.write_text("\n".join(lines) + "\n")

    def _start_munged(self) -> None:
        munge_user = pwd.getpwnam("munge")
        self.munge_dir = Path(tempfile.mkdtemp(prefix="rcka-munge-", dir="/tmp"))
        os.chmod(self.munge_dir, 0o755)  # munged: the socket's directory must be searchable by all
        os.chown(self.munge_dir, munge_user.pw_uid, munge_user.pw_gid)
        key = self.munge_dir / "munge.key"
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(1024))
        os.chown(key, munge_user.pw_uid, munge_user.pw_gid)
        self.munge_socket = self.munge_dir / "munge.socket"
        self.munge_log = self.munge_dir / "munged.log"
        pid_file = self.munge_dir / "munged.pid"
        cmd = [
            self._bins["munged"],
            f"--socket={self.munge_socket}",
            f"--key-file={key}",
            f"--pid-file={pid_file}",
            f"--log-file={self.munge_log}",
            f"--seed-file={self.munge_dir / 'munged.seed'}",
        ]
        # munged refuses to run as root: it runs as the munge user, like the packaged service.
        self._spawn_daemon(
            "munged", cmd, pid_file, marker=str(self.munge_socket),
            user=munge_user.pw_uid, group=munge_user.pw_gid, extra_groups=[],
        )
        # A credential round trip through the private socket proves munged works.
        enc = subprocess.run(
            [self._bins["munge"], "-n", "-S", str(self.munge_socket)],
            capture_output=True, timeout=20,
        )
        dec = subprocess.run(
            [self._bins["unmunge"], "-S", str(self.munge_socket)],
            input=enc.stdout, capture_output=True, timeout=20,
        )
        if enc.returncode != 0 or dec.returncode != 0:
            raise RuntimeError(
                f"munge round trip failed: {enc.stderr.decode()} {dec.stderr.decode()}\n{self.log_tail()}"
            )

    def _spawn_daemon(
        self, name: str, cmd: list[str], pid_file: Path, marker: str, **popen_kwargs
    ) -> None:
        """Starts a self-daemonizing program and records the pid it writes to `pid_file`."""
        out_file = self.log_dir / f"{name}.start.out"
        with open(out_file, "wb") as out:
            proc = subprocess.run(
                cmd, env=self.env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, timeout=60, **popen_kwargs,
            )
        if proc.returncode != 0:
            raise RuntimeError(
                f"{shlex.join(cmd)} exited {proc.returncode}:\n{_tail(out_file, 40)}\n{self.log_tail()}"
            )
        deadline = time.monotonic() + 20
        pid = None
        while time.monotonic() < deadline:
            try:
                pid = int(pid_file.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                pid = None
            if pid and _pid_alive(pid):
                break
            time.sleep(0.1)
        else:
            raise RuntimeError(
                f"{name} started but no live pid in {pid_file} (pid={pid}):\n"
                f"{_tail(out_file, 40)}\n{self.log_tail()}"
            )
        self._started[name] = (pid, marker)

    def wait_idle(self, timeout: float = START_TIMEOUT_S) -> None:
        """Waits until sinfo shows the node ``idle``; RuntimeError with the log tails otherwise."""
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            state = self.node_state()
            if state == "idle":
                return
            for name in ("slurmctld", "slurmd"):
                if name in self._started and not _pid_alive(self._started[name][0]):
                    raise RuntimeError(f"{name} died while starting\n{self.log_tail()}")
            time.sleep(0.5)
        raise RuntimeError(
            f"node {self.hostname} not idle after {timeout:.0f} s (state: {state!r})\n{self.log_tail()}"
        )

    def start(self) -> None:
        for d in (self.state_dir, self.spool_dir, self.log_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.ctld_port, self.slurmd_port = free_ports(2)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(_SCRUB_PREFIXES)}
        self.env["PATH"] = os.pathsep.join(
            [self.env.get("PATH", "")] + [d for d in _SBIN_DIRS if d not in self.env.get("PATH", "")]
        )
        self._start_munged()
        self._write_conf()
        self.env["SLURM_CONF"] = str(self.conf_path)
        conf = str(self.conf_path)
        self._spawn_daemon(
            "slurmctld", [self._bins["slurmctld"], "-f", conf], self.ctld_pid_file, marker=conf
        )
        self._spawn_daemon(
            "slurmd", [self._bins["slurmd"], "-f", conf, "-N", self.hostname],
            self.slurmd_pid_file, marker=conf,
        )
        self.wait_idle()

    # ----------------------------------------------------------------------------------- environ
    def activate(self) -> None:
        """Points this process's environment at the cluster (restored by `deactivate`)."""
        if self._saved_environ is None:
            self._saved_environ = dict(os.environ)
        for k in [k for k in os.environ if k.startswith(_SCRUB_PREFIXES)]:
            del os.environ[k]
        os.environ["SLURM_CONF"] = str(self.conf_path)
        os.environ["PATH"] = self.env["PATH"]

    def deactivate(self) -> None:
        if self._saved_environ is not None:
            os.environ.clear()
            os.environ.update(self._saved_environ)
            self._saved_environ = None

    # ----------------------------------------------------------------------------------- stop
    def cancel_all_jobs(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Cancels every job of this cluster and waits (bounded) until none is left running."""
        if "slurmctld" not in self._started:
            return
        ids = self.job_ids()
        if ids:
            self.run(["scancel", *ids], check=False, timeout=30)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            steps_left = list(self.spool_dir.glob("*.*")) if self.spool_dir.exists() else []
            steps_left = [p for p in steps_left if p.is_socket()]
            if not self.job_ids() and not steps_left:
                return
            time.sleep(0.5)

    def _stop_daemon(self, name: str) -> str | None:
        """Stops one daemon we started (SIGTERM, then SIGKILL); returns a problem or None."""
        pid, marker = self._started.pop(name)
        if not _pid_alive(pid):
            return None
        cmdline = _cmdline(pid)
        # Guard against pid reuse: only signal the process that runs our binary with our files.
        if not any(marker in a for a in cmdline) or not any(name in a for a in cmdline[:1]):
            return f"{name}: pid {pid} now runs {cmdline!r}, not ours; left alone"
        for sig, wait_s in ((signal.SIGTERM, STOP_TIMEOUT_S), (signal.SIGKILL, 5.0)):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                return None
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline:
                if not _pid_alive(pid):
                    return None
                time.sleep(0.1)
        return f"{name} (pid {pid}) did not exit after SIGKILL"

    def stop(self) -> None:
        """Cancels leftover jobs, then stops slurmd, slurmctld and munged (only those we started)."""
        problems = []
        try:
            self.cancel_all_jobs()
        except Exception as e:  # noqa: BLE001 - teardown goes on
            problems.append(f"cancelling jobs: {e!r}")
        for name in ("slurmd", "slurmctld", "munged"):
            if name in self._started:
                problem = self._stop_daemon(name)
                if problem:
                    problems.append(problem)
        if self.munge_dir is not None:
            shutil.rmtree(self.munge_dir, ignore_errors=True)
        if problems:
            raise RuntimeError("slurm cluster teardown: " + "; ".join(problems))

    def __repr__(self) -> str:
        return (
            f"SlurmCluster(hostname={self.hostname!r}, partition={self.partition!r}, "
            f"cpus={self.cpus}, conf_path={str(self.conf_path)!r})"
        )


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """A running one-node SLURM cluster for the session, with ``SLURM_CONF`` pointing at it."""
    reason = missing_requirements()
    if reason:
        pytest.skip(reason)
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except BaseException as e:
        try:
            cluster.stop()
        finally:
            if isinstance(e, RuntimeError):
                pytest.fail(f"could not start the SLURM cluster: {e}", pytrace=False)
        raise
    cluster.activate()
    try:
        yield cluster
    finally:
        cluster.deactivate()
        cluster.stop()


# ------------------------------------------------------------------------------------- waiting on jobs in tests
JOB_TIMEOUT_S = 120.0


def describe(cluster: SlurmCluster, *jobs) -> str:
    """The jobs' SLURM state, stdout and stderr, and the daemon logs: what a failure message needs."""
    parts = []
    for job in jobs:
        if job is None:
            continue
        parts.append(f"=== scontrol show job {job.job_id} ===\n{cluster.job_info(job.job_id)}")
        for sub in getattr(job, "_sub_jobs", None) or [job]:
            for name in ("stdout", "stderr"):
                try:
                    text = sub._get_logs_string(name)
                except Exception as e:  # noqa: BLE001 - this is the error report itself
                    text = f"<{e!r}>"
                parts.append(f"=== {name} of {sub.job_id} (task {sub.task_id}) ===\n{text}")
    parts.append(f"=== node state: {cluster.node_state()} ===\n{cluster.log_tail()}")
    return "\n".join(parts)


def wait_results(cluster: SlurmCluster, job, timeout: float = JOB_TIMEOUT_S) -> list:
    """All task results of a submitit job, waiting at most `timeout` seconds.

    Polls job.done() against a deadline: without an accounting database a job that dies without writing
    its result would make job.results() wait forever.
    """
    wait_for(job.done, f"job {job.job_id} to finish", cluster, job, timeout=timeout, poll_s=0.5)
    try:
        return job.results()
    except Exception as e:  # noqa: BLE001 - reported with the job's logs
        pytest.fail(f"job {job.job_id} failed: {e!r}\n{describe(cluster, job)}")


def wait_for(predicate, what: str, cluster: SlurmCluster, *jobs, timeout: float = JOB_TIMEOUT_S,
             poll_s: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{describe(cluster, *jobs)}")
        time.sleep(poll_s)


def _main() -> None:  # pragma: no cover - manual check: `python tests/slurm_cluster.py`
    reason = missing_requirements()
    if reason:
        raise SystemExit(f"skip: {reason}")
    cluster = SlurmCluster(Path(tempfile.mkdtemp(prefix="rcka-slurm-")))
    try:
        cluster.start()
        print(cluster, cluster.node_state())
        print(cluster.run(["sinfo"]).stdout)
    finally:
        cluster.stop()


if __name__ == "__main__":
    _main()
