"""Which GPU a rank takes, which process-group backend it gets, and how many CPU threads: the
launch-time rules a GPU cluster checks, tested without one (torch.cuda faked where needed)."""
from __future__ import annotations

import pytest
import torch

from moetrain.cpu_runtime import bound_per_task, threads_per_process
from moetrain.parallel.mesh import LaunchError, pick_device, process_group_backend


@pytest.fixture
def gpus(monkeypatch):
    def visible(n):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
    return visible


def test_one_visible_gpu_is_this_ranks_gpu_whatever_its_local_rank(gpus):
    """Slurm --gpus-per-task=1 / --gpu-bind: every rank sees only its own GPU, as cuda:0."""
    gpus(1)
    for local_rank in (0, 3, 7):
        assert pick_device("auto", local_rank) == torch.device("cuda", 0)
        assert pick_device("cuda", local_rank, "nccl") == torch.device("cuda", 0)


def test_several_visible_gpus_one_per_local_rank(gpus):
    gpus(4)
    assert [pick_device("auto", r) for r in range(4)] == [torch.device("cuda", r) for r in range(4)]


def test_more_ranks_than_gpus_share_them_under_gloo_only(gpus):
    gpus(2)
    assert [pick_device("auto", r, "gloo").index for r in range(5)] == [0, 1, 0, 1, 0]
    with pytest.raises(LaunchError, match="LOCAL_RANK=2 but only 2 GPUs are visible: NCCL needs one GPU per rank"):
        pick_device("auto", 2, "auto")


def test_cpu_choices(gpus):
    gpus(0)
    assert pick_device("auto", 5) == torch.device("cpu")
    with pytest.raises(LaunchError, match="train.device=cuda but CUDA is not available"):
        pick_device("cuda", 0)
    gpus(2)
    assert pick_device("cpu", 1) == torch.device("cpu")


def test_backend_strings():
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert process_group_backend("auto", cuda) == "nccl"
    assert process_group_backend("nccl", cuda) == "nccl"
    # gloo on CUDA: a group for the CUDA device type only, which rejects CPU tensors as NCCL does
    assert process_group_backend("gloo", cuda) == "cuda:gloo"
    assert process_group_backend("auto", cpu) == process_group_backend("gloo", cpu) == "gloo"
    with pytest.raises(LaunchError, match="parallel.backend=nccl needs CUDA"):
        process_group_backend("nccl", cpu)


def test_threads_when_srun_bound_the_task_to_its_own_cores():
    import os
    cores = len(os.sched_getaffinity(0))
    bound = {"SLURM_CPU_BIND_TYPE": "mask_cpu:", "SLURM_PROCID": "0"}
    assert bound_per_task("slurm", bound)
    assert threads_per_process(0, 4, "slurm", bound) == cores          # its own cores: all of them
    # shared allocation (no binding, --cpu-bind=none) or torchrun workers inside a bound step
    assert threads_per_process(0, 2, "slurm", {"SLURM_CPU_BIND_TYPE": "none"}) == max(1, cores // 2)
    assert threads_per_process(0, 2, "slurm", {}) == max(1, cores // 2)
    assert threads_per_process(0, 2, "torchrun", bound) == max(1, cores // 2)
    assert threads_per_process(3, 2, "slurm", bound) == 3               # train.num_threads wins
