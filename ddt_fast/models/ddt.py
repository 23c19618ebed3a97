"""DDT: Decoupled Diffusion Transformer (Wang, Tian, Huang, Wang, 2025).

A condition encoder turns the noisy latent, timestep and class into a
per-token self-condition `s`; a velocity decoder, modulated per token by `s`,
predicts the flow-matching velocity. Drop-in for the published `DDT` class:
same constructor, same `forward(x, t, y, s=None, mask=None) -> (v, s)`, same
state-dict keys, same numbers (see docs/spec.md, "The model"). All block math goes
through `ddt_fast.ops`, which picks fused kernels or the reference.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ddt_fast import ops
from ddt_fast.models._pretrained import PretrainedMixin

__all__ = [
    "DDT",
    "DDTBlock",
    "ModulationCache",
    "Linear",
    "RMSNorm",
    "TimestepEmbedder",
    "LabelEmbedder",
    "PatchEmbed",
    "Attention",
    "FeedForward",
    "FinalLayer",
    "run_blocks",
]

Tensor = torch.Tensor


class Linear(nn.Linear):
    """`nn.Linear` (same parameters, init and state-dict keys) through
    `ops.linear`, which runs 16-bit products in float32 on CPUs without 16-bit
    matrix instructions."""

    def forward(self, x: Tensor) -> Tensor:
        return ops.linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return ops.reference.rms_norm(x, self.weight, self.eps)


class TimestepEmbedder(nn.Module):
    """Sinusoidal embedding of t in [0, 1] (max period 10, cos first), then an MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256, max_period: float = 10.0):
        super().__init__()
        self.mlp = nn.Sequential(
            Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size
        self.max_period = max_period

    @staticmethod
    def timestep_embedding(t: Tensor, dim: int, max_period: float = 10.0) -> Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[..., None].float() * freqs[None, ...]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[..., :1])], dim=-1)
        return emb

    def forward(self, t: Tensor) -> Tensor:
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size, self.max_period)
        # no-op for float32 weights; lets a model cast to bf16/fp16 run
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class table with one extra row: index `num_classes` is the null (unconditional) class."""

    def __init__(self, num_classes: int, hidden_size: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)
        self.num_classes = num_classes

    def forward(self, labels: Tensor) -> Tensor:
        return self.embedding_table(labels)


class PatchEmbed(nn.Module):
    """Linear projection of flattened patches `[B, L, Cin*p*p] -> [B, L, C]`."""

    def __init__(self, in_features: int, hidden_size: int):
        super().__init__()
        self.proj = Linear(in_features, hidden_size, bias=True)

    def forward(self, patches: Tensor) -> Tensor:
        return self.proj(patches)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, eps: float = 1e-6):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = Linear(dim, dim * 3, bias=False)
        self.q_norm = RMSNorm(self.head_dim, eps)
        self.k_norm = RMSNorm(self.head_dim, eps)
        self.proj = Linear(dim, dim, bias=True)

    def forward(self, x: Tensor, freqs_cis: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        # q/k RMSNorm + 2D rotary, softmax attention, heads merged: [B, L, C]
        out = ops.qkv_attention(
            self.qkv(x), self.q_norm.weight, self.k_norm.weight, self.num_heads, freqs_cis, self.q_norm.eps, mask
        )
        return self.proj(out)


class FeedForward(nn.Module):
    """SwiGLU MLP: `w2(silu(w1 x) * w3 x)`, hidden = int(2 * int(4 C) / 3)."""

    def __init__(self, dim: int, mlp_ratio: float = 4.0):
        super().__init__()
        hidden = int(2 * int(dim * mlp_ratio) / 3)
        self.w1 = Linear(dim, hidden, bias=False)
        self.w3 = Linear(dim, hidden, bias=False)
        self.w2 = Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(ops.swiglu(self.w1(x), self.w3(x)))


class DDTBlock(nn.Module):
    """adaLN-modulated transformer block, shared by encoder (`cond` `[B,1,C]`)
    and decoder (`cond` `[B,L,C]`, per-token modulation)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = RMSNorm(hidden_size, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = RMSNorm(hidden_size, eps=1e-6)
        self.mlp = FeedForward(hidden_size, mlp_ratio)
        self.adaLN_modulation = nn.Sequential(Linear(hidden_size, 6 * hidden_size, bias=True))

    def modulation(self, cond: Tensor) -> Tuple[Tensor, ...]:
        """`shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp` (views of one GEMM)."""
        return self.adaLN_modulation(cond).chunk(6, dim=-1)

    def attention_input(self, x: Tensor, mods: Tuple[Tensor, ...]) -> Tensor:
        return ops.rms_norm_modulate(x, self.norm1.weight, mods[0], mods[1], self.norm1.eps)

    def body(
        self, x: Tensor, h: Tensor, mods: Tuple[Tensor, ...], freqs_cis: Tensor, mask: Optional[Tensor]
    ) -> Tuple[Tensor, Tensor]:
        """Attention (on the modulated input `h`), its gated residual fused with the
        MLP's norm+modulate, and the MLP. Returns `x` after the attention residual
        and the MLP output `y`; the block's output is `x + gate_mlp * y`."""
        x, h = ops.gated_residual_rms_norm_modulate(
            x, mods[2], self.attn(h, freqs_cis, mask), self.norm2.weight, mods[3], mods[4], self.norm2.eps
        )
        return x, self.mlp(h)

    def forward(self, x: Tensor, cond: Tensor, freqs_cis: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        mods = self.modulation(cond)
        x, y = self.body(x, self.attention_input(x, mods), mods, freqs_cis, mask)
        return ops.gated_residual(x, mods[5], y)


class ModulationCache:
    """The decoder's per-token modulations (every decoder block's `Linear(C, 6C)(s)`
    and the final layer's `Linear(C, 2C)(s)`), kept while a sampler reuses the
    same self-condition `s`. Bound to one `s` tensor: passing another one
    clears it. Costs `(6 * decoder_blocks + 2) * B * L * C` elements."""

    def __init__(self):
        self.source: Optional[Tensor] = None
        self.blocks: dict = {}
        self.final: Optional[Tuple[Tensor, Tensor]] = None

    def bind(self, s: Tensor) -> "ModulationCache":
        if self.source is not s:
            self.source, self.blocks, self.final = s, {}, None
        return self

    def clear(self) -> None:
        self.source, self.blocks, self.final = None, {}, None

    def block(self, index: int, block: "DDTBlock", cond: Tensor) -> Tuple[Tensor, ...]:
        if index not in self.blocks:
            self.blocks[index] = block.modulation(cond)
        return self.blocks[index]

    def fill(self, model: "DDT", s: Tensor) -> "ModulationCache":
        """Bind to `s` and compute now every modulation the decoder would compute on first use."""
        self.bind(s)
        for i, block in enumerate(model.decoder_blocks):
            self.block(i, block, s)
        if self.final is None:
            self.final = model.final_layer.modulation(s)
        return self

    def nbytes(self) -> int:
        groups = list(self.blocks.values()) + ([self.final] if self.final is not None else [])
        return sum(g[0].untyped_storage().nbytes() for g in groups)  # chunks share one storage


def run_blocks(
    blocks, x: Tensor, cond: Tensor, freqs_cis: Tensor, mask: Optional[Tensor], cache: Optional[ModulationCache] = None
) -> Tensor:
    """Blocks in sequence, with each block's closing gated residual fused with
    the next block's norm+modulate (one pass over x instead of two).

    Equal to calling the blocks one by one (which is what happens when any
    block has forward hooks, so hooks see every block's output). `cache`
    (decoder only) reuses the blocks' modulations computed from the same `cond`.
    """
    if len(blocks) == 0:
        return x
    if any(b._forward_hooks or b._forward_pre_hooks for b in blocks):
        for block in blocks:
            x = block(x, cond, freqs_cis, mask)
        return x

    def modulation(i):
        return blocks[i].modulation(cond) if cache is None else cache.block(i, blocks[i], cond)

    mods = modulation(0)
    h = blocks[0].attention_input(x, mods)
    for i, block in enumerate(blocks):
        x, y = block.body(x, h, mods, freqs_cis, mask)
        if i + 1 == len(blocks):
            return ops.gated_residual(x, mods[5], y)
        nxt = blocks[i + 1]
        gate_mlp, mods = mods[5], modulation(i + 1)
        x, h = ops.gated_residual_rms_norm_modulate(x, gate_mlp, y, nxt.norm1.weight, mods[0], mods[1], nxt.norm1.eps)
    return x


class FinalLayer(nn.Module):
    """Weight-free LayerNorm modulated per token by `s`, then a Linear to patch pixels."""

    def __init__(self, hidden_size: int, out_features: int):
        super().__init__()
        self.eps = 1e-6
        self.adaLN_modulation = nn.Sequential(Linear(hidden_size, 2 * hidden_size, bias=True))
        self.linear = Linear(hidden_size, out_features, bias=True)

    def modulation(self, s: Tensor) -> Tuple[Tensor, Tensor]:
        return self.adaLN_modulation(s).chunk(2, dim=-1)

    def forward(self, x: Tensor, s: Tensor, mods: Optional[Tuple[Tensor, Tensor]] = None) -> Tensor:
        shift, scale = self.modulation(s) if mods is None else mods
        return self.linear(ops.layer_norm_modulate(x, shift, scale, self.eps))


class DDT(PretrainedMixin, nn.Module):
    """Decoupled Diffusion Transformer; the first `num_encoder_blocks` blocks
    form the condition encoder, the rest the velocity decoder.

    `num_groups` is the number of attention heads. `learn_sigma`,
    `deep_supervision`, `weight_path` and `load_ema` are accepted for
    compatibility with the published class and do not change the math
    (output channels are always `in_channels`); use `ddt_fast.load_checkpoint`
    to load weights. `save_pretrained` / `from_pretrained` come from
    `PretrainedMixin` (`_pretrained.py`).
    """

    def __init__(
        self,
        in_channels: int = 4,
        num_groups: int = 12,
        hidden_size: int = 1152,
        num_blocks: int = 18,
        num_encoder_blocks: int = 4,
        patch_size: int = 2,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        deep_supervision: int = 0,
        weight_path: Optional[str] = None,
        load_ema: bool = False,
    ):
        super().__init__()
        _check_architecture(
            in_channels, num_groups, hidden_size, num_blocks, num_encoder_blocks, patch_size, num_classes
        )
        self.in_channels = in_channels
        self.out_channels = in_channels
        self.num_groups = num_groups
        self.hidden_size = hidden_size
        self.num_blocks = num_blocks
        self.num_encoder_blocks = num_encoder_blocks
        self.patch_size = patch_size
        self.num_classes = num_classes
        self.head_dim = hidden_size // num_groups
        self.learn_sigma = learn_sigma
        self.deep_supervision = deep_supervision
        self.weight_path = weight_path
        self.load_ema = load_ema

        patch_features = in_channels * patch_size * patch_size
        self.s_embedder = PatchEmbed(patch_features, hidden_size)
        self.x_embedder = PatchEmbed(patch_features, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size)
        self.final_layer = FinalLayer(hidden_size, patch_features)
        self.blocks = nn.ModuleList(DDTBlock(hidden_size, num_groups) for _ in range(num_blocks))
        self.initialize_weights()

    @property
    def config(self) -> dict:
        """Constructor arguments that define the architecture (what `config.json` stores)."""
        return {
            "in_channels": self.in_channels,
            "num_groups": self.num_groups,
            "hidden_size": self.hidden_size,
            "num_blocks": self.num_blocks,
            "num_encoder_blocks": self.num_encoder_blocks,
            "patch_size": self.patch_size,
            "num_classes": self.num_classes,
        }

    @property
    def encoder_blocks(self):
        return self.blocks[: self.num_encoder_blocks]

    @property
    def decoder_blocks(self):
        return self.blocks[self.num_encoder_blocks :]

    def initialize_weights(self) -> None:
        for embed in (self.x_embedder, self.s_embedder):
            nn.init.xavier_uniform_(embed.proj.weight)
            nn.init.zeros_(embed.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for layer in (self.final_layer.adaLN_modulation[0], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    # -- pieces of the forward pass, usable on their own by samplers --------

    def patchify(self, x: Tensor) -> Tensor:
        """`[B, Cin, H, W] -> [B, L, Cin*p*p]` (channel-major inside a patch, row-major tokens)."""
        p = self.patch_size
        return F.unfold(x, kernel_size=p, stride=p).transpose(1, 2)

    def unpatchify(self, patches: Tensor, height: int, width: int) -> Tensor:
        p = self.patch_size
        return F.fold(patches.transpose(1, 2).contiguous(), (height, width), kernel_size=p, stride=p)

    def rope(self, height: int, width: int, device: torch.device) -> Tensor:
        p = self.patch_size
        return ops.rope_frequencies(height // p, width // p, self.head_dim, torch.device(device))

    def embed_condition(self, t: Tensor, y: Tensor) -> Tuple[Tensor, Tensor]:
        """`temb [B,1,C]` and `c = SiLU(temb + yemb)` `[B,1,C]`."""
        B = y.shape[0]
        temb = self.t_embedder(t.view(-1)).view(B, -1, self.hidden_size)
        yemb = self.y_embedder(y).view(B, 1, self.hidden_size)
        return temb, F.silu(temb + yemb)

    def encode(self, x: Tensor, t: Tensor, y: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """The condition encoder alone: the self-condition `s` `[B, L, C]`."""
        self._check_inputs(x, t, y)
        return self._encode(self.patchify(x), t, y, self.rope(*x.shape[-2:], x.device), mask)

    def decode(self, x: Tensor, s: Tensor, cache: Optional[ModulationCache] = None) -> Tensor:
        """The velocity decoder alone, for a given self-condition `s` (the decoder
        reads neither t nor y: they reach it only through `s`). With a
        `ModulationCache`, the modulations computed from this `s` are kept and
        reused by later calls with the same `s` tensor."""
        self._check_inputs(x, None, None, s)
        H, W = x.shape[-2:]
        return self._decode(
            self.patchify(x), s, self.rope(H, W, x.device), H, W, cache.bind(s) if cache is not None else None
        )

    def _encode(self, patches: Tensor, t: Tensor, y: Tensor, freqs_cis: Tensor, mask: Optional[Tensor]) -> Tensor:
        temb, c = self.embed_condition(t, y)
        s = run_blocks(self.encoder_blocks, self.s_embedder(patches), c, freqs_cis, mask)
        return F.silu(temb + s)

    def _decode(
        self,
        patches: Tensor,
        s: Tensor,
        freqs_cis: Tensor,
        height: int,
        width: int,
        cache: Optional[ModulationCache] = None,
    ) -> Tensor:
        h = run_blocks(self.decoder_blocks, self.x_embedder(patches), s, freqs_cis, None, cache)
        final_mods = None
        if cache is not None:
            if cache.final is None:
                cache.final = self.final_layer.modulation(s)
            final_mods = cache.final
        return self.unpatchify(self.final_layer(h, s, final_mods), height, width)

    def forward(
        self, x: Tensor, t: Tensor, y: Tensor, s: Optional[Tensor] = None, mask: Optional[Tensor] = None
    ) -> Tuple[Tensor, Tensor]:
        """Velocity `[B, Cin, H, W]` and the self-condition `s` (new if `s` is None,
        else the one passed in, reused without running the encoder)."""
        self._check_inputs(x, t, y, s)
        H, W = x.shape[-2:]
        patches = self.patchify(x)
        freqs_cis = self.rope(H, W, x.device)
        if s is None:
            s = self._encode(patches, t, y, freqs_cis, mask)
        return self._decode(patches, s, freqs_cis, H, W), s

    # -- input checks: clear errors instead of shape soup deep inside -------

    def _check_inputs(self, x: Tensor, t: Optional[Tensor], y: Optional[Tensor], s: Optional[Tensor] = None) -> None:
        p = self.patch_size
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must be [B, {self.in_channels}, H, W], got {tuple(x.shape)}")
        B, _, H, W = x.shape
        if H % p or W % p:
            raise ValueError(f"image size {H}x{W} is not divisible by the patch size {p}")
        if t is not None and t.numel() != B:
            raise ValueError(f"t must hold one time per sample ([{B}]), got shape {tuple(t.shape)}")
        if y is not None:
            if y.shape != (B,):
                raise ValueError(f"y must be [{B}] class ids, got shape {tuple(y.shape)}")
            if y.dtype not in (torch.int64, torch.int32):
                raise TypeError(f"y must hold integer class ids (int64), got {y.dtype}")
            # Range check only where it is free: CPU tensors, eager mode (on a GPU it
            # would synchronise; torch.compile cannot branch on data).
            if (
                y.device.type == "cpu"
                and y.numel()
                and not torch.compiler.is_compiling()
                and (int(y.min()) < 0 or int(y.max()) > self.num_classes)
            ):
                raise ValueError(
                    f"class ids must lie in [0, {self.num_classes}] ({self.num_classes} is the "
                    f"null class), got range [{int(y.min())}, {int(y.max())}]"
                )
        if s is not None:
            L = (H // p) * (W // p)
            if s.shape != (B, L, self.hidden_size):
                raise ValueError(f"s must be [{B}, {L}, {self.hidden_size}] for a {H}x{W} input, got {tuple(s.shape)}")


def _check_architecture(
    in_channels, num_groups, hidden_size, num_blocks, num_encoder_blocks, patch_size, num_classes
) -> None:
    for name, value in (
        ("in_channels", in_channels),
        ("num_groups", num_groups),
        ("hidden_size", hidden_size),
        ("num_blocks", num_blocks),
        ("patch_size", patch_size),
        ("num_classes", num_classes),
    ):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not isinstance(num_encoder_blocks, int) or not 0 <= num_encoder_blocks <= num_blocks:
        raise ValueError(f"num_encoder_blocks must be in [0, num_blocks={num_blocks}], got {num_encoder_blocks!r}")
    if hidden_size % num_groups:
        raise ValueError(f"hidden_size {hidden_size} is not divisible by num_groups (heads) {num_groups}")
    if (hidden_size // num_groups) % 4:
        raise ValueError(
            f"head dim {hidden_size // num_groups} (hidden_size / num_groups) must be a "
            "multiple of 4 for the 2D rotary embedding"
        )
