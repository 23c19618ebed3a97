"""Training: objective, REPA, EMA, checkpoints and exact resume, bad input."""

import json
import math
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ddt_fast
from ddt_fast import models
from ddt_fast.models import CheckpointError
from ddt_fast.training import (
    EMA,
    DiffusionTrainer,
    NonFiniteLossError,
    StepDraws,
    TrainConfig,
    Trainer,
    cosine_alignment_loss,
    export_lightning,
    interpolate,
    list_checkpoints,
    load_feature_encoder,
    load_training_checkpoint,
    resize_features,
)
from ddt_fast.training import repa as repa_mod
from ddt_fast.training.data import DigitsDataset, SampleOrder, StepBatches
from ddt_fast.training.objective import step_seed

DIGITS = dict(
    model="DDT-tiny/2",
    model_args={"in_channels": 1, "num_classes": 10},
    data="digits",
    progress=False,
    tensorboard=False,
    seed=3,
)


class FakeEncoder(nn.Module):
    """A frozen stand-in for DINOv2: images [B, 1, 8, 8] -> 2x2 patch features [B, 4, 12]."""

    feature_dim = 12

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(7)
        self.conv = nn.Conv2d(1, 12, kernel_size=4, stride=4)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g))
            self.conv.bias.copy_(torch.randn(self.conv.bias.shape, generator=g))
        self.requires_grad_(False)

    def forward(self, images):
        return self.conv(images).flatten(2).transpose(1, 2)


def _cfg(tmp_path, name="run", **kw):
    return TrainConfig(**{**DIGITS, "out_dir": str(tmp_path / name), **kw})


# ---------------------------------------------------------------------------
# objective


def test_interpolation_direction_matches_the_samplers():
    x0, noise = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    t = torch.tensor([0.0, 1.0, 0.25])
    x_t, v = interpolate(x0, noise, t)
    torch.testing.assert_close(x_t[0], noise[0])  # t = 0 is noise
    torch.testing.assert_close(x_t[1], x0[1])  # t = 1 is data
    torch.testing.assert_close(x_t[2], 0.25 * x0[2] + 0.75 * noise[2])
    torch.testing.assert_close(v, x0 - noise)
    # an Euler step of the samplers' ODE along v moves x_t to x_{t+dt}
    x_next, _ = interpolate(x0, noise, torch.full((3,), 0.5))
    x_mid, _ = interpolate(x0, noise, torch.full((3,), 0.25))
    torch.testing.assert_close(x_mid + 0.25 * v, x_next)


def test_loss_is_mse_to_velocity_with_label_dropout_to_null_class():
    torch.manual_seed(0)
    model = models.create("DDT-tiny/2", in_channels=1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x0, y = torch.randn(4, 1, 8, 8), torch.tensor([1, 2, 3, 4])
    draws = StepDraws(torch.randn(4, 1, 8, 8), torch.rand(4), torch.tensor([True, False, True, False]), None)
    out = DiffusionTrainer(model.hidden_size)(model, x0, y, draws)
    x_t = draws.t.view(-1, 1, 1, 1) * x0 + (1 - draws.t.view(-1, 1, 1, 1)) * draws.noise
    v_pred, _ = model(x_t, draws.t, torch.tensor([10, 2, 10, 4]))
    expected = ((v_pred - (x0 - draws.noise)) ** 2).mean()
    torch.testing.assert_close(out["loss"], expected)
    assert set(out) == {"loss", "loss_fm"}


def test_step_draws_time_distribution_and_dropout_rate():
    d = StepDraws.draw(
        0, 5, 20000, (1, 2, 2), time_sampling="lognorm", label_dropout=0.1, posterior=False, device="cpu"
    )
    assert d.t.min() > 0 and d.t.max() < 1
    logit = torch.log(d.t / (1 - d.t))  # sigmoid(randn) -> logit is N(0, 1)
    assert abs(logit.mean()) < 0.03 and abs(logit.std() - 1) < 0.03
    assert abs(d.drop.float().mean() - 0.1) < 0.01
    u = StepDraws.draw(0, 5, 20000, (1,), time_sampling="uniform", label_dropout=0.0, posterior=True, device="cpu")
    assert abs(u.t.mean() - 0.5) < 0.01 and abs(u.t.var() - 1 / 12) < 0.005 and not u.drop.any()
    assert u.eps.shape == (20000, 1)
    # a step's draws are a function of (seed, step): what a resumed run or another world size sees
    again = StepDraws.draw(
        0, 5, 20000, (1, 2, 2), time_sampling="lognorm", label_dropout=0.1, posterior=False, device="cpu"
    )
    assert torch.equal(again.noise, d.noise) and torch.equal(again.t, d.t)
    assert len({step_seed(0, s) for s in range(100)} | {step_seed(1, s) for s in range(100)}) == 200


def test_ema_update_formula():
    model = nn.Linear(3, 2)
    ema = EMA(model, decay=0.9)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    for k, v in ema.state_dict().items():
        torch.testing.assert_close(v, 0.9 * start[k] + 0.1 * (start[k] + 1.0))


def test_sample_order_and_step_batches_cover_the_global_batch():
    order = SampleOrder(10, seed=1)
    stream = order.indices(0, 25)
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))
    assert stream[:10] != stream[10:20]  # a new permutation every epoch
    assert order.indices(7, 6) == stream[7:13]
    one = list(StepBatches(SampleOrder(10, 1), 4, 0, 1, 2, start_step=1, end_step=3))
    two = [list(StepBatches(SampleOrder(10, 1), 4, r, 2, 1, start_step=1, end_step=3)) for r in range(2)]
    assert [len(b) for b in one] == [2, 2, 2, 2]
    assert one[0] + one[1] == two[0][0] + two[1][0] == stream[4:8]


# ---------------------------------------------------------------------------
# REPA


def test_repa_hook_sees_block_align_layer_minus_1_and_loss_is_mean_one_minus_cos():
    torch.manual_seed(0)
    model = models.create("DDT-tiny/2", in_channels=1)
    hook = repa_mod.RepaHook(model, align_layer=2)
    assert hook.index == 1
    x, t, y = torch.randn(2, 1, 8, 8), torch.rand(2), torch.tensor([1, 2])
    model(x, t, y)
    # the output of block index 1, computed by hand from the model's pieces
    patches = model.patchify(x)
    _, c = model.embed_condition(t, y)
    h = model.s_embedder(patches)
    rope = model.rope(8, 8, x.device)
    for block in model.blocks[:2]:
        h = block(h, c, rope)
    torch.testing.assert_close(hook.output, h)
    a, b = torch.randn(2, 5, 6), torch.randn(2, 5, 6)
    expected = (1 - (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))).mean()
    torch.testing.assert_close(cosine_alignment_loss(a, b), expected)
    assert float(cosine_alignment_loss(a, 3 * a)) == pytest.approx(0.0, abs=1e-6)
    assert float(cosine_alignment_loss(a, -a)) == pytest.approx(2.0, abs=1e-6)


def test_resize_features_to_token_grid():
    f = torch.randn(2, 4, 3)  # a 2x2 feature grid
    out = resize_features(f, (4, 4))
    assert out.shape == (2, 16, 3)
    ref = F.interpolate(f.transpose(1, 2).reshape(2, 3, 2, 2), size=(4, 4), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out, ref.flatten(2).transpose(1, 2))
    assert resize_features(f, (2, 2)) is f
    with pytest.raises(ValueError, match="not a square"):
        resize_features(torch.randn(2, 5, 3), (4, 4))


def test_align_layer_out_of_range_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"align_layer=8 is out of range for a model with 4 blocks.*1\.\.4"):
        Trainer(
            _cfg(tmp_path, repa=True, align_layer=8, repa_feature_dim=12, global_batch=4), feature_encoder=FakeEncoder()
        )


def test_dinov2_unavailable_error_names_the_fixes(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(torch.hub, "load", offline)
    with pytest.raises(RuntimeError, match="dinov2_vitb14.*torch.hub.*feature_encoder=.*repa=False"):
        load_feature_encoder("dinov2_vitb14")
    with pytest.raises(ValueError, match="unknown REPA feature encoder"):
        load_feature_encoder("resnet50")


def test_dinov2_wrapper_preprocessing_and_output():
    class FakeViT(nn.Module):
        def forward_features(self, x):
            self.seen = x
            return {"x_norm_patchtokens": x.mean(1).flatten(1)[:, :256, None].expand(-1, -1, 768)}

    enc = repa_mod.DINOv2Features(FakeViT(), 768, resolution=256)
    img = torch.zeros(1, 3, 256, 256)  # mid grey in [-1, 1]
    out = enc(img)
    assert out.shape == (1, 256, 768) and enc.model.seen.shape == (1, 3, 224, 224)
    expected = (0.5 - torch.tensor(enc.MEAN)) / torch.tensor(enc.STD)
    torch.testing.assert_close(enc.model.seen[0, :, 100, 100], expected)


# ---------------------------------------------------------------------------
# training runs


def _weights(trainer):
    return {k: v.clone() for k, v in trainer.module.state_dict().items()}


@pytest.mark.slow
def test_loss_falls_on_digits(tmp_path):
    cfg = _cfg(tmp_path, global_batch=16, steps=30, lr=2e-3, log_every=1, ckpt_every=1000)
    result = Trainer(cfg).fit()
    lines = [json.loads(ln) for ln in open(tmp_path / "run" / "metrics.jsonl")]
    assert [ln["step"] for ln in lines] == list(range(1, 31))
    first = sum(ln["loss"] for ln in lines[:8]) / 8
    last = sum(ln["loss"] for ln in lines[-8:]) / 8
    assert last < 0.75 * first, (first, last)
    assert all(ln["images_per_s"] > 0 for ln in lines)
    assert result["step"] == 30 and os.path.exists(result["checkpoint"])
    assert TrainConfig.from_json(str(tmp_path / "run" / "config.json")) == cfg


@pytest.mark.slow
def test_exact_resume_bit_for_bit_with_repa_and_accumulation(tmp_path):
    common = dict(
        global_batch=8,
        grad_accum=2,
        steps=20,
        ckpt_every=10,
        keep_last=1,
        lr=1e-3,
        repa=True,
        align_layer=2,
        repa_feature_dim=12,
        grad_clip=1.0,
        ema_decay=0.9,
    )
    straight = Trainer(_cfg(tmp_path, "straight", **common), feature_encoder=FakeEncoder())
    straight.fit()

    first = Trainer(_cfg(tmp_path, "resumed", **{**common, "steps": 10}), feature_encoder=FakeEncoder())
    first.fit()
    # a stopped run: a new process would start from the files alone
    torch.manual_seed(1234)
    second = Trainer(_cfg(tmp_path, "resumed", **{**common, "resume": True}), feature_encoder=FakeEncoder())
    assert second.step == 10
    second.fit()

    a, b = _weights(straight), _weights(second)
    assert a.keys() == b.keys() and any(k.startswith("diffusion_trainer.proj.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for k, v in straight.ema.state_dict().items():
        assert torch.equal(v, second.ema.state_dict()[k]), k
    oa, ob = straight.optimizer.state_dict(), second.optimizer.state_dict()
    for i, s in oa["state"].items():
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(s[name], ob["state"][i][name]), (i, name)
    # the metrics log is the uninterrupted run's
    read = [json.loads(ln)["loss"] for ln in open(tmp_path / "straight" / "metrics.jsonl")]
    again = [json.loads(ln)["loss"] for ln in open(tmp_path / "resumed" / "metrics.jsonl")]
    assert read == again
    # keep_last=1, the checkpoint reads as a published-layout file
    found = list_checkpoints(str(tmp_path / "resumed"))
    assert [s for s, _ in found] == [20]
    path = found[0][1]
    sd = torch.load(path, weights_only=True)["state_dict"]
    assert {k.split(".")[0] for k in sd} == {"denoiser", "ema_denoiser", "diffusion_trainer"}
    assert "diffusion_trainer.proj.4.weight" in sd and sd["diffusion_trainer.proj.4.weight"].shape == (12, 64)
    ema_model = ddt_fast.load_checkpoint(path)
    assert ema_model.in_channels == 1 and ema_model.patch_size == 2 and ema_model.num_encoder_blocks == 2
    for k, v in ema_model.state_dict().items():
        assert torch.equal(v, second.ema.state_dict()[k])
    trained = ddt_fast.load_checkpoint(path, ema=False)
    assert torch.equal(trained.state_dict()["blocks.0.attn.qkv.weight"], b["denoiser.blocks.0.attn.qkv.weight"])
    lightning = export_lightning(path, str(tmp_path / "export" / "last.ckpt"))
    raw = torch.load(lightning, weights_only=True)
    assert raw["global_step"] == 20 and set(raw["state_dict"]) == set(sd)
    assert torch.equal(
        ddt_fast.load_checkpoint(lightning).state_dict()["final_layer.linear.weight"],
        ema_model.state_dict()["final_layer.linear.weight"],
    )


# ---------------------------------------------------------------------------
# bad input


def test_config_errors():
    with pytest.raises(ValueError, match="global_batch 10 is not divisible by grad_accum 4"):
        TrainConfig(global_batch=10, grad_accum=4)
    with pytest.raises(ValueError, match="time_sampling"):
        TrainConfig(time_sampling="beta")
    with pytest.raises(ValueError, match=r"unknown training setting\(s\) \['batch'\]"):
        TrainConfig.from_dict({"batch": 3})
    cfg = TrainConfig(model="DDT-B/2", repa=True)
    assert TrainConfig.from_dict(json.loads(cfg.to_json())) == cfg


def test_batch_not_divisible_by_world_size(tmp_path, monkeypatch):
    from ddt_fast.training import trainer as trainer_mod

    monkeypatch.setattr(trainer_mod.dist, "rank_world", lambda: (0, 3))
    with pytest.raises(ValueError, match=r"global_batch 8 is not divisible by world_size \(3\) x grad_accum"):
        Trainer(_cfg(tmp_path, global_batch=8))


def test_dataset_and_model_mismatch_errors(tmp_path):
    from ddt_fast.training import DatasetError

    with pytest.raises(DatasetError, match="dataset folder not found: .*nowhere"):
        Trainer(_cfg(tmp_path, data=str(tmp_path / "nowhere")))
    with pytest.raises(ValueError, match="data has 1 channels but the model takes in_channels=4"):
        Trainer(_cfg(tmp_path, model_args={"num_classes": 10}))


def test_out_dir_is_never_overwritten_and_corrupt_checkpoint_is_named(tmp_path):
    cfg = _cfg(tmp_path, global_batch=4, steps=2, ckpt_every=1, keep_last=0)
    Trainer(cfg).fit()
    with pytest.raises(FileExistsError, match="pass resume=True"):
        Trainer(cfg)
    with pytest.raises(CheckpointError, match="global_batch"):
        Trainer(cfg.replace(resume=True, global_batch=8))
    newest = list_checkpoints(cfg.out_dir)[-1][1]
    with open(newest, "r+b") as f:
        f.truncate(os.path.getsize(newest) // 2)
    with pytest.raises(CheckpointError, match=f"{newest} fails its checksum"):
        load_training_checkpoint(newest)
    assert Trainer(cfg.replace(resume=True, steps=3)).step == 1  # falls back past it (moved aside)
    assert [s for s, _ in list_checkpoints(cfg.out_dir)] == [1]


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    class Poisoned(DigitsDataset):
        def __getitem__(self, i):
            item = super().__getitem__(i)
            return dict(item, x=item["x"] * math.inf) if self.poison else item

    data = Poisoned()
    data.poison = False
    cfg = _cfg(tmp_path, global_batch=4, steps=4, ckpt_every=2)
    trainer = Trainer(cfg, dataset=data)
    trainer.config = cfg.replace(steps=2)
    trainer.fit()
    good = list_checkpoints(cfg.out_dir)
    before = _weights(trainer)
    data.poison = True
    trainer.config = cfg
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 2.*step_00000002\.ckpt"):
        trainer.fit()
    assert list_checkpoints(cfg.out_dir) == good
    after = _weights(trainer)
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.slow
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_bf16_training_on_cpu_float32_linears_match_native(tmp_path, compiled):
    """precision="bf16" on a CPU: under autocast the linear layers multiply in
    float32 (ops.linear) instead of PyTorch's bf16 kernels; the losses of the
    same run (REPA projector included) agree with those kernels' within bf16
    noise, the weights stay float32, and the run works under torch.compile."""
    common = dict(
        global_batch=8,
        steps=4,
        lr=1e-3,
        log_every=1,
        ckpt_every=1000,
        precision="bf16",
        repa=True,
        align_layer=2,
        repa_feature_dim=12,
    )
    losses = {}
    for mode in ("float32", "native"):
        with ddt_fast.ops.use_backend(cpu_linear=mode):
            trainer = Trainer(
                _cfg(tmp_path, mode, compile=compiled and mode == "float32", **common), feature_encoder=FakeEncoder()
            )
            trainer.fit()
        losses[mode] = [json.loads(ln)["loss"] for ln in open(tmp_path / mode / "metrics.jsonl")]
        assert all(p.dtype == torch.float32 for p in trainer.module.parameters())
    assert len(losses["float32"]) == 4 and all(math.isfinite(v) for v in losses["float32"])
    for a, b in zip(losses["float32"], losses["native"]):
        assert abs(a - b) <= 2e-2 * abs(b), losses
