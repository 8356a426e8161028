"""Global-batch CKA under DDP: all_gather_with_grad and RCKALoss(cka_batch=...) on two real gloo processes,
against one process on the concatenated batch."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.dist import all_gather_with_grad, gather_sizes
from common.losses import RCKALoss, build_distillation_loss
from test_dist import free_port, without_launcher_variables

REPO = Path(__file__).resolve().parents[1]
PER_RANK, WORLD = 6, 2


class Student(torch.nn.Module):
    """Logits and one (2, 4, 4) feature map from two linear maps."""

    def __init__(self):
        super().__init__()
        self.head, self.stage = torch.nn.Linear(12, 10), torch.nn.Linear(12, 32)

    def forward(self, x):
        return self.head(x), [torch.tanh(self.stage(x)).view(len(x), 2, 4, 4)]


def problem():
    """A student, fixed teacher outputs, and 12 inputs; float64."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(PER_RANK * WORLD, 12, generator=gen, dtype=torch.float64)
    torch.manual_seed(1)
    student = Student().double()
    logits_t = torch.randn(len(x), 10, generator=gen, dtype=torch.float64)
    feats_t = [torch.randn(len(x), 3, 4, 4, generator=gen, dtype=torch.float64)]
    return x, student, logits_t, feats_t


def rcka_step(student, x, logits_t, feats_t, cka_batch="local"):
    """The loss a training step computes, and the student's parameter gradients."""
    logits_s, feats_s = student(x)  # through DDP's forward when wrapped, so that it averages the gradients
    loss = RCKALoss(cka_batch=cka_batch)(logits_s=logits_s, logits_t=logits_t, feats_s=feats_s, feats_t=feats_t)
    loss.backward()
    return loss.item(), [p.grad.flatten().tolist() for p in student.parameters()]


WORKER = """
import json, sys
import torch
import torch.distributed as dist
sys.path.insert(0, {tests!r})
from common.dist import all_gather_with_grad, cleanup, gather_sizes, init_distributed
from test_global_cka import PER_RANK, problem, rcka_step

info = init_distributed("cpu")
rank, world = info.rank, info.world_size
mine = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
out = {{}}

# all_gather_with_grad: unequal row counts, and a loss that differs between ranks.
rows = torch.arange(3 + 2 * rank, dtype=torch.float64).unsqueeze(1).add(10 * rank).requires_grad_()
gathered = all_gather_with_grad(rows)
weights = torch.arange(len(gathered), dtype=torch.float64).unsqueeze(1) + 100 * rank
(gathered * weights).sum().backward()
out["gathered"] = gathered.flatten().tolist()
out["sizes"] = gather_sizes(len(rows))
out["grad_any_loss"] = rows.grad.flatten().tolist()
rows.grad = None
(all_gather_with_grad(rows, same_loss_everywhere=True) * weights.sub(100 * rank)).sum().backward()
out["grad_same_loss"] = rows.grad.flatten().tolist()

# RCKA on each process's slice, the student wrapped in DDP as in training.
x, student, logits_t, feats_t = problem()
for cka_batch in ("global", "local"):
    ddp = torch.nn.parallel.DistributedDataParallel(problem()[1])
    out[cka_batch] = rcka_step(ddp, x[mine], logits_t[mine], [f[mine] for f in feats_t], cka_batch)
    # A DDP reducer that outlives the process group can abort the process at exit ("terminate called
    # without an active exception"), seen once in CI: release it before the group goes.
    del ddp

everyone = [None] * world
dist.all_gather_object(everyone, out)
if rank == 0:
    print("RESULT " + json.dumps(everyone), flush=True)
dist.barrier()
cleanup()
"""


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    script = tmp_path_factory.mktemp("global_cka") / "worker.py"
    script.write_text(WORKER.format(tests=str(Path(__file__).parent)))
    env = without_launcher_variables(os.environ) | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={WORLD}", "--master_addr=127.0.0.1",
               f"--master_port={free_port()}", str(script)]
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    results = [line[len("RESULT "):] for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(results) == 1, done.stdout
    return json.loads(results[0])


def test_all_gather_with_grad_concatenates_unequal_batches_in_rank_order(two_ranks):
    assert [r["sizes"] for r in two_ranks] == [[3, 5]] * 2
    expected = [0.0, 1.0, 2.0] + [10.0, 11.0, 12.0, 13.0, 14.0]
    assert [r["gathered"] for r in two_ranks] == [expected] * 2


def test_all_gather_with_grad_sums_every_process_gradient_for_our_rows(two_ranks):
    # Rank r's loss weights gathered row i by i + 100 r; our rows' gradient sums both ranks' weights.
    index = torch.arange(8.0)
    total = (index + 0) + (index + 100)
    assert two_ranks[0]["grad_any_loss"] == total[:3].tolist()
    assert two_ranks[1]["grad_any_loss"] == total[3:].tolist()
    # Same loss on both ranks: world_size times the local gradient, without communication.
    assert two_ranks[0]["grad_same_loss"] == (2 * index[:3]).tolist()
    assert two_ranks[1]["grad_same_loss"] == (2 * index[3:]).tolist()


def test_global_cka_under_ddp_equals_one_process_on_the_concatenated_batch(two_ranks):
    x, student, logits_t, feats_t = problem()
    loss, grads = rcka_step(student, x, logits_t, feats_t)
    for rank in two_ranks:
        got_loss, got_grads = rank["global"]
        assert got_loss == pytest.approx(loss, rel=1e-12)
        for got, expected in zip(got_grads, grads):  # after DDP's averaging
            assert got == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_local_cka_under_ddp_is_each_process_own_batch_value(two_ranks):
    x, student, logits_t, feats_t = problem()
    per_rank = []
    for rank in range(WORLD):
        mine = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        student.zero_grad(set_to_none=True)
        per_rank.append(rcka_step(student, x[mine], logits_t[mine], [f[mine] for f in feats_t]))
    for rank, (loss, _) in enumerate(per_rank):
        assert two_ranks[rank]["local"][0] == pytest.approx(loss, rel=1e-12)
    # DDP averages the per-process gradients: the step of the mean of the per-process losses.
    mean_grads = [[(a + b) / 2 for a, b in zip(g0, g1)] for g0, g1 in zip(per_rank[0][1], per_rank[1][1])]
    for got, expected in zip(two_ranks[0]["local"][1], mean_grads):
        assert got == pytest.approx(expected, rel=1e-9, abs=1e-12)
    # And it is not the global loss: the option changes the objective.
    global_loss = rcka_step(problem()[1], x, logits_t, feats_t)[0]
    assert abs(two_ranks[0]["local"][0] - global_loss) > 1e-3


def test_without_a_process_group_global_is_local_and_gathering_is_the_identity():
    x, student, logits_t, feats_t = problem()
    assert rcka_step(problem()[1], x, logits_t, feats_t, "global") == rcka_step(problem()[1], x, logits_t, feats_t, "local")
    t = torch.randn(3, 2)
    assert all_gather_with_grad(t) is t and gather_sizes(3) == [3]


def test_cka_batch_is_validated_and_built_from_settings():
    with pytest.raises(ValueError, match="'local' or 'global'"):
        RCKALoss(cka_batch="world")
    settings = {"fcka_weight": 1.0, "lcka_intra_weight": 15.0, "lcka_inter_weight": 15.0, "cka_centered": True,
                "lcka_row_norm": True, "fcka_form": "sp", "cka_batch": "local"}
    assert build_distillation_loss("rcka", settings).cka_batch == "local"
    assert build_distillation_loss("rcka", settings | {"cka_batch": "global"}).cka_batch == "global"
    with pytest.raises(ValueError, match="different numbers of samples"):
        RCKALoss(cka_batch="global")(logits_s=torch.randn(4, 3), logits_t=torch.randn(5, 3), feats_s=torch.randn(4, 2),
                                     feats_t=torch.randn(4, 2))
