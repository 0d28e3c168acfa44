"""Per-layer statistics of the residual stream, for train.py (telemetry_interval, probe_init) and study.py.

For each block i (0 = the first):
    grad_attn[i], grad_mlp[i]      gradient norm of the attention / MLP weights (with their input norms)
    update_attn[i], update_mlp[i]  ||weights after the optimizer step - before|| / ||weights before||
    rms[i]                         RMS of the residual stream: rms[0] entering block 0 (the
                                   embeddings), rms[i + 1] leaving block i (n_layer + 1 entries); with
                                   hyper_connections or attn_residuals, of the streams' sum (streams.py)
    attn_logit_max[i]              the largest attention logit |q.k| / sqrt(hs) of block i (over the causal
                                   pairs of the first micro-batch), with or without qk_norm
    act_top[i], act_median[i]      massive activations (Sun et al. 2024; instruments.py): the largest and the median
                                   |h| of the stream leaving block i (its sum over the streams with hyper_connections),
                                   over the step's last micro-batch
    hc_gain                        hyper_connections: the composite gain of H_res over depth (instruments.hc_gain)
What the model's own scalars have learned, after the step (present when the switch is on):
    resid_a[i], resid_b[i]         residual_scalars: x = a_i * x + b_i * x0 before block i
    v_lambda[i]                    value_residual: block i's share of layer 0's values (0 for block 0)
Measuring is cheap: the hooks exist only on telemetry steps, and a compiled model runs those steps
eagerly (torch.compiler.set_stance("force_eager")), so the hooks neither recompile it nor break its graphs.
"""

import copy
from contextlib import contextmanager

import torch

from gpt_residual import instruments, runlog
from model import ForwardContext


def sublayers(block) -> dict[str, list[torch.nn.Parameter]]:
    """The parameters of a block's two sub-layers, each with the norms that belong to it."""
    groups = {"attn": ["ln_1", "attn", "ln_1_out"], "mlp": ["ln_2", "mlp", "ln_2_out"]}
    return {
        name: [p for m in mods if hasattr(block, m) for p in getattr(block, m).parameters()]
        for name, mods in groups.items()
    }


def _norm(tensors) -> float:
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t.float()) for t in tensors])).item()


class Telemetry:
    def __init__(self, model):
        self.model = model
        self.blocks = list(model.transformer.h)
        self.rms: list[float] = []
        self.attn_logit_max: list[float] = []
        self.act: dict[str, list[float]] = {}  # act_top, act_median

    @contextmanager
    def capture_rms(self):
        """Record the RMS of the residual stream entering block 0 and leaving every block, the largest and the
        median |h| leaving every block (kept on the device until the context ends), and the largest attention
        logit of every block (in the first forward pass of the context)."""
        rms = [0.0] * (len(self.blocks) + 1)
        logit_max = [None] * len(self.blocks)
        act = [None] * len(self.blocks)

        def attn_hook(i):
            def fn(module, args, output):
                if logit_max[i] is None and len(args) >= 4:
                    logit_max[i] = max_attention_logit(module, *args[:4])

            return fn

        def hook(i):
            def fn(module, args, output):
                if i == 0:
                    rms[0] = _rms(args[0])
                rms[i + 1] = _rms(output)
                h = instruments.stream_view(output.detach()).abs()
                act[i] = torch.stack([h.max(), h.median()]).float()

            return fn

        handles = [b.register_forward_hook(hook(i)) for i, b in enumerate(self.blocks)]
        handles += [b.attn.register_forward_hook(attn_hook(i)) for i, b in enumerate(self.blocks)]
        try:
            with torch.compiler.set_stance("force_eager"):  # compiled code would recompile for the hooks
                yield rms
        finally:
            for h in handles:
                h.remove()
            self.rms = rms
            self.attn_logit_max = [v or 0.0 for v in logit_max]
            if all(a is not None for a in act):  # one read-back for every block
                top, median = torch.stack(act).T.tolist()
                self.act = {"act_top": top, "act_median": median}

    def learned(self) -> dict[str, list[float]]:
        """The learned scalars (residual_scalars' a_i, b_i; value_residual's l_i), hyper_connections' hc_gain and,
        after capture_rms, the largest attention logit and the largest and median |h| of every block."""
        out = {"attn_logit_max": self.attn_logit_max, **self.act} if self.attn_logit_max else {}
        gain = instruments.hc_gain(self.model)
        if gain is not None:
            out["hc_gain"] = gain
        if hasattr(self.model, "resid_lambdas"):
            out["resid_a"] = _values(self.model.resid_lambdas)
            out["resid_b"] = _values(self.model.x0_lambdas)
        if self.model.config.value_residual:
            out["v_lambda"] = [_values(b.attn.v_lambda)[0] if hasattr(b.attn, "v_lambda") else 0.0 for b in self.blocks]
        return out

    def grad_norms(self) -> dict[str, list[float]]:
        out = {"grad_attn": [], "grad_mlp": []}
        for b in self.blocks:
            for name, params in sublayers(b).items():
                grads = [p.grad for p in params if p.grad is not None]
                out[f"grad_{name}"].append(_norm(grads) if grads else 0.0)
        return out

    def snapshot(self) -> list[dict[str, list[torch.Tensor]]]:
        return [{k: [p.detach().clone() for p in v] for k, v in sublayers(b).items()} for b in self.blocks]

    def update_ratios(self, before) -> dict[str, list[float]]:
        """Each sub-layer's relative update, and (train.py's step logs this dict) what learned() reads."""
        out = {"update_attn": [], "update_mlp": []}
        for b, old in zip(self.blocks, before):
            for name, params in sublayers(b).items():
                delta = _norm([p.detach() - q for p, q in zip(params, old[name])])
                out[f"update_{name}"].append(delta / max(_norm(old[name]), 1e-12))
        return {**out, **self.learned()}


def _rms(x: torch.Tensor) -> float:
    """The RMS of the residual stream; hyper_connections' lanes (B, T, n, C) or attn_residuals' sources (B, T, S, C)
    are summed first (streams.py: the pre-LN stream's counterpart)."""
    return instruments.stream_view(x.detach()).float().pow(2).mean().sqrt().item()


def _values(p: torch.Tensor) -> list[float]:
    """A parameter's values as floats (a sharded DTensor gathered first)."""
    p = p.detach()
    return (p.full_tensor() if hasattr(p, "full_tensor") else p).float().tolist()


@torch.no_grad()
def max_attention_logit(attn, x, cache, pos, shared) -> float:
    """max |q.k| / sqrt(hs) over the causal pairs of one attention module's input x (B, T, C), recomputing
    its queries and keys (after qk_norm and rotary, as attention sees them); one row at a time."""
    if cache is not None:
        return 0.0  # measured in training, not while decoding
    q, k, _ = attn.project(x, pos, copy.copy(shared or ForwardContext()))  # a copy: layer 0's values stay as they are
    T = q.size(2)
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    best = torch.zeros((), device=q.device)
    for b in range(q.size(0)):
        scores = (q[b].float() @ k[b].float().transpose(-2, -1)) / q.size(-1) ** 0.5  # (nh, T, T)
        best = torch.maximum(best, scores.abs().masked_fill(~causal, 0).max())
    return best.item()


def probe(model, batches, autocast) -> dict:
    """Telemetry at this point of training (e.g. initialisation), averaged over batches of (x, y):
    forward and backward only, the weights do not change."""
    tele, sums = Telemetry(model), {}
    for x, y in batches:
        with tele.capture_rms() as rms, autocast():
            _, loss = model(x, y)
        loss.backward()
        for key, values in {**tele.grad_norms(), **tele.learned(), "rms": rms, "loss": loss.item()}.items():
            values = values if isinstance(values, list) else [values]
            sums[key] = [a + b for a, b in zip(sums.get(key, [0.0] * len(values)), values)]
        model.zero_grad(set_to_none=True)
    result = {k: [v / len(batches) for v in vals] for k, vals in sums.items()}
    result["loss"] = result["loss"][0]
    if "hc_gain" in result:  # one number, not one per layer
        result["hc_gain"] = result["hc_gain"][0]
    return result


def table(record: dict) -> str:
    """A per-layer text table of a telemetry record."""
    keys = [k for k in ("grad_attn", "grad_mlp", "update_attn", "update_mlp") if k in record]
    lines = [f"{'layer':>5} " + " ".join(f"{k:>12}" for k in keys) + f" {'rms after':>12}"]
    for i, rms in enumerate(record["rms"][1:]):
        lines.append(f"{i:>5} " + " ".join(f"{record[k][i]:>12.4g}" for k in keys) + f" {rms:>12.4g}")
    return "\n".join(lines)


def probe_init(model, sampler, step: int, cfg, rt) -> dict:
    """Telemetry of the untrained model over eval_iters batches of sampler (the training batches), logged to
    out_dir/metrics.jsonl; train.py then stops (probe_init=True)."""
    batches = [sampler.get(g * rt.world_size + rt.rank, rt.device) for g in range(cfg.eval_iters)]
    record = {"step": step, "probe_init": True, **probe(model, batches, rt.autocast)}
    rt.print(f"at initialisation, mean of {cfg.eval_iters} batches (loss {record['loss']:.4f}):")
    rt.print(table(record))
    logger = runlog.Logger(cfg.out_dir, rt.master, fresh=cfg.init_from != "resume")
    logger.log(record)
    logger.close()
    return record
