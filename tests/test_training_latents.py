"""Latent extraction with a tiny random VAE (no download), the shard dataset,
REPA on latents with paired images, and damaged datasets."""

import json
import os

import numpy as np
import pytest
import torch
from helpers import tiny_vae

from ddt_fast.training import DatasetError, LatentDataset, TrainConfig, Trainer, extract_latents
from ddt_fast.training.data import load_image

diffusers = pytest.importorskip("diffusers")
PIL = pytest.importorskip("PIL")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("latents")
    vae = tiny_vae(0)
    vae_dir = str(root / "vae")
    vae.save_pretrained(vae_dir)
    images = root / "images"
    rng = np.random.default_rng(0)
    for cls, n in (("cat", 3), ("dog", 2)):
        os.makedirs(images / cls)
        for i in range(n):  # odd sizes: the crop must do its work
            arr = rng.integers(0, 256, size=(20 + i, 27, 3), dtype=np.uint8)
            Image.fromarray(arr).save(images / cls / f"{i}.png")
    (images / "dog" / "notes.txt").write_text("not an image")
    out = str(root / "out")
    extract_latents(str(images), out, vae=vae_dir, resolution=16, flip=True, batch_size=3, shard_size=4, progress=False)
    return dict(root=root, vae_dir=vae_dir, images=str(images), out=out)


def test_extraction_matches_direct_encoding_and_round_trips(setup):
    vae = diffusers.AutoencoderKL.from_pretrained(setup["vae_dir"]).eval()
    index = json.load(open(os.path.join(setup["out"], "index.json")))
    assert index["classes"] == ["cat", "dog"] and index["num_items"] == 10 and len(index["shards"]) == 3
    assert index["scaling_factor"] == vae.config.scaling_factor
    ds = LatentDataset(setup["out"], image_folder=setup["images"])
    assert len(ds) == 10 and ds.sample_shape == (4, 8, 8) and ds.num_classes == 2
    labels = [int(ds[i]["y"]) for i in range(10)]
    assert labels == [0] * 6 + [1] * 4
    for i in (0, 1, 7):  # item 2k is file k, item 2k+1 its mirror
        item = ds[i]
        image = load_image(os.path.join(setup["images"], index["files"][i // 2]), 16, flip=bool(i % 2))
        torch.testing.assert_close(item["image"], image)
        with torch.no_grad():
            post = vae.encode(image[None]).latent_dist
        sf = vae.config.scaling_factor
        torch.testing.assert_close(item["x"], post.mean[0] * sf, rtol=1e-3, atol=1e-4)  # one float16 ulp
        torch.testing.assert_close(item["std"], post.std[0] * sf, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(ds[1]["image"], ds[0]["image"].flip(-1))


def test_extraction_resumes_only_missing_shards_and_refuses_other_settings(setup):
    shards = os.path.join(setup["out"], "shards")
    names = sorted(n for n in os.listdir(shards) if n.endswith(".safetensors"))  # not the .sha256 sidecars
    before = {n: os.stat(os.path.join(shards, n)).st_mtime_ns for n in names}
    kept = open(os.path.join(shards, names[0]), "rb").read()
    os.remove(os.path.join(shards, names[1]))
    extract_latents(
        setup["images"],
        setup["out"],
        vae=setup["vae_dir"],
        resolution=16,
        flip=True,
        batch_size=3,
        shard_size=4,
        progress=False,
    )
    after = {n: os.stat(os.path.join(shards, n)).st_mtime_ns for n in names}
    assert after[names[0]] == before[names[0]] and after[names[2]] == before[names[2]]
    assert os.path.exists(os.path.join(shards, names[1])) and len(LatentDataset(setup["out"])) == 10
    assert open(os.path.join(shards, names[0]), "rb").read() == kept
    with pytest.raises(ValueError, match="other settings.*resolution"):
        extract_latents(
            setup["images"],
            setup["out"],
            vae=setup["vae_dir"],
            resolution=8,
            flip=True,
            batch_size=3,
            shard_size=4,
            progress=False,
        )


def test_damaged_datasets_are_reported_with_the_shard_path(setup, tmp_path):
    import shutil

    bad = str(tmp_path / "bad")
    shutil.copytree(setup["out"], bad)
    shard = os.path.join(bad, "shards", "shard_000001.safetensors")
    with open(shard, "r+b") as f:
        f.truncate(40)
    with pytest.raises(DatasetError, match=f"corrupt: {shard}"):
        LatentDataset(bad)
    open(shard, "wb").close()
    with pytest.raises(DatasetError, match=f"empty: {shard}"):
        LatentDataset(bad)
    os.remove(shard)
    with pytest.raises(DatasetError, match=f"missing: {shard}"):
        LatentDataset(bad)
    os.remove(os.path.join(bad, "index.json"))
    with pytest.raises(DatasetError, match="no index.json.*extract_latents"):
        Trainer(TrainConfig(model="DDT-tiny/2", data=bad, out_dir=str(tmp_path / "run"), global_batch=2))
    with pytest.raises(DatasetError, match="image folder not found"):
        extract_latents(str(tmp_path / "none"), str(tmp_path / "x"), vae=setup["vae_dir"], progress=False)


@pytest.mark.slow
def test_training_on_latents_with_repa_on_the_paired_images(setup, tmp_path):
    class Encoder(torch.nn.Module):  # frozen stand-in: [B, 3, 16, 16] -> 2x2 grid of 8-dim features
        feature_dim = 8

        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 8, stride=8)

        def forward(self, images):
            assert images.shape[1:] == (3, 16, 16)
            return self.conv(images).flatten(2).transpose(1, 2)

    cfg = TrainConfig(
        model="DDT-tiny/2",
        model_args={"num_classes": 2},
        data=setup["out"],
        image_folder=setup["images"],
        repa=True,
        align_layer=1,
        repa_feature_dim=8,
        latent_sampling="sample",
        global_batch=4,
        steps=2,
        out_dir=str(tmp_path / "run"),
        progress=False,
        tensorboard=False,
    )
    result = Trainer(cfg, feature_encoder=Encoder()).fit()
    m = result["metrics"]
    assert 0.0 < m["loss_repa"] <= 2.0 and m["loss"] == pytest.approx(m["loss_fm"] + 0.5 * m["loss_repa"], rel=1e-5)
    with pytest.raises(ValueError, match="REPA needs the raw images.*image_folder"):
        Trainer(cfg.replace(image_folder=None, out_dir=str(tmp_path / "r2")), feature_encoder=Encoder())
