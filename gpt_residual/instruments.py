"""What the papers on the residual stream measure, per layer, read from a model through forward hooks on its
blocks (model.transformer.h[i]): nothing in the model changes, and nothing runs when nobody looks.

For block i (0 = the first), over fixed batches (x, y):
    top_abs, median_abs      massive activations (Sun et al. 2024, "Massive Activations in Large Language Models"):
                             the three largest |h| of the stream leaving the block, over all the batches' tokens and
                             channels, and the median |h| (each batch's median, averaged over the batches);
    max_position, max_channel     where the largest sits: its token position in the window and its channel
    logit_lens_loss          the logit lens (nostalgebraist 2020): the loss of the stream leaving the block read
                             through the final norm and the head (model.head), as if the model ended there; the last
                             block's is the model's own loss
    skip_loss_delta          how much the block is worth, the ground truth: the loss with the block skipped (a forward
                             hook returns its input, so the block becomes the identity) minus the model's loss
    angular_distance         Gromov et al. 2024 ("The Unreasonable Ineffectiveness of the Deeper Layers"):
                             arccos(cos(x_in, x_out)) / pi between the block's input and output, per token, mean over
                             tokens: 0 when the block turns no token's direction, 1 when it reverses them
With hyper_connections the stream between blocks is (B, T, n_streams, C); what is read is its sum over the
streams, what the final norm receives (stream_view).

The switches' own readings, keyed by module name (model.named_modules()):
    readings()               any module that defines it: numbers computed from its parameters (DyT/Derf's alpha and
                             shift, HC/mHC's static H_pre, H_post, H_res, Attention Residuals' pseudo-query norm)
    gate_mean                gated attention's gate (block.attn.gate): the mean of its output, the sigmoid gates
                             (B, T, n_head or C), over the forward passes
    saturated                a DyT or Derf norm (norms.DyT): the fraction of its units with |squash(x)| > 0.99
                             (|tanh(alpha x)|, resp. |erf(alpha x + s)|), x its input
    h_pre_mean, h_post_mean, h_res_mean    HC/mHC's mixing (block.res_attn.mix, block.res_mlp.mix: streams.HyperMix,
                             ManifoldMix), whose forward returns (H_pre, H_post, H_res) for its input: each averaged
                             over the batch's tokens (static and dynamic parts together)
    weights_mean             Attention Residuals' depth weights (block.res_attn.depth, ...; streams.DepthWeights): the
                             softmax over the sources (the embedding, the earlier outputs) averaged over the tokens
    hc_gain                  with hyper_connections, the composite gain of H_res over depth: streams.composite_gain
"""

import math

import torch

from gpt_residual import norms, streams

TOP_K = 3  # Sun et al. show the three largest magnitudes of each layer beside the median
SATURATED = 0.99  # a DyT/Derf unit whose |tanh| (|erf|) exceeds this passes almost no gradient


def stream_view(h: torch.Tensor) -> torch.Tensor:
    """The single-stream view (B, T, C) of the stream between blocks: with hyper_connections, (B, T, n_streams, C),
    its sum over the streams (what the final norm receives)."""
    return h.sum(2) if h.dim() == 4 else h


def angular_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """arccos(cos(a, b)) / pi over the last dim, in [0, 1]. By Kahan's formula 2 atan2(|u - v|, |u + v|) of the
    unit vectors u, v: exactly 0 where a = b, where arccos of a rounded cosine would read about 1e-4."""
    u = a / a.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    v = b / b.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    return 2 * torch.atan2((u - v).norm(dim=-1), (u + v).norm(dim=-1)) / math.pi


def massive(h: torch.Tensor):
    """The TOP_K largest |h| of a stream (B, T, C), their token positions and channels, and the median |h|."""
    a = h.detach().abs()
    values, flat = a.flatten().topk(TOP_K)
    T, C = a.shape[-2:]
    return values.float(), (flat // C) % T, flat % C, a.median().float()


def hc_gain(model) -> float | None:
    """The composite gain of HC/mHC's H_res over depth (streams.composite_gain), None without hyper_connections."""
    gain = streams.composite_gain(model)
    return None if gain is None else float(gain)


# ----------------------------------------------------------------------------- the switches' modules


def saturated(norm: norms.DyT, x: torch.Tensor) -> torch.Tensor:
    """The fraction of a DyT/Derf norm's units past SATURATED for its input x."""
    with torch.no_grad():
        return (norm.squash(x.detach().float()).abs() > SATURATED).float().mean()


def _leading_mean(t: torch.Tensor, keep: int) -> torch.Tensor:
    """t averaged over all but its last `keep` dims."""
    t = t.detach().float()
    return t.reshape(-1, *t.shape[t.dim() - keep :]).mean(0) if t.dim() > keep else t


def _mixing(args, out) -> dict:
    return {f"{k}_mean": _leading_mean(t, 1 + (k == "h_res")) for k, t in zip(("h_pre", "h_post", "h_res"), out)}


def reader_for(name: str, module):
    """What a forward hook on this module records (a function of its args and output), or None."""
    if name.endswith("attn.gate"):
        return lambda args, out: {"gate_mean": out.detach().float().mean()}
    if isinstance(module, norms.DyT):  # Derf too
        return lambda args, out: {"saturated": saturated(module, args[0])}
    if isinstance(module, (streams.HyperMix, streams.ManifoldMix)):
        return _mixing
    if isinstance(module, streams.DepthWeights):
        return lambda args, out: {"weights_mean": _leading_mean(out, 1)}
    return None


class SwitchReaders:
    """Forward hooks on the switches' modules (reader_for), averaging what they record over the forward passes."""

    def __init__(self, model):
        self.model, self.sums, self.calls = model, {}, {}
        self.handles = [
            m.register_forward_hook(self._hook(name, reader))
            for name, m in model.named_modules()
            if (reader := reader_for(name, m)) is not None
        ]

    def _hook(self, name, reader):
        def fn(module, args, output):
            sums = self.sums.setdefault(name, {})
            for key, value in reader(args, output).items():
                sums[key] = sums[key] + value if key in sums else value
            self.calls[name] = self.calls.get(name, 0) + 1

        return fn

    def remove(self):
        for h in self.handles:
            h.remove()

    def result(self) -> dict[str, dict]:
        """{module name: {key: value}}: each module's readings(), then what its hooks recorded (means)."""
        out = {}
        for name, m in self.model.named_modules():
            if callable(getattr(m, "readings", None)):
                out[name] = dict(m.readings())
            if name in self.sums:
                means = {k: (v / self.calls[name]).tolist() for k, v in self.sums[name].items()}
                out.setdefault(name, {}).update(means)
        return out


# ----------------------------------------------------------------------------- the measurements


def _loss(model, batches, skip: int | None = None) -> float:
    """The mean loss over batches (weighted by their rows), with block `skip` made the identity."""
    handle = None
    if skip is not None:
        handle = model.transformer.h[skip].register_forward_hook(lambda module, args, output: args[0])
    try:
        total = sum(model(x, y)[1].item() * x.size(0) for x, y in batches)
    finally:
        if handle is not None:
            handle.remove()
    return total / sum(x.size(0) for x, _ in batches)


def _layer_pass(model, batches) -> tuple[float, list[dict], dict]:
    """One forward per batch with a hook on every block: the loss, the per-layer sums, the switches' readings."""
    blocks = list(model.transformer.h)
    sums = [{"median": 0.0, "lens": 0.0, "angle": 0.0, "top": []} for _ in blocks]
    now = {}  # the batch being measured: its targets and rows

    def hook(i):
        def fn(module, args, output):
            h_in, h = stream_view(args[0]), stream_view(output)
            values, positions, channels, median = massive(h)
            s, w = sums[i], now["rows"]
            s["top"].append((values, positions, channels))
            s["median"] += median.item() * w
            s["angle"] += angular_distance(h_in.float(), h.float()).mean().item() * w
            s["lens"] += model.head(h, now["y"])[1].item() * w

        return fn

    handles = [b.register_forward_hook(hook(i)) for i, b in enumerate(blocks)]
    readers = SwitchReaders(model)
    try:
        total = 0.0
        for x, y in batches:
            now.update(y=y, rows=x.size(0))
            total += model(x, y)[1].item() * x.size(0)
    finally:
        readers.remove()
        for h in handles:
            h.remove()
    return total / sum(x.size(0) for x, _ in batches), sums, readers.result()


def _largest(found: list) -> tuple[list[float], int, int]:
    """The TOP_K largest values over every batch's top-k, and the position and channel of the largest."""
    values, positions, channels = (torch.cat(parts) for parts in zip(*found))
    order = values.topk(TOP_K).indices
    return values[order].tolist(), int(positions[order[0]]), int(channels[order[0]])


@torch.no_grad()
def measure(model, batches: list) -> dict:
    """Every number of scripts.inspect's JSON (interfaces.md) but out_dir and step, over batches [(x, y)], means
    weighted by their rows. The model runs in eval mode and eagerly (compiled code would recompile for the hooks)."""
    training, rows = model.training, sum(x.size(0) for x, _ in batches)
    model.eval()
    try:
        with torch.compiler.set_stance("force_eager"):
            loss, sums, switches = _layer_pass(model, batches)
            skipped = [_loss(model, batches, skip=i) for i in range(len(sums))]
    finally:
        model.train(training)
    layers = []
    for i, s in enumerate(sums):
        top, position, channel = _largest(s["top"])
        layers.append({"block": i, "top_abs": top, "median_abs": s["median"] / rows, "max_position": position,
                       "max_channel": channel, "logit_lens_loss": s["lens"] / rows,
                       "skip_loss_delta": skipped[i] - loss, "angular_distance": s["angle"] / rows})  # fmt: skip
    return {"n_layer": len(layers), "val_loss": loss, "layers": layers, "switches": switches, "hc_gain": hc_gain(model)}
