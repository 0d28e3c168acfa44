"""Per-layer statistics of the residual stream, for train.py (telemetry_interval, probe_init) and study.py.

For each block i (0 = the first):
    grad_attn[i], grad_mlp[i]      gradient norm of the attention / MLP weights (with their input norms)
    update_attn[i], update_mlp[i]  ||weights after the optimizer step - before|| / ||weights before||
    rms[i]                         RMS of the residual stream: rms[0] entering block 0 (the
                                   embeddings), rms[i + 1] leaving block i (n_layer + 1 entries)
Measuring is cheap: the hooks exist only on telemetry steps.
"""

from contextlib import contextmanager

import torch


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
        self.blocks = list(model.transformer.h)
        self.rms: list[float] = []

    @contextmanager
    def capture_rms(self):
        """Record the RMS of the residual stream entering block 0 and leaving every block."""
        rms = [0.0] * (len(self.blocks) + 1)

        def hook(i):
            def fn(module, args, output):
                if i == 0:
                    rms[0] = args[0].detach().float().pow(2).mean().sqrt().item()
                rms[i + 1] = output.detach().float().pow(2).mean().sqrt().item()

            return fn

        handles = [b.register_forward_hook(hook(i)) for i, b in enumerate(self.blocks)]
        try:
            yield rms
        finally:
            for h in handles:
                h.remove()
            self.rms = rms

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
        out = {"update_attn": [], "update_mlp": []}
        for b, old in zip(self.blocks, before):
            for name, params in sublayers(b).items():
                delta = _norm([p.detach() - q for p, q in zip(params, old[name])])
                out[f"update_{name}"].append(delta / max(_norm(old[name]), 1e-12))
        return out


def probe(model, batches, autocast) -> dict:
    """Telemetry at this point of training (e.g. initialisation), averaged over batches of (x, y):
    forward and backward only, the weights do not change."""
    tele, sums = Telemetry(model), {}
    for x, y in batches:
        with tele.capture_rms() as rms, autocast():
            _, loss = model(x, y)
        loss.backward()
        for key, values in {**tele.grad_norms(), "rms": rms, "loss": [loss.item()]}.items():
            sums[key] = [a + b for a, b in zip(sums.get(key, [0.0] * len(values)), values)]
        model.zero_grad(set_to_none=True)
    result = {k: [v / len(batches) for v in vals] for k, vals in sums.items()}
    result["loss"] = result["loss"][0]
    return result


def table(record: dict) -> str:
    """A per-layer text table of a telemetry record."""
    keys = [k for k in ("grad_attn", "grad_mlp", "update_attn", "update_mlp") if k in record]
    lines = [f"{'layer':>5} " + " ".join(f"{k:>12}" for k in keys) + f" {'rms after':>12}"]
    for i, rms in enumerate(record["rms"][1:]):
        lines.append(f"{i:>5} " + " ".join(f"{record[k][i]:>12.4g}" for k in keys) + f" {rms:>12.4g}")
    return "\n".join(lines)
