"""The optimizer of a training run: AdamW, or Muon for the blocks' matrices and AdamW for the rest.

    optimizer = build(model, weight_decay, learning_rate, betas, device_type, "muon", muon_lr, scalar_lr)

train.py sets every group's "lr" to the schedule's learning rate at each step. A resume takes the config's
settings, not the checkpoint's: hyperparameters() before Optimizer.load_state_dict, set_hyperparameters()
after. A group may carry an "lr_scale": it then steps at lr * lr_scale, so it follows the same warmup and
decay, peaking at its own rate. Two such rates:
    muon_lr     Muon's peak rate for the 2-D weights of the blocks (nanochat: 0.02), with torch's default
                shape adjustment max(1, rows / cols) ** 0.5 (Keller Jordan's Muon).
    scalar_lr   the peak rate of the learned scalars, without weight decay (nanochat: 0.5 for x0's b_i and
                1/100 of it for the residual's a_i, which multiplies the stream and compounds through the
                layers); value_residual's l_i take 1/10 of it, near modded-nanogpt's 0.04 for its scalars.
"""

import torch

SCALAR_LR = {"x0_lambdas": 1.0, "resid_lambdas": 0.01, "v_lambda": 0.1}  # fractions of scalar_lr, by name


class CombinedOptimizer(torch.optim.Optimizer):
    """Several optimizers acting as one: param_groups lists theirs (the same dicts), state is one dict they
    all share (their parameters differ), and step, zero_grad, state_dict and load_state_dict cover them
    all, so the GradScaler, gradient clipping and torch.distributed.checkpoint treat it as any optimizer.
    Each group's lr is multiplied by its "lr_scale" (if any) for the step, then put back."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = optimizers
        super().__init__([g for o in optimizers for g in o.param_groups], {})
        for o in optimizers:
            o.state = self.state

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        lrs = [g["lr"] for g in self.param_groups]
        for g in self.param_groups:
            g["lr"] = g["lr"] * g.get("lr_scale", 1.0)
        try:
            for o in self.optimizers:
                o.step()
        finally:
            for g, lr in zip(self.param_groups, lrs):
                g["lr"] = lr
        return loss

    def load_state_dict(self, state_dict: dict):
        super().load_state_dict(state_dict)  # makes new group dicts and a new state: hand them back
        groups = iter(self.param_groups)
        for o in self.optimizers:
            o.param_groups = [next(groups) for _ in o.param_groups]
            o.state = self.state


def build(model, weight_decay, learning_rate, betas, device_type, optimizer="adamw", muon_lr=0.02, scalar_lr=0.5):
    """AdamW with weight decay on 2-D weights (matmuls, embeddings) only, not on biases and norms; the
    learned scalars in groups of their own, without decay, at scalar_lr. With optimizer="muon", the 2-D
    weights of the blocks go to torch.optim.Muon at muon_lr instead."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    scalars = {key: [p for n, p in named if n.split(".")[-1] == key] for key in SCALAR_LR}
    taken = {id(p) for ps in scalars.values() for p in ps}
    muon = [p for n, p in named if optimizer == "muon" and n.startswith("transformer.h.") and p.dim() == 2]
    taken |= {id(p) for p in muon}
    rest = [p for n, p in named if id(p) not in taken]
    groups = [
        {"params": [p for p in rest if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0},
    ]
    for key, ps in scalars.items():
        if ps:
            groups.append({"params": ps, "weight_decay": 0.0, "lr_scale": scalar_lr * SCALAR_LR[key] / learning_rate})
    adamw = torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device_type in ("cuda", "cpu"))  # 1 kernel
    if not muon and len(groups) == 2:
        return adamw  # today's optimizer, exactly
    optimizers = [adamw]
    if muon:
        scale = muon_lr / learning_rate
        optimizers.append(
            torch.optim.Muon([{"params": muon, "lr_scale": scale}], lr=learning_rate, weight_decay=weight_decay)
        )
    return CombinedOptimizer(optimizers)


def hyperparameters(optimizer) -> list[dict]:
    """Every param group's settings (weight_decay, betas, lr_scale, ...; all but its parameters), in order."""
    return [{k: v for k, v in g.items() if k not in ("params", "param_names")} for g in optimizer.param_groups]


def set_hyperparameters(optimizer, settings: list[dict]):
    """Put settings (hyperparameters() of an optimizer built from the config) into optimizer's groups.
    Optimizer.load_state_dict restores each group's saved settings; a resume calls this after it, so a changed
    weight_decay, beta1, beta2, learning_rate (the lr_scale of Muon and the scalars), muon_lr or scalar_lr
    takes effect from the first resumed step."""
    if len(settings) != len(optimizer.param_groups):
        raise RuntimeError(f"{len(settings)} settings for {len(optimizer.param_groups)} param groups")
    for group, values in zip(optimizer.param_groups, settings):
        group.update(values)
