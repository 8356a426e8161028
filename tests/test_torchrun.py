"""cifar100/train.py under torchrun without SLURM: two CPU processes (gloo) train one run, and the accuracy they
measure together is that of the weights rank 0 saved."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from cifar100 import train
from cifar_fixtures import write_fake_cifar100

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes_finish_and_report_the_saved_weights_accuracy(tmp_path):
    data, out = tmp_path / "data", tmp_path / "run"
    write_fake_cifar100(data, n_train=128, n_test=64, seed=0)
    flags = ["--data_path", str(data), "--no_verify_data", "--no_download", "--device", "cpu", "--student", "resnet8",
             "--print_freq", "1000"]
    # A SLURM job's variables in the environment must not steer the processes: torchrun's own ones decide.
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
         str(REPO / "cifar100" / "train.py"), *flags, "--epochs", "2", "--batch_size", "32", "--output_dir", str(out)],
        capture_output=True, text=True, timeout=120, cwd=REPO, env=env,
    )
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert "distributed: 2 processes via torchrun" in result.stdout, result.stdout
    done = json.loads((out / "done.json").read_text())
    assert done["epochs"] == 2
    derived = json.loads((out / "args.json").read_text())["derived"]
    assert derived["world_size"] == 2 and derived["batch_size_per_process"] == 16

    eval_args = train.get_args_parser().parse_args(
        [*flags, "--output_dir", str(tmp_path / "eval"), "--eval", "--resume", str(out / "student_last.pth")])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the torchrun processes
    try:
        stats = train.main(eval_args)
    finally:
        torch.set_num_threads(threads)
    assert stats["acc1"] == done["last_acc1"], (stats, done)
