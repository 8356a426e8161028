"""Training runs of any task as SLURM jobs (submitit): one run, several seeds, or a named sweep as ONE job array.

    python slurm/launch.py imagenet --data_path /datasets/imagenet --dry_run   # the task's default sweep and resources
    python slurm/launch.py cifar100                                            # Table 1's RCKA column, 1 GPU per run
    python slurm/launch.py cifar100 --teacher resnet56 --student resnet20 --timeout_min 600 --gpus_per_node 1
    python slurm/launch.py cifar100 --sweep table1 --timeout_min 600 --gpus_per_node 1 --dry_run
    python slurm/launch.py cifar100 --sweep table1 --status                                  # where every run is
    python slurm/launch.py imagenet --sweep table2 --nodes 2 --gpus_per_node 8               # multi-node DDP
    python slurm/launch.py coco_detection --dry_run      # Table 3's configs; one task per node, --num-gpus = GPUs

Every flag of the task's train.py works as is (this parser extends the task's own). A task module may declare, beside
its recipe, DEFAULT_SWEEP (the named sweep a command that names no run submits: no --sweep, --pairs, --methods,
--seeds, --teacher, --student, --method, --seed, --output_dir or --config-file) and SLURM_DEFAULTS (resources for its
runs, e.g. {"nodes": 1, "gpus_per_node": 8, "timeout_min": 720}), so `python slurm/launch.py imagenet` alone submits
the paper's Table 2 RCKA runs on one 8-GPU node each; every flag overrides them, and the launcher prints which defaults
it applied (--device cpu leaves out the GPU default). SLURM flags that neither the command nor the task sets are not
passed, so the cluster's own defaults apply. Each run's output_dir is derived from its settings and made absolute at
submission, so resubmitting a sweep skips finished runs (done.json), leaves alone runs whose job is still queued or
running, and resubmits the rest, which resume from their checkpoint.pth. A preempted or timed-out job is requeued by
submitit (Trainer.checkpoint) and resumes the same way. `--status` with the same flags reads the run folders and
squeue: done / running / pending / failed / not submitted.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.util
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import submitit
import submitit.slurm.slurm
from submitit.core.utils import FailedJobError, FailedSubmissionError

from common.logging import write_json_atomic
from slurm.status import JOB_RECORD, print_status, run_state, run_states, summarise
from slurm.sweeps import SWEEP_SEEDS, SWEEPS, LaunchError, Run, varied_settings

__all__ = ["LaunchError", "Run", "Trainer", "executor_parameters", "expand_runs", "main", "parse_args", "run_state"]

# Task name -> its training module, which provides get_args_parser(add_help), main(args) and default_output_dir(args),
# and may set DEFAULT_SWEEP and SLURM_DEFAULTS (see the module docstring). A new task is one line here.
TASKS = {
    "cifar100": "cifar100.train",
    "imagenet": "imagenet.train",
    "coco_detection": "coco_detection.train",
}


# Runs that (re)submission sends: never one whose job may still be alive, so no two jobs write one run folder.
SUBMITTABLE = ("not submitted", "failed")
# How often submitit requeues a job that reached its time limit (its default, 3, ends a 240-epoch run on a
# 4-hour partition early); preemptions are requeued without limit. DeiT's run_with_submitit.py uses 30 too.
MAX_NUM_TIMEOUT = 30


# ---------------------------------------------------------------------------------------------------- tasks
def available_tasks() -> list[str]:
    def exists(module: str) -> bool:
        try:
            return importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:  # its package is missing too
            return False
    return [task for task, module in TASKS.items() if exists(module)]


def load_task(task: str):
    """The training module of `task`, with a clear error for unknown tasks and tasks without a train.py yet."""
    if task not in TASKS:
        planned = [t for t in TASKS if t not in available_tasks()]
        raise LaunchError(f"unknown task {task!r}; tasks: {', '.join(available_tasks())}"
                          + (f" ({', '.join(planned)}: no train.py yet)" if planned else "")
                          + f". A new task is one line in TASKS in {__file__}")
    module_name = TASKS[task]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        parts = module_name.split(".")
        if err.name not in {".".join(parts[:i]) for i in range(1, len(parts) + 1)}:
            raise LaunchError(f"task {task!r} needs the package {err.name!r}, which is not installed here ({err}); "
                              f"see the task's README for how to install it") from err
        raise LaunchError(f"task {task!r} has no training script yet ({module_name.replace('.', '/')}.py does not "
                          f"exist); tasks available now: {', '.join(available_tasks())}") from None
    missing = [name for name in ("get_args_parser", "main", "default_output_dir") if not hasattr(module, name)]
    if missing:
        raise LaunchError(f"{module_name} lacks {', '.join(missing)}: a task module provides get_args_parser("
                          f"add_help), main(args) and default_output_dir(args)")
    return module


def requeue_ignoring_sigterm(self, countdown: int) -> None:
    """submitit's ``SlurmJobEnvironment._requeue``, with ``scontrol requeue`` deaf to SIGTERM.

    ``scontrol requeue`` makes SLURM kill the job's processes at once, and scontrol is one of them. When that
    SIGTERM lands before scontrol has exited (about 1 requeue in 20 on our test cluster), submitit's check_call
    raises out of the signal handler and the task records a *failed* result although SLURM did requeue the job.
    An ignored signal stays ignored through exec, so scontrol finishes; SLURM's SIGKILL after KillWait still applies.
    """
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        subprocess.check_call(["scontrol", "requeue", self.job_id], timeout=60)
    finally:
        signal.signal(signal.SIGTERM, previous)


class Trainer:
    """What each SLURM task runs: the task's main(args), like DeiT's run_with_submitit.Trainer.

    main() joins the job's process group by itself from SLURM's variables (common/dist.py), so one call per task
    is all there is. On preemption or timeout submitit calls checkpoint() in task 0 and requeues the job with what
    it returns; main() then resumes from output_dir/checkpoint.pth (saved after every epoch), so at most the epoch in
    progress is redone.
    """

    def __init__(self, task: str, args: argparse.Namespace) -> None:
        self.task = task
        self.args = args

    def __call__(self):
        # The fix replaces a private method of submitit 1.5 (pyproject pins >=1.5,<1.6, the range it is tested
        # with); should another version lack it, submitit's own requeue stays rather than a broken patch.
        if hasattr(submitit.slurm.slurm.SlurmJobEnvironment, "_requeue"):
            submitit.slurm.slurm.SlurmJobEnvironment._requeue = requeue_ignoring_sigterm
        cpus = os.environ.get("SLURM_CPUS_PER_TASK")
        if cpus and "OMP_NUM_THREADS" not in os.environ:
            # Without CPU binding torch would start one thread per core of the node in every task.
            import torch
            torch.set_num_threads(int(cpus))
        return load_task(self.task).main(self.args)

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        print(f"requeueing: {self.args.output_dir} will resume from its checkpoint.pth", flush=True)
        return submitit.helpers.DelayedSubmission(type(self)(self.task, self.args))


# ---------------------------------------------------------------------------------------------------- arguments
def add_launch_arguments(parser: argparse.ArgumentParser) -> None:
    cluster = parser.add_argument_group("SLURM (each passed to sbatch only when given: your cluster's defaults apply)")
    cluster.add_argument("--nodes", type=int, default=None, help="nodes per run (DDP across them)")
    cluster.add_argument("--gpus_per_node", type=int, default=None, help="GPUs per node")
    cluster.add_argument("--ntasks_per_node", type=int, default=None,
                         help="processes per node, one per GPU (default: --gpus_per_node, or 1 without GPUs)")
    cluster.add_argument("--cpus_per_task", type=int, default=None, help="CPUs per process")
    cluster.add_argument("--mem_gb", type=float, default=None, help="memory per node in GB")
    cluster.add_argument("--timeout_min", type=int, default=None,
                         help="time limit of each job in minutes (required to submit; at most the partition's, see "
                              "`sinfo -o '%%P %%l'`); a run that needs longer is requeued and resumes")
    cluster.add_argument("--partition", default=None, help="SLURM partition")
    cluster.add_argument("--account", default=None, help="SLURM account")
    cluster.add_argument("--qos", default=None, help="SLURM quality of service")
    cluster.add_argument("--constraint", default=None, help="SLURM node constraint (e.g. a GPU type feature)")
    cluster.add_argument("--job_dir", default=None,
                         help="submitit's folder for job scripts and logs (%%j: the job id); default "
                              "./output/slurm/%%j, beside the runs' default output_dirs")
    cluster.add_argument("--array_parallelism", type=int, default=None,
                         help="at most this many runs of a sweep at once (submitit's default: 256)")
    runs = parser.add_argument_group("runs (a sweep or several seeds go out as one job array)")
    runs.add_argument("--sweep", default=None, help="a named sweep: " + "; ".join(
        f"{name} ({sweep.task}): {sweep.help}" for name, sweep in SWEEPS.items()))
    runs.add_argument("--pairs", nargs="+", default=None, metavar="TEACHER:STUDENT",
                      help="these pairs instead of the sweep's (a subset, or pairs of your own)")
    runs.add_argument("--methods", nargs="+", default=None, help="only these methods (default: the sweep's)")
    runs.add_argument("--seeds", nargs="+", type=int, default=None,
                      help=f"one run per seed (default: {' '.join(map(str, SWEEP_SEEDS))} for a sweep, else --seed)")
    runs.add_argument("--dry_run", action="store_true",
                      help="print each run (state, output_dir, equivalent command) and the sbatch parameters; "
                           "submit nothing")
    runs.add_argument("--status", action="store_true",
                      help="print the state of each run these flags describe (done with top-1, running with its "
                           "epoch, pending, failed with its error log, not submitted) and submit nothing")


def get_args_parser(task: str) -> argparse.ArgumentParser:
    module = load_task(task)
    parser = argparse.ArgumentParser(f"python slurm/launch.py {task}", parents=[module.get_args_parser(add_help=False)],
                                     description=f"Submit {task} training runs to SLURM.")
    add_launch_arguments(parser)
    return parser


def parse_args(argv: Sequence[str]) -> tuple[str, argparse.Namespace]:
    """(task, namespace holding the task's flags and the launcher's)."""
    argv = list(argv)
    if not argv or argv[0].startswith("-"):
        usage = "\n".join([
            "usage: python slurm/launch.py TASK [--sweep NAME] [train.py flags] [SLURM flags]",
            f"  TASK: {', '.join(available_tasks())}",
            "  sweeps: " + "; ".join(f"{name} ({sweep.task})" for name, sweep in SWEEPS.items()),
            "  all flags of a task: python slurm/launch.py TASK -h",
        ])
        if argv and argv[0] in ("-h", "--help"):
            print(usage)
            raise SystemExit(0)
        raise LaunchError(f"name the task first.\n{usage}")
    return argv[0], get_args_parser(argv[0]).parse_args(argv[1:])


# Flags that name which runs to submit: a command with none of them gets the task's DEFAULT_SWEEP.
RUN_SELECTION = ("sweep", "pairs", "methods", "seeds", "teacher", "student", "method", "seed", "output_dir",
                 "config_file")
SLURM_RESOURCES = ("nodes", "gpus_per_node", "ntasks_per_node", "cpus_per_task", "mem_gb", "timeout_min", "partition",
                   "account", "qos", "constraint")


def with_task_defaults(task: str, args: argparse.Namespace, argv: Sequence[str] = ()) -> tuple[argparse.Namespace,
                                                                                            list[str]]:
    """The flags with the task's DEFAULT_SWEEP (when no run is named) and SLURM_DEFAULTS (for resources not given)
    filled in, as a new namespace, and one line per default applied, for the user to see.

    A run is named by a selection flag that differs from its default, or that the command line ``argv`` spells
    out (``--student resnet20`` names one run even where resnet20 is the default)."""
    module = load_task(task)
    task_parser = module.get_args_parser(add_help=False)
    task_dests = {action.dest for action in task_parser._actions}
    changes, notes = {}, []
    default_sweep = getattr(module, "DEFAULT_SWEEP", None)
    spelled = {arg.split("=", 1)[0] for arg in argv if arg.startswith("--")}
    selection_flags = {option for action in get_args_parser(task)._actions if action.dest in RUN_SELECTION
                       for option in action.option_strings}
    named = [dest for dest in RUN_SELECTION if hasattr(args, dest)
             and getattr(args, dest) != (task_parser.get_default(dest) if dest in task_dests else None)]
    named += sorted(spelled & selection_flags)
    if default_sweep is not None and not named:
        changes["sweep"] = default_sweep
        how = ("--config-file FILE" if SWEEPS[default_sweep].configs else
               "--sweep, --pairs, --methods, --seeds or the task's --teacher/--student/--method/--seed")
        notes.append(f"no run named: {task}'s default sweep {default_sweep} ({SWEEPS[default_sweep].help}); name "
                     f"runs with {how}")
    # --device cpu asks for no GPU: the task's GPU default would only make sbatch refuse on a CPU partition.
    cpu_only = getattr(args, "device", None) == "cpu"
    resources = {key: value for key, value in getattr(module, "SLURM_DEFAULTS", {}).items()
                 if key in SLURM_RESOURCES and getattr(args, key) is None
                 and not (cpu_only and key == "gpus_per_node")}
    if resources:
        changes.update(resources)
        notes.append(f"{task}'s default resources: " + ", ".join(f"--{k} {v}" for k, v in resources.items())
                     + " (each flag overrides)")
    if "num_gpus" in task_dests:
        changes.update(detectron2_processes(task, {**vars(args), **changes}, "--num-gpus" in spelled, notes))
    return argparse.Namespace(**{**vars(args), **changes}), notes


def detectron2_processes(task: str, flags: dict, num_gpus_given: bool, notes: list[str]) -> dict:
    """A detectron2 task's launch starts one process per GPU itself: one SLURM task per node, and --num-gpus equal
    to --gpus_per_node. Returns the flags to change; refuses a plan that would start the wrong number of processes."""
    tasks, gpus, num_gpus = flags["ntasks_per_node"], flags["gpus_per_node"], flags["num_gpus"]
    if tasks not in (None, 1):
        raise LaunchError(f"--ntasks_per_node {tasks}: {task} starts its GPU processes on each node itself "
                          f"(detectron2's launch, one per --num-gpus); pass --ntasks_per_node 1")
    changes = {"ntasks_per_node": 1}
    if gpus and num_gpus != gpus:
        if num_gpus_given:
            raise LaunchError(f"--num-gpus {num_gpus} but --gpus_per_node {gpus}: {task} starts one process per "
                              f"--num-gpus on each node; pass the same number to both")
        changes["num_gpus"] = gpus
        notes.append(f"--num-gpus {gpus}, as --gpus_per_node {gpus}: {task} starts one process per GPU itself")
    return changes


def task_namespace(task_parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Only the task's own flags (what its main() gets), unchanged."""
    return argparse.Namespace(**{a.dest: getattr(args, a.dest) for a in task_parser._actions if a.dest != "help"})


def namespace_to_argv(parser: argparse.ArgumentParser, namespace: argparse.Namespace) -> list[str]:
    """The flags that make `parser` parse to `namespace` (only those that differ from the defaults)."""
    argv, positional = [], []
    for action in parser._actions:
        if action.dest == "help":
            continue
        value = getattr(namespace, action.dest)
        if not action.option_strings:  # a positional, e.g. detectron2's trailing config options (KEY VALUE ...)
            if value is not None:
                positional += list(map(str, value)) if isinstance(value, (list, tuple)) else [str(value)]
            continue
        if value == action.default:
            continue
        flag = action.option_strings[0]
        if isinstance(action, argparse._AppendAction):  # a repeatable flag: once per value given
            for item in value:
                argv += [flag, *map(str, item)] if isinstance(item, (list, tuple)) else [flag, str(item)]
        elif isinstance(action, argparse.BooleanOptionalAction):
            argv.append(flag if value else f"--no-{flag[2:]}")
        elif action.nargs == 0:  # store_true / store_false / store_const
            argv.append(flag)
        elif value is None:
            raise LaunchError(f"{flag} is None, which no command line can express")
        elif isinstance(value, (list, tuple)):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    return argv + positional


def executor_parameters(args: argparse.Namespace, name: str) -> dict:
    """submitit AutoExecutor parameters from the SLURM flags; flags left out are not passed."""
    tasks_per_node = args.ntasks_per_node if args.ntasks_per_node is not None else (args.gpus_per_node or 1)
    params = {
        "name": name, "nodes": args.nodes, "gpus_per_node": args.gpus_per_node, "tasks_per_node": tasks_per_node,
        "cpus_per_task": args.cpus_per_task, "mem_gb": args.mem_gb, "timeout_min": args.timeout_min,
        "slurm_partition": args.partition, "slurm_account": args.account, "slurm_qos": args.qos,
        "slurm_constraint": args.constraint, "slurm_array_parallelism": args.array_parallelism,
    }
    return {key: value for key, value in params.items() if value is not None}


# ---------------------------------------------------------------------------------------------------- runs
def expand_runs(task: str, args: argparse.Namespace) -> list[Run]:
    """The runs the flags describe, each with its absolute output_dir; runs sharing an output_dir appear once."""
    module = load_task(task)
    task_parser = module.get_args_parser(add_help=False)
    base = task_namespace(task_parser, args)
    settings = varied_settings(args, task, task_parser)
    if len(settings) > 1 and base.output_dir is not None:
        raise LaunchError("--output_dir names one run's folder, but these flags describe several runs: leave it out "
                          "(each run gets its own under ./output/; run the launcher where output/ should be)")
    runs, seen = [], set()
    for overrides in settings:
        run_args = argparse.Namespace(**{**vars(base), **overrides})
        output_dir = os.path.abspath(run_args.output_dir or module.default_output_dir(run_args))
        if output_dir in seen:
            continue
        seen.add(output_dir)
        paths = {"output_dir": output_dir}
        config_file = getattr(run_args, "config_file", None)
        if config_file:  # a detectron2 task: checked now, not after the queue; absolute, as output_dir
            if not os.path.isfile(config_file):
                raise LaunchError(f"--config-file {config_file} does not exist; the task's configs are in "
                                  f"{TASKS[task].split('.')[0]}/configs/")
            paths["config_file"] = os.path.abspath(config_file)
        run_args = argparse.Namespace(**{**vars(run_args), **paths})
        command = ("python", "-m", TASKS[task], *namespace_to_argv(task_parser, run_args))
        runs.append(Run(task, run_args, command))
    return runs


def default_job_dir(task: str) -> str:
    """./output/slurm/%j: beside the runs' default output_dirs (output/<task>/...)."""
    module = load_task(task)
    root = Path(module.default_output_dir(module.get_args_parser(add_help=False).parse_args([]))).parts[0]
    return os.path.abspath(os.path.join(root, "slurm", "%j"))


# ---------------------------------------------------------------------------------------------------- submission
def dry_run(task: str, runs: Sequence[Run], args: argparse.Namespace) -> list[tuple[Run, str, str]]:
    states = run_states(runs)
    for run, state, detail in states:
        print(f"[{state}] {run.output_dir}" + (f"  ({detail.splitlines()[0]})" if detail else ""))
        print(f"    {shlex.join(run.command)}")
    todo = [run for run, state, _ in states if state in SUBMITTABLE]
    for warning in plan_warnings(args):
        print(f"warning: {warning}")
    print(f"dry run: {summarise(states)}; would submit {len(todo)} (as one job array when more than one) with "
          f"{executor_parameters(args, job_name(task, args))} and job_dir {args.job_dir or default_job_dir(task)}")
    return states


def plan_warnings(args: argparse.Namespace) -> list[str]:
    """What a plan lacks that a real submission needs or most likely wants."""
    warnings = []
    if args.timeout_min is None:
        warnings.append("no --timeout_min: submitting will be refused until you give each job a time limit")
    if not args.gpus_per_node:
        device = getattr(args, "device", None)
        if device != "cpu":
            warnings.append("no --gpus_per_node: the jobs would get no GPU and train on CPU; pass --gpus_per_node N "
                            "(or --device cpu if that is what you want)")
    return warnings


def job_name(task: str, args: argparse.Namespace) -> str:
    return f"{task}-{args.sweep}" if args.sweep else task


def submit(task: str, runs: Sequence[Run], args: argparse.Namespace, cluster: str | None = None,
           argv: Sequence[str] = ()) -> list[submitit.Job]:
    """Submits the runs that are neither finished nor queued, as one job (array); returns the submitted jobs.

    `cluster` is submitit's: None means SLURM (an error elsewhere); "local" or "debug" run the jobs on this machine.
    """
    if args.timeout_min is None:
        raise LaunchError("pass --timeout_min (each job's time limit in minutes, at most your partition's: "
                          "`sinfo -o '%P %l'`); a run that needs longer is requeued and resumes")
    states = run_states(runs)
    todo = [run for run, state, _ in states if state in SUBMITTABLE]
    finished = sum(1 for _, state, _ in states if state == "done")
    active = sum(1 for _, state, _ in states if state in ("running", "pending"))
    unknown = sum(1 for _, state, _ in states if state == "unknown")
    if finished:
        print(f"skipped {finished} finished run(s) (done.json exists)")
    if active:
        print(f"skipped {active} run(s) whose job is still queued or running")
    if unknown:
        print(f"skipped {unknown} submitted run(s) whose job state is unknown; delete their {JOB_RECORD} to resubmit")
    if not todo:
        print("nothing to submit")
        return []
    job_dir = os.path.abspath(args.job_dir) if args.job_dir else default_job_dir(task)
    try:
        executor = submitit.AutoExecutor(folder=job_dir, cluster=cluster, slurm_max_num_timeout=MAX_NUM_TIMEOUT)
    except RuntimeError as err:
        raise LaunchError(f"no SLURM here ({err}): run on the cluster's login node, or train without SLURM: "
                          f"python -m {TASKS[task]} ... or torchrun") from None
    if cluster is None and executor.cluster != "slurm":
        raise LaunchError(f"submitit found no SLURM (it picked {executor.cluster!r}): run on the cluster's login node")
    executor.update_parameters(**executor_parameters(args, job_name(task, args)))
    try:
        jobs = executor.submit_array([Trainer(task, run.args) for run in todo])
    except (FailedJobError, FailedSubmissionError, OSError) as err:
        raise LaunchError(f"sbatch refused the job: {err}\nCheck --partition, --account, --qos, --constraint and "
                          f"that the resources fit a node (`sinfo -o '%P %c %m %G %l'`).") from None
    submitted = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    for run, job in zip(todo, jobs):
        job_id = str(job.job_id)
        array_id, _, index = job_id.partition("_")
        run.output_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic({"job_id": job_id, "array_job_id": array_id if index else None,
                           "array_index": int(index) if index else None, "cluster": executor.cluster,
                           "job_dir": str(job_dir), "stdout": str(job.paths.stdout), "stderr": str(job.paths.stderr),
                           "submitted": submitted, "launcher_argv": ["slurm/launch.py", *argv],
                           "command": list(run.command)}, run.output_dir / JOB_RECORD)
        print(f"job {job_id}: {run.output_dir}\n    logs: {job.paths.stdout} (.err beside it)")
    first = str(jobs[0].job_id).split("_")[0]
    kind = f"job array {first} ({len(jobs)} runs)" if len(jobs) > 1 else f"job {first}"
    logs = job_dir.replace("%j", first + ("_*" if len(jobs) > 1 else ""))
    print(f"submitted {kind} to {executor.cluster}; logs in {logs}\nstate of every run: the same command with --status")
    return jobs


def main(argv: Sequence[str] | None = None, cluster: str | None = None) -> list:
    """Submits and returns the jobs, or with --dry_run / --status prints and returns [(run, state, detail), ...]."""
    argv = list(sys.argv[1:] if argv is None else argv)
    task, args = parse_args(argv)
    args, notes = with_task_defaults(task, args, argv)
    for note in notes:
        print(note)
    runs = expand_runs(task, args)
    if args.status:
        return print_status(runs)
    if args.dry_run:
        return dry_run(task, runs, args)
    return submit(task, runs, args, cluster=cluster, argv=argv)


def cli() -> None:
    try:
        main()
    except LaunchError as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    # Run the copy imported as slurm.launch: submitit pickles Trainer by reference, and jobs can import
    # slurm.launch but not this script's __main__.
    from slurm.launch import cli as launch_cli
    launch_cli()
