import json
import os

import pytest
import torch
from safetensors.torch import save_file

import ddt_fast
from ddt_fast import models
from ddt_fast.models import DDT, CheckpointError, infer_config, load_checkpoint


def _model(name="DDT-tiny/2", seed=0, **kw):
    torch.manual_seed(seed)
    m = models.create(name, **kw)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _lightning_file(path, ema_model, train_model, prefix_extra=""):
    sd = {}
    for k, v in train_model.state_dict().items():
        sd[f"denoiser.{prefix_extra}{k}"] = v
    for k, v in ema_model.state_dict().items():
        sd[f"ema_denoiser.{prefix_extra}{k}"] = v
    C = ema_model.hidden_size
    for i, shape in enumerate([(C, C), (C, C), (768, C)]):  # the REPA projector
        sd[f"diffusion_trainer.proj.{2 * i}.weight"] = torch.randn(shape)
    torch.save({"state_dict": sd, "epoch": 3, "global_step": 1000, "pytorch-lightning_version": "2.2.0"}, path)


def test_lightning_checkpoint_takes_ema_by_default(tmp_path):
    ema, train = _model(seed=1), _model(seed=2)
    path = str(tmp_path / "last.ckpt")
    _lightning_file(path, ema, train)
    loaded = load_checkpoint(path, num_encoder_blocks=2)
    assert _same_weights(loaded, ema)
    assert _same_weights(load_checkpoint(path, ema=False, num_encoder_blocks=2), train)


def test_tiny_preset_split_is_inferred_from_matching_preset(tmp_path):
    ema = _model(seed=1)
    path = str(tmp_path / "m.ckpt")
    _lightning_file(path, ema, ema)
    assert load_checkpoint(path).num_encoder_blocks == models.PRESETS["DDT-tiny/2"]["num_encoder_blocks"]


def test_compiled_model_prefixes_are_stripped(tmp_path):
    ema = _model(seed=3)
    path = str(tmp_path / "compiled.ckpt")
    _lightning_file(path, ema, ema, prefix_extra="_orig_mod.")
    assert _same_weights(load_checkpoint(path), ema)
    compiled_plain = {"_orig_mod." + k: v for k, v in ema.state_dict().items()}
    torch.save(compiled_plain, tmp_path / "plain_compiled.pt")
    assert _same_weights(load_checkpoint(str(tmp_path / "plain_compiled.pt")), ema)


def test_plain_state_dict_and_safetensors(tmp_path):
    m = _model(seed=4)
    torch.save(m.state_dict(), tmp_path / "plain.pt")
    assert _same_weights(load_checkpoint(str(tmp_path / "plain.pt")), m)
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(tmp_path / "w.safetensors"))
    assert _same_weights(load_checkpoint(str(tmp_path / "w.safetensors")), m)


def test_save_pretrained_round_trip_keeps_split_and_outputs(tmp_path):
    m = _model("DDT-tiny-d72/2", seed=5, num_encoder_blocks=1)
    m.save_pretrained(str(tmp_path / "ckpt"))
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["config.json", "model.safetensors"]
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert cfg["num_encoder_blocks"] == 1 and cfg["hidden_size"] == 144
    loaded = DDT.from_pretrained(str(tmp_path / "ckpt"))
    assert loaded.num_encoder_blocks == 1 and _same_weights(loaded, m)
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2])
    with torch.no_grad():
        assert torch.equal(loaded(x, t, y)[0], m(x, t, y)[0])


def test_save_pretrained_overwrites_atomically(tmp_path, monkeypatch):
    m = _model(seed=6)
    folder = str(tmp_path / "ckpt")
    m.save_pretrained(folder)
    before = (tmp_path / "ckpt" / "model.safetensors").read_bytes()
    import safetensors.torch

    def crash(*a, **k):
        raise KeyboardInterrupt("simulated crash while writing")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        _model(seed=7).save_pretrained(folder, overwrite=True)
    assert (tmp_path / "ckpt" / "model.safetensors").read_bytes() == before
    assert sorted(os.listdir(folder)) == ["config.json", "model.safetensors"]  # no temp left


def test_infer_config_published_xl_from_shapes():
    with torch.device("meta"):
        sd = models.create("DDT-XL/2").state_dict()
    cfg = infer_config(sd)
    assert cfg == dict(models.PRESETS["DDT-XL/2"])
    assert infer_config(sd, num_encoder_blocks=20)["num_encoder_blocks"] == 20


def test_unknown_architecture_needs_split():
    m = DDT(hidden_size=32, num_groups=2, num_blocks=3, num_encoder_blocks=1, num_classes=5)
    with pytest.raises(CheckpointError, match="pass num_encoder_blocks"):
        infer_config(m.state_dict())
    assert infer_config(m.state_dict(), num_encoder_blocks=1)["num_groups"] == 2


def test_missing_keys_named(tmp_path):
    sd = _model().state_dict()
    del sd["blocks.1.mlp.w2.weight"]
    torch.save(sd, tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match=r"missing key.*blocks\.1\.mlp\.w2\.weight.*Model config"):
        load_checkpoint(str(tmp_path / "missing.pt"))


def test_wrong_shapes_named(tmp_path):
    sd = _model().state_dict()
    sd["blocks.0.attn.proj.weight"] = torch.zeros(64, 63)
    torch.save(sd, tmp_path / "shape.pt")
    with pytest.raises(CheckpointError, match=r"shape mismatch.*blocks\.0\.attn\.proj\.weight \(64, 63\)"):
        load_checkpoint(str(tmp_path / "shape.pt"))


def test_unexpected_keys_named_and_non_strict(tmp_path):
    m = _model()
    sd = dict(m.state_dict(), **{"blocks.0.extra.weight": torch.zeros(1)})
    torch.save(sd, tmp_path / "extra.pt")
    with pytest.raises(CheckpointError, match=r"unexpected key.*blocks\.0\.extra\.weight"):
        load_checkpoint(str(tmp_path / "extra.pt"), model=models.create("DDT-tiny/2"))
    loaded = load_checkpoint(str(tmp_path / "extra.pt"), model=models.create("DDT-tiny/2"), strict=False)
    assert _same_weights(loaded, m)


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(str(tmp_path / "nope.ckpt"))
    good = tmp_path / "good.pt"
    torch.save(_model().state_dict(), good)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(str(bad))
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match="safetensors"):
        load_checkpoint(str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointError, match="do not look like a DDT"):
        torch.save({"foo": torch.zeros(2)}, tmp_path / "other.pt")
        load_checkpoint(str(tmp_path / "other.pt"))


class _Custom:
    def __init__(self):
        self.x = 1


def test_untrusted_pickle_refused_with_how_to_allow(tmp_path):
    m = _model()
    torch.save(
        {
            "state_dict": {"ema_denoiser." + k: v for k, v in m.state_dict().items()},
            "hyper_parameters": {"obj": _Custom(), "num_encoder_blocks": 2},
        },
        tmp_path / "p.ckpt",
    )
    with pytest.raises(CheckpointError, match="allow_pickle=True"):
        load_checkpoint(str(tmp_path / "p.ckpt"))
    assert _same_weights(load_checkpoint(str(tmp_path / "p.ckpt"), allow_pickle=True), m)


def test_ema_missing_says_how(tmp_path):
    m = _model()
    torch.save({"state_dict": {"denoiser." + k: v for k, v in m.state_dict().items()}}, tmp_path / "t.ckpt")
    with pytest.raises(CheckpointError, match="pass ema=False"):
        load_checkpoint(str(tmp_path / "t.ckpt"))


def test_hub_id_offline_fails_clearly(monkeypatch, tmp_path):
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True, raising=False)
    with pytest.raises(ddt_fast.CheckpointError, match="could not fetch 'someone/ddt-missing'"):
        DDT.from_pretrained("someone/ddt-missing", cache_dir=str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match="neither an existing path nor a hub id"):
        DDT.from_pretrained("./not/here/at/all")
