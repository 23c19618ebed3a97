"""Training on two CPU processes (gloo): DDP and FSDP2 give the one-process updates."""

import os

import pytest
import torch
import torch.multiprocessing as mp

from ddt_fast.training import TrainConfig, Trainer, list_checkpoints
from ddt_fast.training.distributed import fsdp_available

BASE = dict(
    model="DDT-tiny/2",
    model_args={"in_channels": 1, "num_classes": 10},
    data="digits",
    progress=False,
    tensorboard=False,
    seed=5,
    global_batch=8,
    steps=3,
    ckpt_every=3,
    lr=1e-3,
    ema_decay=0.5,
    grad_clip=1.0,
)


def _worker(rank, world, store, out, strategy):
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        Trainer(TrainConfig(**BASE, out_dir=out, strategy=strategy, device="cpu")).fit()
    finally:
        torch.distributed.destroy_process_group()


def _weights(out):
    path = list_checkpoints(out)[-1][1]
    return torch.load(path, weights_only=True)["state_dict"]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path, strategy):
    if strategy == "fsdp" and not fsdp_available():
        pytest.skip(f"this PyTorch ({torch.__version__}) has no FSDP2 (torch.distributed.fsdp.fully_shard)")
    single = str(tmp_path / "single")
    Trainer(TrainConfig(**BASE, out_dir=single, grad_accum=2)).fit()
    two = str(tmp_path / "two")
    mp.spawn(_worker, args=(2, str(tmp_path / "store"), two, strategy), nprocs=2)
    a, b = _weights(single), _weights(two)
    assert a.keys() == b.keys()
    moved = 0
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=2e-6, rtol=1e-5, msg=k)
        moved += k.startswith("denoiser.") and not torch.equal(a[k], a[k.replace("denoiser.", "ema_denoiser.")])
    assert moved > 0  # the weights did change over the run
    assert os.path.exists(os.path.join(two, "config.json"))
