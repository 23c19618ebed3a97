import math

import pytest
import torch

from spec_model import patches_by_loops, rope_angles, spec_forward, timestep_embedding

import ddt_fast
from ddt_fast import models, ops
from ddt_fast.models import DDT


def randomize(model, std=0.2, seed=0):
    """Give every parameter (incl. the zero-initialised final layer) a nonzero value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def spec_keys(cfg):
    C, Cin, p, nc = cfg["hidden_size"], cfg["in_channels"], cfg["patch_size"], cfg["num_classes"]
    D = C // cfg["num_groups"]
    hidden = int(2 * int(4.0 * C) / 3)
    k = {
        "x_embedder.proj.weight": (C, Cin * p * p),
        "x_embedder.proj.bias": (C,),
        "s_embedder.proj.weight": (C, Cin * p * p),
        "s_embedder.proj.bias": (C,),
        "t_embedder.mlp.0.weight": (C, 256),
        "t_embedder.mlp.0.bias": (C,),
        "t_embedder.mlp.2.weight": (C, C),
        "t_embedder.mlp.2.bias": (C,),
        "y_embedder.embedding_table.weight": (nc + 1, C),
        "final_layer.adaLN_modulation.0.weight": (2 * C, C),
        "final_layer.adaLN_modulation.0.bias": (2 * C,),
        "final_layer.linear.weight": (Cin * p * p, C),
        "final_layer.linear.bias": (Cin * p * p,),
    }
    for i in range(cfg["num_blocks"]):
        b = f"blocks.{i}."
        k.update(
            {
                b + "norm1.weight": (C,),
                b + "norm2.weight": (C,),
                b + "attn.qkv.weight": (3 * C, C),
                b + "attn.q_norm.weight": (D,),
                b + "attn.k_norm.weight": (D,),
                b + "attn.proj.weight": (C, C),
                b + "attn.proj.bias": (C,),
                b + "mlp.w1.weight": (hidden, C),
                b + "mlp.w3.weight": (hidden, C),
                b + "mlp.w2.weight": (C, hidden),
                b + "adaLN_modulation.0.weight": (6 * C, C),
                b + "adaLN_modulation.0.bias": (6 * C,),
            }
        )
    return k


@pytest.mark.parametrize("name", ["DDT-XL/2", "DDT-B/2", "DDT-tiny/2"])
def test_state_dict_keys_and_shapes_match_spec(name):
    with torch.device("meta"):
        model = models.create(name)
    sd = model.state_dict()
    expected = spec_keys(models.PRESETS[name])
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected
    if name == "DDT-XL/2":
        assert expected["blocks.0.mlp.w1.weight"] == (3072, 1152)
        assert expected["blocks.0.attn.q_norm.weight"] == (72,)


def test_published_parameter_counts():
    with torch.device("meta"):
        counts = {n: sum(p.numel() for p in models.create(n).parameters()) for n in ("DDT-L/2", "DDT-XL/2")}
    assert round(counts["DDT-L/2"] / 1e6) == 458
    assert round(counts["DDT-XL/2"] / 1e6) == 675


def test_state_dict_with_spec_keys_loads_strict():
    cfg = models.PRESETS["DDT-tiny/2"]
    sd = {k: torch.randn(shape) for k, shape in spec_keys(cfg).items()}
    model = models.create("DDT-tiny/2")
    model.load_state_dict(sd, strict=True)
    assert torch.equal(model.blocks[3].mlp.w2.weight, sd["blocks.3.mlp.w2.weight"])


def test_drop_in_constructor_and_split():
    m = DDT(
        in_channels=4,
        num_groups=4,
        hidden_size=64,
        num_blocks=5,
        num_encoder_blocks=3,
        patch_size=2,
        num_classes=7,
        learn_sigma=True,
        deep_supervision=0,
        weight_path=None,
        load_ema=False,
    )
    assert len(m.encoder_blocks) == 3 and len(m.decoder_blocks) == 2
    with torch.device("meta"):
        assert models.create("DDT-XL/2").num_encoder_blocks == 22
        assert models.create("DDT-L/2").num_encoder_blocks == 20
        assert models.create("DDT-B/2", num_encoder_blocks=4).num_encoder_blocks == 4


def test_init_follows_spec():
    m = models.create("DDT-tiny/2")
    assert torch.count_nonzero(m.final_layer.linear.weight) == 0
    assert torch.count_nonzero(m.final_layer.adaLN_modulation[0].bias) == 0
    assert torch.count_nonzero(m.x_embedder.proj.bias) == 0
    assert abs(m.y_embedder.embedding_table.weight.std().item() - 0.02) < 0.005
    # block modulations keep PyTorch's default init (not zeroed)
    assert torch.count_nonzero(m.blocks[0].adaLN_modulation[0].weight) > 0
    bound = math.sqrt(6 / (m.x_embedder.proj.weight.shape[0] + m.x_embedder.proj.weight.shape[1]))
    assert m.x_embedder.proj.weight.abs().max() <= bound


def test_rope_table_matches_spec_loops():
    for hp, wp, D in [(3, 5, 8), (4, 4, 72), (1, 2, 16)]:
        table = ops.rope_frequencies(hp, wp, D, torch.device("cpu"))
        angles = rope_angles(hp, wp, D)
        assert table.shape == (hp * wp, D // 2) and table.dtype == torch.complex64
        torch.testing.assert_close(table.real.double(), angles.cos(), atol=2e-6, rtol=0)
        torch.testing.assert_close(table.imag.double(), angles.sin(), atol=2e-6, rtol=0)


def test_rope_rejects_head_dim_not_multiple_of_4():
    with pytest.raises(ValueError, match="multiple of 4"):
        DDT(hidden_size=36, num_groups=6, num_blocks=1, num_encoder_blocks=1, num_classes=2)
    with pytest.raises(ValueError, match="divisible by 4"):
        ops.reference.rope_frequencies(2, 2, 6)


def test_timestep_embedding_max_period_10_cos_first():
    from ddt_fast.models.ddt import TimestepEmbedder

    t = torch.tensor([0.0, 0.25, 0.9, 1.0])
    ours = TimestepEmbedder.timestep_embedding(t, 256, 10.0)
    torch.testing.assert_close(ours.double(), timestep_embedding(t), atol=1e-6, rtol=0)
    assert torch.allclose(ours[0, :128], torch.ones(128))  # cos(0) first


def test_patch_order_matches_unfold_layout():
    m = models.create("DDT-tiny/2")
    x = torch.randn(2, 4, 6, 10)
    assert torch.equal(m.patchify(x), patches_by_loops(x, 2))
    assert torch.equal(m.unpatchify(m.patchify(x), 6, 10), x)


def test_final_layer_layer_norm_has_no_affine():
    m = randomize(models.create("DDT-tiny/2"))
    h, s = torch.randn(2, 5, 64), torch.randn(2, 5, 64)
    shift, scale = m.final_layer.adaLN_modulation(s).chunk(2, -1)
    mu, var = h.mean(-1, keepdim=True), h.var(-1, unbiased=False, keepdim=True)
    expected = m.final_layer.linear((h - mu) / torch.sqrt(var + 1e-6) * (1 + scale) + shift)
    torch.testing.assert_close(m.final_layer(h, s), expected, atol=1e-5, rtol=1e-5)
    assert not any("norm" in k for k in m.final_layer.state_dict())


@pytest.mark.parametrize("name,hw", [("DDT-tiny/2", (8, 8)), ("DDT-tiny/2", (6, 10)), ("DDT-tiny-d72/2", (4, 6))])
def test_forward_matches_independent_spec_implementation(name, hw):
    m = randomize(models.create(name)).double()
    cfg = models.PRESETS[name]
    x = torch.randn(3, 4, *hw, dtype=torch.float64)
    t = torch.tensor([0.0, 0.37, 1.0], dtype=torch.float64)
    y = torch.tensor([0, 5, cfg["num_classes"]])  # includes the null class
    with torch.no_grad():
        v, s = m(x, t, y)
        v_ref, s_ref = spec_forward(m.state_dict(), cfg, x, t, y)
    # The spec rounds norms and rotary to float32, so agreement is at float32 level.
    for ours, ref in ((s, s_ref), (v, v_ref)):
        assert ref.abs().max() > 0.1  # a meaningful, non-degenerate output
        torch.testing.assert_close(ours, ref, atol=2e-5 * ref.abs().max().item(), rtol=1e-4)


@pytest.mark.slow
def test_forward_with_given_s_is_decoder_only():
    m = randomize(models.create("DDT-tiny/2"))
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([3, 4])
    with torch.no_grad():
        v, s = m(x, t, y)
        s_other = m.encode(torch.randn_like(x), torch.rand(2), torch.tensor([1, 2]))
        v2, s2 = m(x, t, y, s=s_other)
        assert s2 is s_other
        torch.testing.assert_close(v2, m.decode(x, s_other))
        # t and y reach the decoder only through s
        v3, _ = m(x, torch.rand(2), torch.tensor([7, 7]), s=s)
        torch.testing.assert_close(v3, v)
        torch.testing.assert_close(m.encode(x, t, y), s)
        assert not torch.allclose(v2, v)


def test_encoder_mask_is_passed_to_encoder_attention():
    m = randomize(models.create("DDT-tiny/2"))
    x, t, y = torch.randn(1, 4, 4, 4), torch.rand(1), torch.tensor([1])
    L = 4
    with torch.no_grad():
        _, s_full = m(x, t, y)
        _, s_none = m(x, t, y, mask=torch.zeros(L, L))
        _, s_diag = m(x, t, y, mask=torch.eye(L, dtype=torch.bool))
    torch.testing.assert_close(s_none, s_full)
    assert not torch.allclose(s_diag, s_full)


def test_bf16_autocast_forward_close_to_fp32():
    m = randomize(models.create("DDT-tiny-d72/2"), std=0.05)
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([0, 1])
    with torch.no_grad():
        v32, s32 = m(x, t, y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            v16, s16 = m(x, t, y)
    assert torch.isfinite(v16).all()
    rel = (v16.float() - v32).norm() / v32.norm()
    assert rel < 3e-2, rel


def test_model_runs_in_bfloat16_weights():
    m = randomize(models.create("DDT-tiny/2"), std=0.05).to(torch.bfloat16)
    v, s = m(torch.randn(1, 4, 4, 4, dtype=torch.bfloat16), torch.rand(1), torch.tensor([2]))
    assert v.dtype == torch.bfloat16 and torch.isfinite(v.float()).all()


def test_bad_inputs_have_clear_errors():
    m = models.create("DDT-tiny/2")
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([0, 1])
    with pytest.raises(ValueError, match=r"x must be \[B, 4, H, W\]"):
        m(torch.randn(2, 3, 8, 8), t, y)
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        m(torch.randn(2, 4, 7, 8), t, y)
    with pytest.raises(ValueError, match="one time per sample"):
        m(x, torch.rand(3), y)
    with pytest.raises(ValueError, match=r"class ids must lie in \[0, 10\]"):
        m(x, t, torch.tensor([0, 11]))
    with pytest.raises(TypeError, match="integer class ids"):
        m(x, t, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"s must be \[2, 16, 64\]"):
        m(x, t, y, s=torch.randn(2, 15, 64))
    with pytest.raises(ValueError, match="not divisible by num_groups"):
        DDT(hidden_size=100, num_groups=3)
    with pytest.raises(KeyError, match="unknown DDT preset"):
        models.create("DDT-XXL/2")
    with pytest.raises(TypeError, match="unknown DDT argument"):
        models.create("DDT-B/2", hidden=3)


def test_top_level_exports():
    assert ddt_fast.DDT is models.DDT
    assert ddt_fast.create is models.create


def test_fused_block_chain_equals_block_by_block_and_hooks_see_blocks():
    from ddt_fast.models.ddt import run_blocks

    m = randomize(models.create("DDT-tiny/2"), std=0.1)
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2])
    with torch.no_grad():
        v, s = m(x, t, y)
        patches = m.patchify(x)
        rope = m.rope(8, 8, "cpu")
        _, c = m.embed_condition(t, y)
        h = m.s_embedder(patches)
        for block in m.encoder_blocks:
            h = block(h, c, rope, None)
        torch.testing.assert_close(
            run_blocks(m.encoder_blocks, m.s_embedder(patches), c, rope, None), h, atol=1e-6, rtol=1e-6
        )
    seen = []
    handle = m.blocks[1].register_forward_hook(lambda mod, args, out: seen.append(out.shape))
    with torch.no_grad():
        v2, s2 = m(x, t, y)
    handle.remove()
    assert seen == [(2, 16, 64)]
    torch.testing.assert_close(v2, v, atol=1e-6, rtol=1e-6)
