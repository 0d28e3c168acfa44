"""Residual connections that are learned: several streams mixed by small matrices, or attention over depth.

A leaf module (it imports nothing of the project); model.py builds these and keeps the stream visible in one
line per sub-layer of a pre-LN Block:

    x = self.res_attn(x, lambda h: self.attn(self.ln_1(h), ...))      # instead of x = x + attn(ln_1(x))
    x = self.res_mlp(x, lambda h: self.mlp(self.ln_2(h)))

hyper_connections = "hc" | "mhc", with n_streams = n (the stream between blocks is (B, T, n, C)):
    the embedding enters every stream; around sub-layer f (its norm included),
        h = sum_j H_pre[j] x_j                                  the sub-layer's input, one of C wide
        x'_i = sum_j H_res[i, j] x_j + H_post[i] f(h)           n streams out
    and the streams are summed before the final norm. Each H is a static part plus a dynamic one read from x:
    "hc"  Hyper-Connections (Zhu et al., ICLR 2025, arXiv 2409.19606): from each stream's features
          xn_j = norm(x_j) (the model's norm, as the paper's LayerNorm) and W = [W_m | W_b | W_r] (C, 2 + n),
              H_pre[j]  = A_m[j] + s_a tanh(xn_j W_m)         H_post[j] = B[j] + s_b tanh(xn_j W_b)
              H_res[i, j] = A_r[i, j] + s_a tanh(xn_j W_r)[i]  (the dynamic column j is read from stream j)
          init: A_m = e_(k mod n) for sub-layer k (attention 2l, MLP 2l + 1 of layer l), A_r = I, B = 1, W = 0,
          s_a = s_b = 0.01. The streams start equal (the embedding) and stay equal: each is the pre-LN stream x,
          and the final norm reads n * x; with eps-free norms the logits are exactly the pre-LN model's.
    "mhc" Manifold-constrained HC (Xie et al., DeepSeek 2025, arXiv 2512.24880): from all streams at once,
          xt = RMSNorm(vec(x)) (nC wide, no weight) and phi = [phi_pre | phi_post | phi_res] (nC, 2n + n^2),
              H_pre = sigmoid(a_pre xt phi_pre + b_pre)          H_post = 2 sigmoid(a_post xt phi_post + b_post)
              H_res = SinkhornKnopp(a_res mat(xt phi_res) + b_res)     rows and columns sum to 1
          Sinkhorn-Knopp: exp, then 20 times columns / their sums, rows / their sums (sinkhorn() below). The
          paper's eq. 9 does rows first; DeepSeek-V4's released code columns first, as we do: both tend to the same
          matrix, and this order ends with exact row sums (each new stream a convex combination of the old ones).
          init: phi = 0 and a = 0.01 (as HC's W and s), b_post = b_res = 0 (DeepSeek-V4's released init of its
          biases: H_post = 1, H_res = J / n), b_pre = e_(k mod n) (sub-layer k leans on stream k mod n, as HC's
          A_m, so the streams can come apart; DeepSeek-V4 breaks the symmetry with a random phi instead). At init
          the streams stay equal and each is the pre-LN stream; the sub-layer reads sum_j H_pre[j] x =
          (0.73 + 0.5 (n - 1)) x, which its norm scales back (exactly, eps aside).
    Where these differ from the `hyper-connections` package (lucidrains), tests/test_streams.py says exactly.

attn_residuals = "full" | "block" (Attention Residuals, Kimi Team 2026, arXiv 2603.15031): the stream between
    blocks is the stack of sources V = (B, T, S, C), source 0 the embedding; each sub-layer reads
        h = sum_i alpha_i v_i,   alpha = softmax_i(w . RMSNorm(v_i))     w: the sub-layer's pseudo-query (C,), 0 at init
    "full":  every sub-layer's output is a new source: source 2l + 1 is layer l's attention, 2l + 2 its MLP.
    "block": the layers fall into attn_residual_blocks = N blocks of whole layers (layer l is in block
             floor(l * N / n_layer)); source b + 1 is the sum of block b's outputs, the last one still running while
             its block runs, so S <= N + 1. source_labels(config) names the sources the final norm reads.
    The final norm reads the same kind of sum with a pseudo-query of its own (GPT.streams.out: the paper's code
    shows the layers only; we read its h_l for l = L + 1 as the head's input). With w = 0 every
    read is the mean of the sources, the pre-LN stream divided by S, which each norm scales back: with eps-free
    norms the logits are exactly the pre-LN model's. Memory: each sub-layer keeps its stack of sources for the
    backward pass (about S stream copies; activation_checkpointing keeps only each block's input).

The stream a forward hook on block i sees (args[0] in, output out) is x (B, T, n, C) or V (B, T, S, C); its sum
over dim 2 is the pre-LN stream's counterpart (HC: what the final norm receives; AttnRes: the sum of the sources,
which a plain pre-LN model would carry). Returning args[0] skips block i: it adds no stream content (HC) and no
source (AttnRes: the next block reads one source fewer, or keeps adding into the same running block sum).
GPT.streams.reduce(x) is what the final norm would receive if the network ended there.

Hookable outputs: block.res_attn.mix (HC/mHC) returns (H_pre (B,T,n), H_post (B,T,n), H_res (B,T,n,n)) for its
input; block.res_attn.depth (AttnRes) returns alpha (B,T,S) over the sources; likewise res_mlp and
GPT.streams.out.depth. readings() gives the static parts; composite_gain(model) the gain of prod_k H_res^(k).

Parameters (all in AdamW's no-decay group at the base learning rate, also under optimizer=muon; see owns()): decay
would pull the static weights (I, 1) toward 0 and the pseudo-queries toward uniform reads; Muon orthogonalises
weight matrices, and these are vectors, n x n mixers and a (nC, 2n + n^2) read-out.
    mix.static_pre (n,)    HC A_m / mHC b_pre          mix.static_post (n,)   HC B / mHC b_post
    mix.static_res (n, n)  HC A_r / mHC b_res [i, j]   mix.dynamic            HC W (C, 2 + n) / mHC phi (nC, 2n + n^2)
    mix.scale              HC (s_a, s_b) / mHC (a_pre, a_post, a_res)
    mix.norm.*             HC's feature norm (the model's norm type)
    depth.query (C,)       AttnRes's pseudo-query w of one sub-layer (streams.out.depth.query: the final norm's)
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

HYPER_CONNECTIONS = ("none", "hc", "mhc")
ATTN_RESIDUALS = ("none", "full", "block")
SINKHORN_ITERS = 20  # mHC's t_max
EPS = 1e-6  # of the RMSNorms that mHC and AttnRes put on their inputs (DeepSeek-V4's rms_norm_eps)
SCALE_INIT = 0.01  # HC's s_a, s_b and mHC's a: the dynamic weights' gains at init


def check(c) -> None:
    """One-line ValueErrors for settings these connections cannot honour (called by GPTConfig.__post_init__)."""
    if c.hyper_connections not in HYPER_CONNECTIONS:
        raise ValueError(f"hyper_connections must be one of {', '.join(HYPER_CONNECTIONS)}; got {c.hyper_connections!r}"
                         )  # fmt: skip
    if c.attn_residuals not in ATTN_RESIDUALS:
        raise ValueError(f"attn_residuals must be one of {', '.join(ATTN_RESIDUALS)}; got {c.attn_residuals!r}")
    for key in ("n_streams", "attn_residual_blocks"):
        if getattr(c, key) < 1:
            raise ValueError(f"{key} must be >= 1, got {getattr(c, key)}")
    on = [k for k in ("hyper_connections", "attn_residuals") if getattr(c, k) != "none"]
    if len(on) == 2:
        raise ValueError("hyper_connections and attn_residuals each replace the residual connection; choose one")
    if not on:
        return
    if c.norm_position != "pre":  # the papers' blocks: only pre-LN has a branch f(norm(h)) whose input is chosen
        raise ValueError(f"{on[0]} needs norm_position='pre' (the papers' pre-LN blocks); got {c.norm_position!r}")
    if not c.residual or c.residual_scalars:
        raise ValueError(f"{on[0]} replaces the skip connection that residual=False or residual_scalars changes; "
                         "drop one")  # fmt: skip
    if c.attn_residuals == "block" and c.attn_residual_blocks > c.n_layer:
        raise ValueError(f"attn_residual_blocks ({c.attn_residual_blocks}) must be <= n_layer ({c.n_layer}): "
                         "a block holds whole layers")  # fmt: skip


def owns(name: str) -> bool:
    """Whether a parameter name (model.named_parameters()) is one of these connections' (optim.py's rule)."""
    return ".res_attn." in name or ".res_mlp." in name or name.startswith("streams.")


def sinkhorn(logits: torch.Tensor, iters: int | None = None) -> torch.Tensor:
    """Sinkhorn-Knopp on the last two dims (float32): exp(logits) with columns, then rows, divided by their sums,
    iters (default SINKHORN_ITERS) times. Rows sum to 1 exactly (each output a convex combination), columns to
    within the convergence."""
    m = logits.float().softmax(dim=-2)  # exp, columns normalised (softmax subtracts the max first)
    m = m / m.sum(dim=-1, keepdim=True)
    for _ in range((iters or SINKHORN_ITERS) - 1):
        m = m / m.sum(dim=-2, keepdim=True)
        m = m / m.sum(dim=-1, keepdim=True)
    return m


def _full(p: torch.Tensor) -> torch.Tensor:
    """A parameter's whole value, detached (FSDP's sharded DTensor gathered first)."""
    p = p.detach()
    return (p.full_tensor() if hasattr(p, "full_tensor") else p).float()


def _one_hot(n: int, k: int) -> torch.Tensor:
    return F.one_hot(torch.tensor(k % n), n).float()


class HyperMix(nn.Module):
    """HC's H_pre, H_post, H_res for the streams x (B, T, n, C) of one sub-layer (see the module docstring)."""

    def __init__(self, n: int, C: int, k: int, norm: nn.Module):
        super().__init__()
        self.norm = norm
        self.static_pre = nn.Parameter(_one_hot(n, k))  # A_m
        self.static_post = nn.Parameter(torch.ones(n))  # B
        self.static_res = nn.Parameter(torch.eye(n))  # A_r
        self.dynamic = nn.Parameter(torch.zeros(C, 2 + n))  # W_m | W_b | W_r
        self.scale = nn.Parameter(torch.full((2,), SCALE_INIT))  # s_a (pre and res), s_b (post)

    def forward(self, x: torch.Tensor):
        d = torch.tanh(self.norm(x) @ self.dynamic)  # (B, T, n, 2 + n): row j read from stream j
        h_pre = self.static_pre + self.scale[0] * d[..., 0]
        h_post = self.static_post + self.scale[1] * d[..., 1]
        h_res = self.static_res + self.scale[0] * d[..., 2:].transpose(-1, -2)  # column j from stream j
        return h_pre, h_post, h_res

    def static(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _full(self.static_pre), _full(self.static_post), _full(self.static_res)


class ManifoldMix(nn.Module):
    """mHC's H_pre, H_post, H_res for the streams x (B, T, n, C) of one sub-layer (see the module docstring)."""

    def __init__(self, n: int, C: int, k: int):
        super().__init__()
        self.n = n
        self.static_pre = nn.Parameter(_one_hot(n, k))  # b_pre
        self.static_post = nn.Parameter(torch.zeros(n))  # b_post
        self.static_res = nn.Parameter(torch.zeros(n, n))  # b_res
        self.dynamic = nn.Parameter(torch.zeros(n * C, 2 * n + n * n))  # phi_pre | phi_post | phi_res
        self.scale = nn.Parameter(torch.full((3,), SCALE_INIT))  # a_pre, a_post, a_res

    def forward(self, x: torch.Tensor):
        n, flat = self.n, x.flatten(-2).float()
        d = F.rms_norm(flat, (flat.size(-1),), eps=EPS) @ self.dynamic.float()  # (B, T, 2n + n^2)
        a = self.scale.float()
        h_pre = torch.sigmoid(a[0] * d[..., :n] + self.static_pre)
        h_post = 2 * torch.sigmoid(a[1] * d[..., n : 2 * n] + self.static_post)
        h_res = sinkhorn(a[2] * d[..., 2 * n :].unflatten(-1, (n, n)) + self.static_res)  # [i, j]: j into i
        return h_pre, h_post, h_res

    def static(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pre, post, res = _full(self.static_pre), _full(self.static_post), _full(self.static_res)
        return torch.sigmoid(pre), 2 * torch.sigmoid(post), sinkhorn(res)


class HyperConnection(nn.Module):
    """x (B, T, n, C) around one sub-layer f: x'_i = sum_j H_res[i, j] x_j + H_post[i] f(sum_j H_pre[j] x_j).
    The sums are elementwise products, so they stay in float32 under autocast (a matmul would run in bfloat16, or
    TF32 on CUDA, and round the whole stream at every sub-layer; the plain residual adds in float32)."""

    def __init__(self, mix: nn.Module):
        super().__init__()
        self.mix = mix

    def forward(self, x: torch.Tensor, branch) -> torch.Tensor:
        h_pre, h_post, h_res = self.mix(x)
        y = branch((h_pre.unsqueeze(-1) * x).sum(2).to(x.dtype))  # (B, T, C)
        mixed = (h_res.unsqueeze(-1) * x.unsqueeze(2)).sum(3)  # sum_j H_res[i, j] x_j: (B, T, n, C), not a matmul
        return (mixed + h_post.unsqueeze(-1) * y.unsqueeze(2)).to(x.dtype)

    def readings(self) -> dict:
        pre, post, res = self.mix.static()
        return {"h_pre": pre.tolist(), "h_post": post.tolist(), "h_res": res.tolist(),
                "scale": _full(self.mix.scale).tolist()}  # fmt: skip


class DepthWeights(nn.Module):
    """AttnRes' alpha (B, T, S) = softmax over the sources of w . RMSNorm(v_i), for V (B, T, S, C). The key norm has
    no weight: it would only rescale w (w . (g * k) = (w * g) . k)."""

    def __init__(self, C: int):
        super().__init__()
        self.query = nn.Parameter(torch.zeros(C))  # w: uniform weights at init

    def forward(self, sources: torch.Tensor) -> torch.Tensor:
        keys = F.rms_norm(sources.float(), (sources.size(-1),), eps=EPS)
        return (keys * self.query.float()).sum(-1).softmax(dim=-1)


class DepthAttention(nn.Module):
    """AttnRes around one sub-layer f: h = sum_i alpha_i v_i, then f(h) becomes a new source (opens=True: full
    mode, or the first sub-layer of a block) or joins the running sum of the current block (the last source)."""

    def __init__(self, C: int, opens: bool):
        super().__init__()
        self.depth = DepthWeights(C)
        self.opens = opens

    def read(self, sources: torch.Tensor) -> torch.Tensor:
        """The softmax-weighted sum of the sources (B, T, S, C) -> (B, T, C)."""
        return (self.depth(sources).unsqueeze(-1) * sources).sum(2).to(sources.dtype)

    def forward(self, sources: torch.Tensor, branch) -> torch.Tensor:
        y = branch(self.read(sources)).to(sources.dtype).unsqueeze(2)  # (B, T, 1, C)
        if self.opens:
            return torch.cat((sources, y), dim=2)
        return torch.cat((sources[:, :, :-1], sources[:, :, -1:] + y), dim=2)

    def readings(self) -> dict:
        return {"query_norm": _full(self.depth.query).norm().item()}


class HyperStreams(nn.Module):
    """GPT's way into and out of the n streams: the embedding copied into each; their sum for the final norm."""

    def __init__(self, n: int):
        super().__init__()
        self.n = n

    def expand(self, x: torch.Tensor) -> torch.Tensor:
        return x.unsqueeze(2).expand(-1, -1, self.n, -1)  # (B, T, n, C)

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        return x.sum(2)


class DepthSources(nn.Module):
    """GPT's way into and out of AttnRes' sources: the embedding is source 0; the final norm reads the sources
    with a pseudo-query of its own (out)."""

    def __init__(self, C: int):
        super().__init__()
        self.out = DepthAttention(C, opens=False)

    def expand(self, x: torch.Tensor) -> torch.Tensor:
        return x.unsqueeze(2)  # (B, T, 1, C)

    def reduce(self, sources: torch.Tensor) -> torch.Tensor:
        return self.out.read(sources)


def opens_block(c, layer: int) -> bool:
    """attn_residuals="block": whether layer `layer` (0-based) starts a block (N blocks of whole layers)."""
    N, L = c.attn_residual_blocks, c.n_layer
    return layer == 0 or (layer * N) // L != ((layer - 1) * N) // L


def source_labels(c) -> list[str]:
    """What each source the final norm reads is (attn_residuals): "embedding", then "attn 0", "mlp 0", ... (full)
    or "layers 0-1", ... (block)."""
    if c.attn_residuals == "full":
        return ["embedding"] + [f"{s} {layer}" for layer in range(c.n_layer) for s in ("attn", "mlp")]
    starts = [layer for layer in range(c.n_layer) if opens_block(c, layer)] + [c.n_layer]
    return ["embedding"] + [f"layers {a}-{b - 1}" for a, b in zip(starts, starts[1:])]


def connections(c, layer: int, make_norm) -> tuple[nn.Module | None, nn.Module | None]:
    """The connections around block `layer`'s attention and MLP, or (None, None) for the plain residual."""
    n, C = c.n_streams, c.n_embd
    if c.hyper_connections == "hc":
        return tuple(HyperConnection(HyperMix(n, C, 2 * layer + s, make_norm(c))) for s in (0, 1))
    if c.hyper_connections == "mhc":
        return tuple(HyperConnection(ManifoldMix(n, C, 2 * layer + s)) for s in (0, 1))
    if c.attn_residuals != "none":
        full = c.attn_residuals == "full"
        return DepthAttention(C, opens=full or opens_block(c, layer)), DepthAttention(C, opens=full)
    return None, None


def entry(c) -> nn.Module | None:
    """GPT's module into and out of the streams, or None for the plain residual stream."""
    if c.hyper_connections != "none":
        return HyperStreams(c.n_streams)
    if c.attn_residuals != "none":
        return DepthSources(c.n_embd)
    return None


@torch.no_grad()
def composite_gain(model) -> float | None:
    """HC/mHC's forward gain over depth from the parameters: for P = H_res^(L) ... H_res^(1) over every sub-layer
    (static parts), max over rows of sum_j |P[i, j]| (the mHC paper's Amax gain). None without hyper_connections."""
    mats = [m.mix.static()[2] for m in model.modules() if isinstance(m, HyperConnection)]  # in depth order
    if not mats:
        return None
    product = torch.eye(mats[0].size(0))
    for h_res in mats:
        product = h_res.cpu() @ product
    return product.abs().sum(-1).max().item()

