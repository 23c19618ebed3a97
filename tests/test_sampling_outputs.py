"""Images, npz files and sharded / distributed sampling runs."""

import os

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from helpers import tiny_model

from ddt_fast import sampling

_tiny_model = tiny_model


def _tiny_vae():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(8,),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=8,
    ).eval()


def _sampler():
    return sampling.EulerSampler(4, 2.0, 1.0, 0.3, 1.0, last_step=0.04)


def test_decode_latents_to_uint8_and_png_grid_npz(tmp_path):
    vae = _tiny_vae()
    latents = torch.randn(3, 4, 8, 8)
    images = sampling.decode_latents(latents, vae)
    assert images.shape == (3, 8, 8, 3) and images.dtype == np.uint8
    with torch.no_grad():
        direct = vae.decode(latents / 0.18215).sample
    expected = ((direct.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(images, expected)
    grid = sampling.make_grid(images, nrow=2, pad=1)
    assert grid.shape == (2 * 9 + 1, 2 * 9 + 1, 3)
    np.testing.assert_array_equal(grid[1:9, 10:18], images[1])
    sampling.save_png(grid, str(tmp_path / "g.png"))
    from PIL import Image

    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "g.png")), grid)
    sampling.save_npz(str(tmp_path / "s.npz"), images)
    with np.load(tmp_path / "s.npz") as z:
        np.testing.assert_array_equal(z["arr_0"], images)


def test_load_vae_errors_are_clear(tmp_path, monkeypatch):
    pytest.importorskip("diffusers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="could not load the VAE .* sample latents only"):
        sampling.load_vae(str(tmp_path / "no-vae-here"))


def test_sample_to_folder_matches_direct_sampling_and_resumes(tmp_path):
    m, vae = _tiny_model(), _tiny_vae()
    classes, seeds = [1, 2, 3, 4, 5], [10, 11, 12, 13, 14]
    out = str(tmp_path / "run")
    path = sampling.sample_to_folder(
        m, _sampler(), classes, seeds, out, batch_size=2, vae=vae, latent_size=8, progress=False
    )
    with np.load(path) as z:
        images = z["arr_0"]
    assert images.shape == (5, 8, 8, 3)
    direct = sampling.decode_latents(sampling.sample(m, classes, seeds, sampler=_sampler(), latent_size=8), vae)
    np.testing.assert_array_equal(images, direct)
    assert len(os.listdir(os.path.join(out, "images"))) == 5 and os.path.exists(os.path.join(out, "grid.png"))
    # resume: only the missing shard is sampled again
    os.remove(os.path.join(out, "shards", "samples_00000002_00000003.npz"))
    calls = []
    sampler = _sampler()
    orig = sampler.__call__

    class Counting(type(sampler)):
        def __call__(self, *a, **k):
            calls.append(a[1].shape[0])
            return orig(*a, **k)

    Counting.__name__ = type(sampler).__name__  # the recorded settings name the sampler class
    sampler.__class__ = Counting
    sampling.sample_to_folder(m, sampler, classes, seeds, out, batch_size=2, vae=vae, latent_size=8, progress=False)
    assert calls == [2]
    with np.load(path) as z:
        np.testing.assert_array_equal(z["arr_0"], images)


def test_latents_only_without_vae(tmp_path):
    m = _tiny_model()
    path = sampling.sample_to_folder(
        m, _sampler(), [1, 2, 3], [0, 1, 2], str(tmp_path), batch_size=2, latent_size=8, progress=False
    )
    assert path.endswith("latents.npz")
    with np.load(path) as z:
        assert z["arr_0"].shape == (3, 4, 8, 8)


def _worker(rank, world, store, out, classes, seeds):
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        sampling.sample_to_folder(
            _tiny_model(), _sampler(), classes, seeds, out, batch_size=2, latent_size=8, progress=False
        )
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_processes_give_the_single_process_result(tmp_path):
    classes, seeds = [1, 2, 3, 4, 5, 6, 7], [20, 21, 22, 23, 24, 25, 26]
    single = sampling.sample_to_folder(
        _tiny_model(), _sampler(), classes, seeds, str(tmp_path / "one"), batch_size=3, latent_size=8, progress=False
    )
    mp.spawn(_worker, args=(2, str(tmp_path / "store"), str(tmp_path / "two"), classes, seeds), nprocs=2)
    with np.load(single) as a, np.load(tmp_path / "two" / "latents.npz") as b:
        np.testing.assert_allclose(b["arr_0"], a["arr_0"], atol=1e-5, rtol=1e-5)
        np.testing.assert_array_equal(b["seeds"], seeds)
