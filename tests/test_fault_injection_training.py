"""Fault injection for training runs, checkpoints and latent shards: killed
writes, flipped bytes, truncation, a full disk, torn metrics, changed inputs.

The tests marked slow start training processes and SIGKILL them in the
middle of a checkpoint write; the others damage files in place."""

import errno
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from helpers import flip_bytes, tiny_vae

from ddt_fast import models
from ddt_fast._io import read_checksum, sha256_file
from ddt_fast.models import CheckpointError
from ddt_fast.training import (
    DatasetError,
    LatentDataset,
    MetricsLogError,
    NonFiniteLossError,
    TrainConfig,
    Trainer,
    extract_latents,
    list_checkpoints,
    load_training_checkpoint,
)
from ddt_fast.training import checkpointing as ckpt
from ddt_fast.training.data import DigitsDataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = dict(
    model="DDT-tiny/2",
    model_args={"in_channels": 1, "num_classes": 10},
    data="digits",
    progress=False,
    tensorboard=False,
    seed=3,
    global_batch=4,
    lr=1e-3,
    ema_decay=0.9,
    log_every=1,
)


def _cfg(tmp_path, name="run", **kw):
    return TrainConfig(**{**DIGITS, "out_dir": str(tmp_path / name), **kw})


def _weights(path):
    return torch.load(path, weights_only=True)["state_dict"]


def _same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _temps(folder):
    return [n for n in os.listdir(folder) if n.endswith(".tmp")] if os.path.isdir(folder) else []


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted 6-step run (checkpoints at 2, 4, 6), the reference for resumed ones."""
    root = tmp_path_factory.mktemp("straight")
    Trainer(_cfg(root, steps=6, ckpt_every=2, keep_last=0)).fit()
    return str(root / "run")


def _run_to(tmp_path, steps, name="run", **kw):
    cfg = _cfg(tmp_path, name, **{"steps": steps, "ckpt_every": 2, "keep_last": 0, **kw})
    Trainer(cfg).fit()
    return cfg


# ---------------------------------------------------------------------------
# checkpoints: sidecars, fallback


@pytest.mark.slow
def test_checkpoints_carry_sha256sum_sidecars_and_prune_removes_them(tmp_path):
    cfg = _run_to(tmp_path, 4, keep_last=1, export_lightning=True)
    folder = os.path.join(cfg.out_dir, "checkpoints")
    assert sorted(os.listdir(folder)) == ["step_00000004.ckpt", "step_00000004.ckpt.sha256"]  # step 2 pruned
    line = open(os.path.join(folder, "step_00000004.ckpt.sha256")).read()
    assert line == f"{sha256_file(os.path.join(folder, 'step_00000004.ckpt'))}  step_00000004.ckpt\n"
    lightning = os.path.join(cfg.out_dir, "lightning", "last.ckpt")
    assert read_checksum(lightning) == sha256_file(lightning)
    if shutil.which("sha256sum"):  # the format is sha256sum's own
        for where, name in ((folder, "step_00000004.ckpt.sha256"), (os.path.dirname(lightning), "last.ckpt.sha256")):
            subprocess.run(["sha256sum", "-c", "--status", name], cwd=where, check=True)


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["byte_flips", "truncated", "zero_bytes", "unreadable"])
def test_damaged_newest_checkpoint_falls_back_with_warning(tmp_path, straight, caplog, damage):
    cfg = _run_to(tmp_path, 4)
    newest = ckpt.checkpoint_path(cfg.out_dir, 4)
    older = ckpt.checkpoint_path(cfg.out_dir, 2)
    size = os.path.getsize(newest)
    if damage == "byte_flips":  # two bytes inside the tensor data: the file still unpickles
        flip_bytes(newest, [size // 2, size // 2 + 1000])
        torch.load(newest, weights_only=True)
    elif damage == "truncated":
        with open(newest, "r+b") as f:
            f.truncate(size // 2)
    elif damage == "zero_bytes":
        open(newest, "wb").close()
    else:  # something that cannot be read as a file
        os.remove(newest)
        os.mkdir(newest)
    with pytest.raises(CheckpointError, match=re.escape(newest)):
        load_training_checkpoint(newest)
    with caplog.at_level(logging.WARNING, logger="ddt_fast"):
        trainer = Trainer(cfg.replace(resume=True, steps=6))
    assert trainer.step == 2
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(newest in m and older in m and "moved aside" in m for m in warned), warned
    # moved aside: never listed, resumed from or pruned again
    assert [s for s, _ in list_checkpoints(cfg.out_dir)] == [2]
    assert os.path.exists(newest + ".corrupt") and os.path.exists(newest + ".corrupt.sha256")
    trainer.fit()
    assert [s for s, _ in list_checkpoints(cfg.out_dir)] == [2, 4, 6]
    _same_weights(_weights(ckpt.checkpoint_path(cfg.out_dir, 6)), _weights(ckpt.checkpoint_path(straight, 6)))
    lines = [json.loads(ln)["step"] for ln in open(os.path.join(cfg.out_dir, "metrics.jsonl"))]
    assert lines == [1, 2, 3, 4, 5, 6]


def test_no_good_checkpoint_is_a_clear_error_and_nothing_is_moved(tmp_path):
    cfg = _run_to(tmp_path, 4)
    paths = [p for _, p in list_checkpoints(cfg.out_dir)]
    for p in paths:
        flip_bytes(p, [os.path.getsize(p) // 2])
    with pytest.raises(
        CheckpointError,
        match=r"(?s)no checkpoint in .* can be resumed from.*"
        + re.escape(paths[1])
        + r" fails its checksum.*"
        + re.escape(paths[0])
        + r".*start a new run in another out_dir",
    ):
        Trainer(cfg.replace(resume=True, steps=6))
    assert [p for _, p in list_checkpoints(cfg.out_dir)] == paths


def test_legacy_checkpoint_without_sidecar_loads_with_warning(tmp_path, caplog):
    cfg = _run_to(tmp_path, 2)
    path = ckpt.checkpoint_path(cfg.out_dir, 2)
    os.remove(path + ".sha256")
    with caplog.at_level(logging.WARNING, logger="ddt_fast"):
        assert Trainer(cfg.replace(resume=True, steps=4)).step == 2
    assert any("no checksum file" in r.getMessage() and path in r.getMessage() for r in caplog.records)


@pytest.mark.slow
def test_checkpoint_that_verifies_but_does_not_load_is_not_skipped(tmp_path):
    cfg = _run_to(tmp_path, 4)
    newest = ckpt.checkpoint_path(cfg.out_dir, 4)
    torch.save({"format": "something else"}, newest)  # intact bytes, wrong content
    with open(newest + ".sha256", "w") as f:
        f.write(f"{sha256_file(newest)}  step_00000004.ckpt\n")
    with pytest.raises(CheckpointError, match="not a ddt_fast training checkpoint.*checksum verifies"):
        Trainer(cfg.replace(resume=True, steps=6))
    assert os.path.exists(newest)


def test_non_finite_loss_names_the_newest_checkpoint_that_verifies(tmp_path):
    class Poisoned(DigitsDataset):
        poison = False

        def __getitem__(self, i):
            item = super().__getitem__(i)
            return dict(item, x=item["x"] * float("inf")) if self.poison else item

    data = Poisoned()
    cfg = _cfg(tmp_path, steps=6, ckpt_every=2, keep_last=0)
    trainer = Trainer(cfg, dataset=data)
    trainer.config = cfg.replace(steps=4)
    trainer.fit()
    newest, older = ckpt.checkpoint_path(cfg.out_dir, 4), ckpt.checkpoint_path(cfg.out_dir, 2)
    flip_bytes(newest, [os.path.getsize(newest) // 2, os.path.getsize(newest) // 2 + 7])
    data.poison = True
    trainer.config = cfg
    with pytest.raises(NonFiniteLossError) as e:
        trainer.fit()
    msg = str(e.value)
    assert f"Newest checkpoint that verifies: {older}." in msg and f"{newest} fails its checksum" in msg


# ---------------------------------------------------------------------------
# killed and failed writes


def test_leftovers_of_killed_writes_are_removed_at_start(tmp_path, caplog):
    cfg = _run_to(tmp_path, 2, export_lightning=True)
    folder = os.path.join(cfg.out_dir, "checkpoints")
    leftovers = [
        os.path.join(folder, ".step_00000004.ckpt.a1B2c3D4.tmp"),
        os.path.join(folder, "step_00000004.ckpt.sha256"),  # sidecar, never renamed checkpoint
        os.path.join(cfg.out_dir, "lightning", ".last.ckpt.x9Y8z7W6.tmp"),
        os.path.join(cfg.out_dir, ".metrics.jsonl.q1W2e3R4.tmp"),
    ]
    for p in leftovers:
        with open(p, "w") as f:
            f.write("half")
    with caplog.at_level(logging.WARNING, logger="ddt_fast"):
        Trainer(cfg.replace(resume=True))
    assert not any(os.path.exists(p) for p in leftovers)
    assert "removed 4 file(s) that killed writes left" in caplog.text
    assert sorted(os.listdir(folder)) == ["step_00000002.ckpt", "step_00000002.ckpt.sha256"]


@pytest.mark.slow
@pytest.mark.parametrize("where", ["torch_save", "rename"])
def test_disk_full_leaves_no_temp_and_the_previous_checkpoint_intact(tmp_path, monkeypatch, where):
    cfg = _cfg(tmp_path, steps=4, ckpt_every=2, keep_last=1, export_lightning=True)
    trainer = Trainer(cfg)
    trainer.config = cfg.replace(steps=2)
    trainer.fit()
    folder = os.path.join(cfg.out_dir, "checkpoints")
    lightning = os.path.join(cfg.out_dir, "lightning", "last.ckpt")
    before = {n: open(os.path.join(folder, n), "rb").read() for n in os.listdir(folder)}
    lightning_before = open(lightning, "rb").read()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    if where == "torch_save":  # half the bytes reach the file, then the disk is full
        real_save = torch.save

        def save(obj, f, *a, **k):
            real_save(obj, f, *a, **k)
            with open(f, "r+b") as fh:
                fh.truncate(os.path.getsize(f) // 2)
            full()

        monkeypatch.setattr(torch, "save", save)
    else:  # the checkpoint and its sidecar are written; the rename into place fails
        import ddt_fast._io as io

        real_replace = os.replace
        monkeypatch.setattr(io.os, "replace", lambda a, b: full() if b.endswith(".ckpt") else real_replace(a, b))
    trainer.config = cfg
    with pytest.raises(OSError, match="No space left"):
        trainer.fit()
    monkeypatch.undo()
    assert not _temps(folder) and not _temps(os.path.dirname(lightning))
    after = {n: open(os.path.join(folder, n), "rb").read() for n in os.listdir(folder)}
    assert after == before  # no sidecar of step 4, step 2 untouched
    load_training_checkpoint(ckpt.checkpoint_path(cfg.out_dir, 2))
    assert open(lightning, "rb").read() == lightning_before and read_checksum(lightning) == sha256_file(lightning)
    assert Trainer(cfg.replace(resume=True)).step == 2


def test_export_failing_after_its_sidecar_restores_the_old_sidecar(tmp_path, monkeypatch):
    cfg = _run_to(tmp_path, 2, export_lightning=True)
    lightning = os.path.join(cfg.out_dir, "lightning", "last.ckpt")
    side = open(lightning + ".sha256").read()
    import ddt_fast._io as io

    real_replace = os.replace

    def replace(a, b):
        if b == lightning:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_replace(a, b)

    monkeypatch.setattr(io.os, "replace", replace)
    with pytest.raises(OSError):
        ckpt.export_lightning(ckpt.checkpoint_path(cfg.out_dir, 2), lightning, overwrite=True, checksum=True)
    monkeypatch.undo()
    assert open(lightning + ".sha256").read() == side and read_checksum(lightning) == sha256_file(lightning)
    assert not _temps(os.path.dirname(lightning))


# ---------------------------------------------------------------------------
# metrics.jsonl


@pytest.mark.slow
def test_torn_last_metrics_line_is_dropped_and_a_damaged_middle_line_is_reported(tmp_path, straight, caplog):
    cfg = _run_to(tmp_path, 4)
    metrics = os.path.join(cfg.out_dir, "metrics.jsonl")
    good = open(metrics).read()
    with open(metrics, "a") as f:
        f.write('{"step": 5, "loss": 0.12')  # a write killed mid-line
    with caplog.at_level(logging.WARNING, logger="ddt_fast"):
        Trainer(cfg.replace(resume=True, steps=6)).fit()
    assert any(metrics in r.getMessage() and "line 5" in r.getMessage() for r in caplog.records)
    steps = [json.loads(ln)["step"] for ln in open(metrics)]
    assert steps == [1, 2, 3, 4, 5, 6]
    _same_weights(_weights(ckpt.checkpoint_path(cfg.out_dir, 6)), _weights(ckpt.checkpoint_path(straight, 6)))

    lines = good.splitlines(keepends=True)
    with open(metrics, "w") as f:
        f.write("".join(lines[:2]) + '{"step": 3, "lo\n' + "".join(lines[3:]))
    with pytest.raises(MetricsLogError, match=rf"{re.escape(metrics)}, line 3: .*delete line 3"):
        Trainer(cfg.replace(resume=True, steps=8))


# ---------------------------------------------------------------------------
# what a run records


def _init_file(tmp_path, seed, name):
    torch.manual_seed(seed)
    path = str(tmp_path / name)
    models.create("DDT-tiny/2", in_channels=1, num_classes=10).save_pretrained(path)
    return path


@pytest.mark.slow
def test_resume_with_other_init_weights_or_dataset_is_refused(tmp_path, caplog):
    first, second = _init_file(tmp_path, 1, "init_a"), _init_file(tmp_path, 2, "init_b")
    cfg = _run_to(tmp_path, 2, init_from=first)
    state = load_training_checkpoint(ckpt.checkpoint_path(cfg.out_dir, 2))
    recorded = json.load(open(os.path.join(cfg.out_dir, "inputs.json")))
    assert state["inputs"] == recorded and recorded["dataset"] == DigitsDataset().digest()
    assert recorded["init_from"] == models.weights_digest(models.load_checkpoint(first))
    # the same weights under another path: accepted
    shutil.copytree(first, str(tmp_path / "moved"))
    assert Trainer(cfg.replace(resume=True, init_from=str(tmp_path / "moved"))).step == 2
    with pytest.raises(CheckpointError, match="the init_from weights .*allow_changed_inputs=True"):
        Trainer(cfg.replace(resume=True, init_from=second))

    class Shifted(DigitsDataset):
        def __init__(self):
            super().__init__()
            self.x = self.x.flip(0)

    with pytest.raises(CheckpointError, match="the dataset's content"):
        Trainer(cfg.replace(resume=True, init_from=first), dataset=Shifted())
    with caplog.at_level(logging.WARNING, logger="ddt_fast"):
        t = Trainer(cfg.replace(resume=True, init_from=second, allow_changed_inputs=True))
    assert t.step == 2 and "with changed inputs" in caplog.text
    assert json.load(open(os.path.join(cfg.out_dir, "inputs.json")))["init_from"] != recorded["init_from"]


def test_resume_with_another_feature_encoder_is_refused(tmp_path):
    class Encoder(torch.nn.Module):
        feature_dim = 12

        def __init__(self, seed):
            super().__init__()
            torch.manual_seed(seed)
            self.conv = torch.nn.Conv2d(1, 12, kernel_size=4, stride=4)

        def forward(self, images):
            return self.conv(images).flatten(2).transpose(1, 2)

    common = dict(repa=True, align_layer=2, repa_feature_dim=12)
    cfg = _cfg(tmp_path, steps=2, ckpt_every=2, **common)
    Trainer(cfg, feature_encoder=Encoder(1)).fit()
    assert Trainer(cfg.replace(resume=True), feature_encoder=Encoder(1)).step == 2
    with pytest.raises(CheckpointError, match="the REPA feature encoder's weights"):
        Trainer(cfg.replace(resume=True), feature_encoder=Encoder(2))


# ---------------------------------------------------------------------------
# latent shards


_vae = tiny_vae


@pytest.fixture(scope="module")
def latents(tmp_path_factory):
    pytest.importorskip("diffusers")
    Image = pytest.importorskip("PIL.Image")

    root = tmp_path_factory.mktemp("latents")
    vae_dir = str(root / "vae")
    _vae(0).save_pretrained(vae_dir)
    images = root / "images"
    rng = np.random.default_rng(0)
    for cls, n in (("cat", 3), ("dog", 2)):
        os.makedirs(images / cls)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)).save(images / cls / f"{i}.png")
    out = str(root / "out")
    kwargs = dict(vae=vae_dir, resolution=16, batch_size=3, shard_size=2, progress=False)
    extract_latents(str(images), out, **kwargs)
    return dict(root=root, images=str(images), out=out, kwargs=kwargs)


def _copy(latents, tmp_path, name="data"):
    dst = str(tmp_path / name)
    shutil.copytree(latents["out"], dst)
    return dst


def test_index_records_shard_checksums_and_extract_json_the_inputs(latents):
    index = json.load(open(os.path.join(latents["out"], "index.json")))
    for s in index["shards"]:
        path = os.path.join(latents["out"], s["file"])
        assert s["sha256"] == sha256_file(path) == read_checksum(path) and s["bytes"] == os.path.getsize(path)
    settings = json.load(open(os.path.join(latents["out"], "extract.json")))
    vae = pytest.importorskip("diffusers").AutoencoderKL.from_pretrained(os.path.join(latents["root"], "vae"))
    assert settings["vae_digest"] == models.weights_digest(vae) and len(settings["files_digest"]) == 64


@pytest.mark.parametrize("damage", ["byte_flip", "truncated"])
def test_damaged_shard_is_a_dataset_error_and_re_extraction_repairs_it(latents, tmp_path, damage):
    data = _copy(latents, tmp_path)
    shard = os.path.join(data, "shards", "shard_000001.safetensors")
    original = open(shard, "rb").read()
    fix = "re-run extract_latents with the same arguments"
    if damage == "byte_flip":  # in the tensor data: the header still parses
        flip_bytes(shard, [len(original) - 5])
        ds = LatentDataset(data)  # size and header are fine
        ds[0]  # shard 0 reads fine
        with pytest.raises(DatasetError, match=rf"{re.escape(shard)} fails its checksum.*{fix}"):
            ds[2]
        with pytest.raises(DatasetError, match=rf"{re.escape(shard)} fails its checksum"):
            LatentDataset(data, verify="open")
    else:
        with open(shard, "r+b") as f:
            f.truncate(len(original) - 8)
        with pytest.raises(DatasetError, match=rf"corrupt: {re.escape(shard)} \(\d+ bytes, the index says.*{fix}"):
            LatentDataset(data)
    others = {
        n: os.stat(os.path.join(data, "shards", n)).st_mtime_ns
        for n in os.listdir(os.path.join(data, "shards"))
        if "000001" not in n
    }
    extract_latents(latents["images"], data, **latents["kwargs"])
    assert open(shard, "rb").read() == original  # re-encoded, the rest skipped
    assert {n: os.stat(os.path.join(data, "shards", n)).st_mtime_ns for n in others} == others
    ds = LatentDataset(data, verify="open")
    assert len(ds) == 5 and ds[2]["x"].shape == (4, 8, 8)


def test_resumed_extraction_skips_only_shards_that_verify(latents, tmp_path):
    data = _copy(latents, tmp_path)
    shards = os.path.join(data, "shards")
    os.remove(os.path.join(data, "index.json"))  # an unfinished extraction
    os.remove(os.path.join(shards, "shard_000000.safetensors.sha256"))  # no sidecar: not known complete
    damaged = os.path.join(shards, "shard_000002.safetensors")
    flip_bytes(damaged, [os.path.getsize(damaged) - 3])  # damaged, still parses
    open(os.path.join(shards, ".shard_000001.safetensors.k3Jd93Ls.tmp"), "w").close()  # a killed write
    before = {n: os.stat(os.path.join(shards, n)).st_mtime_ns for n in os.listdir(shards)}
    extract_latents(latents["images"], data, **latents["kwargs"])
    after = {n: os.stat(os.path.join(shards, n)).st_mtime_ns for n in os.listdir(shards)}
    assert after["shard_000001.safetensors"] == before["shard_000001.safetensors"]  # verified: skipped
    assert after["shard_000000.safetensors"] != before["shard_000000.safetensors"]  # re-encoded
    assert after["shard_000002.safetensors"] != before["shard_000002.safetensors"]
    assert not _temps(shards)
    assert open(os.path.join(data, "index.json")).read() == open(os.path.join(latents["out"], "index.json")).read()


def test_re_extraction_with_another_vae_or_changed_images_is_refused(latents, tmp_path):
    data = _copy(latents, tmp_path)
    other_vae = str(tmp_path / "vae")
    _vae(1).save_pretrained(other_vae)
    kwargs = dict(latents["kwargs"], vae=other_vae)
    with pytest.raises(ValueError, match=r"other settings.*vae_digest \(the VAE's weights"):
        extract_latents(latents["images"], data, **kwargs)
    images = str(tmp_path / "images")
    shutil.copytree(latents["images"], images)
    with open(os.path.join(images, "dog", "1.png"), "ab") as f:
        f.write(b"\0")  # same names, other content
    with pytest.raises(ValueError, match=r"other settings.*files_digest \(the input images"):
        extract_latents(images, data, **latents["kwargs"])


@pytest.mark.slow
def test_training_resume_on_another_dataset_is_refused_and_a_moved_one_accepted(latents, tmp_path):
    data = _copy(latents, tmp_path)
    cfg = TrainConfig(
        model="DDT-tiny/2",
        model_args={"num_classes": 2},
        data=data,
        global_batch=2,
        steps=2,
        ckpt_every=2,
        out_dir=str(tmp_path / "run"),
        progress=False,
        tensorboard=False,
    )
    Trainer(cfg).fit()
    moved = _copy(latents, tmp_path, "moved")  # the same latents elsewhere
    assert Trainer(cfg.replace(resume=True, data=moved, steps=3)).step == 2
    shutil.rmtree(data)  # other latents under the same path
    extract_latents(latents["images"], data, **dict(latents["kwargs"], shard_size=3))
    with pytest.raises(CheckpointError, match="the dataset's content"):
        Trainer(cfg.replace(resume=True, steps=3))


# ---------------------------------------------------------------------------
# SIGKILL during a checkpoint write, then resume


CHILD = textwrap.dedent("""
    import os, sys, time
    import torch
    torch.set_num_threads(1)
    out, steps, hang = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    marker = out + ".hanging"

    def stop_here():
        open(marker, "w").close()
        time.sleep(600)

    if hang == "torch_save":        # half the checkpoint is written when the kill comes
        real = torch.save

        def save(obj, f, *a, **k):
            real(obj, f, *a, **k)
            if isinstance(obj, dict) and obj.get("step") == 4 and "optimizer" in obj:
                with open(f, "r+b") as fh:
                    fh.truncate(os.path.getsize(f) // 2)
                stop_here()
        torch.save = save
    elif hang == "rename":          # the sidecar is in place, the checkpoint not yet renamed
        real_replace = os.replace

        def replace(a, b):
            if b.endswith("step_00000004.ckpt"):
                stop_here()
            real_replace(a, b)
        os.replace = replace

    from ddt_fast.training import TrainConfig, Trainer
    cfg = TrainConfig(model="DDT-tiny/2", model_args={"in_channels": 1, "num_classes": 10}, data="digits",
                      progress=False, tensorboard=False, seed=3, global_batch=4, lr=1e-3, ema_decay=0.9,
                      log_every=1, steps=steps, ckpt_every=2, keep_last=2, out_dir=out, resume=hang == "resume")
    Trainer(cfg).fit()
""")


def _child(tmp_path, out, steps, hang):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    return subprocess.Popen(
        [sys.executable, str(script), out, str(steps), hang],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _finish(proc):
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output
    return output


@pytest.mark.slow
@pytest.mark.parametrize("hang", ["torch_save", "rename"])
def test_sigkill_during_checkpoint_write_then_resume_gives_the_uninterrupted_weights(tmp_path, hang):
    reference, killed = str(tmp_path / "reference"), str(tmp_path / "killed")
    proc = _child(tmp_path, killed, 6, hang)
    deadline = time.monotonic() + 300
    while not os.path.exists(killed + ".hanging"):
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, "the child never reached the step-4 checkpoint"
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    folder = os.path.join(killed, "checkpoints")
    left = sorted(os.listdir(folder))
    assert [n for n in left if n.endswith(".tmp")], left  # the killed write's temp file
    assert "step_00000004.ckpt" not in left and [s for s, _ in list_checkpoints(killed)] == [2]
    assert ("step_00000004.ckpt.sha256" in left) == (hang == "rename")  # the sidecar comes first
    _finish(_child(tmp_path, reference, 6, "none"))
    _finish(_child(tmp_path, killed, 6, "resume"))
    assert sorted(os.listdir(folder)) == [
        "step_00000004.ckpt",
        "step_00000004.ckpt.sha256",
        "step_00000006.ckpt",
        "step_00000006.ckpt.sha256",
    ]
    for _, path in list_checkpoints(killed):
        assert ckpt.verify_checksum(path)
    a = load_training_checkpoint(ckpt.checkpoint_path(reference, 6))
    b = load_training_checkpoint(ckpt.checkpoint_path(killed, 6))
    _same_weights(a["state_dict"], b["state_dict"])
    for i, s in a["optimizer"]["state"].items():
        for name, v in s.items():
            assert torch.equal(v, b["optimizer"]["state"][i][name]), (i, name)
    assert open(os.path.join(reference, "metrics.jsonl")).read().count("\n") == 6
    steps = [json.loads(ln)["step"] for ln in open(os.path.join(killed, "metrics.jsonl"))]
    assert steps == [1, 2, 3, 4, 5, 6]


def _resume_worker(rank, world, store, out, report):
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        try:
            step = Trainer(
                TrainConfig(
                    **{
                        **DIGITS,
                        "out_dir": out,
                        "steps": 6,
                        "ckpt_every": 2,
                        "keep_last": 0,
                        "resume": True,
                        "device": "cpu",
                    }
                )
            ).step
            result = {"step": step}
        except CheckpointError as e:
            result = {"error": str(e)}
        with open(f"{report}.{rank}", "w") as f:
            json.dump(result, f)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_processes_fall_back_together_and_fail_together(tmp_path):
    """Rank 0 verifies and picks the checkpoint; rank 1 resumes from the same one, or fails alike."""
    import torch.multiprocessing as mp

    cfg = _run_to(tmp_path, 4)
    newest, older = ckpt.checkpoint_path(cfg.out_dir, 4), ckpt.checkpoint_path(cfg.out_dir, 2)
    flip_bytes(newest, [os.path.getsize(newest) // 2])
    report = str(tmp_path / "report")
    mp.spawn(_resume_worker, args=(2, str(tmp_path / "store1"), cfg.out_dir, report), nprocs=2)
    assert [json.load(open(f"{report}.{r}")) for r in range(2)] == [{"step": 2}, {"step": 2}]
    assert os.path.exists(newest + ".corrupt")
    flip_bytes(older, [os.path.getsize(older) // 2])
    mp.spawn(_resume_worker, args=(2, str(tmp_path / "store2"), cfg.out_dir, report), nprocs=2)
    errors = [json.load(open(f"{report}.{r}"))["error"] for r in range(2)]
    assert errors[0] == errors[1] and "no checkpoint in" in errors[0] and older in errors[0]


def test_load_checkpoint_checks_a_sidecar_when_there_is_one(tmp_path):
    """ddt_fast.load_checkpoint (weights for sampling) verifies a training
    checkpoint against its sidecar too, not only the resume path."""
    Trainer(_cfg(tmp_path, steps=2, ckpt_every=2)).fit()
    ((_, path),) = list_checkpoints(str(tmp_path / "run"))
    models.load_checkpoint(path)  # verifies and loads
    size = os.path.getsize(path)
    flip_bytes(path, [size // 2, size // 2 + 3])
    with pytest.raises(CheckpointError, match="fails its checksum"):
        models.load_checkpoint(path)
