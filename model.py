"""A GPT language model, read top-down like the paper.

GPTConfig -> norms -> CausalSelfAttention -> MLP -> Block -> GPT.

The residual stream is the `x` that flows through every Block. Each sub-layer f (attention, MLP)
reads it and adds to it; where the norm sits is a switch:

    pre-LN  (GPT-2, default):  x = x + f(norm(x))             ... and one final norm before the head
    post-LN (original paper):  x = norm(x + f(x))             ... the stream is renormalised after every add
    peri-LN (Gemma):           x = x + norm_out(f(norm(x)))   ... both sides of f, and a final norm
    reordered (OLMo 2):        x = x + norm(f(x))             ... the norm on f's output only, and a final norm
    DeepNorm (post-LN variant): x = norm(alpha * x + f(x))    ... alpha = (2 * n_layer) ** 0.25
    Mix-LN ("mix"):            post-LN in the first floor(mix_ln_frac * n_layer) blocks, pre-LN after
    no residual (ablation):    x = f(norm(x)) or norm(f(x))   ... what the skip connection is for

More switches, each off by default (GPT-2): qk_norm (queries and keys normalised per head), norm_affine=False
(norms without weight or bias), embed_norm (a norm on the embeddings), residual_scalars (before block i,
x = a_i * x + b_i * x0, x0 the embedding output), value_residual (each layer's values mixed with layer 0's),
positions="rope" (rotary position embeddings instead of wpe), logit_softcap (c * tanh(logits / c)),
hyper_connections (n streams mixed by learned matrices: HC, mHC) and attn_residuals (each sub-layer reads a softmax
over the earlier outputs), both replacing the pre-LN skip connection (gpt_residual/streams.py).
The stream's frontier (2025), each off by default too: norm="dyt"|"derf" (point-wise, normalization-free norms,
gpt_residual/norms.py), attn_gate (a sigmoid gate on each head's output), norm_scaling (block l's norms times
1/sqrt(l)) and depth_scaling (each branch times (n_layer/base_depth)^-a): see AttentionGate and Block.
activation_checkpointing trades compute for memory (each block runs again in the backward pass); the math is the same.

Layer names mirror GPT-2's (transformer.wte, h.N.attn.c_attn, ...) so its weights map one to one.
Generation (the sampling loop, the decode engines) lives in gpt_residual/engine.py, its KV cache in kv_cache.py.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from gpt_residual import norms, streams
from gpt_residual.kv_cache import KVCache
from gpt_residual.norms import NORMS

NORM_POSITIONS = ("pre", "post", "peri", "reordered", "mix")
POSITIONS = ("learned", "rope")
ROPE_BASE = 10000.0  # rotary frequencies base ** (-2i / head_dim), as RoFormer, Llama, nanochat
INITS = ("gpt2", "xavier")
ATTN_GATES = ("none", "head", "elementwise")


@dataclass
class GPTConfig:
    block_size: int = 1024  # context length: the longest sequence the model sees
    vocab_size: int = 50304  # tokens in the vocabulary (set from the dataset's meta.json when training)
    n_layer: int = 12  # number of transformer blocks
    n_head: int = 12  # attention heads per block (n_embd must divide by it)
    n_embd: int = 768  # width of the residual stream
    dropout: float = 0.0  # dropout probability (0 for pretraining, 0.1+ for small data)
    bias: bool = True  # bias in Linear and LayerNorm layers (GPT-2: True)
    norm: str = "layernorm"  # normalization type: "layernorm" | "rmsnorm" | "dyt" w*tanh(a*x)+b | "derf" w*erf(a*x+s)+b
    norm_position: str = "pre"  # "pre" x+f(norm(x)) | "post" norm(x+f(x)) | "peri" | "reordered" x+norm(f(x)) | "mix"
    mix_ln_frac: float = 0.25  # norm_position="mix" (Mix-LN): post-LN in the first floor(frac*n_layer) blocks, then pre
    dyt_alpha_attn: float = 0.8  # norm=dyt|derf: initial alpha of the attention's norm (DyT's LLaMA-7B value)
    dyt_alpha_mlp: float = 0.2  # norm=dyt|derf: initial alpha of the MLP's norm (DyT's LLaMA-7B value)
    dyt_alpha_final: float = 0.2  # norm=dyt|derf: initial alpha of the final norm (DyT's LLaMA-7B value)
    norm_scaling: bool = False  # LayerNorm Scaling (pre-LN): block l (1-based) feeds norm(x)/sqrt(l) to its sub-layers
    attn_gate: str = "none"  # gated attention: y * sigmoid(x W_g) before c_proj: "none" | "head" | "elementwise"
    depth_scaling: float = 0.0  # branches times (n_layer/base_depth)**-this: 0 off, 0.5 depth-muP, 1 CompleteP
    base_depth: int = 1  # depth_scaling: the depth the learning rate was tuned at (lr and Adam eps follow the papers)
    deepnorm: bool = False  # post-LN only: x = norm(alpha*x + f(x)) and DeepNet's beta-scaled Xavier init
    residual: bool = True  # False removes the skip connections (an ablation: x = f(norm(x)))
    init: str = "gpt2"  # "gpt2": N(0, 0.02), residual projections / sqrt(2 * n_layer) | "xavier"
    qk_norm: bool = False  # normalize queries and keys per head (the norm type, over head_dim) before attention
    norm_affine: bool = True  # learnable weight (and bias) in every norm; False: plain normalization (nanochat)
    embed_norm: bool = False  # normalize the embedding output before the first block
    residual_scalars: bool = False  # learned per layer: x = a_i * x + b_i * x0 before block i (x0: the embeddings)
    value_residual: bool = False  # mix each layer's values with layer 0's: v_i = (1 - l_i) * v_i + l_i * v_0
    positions: str = "learned"  # position embeddings: "learned" (GPT-2's wpe) | "rope" (rotary, no wpe)
    logit_softcap: float = 0.0  # cap the logits at c * tanh(logits / c), before the loss and sampling (0: off)
    activation_checkpointing: bool = False  # keep only each block's input; recompute the rest in backward
    hyper_connections: str = "none"  # "none" | "hc" (Hyper-Connections) | "mhc" (manifold-constrained): n_streams lanes
    n_streams: int = 4  # hyper_connections: residual streams (the embedding enters each; summed before ln_f)
    attn_residuals: str = "none"  # "none" | "full" | "block": sub-layers read a softmax over earlier outputs (Kimi)
    attn_residual_blocks: int = 8  # attn_residuals="block": blocks of whole layers (<= n_layer) it attends over

    def __post_init__(self):
        for key in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, key) <= 0:
                raise ValueError(f"{key} must be positive, got {getattr(self, key)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {', '.join(NORMS)}; got {self.norm!r}")
        if self.norm_position not in NORM_POSITIONS:
            raise ValueError(f"norm_position must be one of {', '.join(NORM_POSITIONS)}; got {self.norm_position!r}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {', '.join(INITS)}; got {self.init!r}")
        if self.deepnorm and self.norm_position != "post":
            raise ValueError("deepnorm applies to post-LN only; set norm_position='post' or deepnorm=False")
        if self.positions not in POSITIONS:
            raise ValueError(f"positions must be one of {', '.join(POSITIONS)}; got {self.positions!r}")
        if self.positions == "rope" and (self.n_embd // self.n_head) % 2:
            raise ValueError("positions='rope' needs an even head size (n_embd / n_head)")
        if self.logit_softcap < 0:
            raise ValueError(f"logit_softcap must be >= 0 (0: off), got {self.logit_softcap}")
        if self.residual_scalars and not self.residual:
            raise ValueError("residual_scalars scales the skip connection that residual=False removes; drop one")
        self.check_frontier()
        streams.check(self)  # hyper_connections, attn_residuals

    def check_frontier(self):
        """The switches of issue 26 (attn_gate, norm_scaling, mix, dyt/derf, depth_scaling) and what they refuse."""
        if self.attn_gate not in ATTN_GATES:
            raise ValueError(f"attn_gate must be one of {', '.join(ATTN_GATES)}; got {self.attn_gate!r}")
        for key in ("mix_ln_frac", "depth_scaling"):
            if not 0.0 <= getattr(self, key) <= 1.0:  # NaN fails too
                raise ValueError(f"{key} must be in [0, 1], got {getattr(self, key)}")
        for key in ("dyt_alpha_attn", "dyt_alpha_mlp", "dyt_alpha_final"):
            if not 0.0 < getattr(self, key) < math.inf:
                raise ValueError(f"{key} must be a positive number (an initial alpha), got {getattr(self, key)}")
        if self.base_depth < 1:
            raise ValueError(f"base_depth must be >= 1 (the depth the lr was tuned at), got {self.base_depth}")
        if self.norm_scaling and self.norm_position != "pre":
            raise ValueError(f"norm_scaling scales the norm in front of each sub-layer, pre-LN's; norm_position="
                             f"{self.norm_position!r} has none there (or renormalises after it): use 'pre'")
        if self.norm in norms.POINTWISE:
            for key, why in norms.POINTWISE_REFUSES.items():
                if getattr(self, key) not in (False, "pre", "peri", "reordered"):  # True, or post-LN blocks
                    raise ValueError(f"norm={self.norm!r} does not combine with {key}={getattr(self, key)!r}: {why}")
        if self.depth_scaling and (self.deepnorm or not self.residual):
            raise ValueError("depth_scaling scales each branch against the plain skip connection, which "
                             f"{'deepnorm rescales' if self.deepnorm else 'residual=False removes'}: drop one")

    def block_position(self, layer: int) -> str:
        """Where block `layer` (0-based) puts its norms: norm_position, or for "mix" (Mix-LN) "post" in the first
        floor(mix_ln_frac * n_layer) blocks and "pre" after them."""
        if self.norm_position != "mix":
            return self.norm_position
        return "post" if layer < math.floor(self.mix_ln_frac * self.n_layer + 1e-9) else "pre"

    @property
    def branch_multiplier(self) -> float:
        """depth_scaling a: every residual branch is multiplied by (n_layer / base_depth) ** -a (1.0 when off)."""
        return (self.n_layer / self.base_depth) ** -self.depth_scaling

    @property
    def deepnorm_alpha(self) -> float:
        """DeepNet (Wang et al. 2022) for a decoder-only model of N layers: alpha = (2N)^(1/4)."""
        return (2 * self.n_layer) ** 0.25

    @property
    def deepnorm_beta(self) -> float:
        """... and beta = (8N)^(-1/4), the init gain of the FFN, value and output projections."""
        return (8 * self.n_layer) ** -0.25


def make_norm(config: GPTConfig, dim: int | None = None, site: str = "attn", scale: float = 1.0) -> nn.Module:
    """The config's norm over the last dim (default n_embd); with norm_affine=False, without weight or bias.
    site ("attn", "mlp", "final") picks DyT's and Derf's initial alpha; scale multiplies the output (norms.py)."""
    alpha = getattr(config, f"dyt_alpha_{site}")
    return norms.make_norm(config.norm, dim or config.n_embd, config.norm_affine, config.bias, alpha, scale)


def rotary(pos: torch.Tensor, head_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (T, hs/2) of the rotary angles pos * base^(-2i/hs) at positions pos (T,), or (B, T, hs/2) for
    positions per row (B, T). Computed from the position tensor each pass (no buffer): a cached decode step
    reads the cache's slot, so its shapes stay fixed for torch.compile and CUDA graphs."""
    inv_freq = ROPE_BASE ** -(torch.arange(0, head_size, 2, device=pos.device, dtype=torch.float32) / head_size)
    angles = pos.float()[..., None] * inv_freq  # (T, hs/2) or (B, T, hs/2)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair of channels (i, i + hs/2) of x (B, nh, T, hs) by its angle (Llama's half split)."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    if cos.dim() == 3:  # positions per row: the same angles for every head
        cos, sin = cos[:, None], sin[:, None]
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class ForwardContext:
    """What the layers of one forward pass share besides the stream: rope's angles (cos, sin), each (T, hs/2),
    a packed row's attention mask (GPT.forward's mask) and, with value_residual, layer 0's values v0 (B, nh, T,
    hs), set by layer 0 for the later ones. A plain object, not a dict: FSDP rebuilds the containers in a
    module's arguments, and layer 0's v0 would be lost."""

    def __init__(self, rope: tuple[torch.Tensor, torch.Tensor] | None = None, packed: torch.Tensor | None = None):
        self.rope, self.packed, self.v0, self.mask = rope, packed, None, None

    def decode_mask(self, cache: KVCache, dtype: torch.dtype) -> torch.Tensor:
        """The cache's filled slots among the first span as an additive mask (1, 1, 1, span), 0 or -inf in the
        queries' dtype, made once per pass: given a boolean mask, SDPA would convert it in every layer (three
        more kernels per layer and token, which a decode step's launches are made of)."""
        if self.mask is None:
            filled = cache.filled[..., : cache.span]
            self.mask = torch.zeros(filled.shape, dtype=dtype, device=filled.device).masked_fill_(~filled, -math.inf)
        return self.mask


class AttentionGate(nn.Linear):
    """Gated attention (Qiu et al. 2025, "Gated Attention for Large Language Models", the G1 gate of Qwen3-Next):
    g = sigmoid(x W_g + b_g) of the attention's input x (B, T, C), one gate per head (B, T, n_head) or per channel
    (B, T, C), which multiplies SDPA's output before c_proj. A Linear of its own (the reference code widens q_proj
    instead), so Muon orthogonalises W_g apart from q, k and v; initialised as every Linear (N(0, 0.02): g ~ 0.5)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(super().forward(x))


def scaled(y: torch.Tensor, scale: float) -> torch.Tensor:
    """y * scale, and no operation at all when scale is 1 (depth_scaling off)."""
    return y if scale == 1.0 else y * scale


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer: int, out_scale: float = 1.0):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.layer, self.first = layer, layer == 0  # compiled blocks branch on first, not on the index
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        width = {"none": 0, "head": config.n_head, "elementwise": config.n_embd}[config.attn_gate]
        self.gate = AttentionGate(config.n_embd, width, bias=config.bias) if width else None
        self.out_scale = out_scale  # depth_scaling's branch multiplier, when the branch ends here
        if config.qk_norm:  # one norm over head_dim for the queries, one for the keys, shared by the heads
            self.ln_q = make_norm(config, config.n_embd // config.n_head)
            self.ln_k = make_norm(config, config.n_embd // config.n_head)
        if config.value_residual and layer > 0:  # l_i: how much of layer 0's values this layer takes
            self.v_lambda = nn.Parameter(torch.full((1,), 0.5))
        self.qk_norm, self.value_residual = config.qk_norm, config.value_residual

    def project(self, x: torch.Tensor, pos: torch.Tensor, shared: ForwardContext):
        """Queries, keys and values (B, nh, T, hs) of x (B, T, C) at positions pos (T,). Norm first (qk_norm),
        then rotary (rope), as OLMo 2 and modded-nanogpt: the norm's per-channel gains never see positions.
        (nanochat rotates first, but its norm has no weights and a rotation keeps the RMS: the same thing.)
        No extra scale follows the norm (nanochat multiplies q and k by 1.2): attention keeps SDPA's
        1/sqrt(hs), and the norms' learnable gains, with norm_affine, set the sharpness. With
        value_residual, layer 0 leaves its values in shared.v0 for the later layers."""
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if self.qk_norm:
            q, k = self.ln_q(q), self.ln_k(k)
        if shared.rope is not None:
            cos, sin = shared.rope  # (T, hs/2)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if self.value_residual and self.first:
            shared.v0 = v  # the new tokens' values of layer 0, this pass
        elif self.value_residual:
            mixed = (1 - self.v_lambda) * v + self.v_lambda * shared.v0  # a cache stores these mixed values
            v = mixed.to(v.dtype)  # under autocast v is bf16 and l_i float32: keep the cache's dtype
        return q, k, v

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, pos: torch.Tensor | None = None, shared=None):
        B, T, C = x.size()
        shared = shared or ForwardContext()
        q, k, v = self.project(x, pos, shared)
        mask = shared.packed  # None but for a packed row
        if cache is not None:
            keys, values = cache.update(self.layer, k, v, pos)  # (B, nh, block_size, hs)
            if T == 1:  # one new token attends to every filled slot; a prompt (from slot 0) to itself
                span = cache.span
                k, v, mask = keys[:, :, :span], values[:, :, :span], shared.decode_mask(cache, q.dtype)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=T > 1 and mask is None, dropout_p=self.dropout if self.training else 0.0
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2)  # (B, T, nh, hs)
        if self.gate is not None:  # attn_gate: y * g, g (B, T, nh) per head or (B, T, C) per channel
            y = y * self.gate(x).view(B, T, self.n_head, -1)
        y = y.contiguous().view(B, T, C)
        return self.resid_dropout(scaled(self.c_proj(y), self.out_scale))


def gelu(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's GELU, 0.5 x (1 + tanh(u)) with u = sqrt(2/pi) (x + 0.044715 x^3). Compiled for a CPU it is written
    x * sigmoid(2u), the same function: inductor's C++ computes exp faster than tanh (the compiled CPU training step
    ~6% faster at nanoGPT's CPU shape, docs/benchmarks.md). Eager and on GPUs: torch's own kernel."""
    if x.device.type == "cpu" and torch.compiler.is_compiling():
        return x * torch.sigmoid((2 * math.sqrt(2 / math.pi)) * (x + 0.044715 * x * x * x))
    return F.gelu(x, approximate="tanh")


class MLP(nn.Module):
    def __init__(self, config: GPTConfig, out_scale: float = 1.0):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)
        self.out_scale = out_scale  # depth_scaling's branch multiplier, when the branch ends here

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(scaled(self.c_proj(gelu(self.c_fc(x))), self.out_scale))


class Block(nn.Module):
    """One block: attention then MLP, each a branch of the residual stream (see forward). The frontier switches
    live inside the parts, so that forward reads the same for all of them: norm_scaling is ln_1's and ln_2's
    output scale 1/sqrt(l) (LayerNorm Scaling, Sun et al. 2025: block l = layer + 1 feeds norm(x)/sqrt(l) to its
    sub-layers); depth_scaling's multiplier m = (n_layer/base_depth)^-a (depth-muP a = 1/2, Yang et al. 2023;
    CompleteP a = 1, Dey et al. 2025: x = x + m * f(norm(x))) is the last part of each branch, c_proj's output or,
    when the branch ends in a norm (peri, reordered), that norm's output; "mix" (Mix-LN, Li et al. 2025) makes
    the first floor(mix_ln_frac * n_layer) blocks post-LN and the rest pre-LN."""

    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.position = config.block_position(layer)  # "pre", "post", "peri" or "reordered"
        m = config.branch_multiplier  # 1.0 unless depth_scaling
        out_norm = self.position in ("peri", "reordered")  # the branch ends in a norm: m goes there
        lns = (layer + 1) ** -0.5 if config.norm_scaling else 1.0  # GPTConfig allows it with pre-LN only
        norm_scale = m if self.position == "reordered" else lns
        self.ln_1 = make_norm(config, site="attn", scale=norm_scale)
        self.attn = CausalSelfAttention(config, layer, out_scale=1.0 if out_norm else m)
        self.ln_2 = make_norm(config, site="mlp", scale=norm_scale)
        self.mlp = MLP(config, out_scale=1.0 if out_norm else m)
        if self.position == "peri":  # norms on the sub-layer outputs too
            self.ln_1_out = make_norm(config, site="attn", scale=m)
            self.ln_2_out = make_norm(config, site="mlp", scale=m)
        self.alpha = config.deepnorm_alpha if config.deepnorm else 1.0
        self.residual = config.residual
        self.res_attn, self.res_mlp = streams.connections(config, layer, make_norm)  # None: the plain skip

    def skip(self, x: torch.Tensor):
        """What the residual connection carries past a sub-layer: x, alpha * x (DeepNorm), or 0."""
        if not self.residual:
            return 0.0
        return x if self.alpha == 1.0 else self.alpha * x

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, pos: torch.Tensor | None = None, shared=None):
        """shared: what the layers of one pass share (rotary angles, layer 0's values); see ForwardContext."""
        if self.res_attn is not None:  # pre-LN with hyper_connections or attn_residuals (streams.py)
            x = self.res_attn(x, lambda h: self.attn(self.ln_1(h), cache, pos, shared))
            x = self.res_mlp(x, lambda h: self.mlp(self.ln_2(h)))
        elif self.position == "pre":
            x = self.skip(x) + self.attn(self.ln_1(x), cache, pos, shared)
            x = self.skip(x) + self.mlp(self.ln_2(x))
        elif self.position == "post":
            x = self.ln_1(self.skip(x) + self.attn(x, cache, pos, shared))
            x = self.ln_2(self.skip(x) + self.mlp(x))
        elif self.position == "peri":
            x = self.skip(x) + self.ln_1_out(self.attn(self.ln_1(x), cache, pos, shared))
            x = self.skip(x) + self.ln_2_out(self.mlp(self.ln_2(x)))
        else:  # reordered (OLMo 2): the norm on the sub-layer's output only
            x = self.skip(x) + self.ln_1(self.attn(x, cache, pos, shared))
            x = self.skip(x) + self.ln_2(self.mlp(x))
        return x


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                # rope rotates queries and keys instead (see CausalSelfAttention.project)
                wpe=nn.Embedding(config.block_size, config.n_embd) if config.positions == "learned" else None,
                ln_e=make_norm(config) if config.embed_norm else nn.Identity(),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
                # post-LN blocks already end in a norm; pre-, peri-LN and reordered need a final one
                ln_f=make_norm(config, site="final") if config.block_position(config.n_layer - 1) != "post"
                else nn.Identity(),
            )
        )
        if config.norm in norms.POINTWISE:  # DyT's LLaMA and Derf's GPT-2: a learned scalar on the embeddings
            self.embed_scale = nn.Parameter(torch.full((1,), math.sqrt(config.n_embd)))  # from sqrt(n_embd)
        self.streams = streams.entry(config)  # into and out of hyper_connections' streams / attn_residuals' sources
        if config.residual_scalars:  # nanochat: a_i = 1 (the plain residual) and b_i = 0 (no x0) at init
            self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))  # a_i (n_layer,)
            self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer))  # b_i (n_layer,)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        self.apply(self._init_weights)
        if config.init == "gpt2" and not (config.deepnorm or config.norm_scaling or config.depth_scaling):
            # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer), one per sub-layer add. LayerNorm Scaling
            # drops it (its paper: a depth-scaled init undoes what LNS gains) and so does depth_scaling (CompleteP's
            # init does not depend on depth: the branch multiplier takes its place): N(0, 0.02) as every Linear
            for name, p in self.named_parameters():
                if name.endswith("c_proj.weight"):
                    torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        if config.deepnorm:  # DeepNet: Xavier, gain beta for FFN, value and output projections, 1 for q, k
            beta, C = config.deepnorm_beta, config.n_embd
            for block in self.transformer.h:
                for w in (block.mlp.c_fc.weight, block.mlp.c_proj.weight, block.attn.c_proj.weight):
                    torch.nn.init.xavier_normal_(w, gain=beta)
                with torch.no_grad():
                    qkv = block.attn.c_attn.weight  # (3C, C): rows of q, k, v
                    for i, gain in enumerate((1.0, 1.0, beta)):
                        qkv[i * C : (i + 1) * C] = torch.nn.init.xavier_normal_(torch.empty(C, C), gain=gain)

    def _init_weights(self, module: nn.Module):
        if module is self.lm_head:
            return  # tied to wte: initialised as an embedding
        if isinstance(module, nn.Linear):
            if self.config.init == "xavier":
                torch.nn.init.xavier_normal_(module.weight)
            else:
                torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; by default without the position embeddings (the token embedding is
        tied to the head, so it counts as a real weight)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and self.transformer.wpe is not None:
            n -= self.transformer.wpe.weight.numel()
        return n

    def forward(self, idx: torch.Tensor, targets=None, cache: KVCache | None = None, pos=None, mask=None):
        """idx (B, T) -> (logits, loss); see head. A packed row (no cache) gives each token its position, pos
        (B, T), each below block_size, and the tokens it sees, mask (B, 1, T, T) (True: seen; every token must
        see itself): several continuations of one context in one row, each from the context's end."""
        B, T = idx.size()
        if T > self.config.block_size and pos is None:
            raise ValueError(f"sequence of length {T} exceeds block_size {self.config.block_size}")
        # positions: 0..T-1, or with a cache the next T slots (the caller keeps them within block_size)
        if pos is None:
            pos = torch.arange(T, device=idx.device) if cache is None else cache.claim(T)  # (T,)
        c = self.config
        x = self.transformer.wte(idx)  # (B, T, C)
        if self.transformer.wpe is not None:
            x = x + self.transformer.wpe(pos)
        if c.norm in norms.POINTWISE:
            x = x * self.embed_scale  # a learned scalar, from sqrt(n_embd): the embeddings reach DyT's range
        x = self.transformer.drop(self.transformer.ln_e(x))  # ln_e: embed_norm, else nothing
        x0 = x  # what residual_scalars mixes back in before every block
        angles = rotary(pos, c.n_embd // c.n_head) if c.positions == "rope" else None
        shared = ForwardContext(angles, mask)  # and, once layer 0 has run, its values
        if self.streams is not None:
            x = self.streams.expand(x)  # (B, T, n, C) or (B, T, 1, C): see streams.py
        for i, block in enumerate(self.transformer.h):
            if c.residual_scalars:
                x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            if c.activation_checkpointing and torch.is_grad_enabled():  # keep x only; rerun block in backward
                x = checkpoint(block, x, cache, pos, shared, use_reentrant=False)
            else:
                x = block(x, cache, pos, shared)
        if self.streams is not None:
            x = self.streams.reduce(x)  # (B, T, C)
        return self.head(x, targets)

    def head(self, x: torch.Tensor, targets: torch.Tensor | None = None):
        """The final norm and the logits (B, T, vocab) of the stream x, and with targets the loss; without
        them only the last position's logits (B, 1, vocab), all that generation needs. A method of its
        own so that compile_regions can compile it apart from the blocks."""
        x = self.transformer.ln_f(x)
        if targets is None:
            return self.softcap(self.lm_head(x[:, -1:, :])), None
        logits = self.softcap(self.lm_head(x))
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def softcap(self, logits: torch.Tensor) -> torch.Tensor:
        """logit_softcap c > 0: c * tanh(logits / c), smooth and bounded by c (Gemma 2, modded-nanogpt)."""
        c = self.config.logit_softcap
        return c * torch.tanh(logits / c) if c else logits

    # ---------------------------------------------------------------- training helpers

    def compile_regions(self):
        """torch.compile every block and the head in place (regional compilation, as torchtitan does): the
        blocks share one compiled graph, so compiling costs about one block's time, not n_layer blocks',
        and the parameter names stay as they are. The embeddings between them run eagerly."""
        for block in self.transformer.h:
            block.forward = torch.compile(block.forward)  # hooks on the block (FSDP's) run outside, eagerly
        self.head = torch.compile(self.head)

    def flops_per_token(self) -> float:
        """Training FLOPs per token: 6N for the weights plus attention (PaLM paper, appendix B)."""
        c = self.config
        return 6 * self.num_params() + 12 * c.n_layer * c.n_embd * c.block_size

    def estimate_mfu(self, tokens_per_second: float, peak_flops: float) -> float:
        """Model FLOPs utilisation: achieved training FLOP/s as a fraction of the device's peak."""
        return self.flops_per_token() * tokens_per_second / peak_flops
