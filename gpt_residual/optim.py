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

Every parameter's group, by what it is:
    2-D weights: wte (tied to the head), wpe, and, under AdamW, the blocks' matrices (attn.c_attn, attn.c_proj,
        attn.gate, mlp.c_fc, mlp.c_proj)                                   weight_decay, learning_rate
    1-D and scalar parameters: every bias, the norms' weights (and DyT's and Derf's per-channel weight and
        bias), DyT's and Derf's alpha and Derf's shift (one scalar per norm: the squashing function's input
        scale and offset), and embed_scale (norm=dyt|derf: the learned scalar on the embeddings, from
        sqrt(n_embd))                                                      no weight decay, learning_rate
    x0_lambdas (b_i), resid_lambdas (a_i), v_lambda (l_i)                  no weight decay, scalar_lr's fractions
    optimizer="muon": the blocks' 2-D weights (attn.gate included) go to Muon at muon_lr instead, c_attn as its
        three matrices q, k and v (see Muon below)
Decay would pull a gain, an alpha or a mixing weight toward 0, which is no simpler model but a different one: the
small parameters are never decayed (nanoGPT's rule, dim < 2, covers them all).
depth_scaling a > 0 (CompleteP, Dey et al. 2025, Table 1, with m = n_layer / base_depth): every parameter inside
the blocks (transformer.h.*; the branches, their norms and biases, Muon's matrices too) steps at lr * m^(a-1) and
takes AdamW's eps * m^-a; the embeddings, the final norm and the head keep learning_rate and eps. Weight decay
is left as set (AdamW decays by lr * weight_decay per step, so the blocks' decay follows their rate, as in the
reference code). a = 1 leaves the rates alone; a = 1/2 (depth-muP) divides them by sqrt(m).

The weights of hyper_connections and attn_residuals (streams.py lists each) join the no-decay AdamW group at the
base rate, also under Muon.
"""

import torch

from gpt_residual import streams

SCALAR_LR = {"x0_lambdas": 1.0, "resid_lambdas": 0.01, "v_lambda": 0.1}  # fractions of scalar_lr, by name
ADAM_EPS = 1e-8  # torch.optim.AdamW's default: every group's, but the blocks' under depth_scaling
BLOCKS = "transformer.h."  # the parameters inside the residual blocks start so


class Muon(torch.optim.Muon if hasattr(torch.optim, "Muon") else torch.optim.Optimizer):
    """torch.optim.Muon that steps a parameter named in `splits` as that many matrices stacked by rows: c_attn's
    weight (3C, C) as q, k and v, (C, C) each, as nanochat (separate c_q, c_k, c_v Linears) and modded-nanogpt
    (one (C, C) slice each) do. Whole, Newton-Schulz would orthogonalise q, k and v as one matrix, and torch's
    shape rule max(1, rows / cols) ** 0.5 would give all three a sqrt(3) larger step. Momentum and weight decay
    are element-wise, so stepping the row blocks (views of the parameter, its gradient and its momentum) is
    stepping three parameters of their own; the state stays one momentum buffer per parameter, as before."""

    def __init__(self, params, splits: dict[int, int], **kwargs):
        super().__init__(params, **kwargs)
        self.splits = splits  # id(parameter) -> how many row blocks

    def _init_group(self, group, params_with_grad, grads, momentum_bufs):
        has_complex = super()._init_group(group, params_with_grad, grads, momentum_bufs)
        pieces = [self.splits.get(id(p), 1) for p in params_with_grad]
        for tensors in (params_with_grad, grads, momentum_bufs):
            tensors[:] = [block for t, n in zip(tensors, pieces) for block in t.chunk(n)]
        return has_complex


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
    weights of the blocks go to Muon at muon_lr instead. depth_scaling (model.config) splits every group into
    the blocks' parameters, at its rate and eps, and the rest (see the module's docstring)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    scalars = {key: [p for n, p in named if n.split(".")[-1] == key] for key in SCALAR_LR}
    connections = [p for n, p in named if streams.owns(n)]  # stream mixing weights, pseudo-queries: no decay
    taken = {id(p) for ps in scalars.values() for p in ps} | {id(p) for p in connections}
    muon = [p for n, p in named if optimizer == "muon" and n.startswith(BLOCKS) and p.dim() == 2]
    muon = [p for p in muon if id(p) not in taken]
    taken |= {id(p) for p in muon}
    rest = [p for n, p in named if id(p) not in taken]
    groups = [
        {"params": [p for p in rest if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in rest if p.dim() < 2] + connections, "weight_decay": 0.0},
    ]
    for key, ps in scalars.items():
        if ps:
            groups.append({"params": ps, "weight_decay": 0.0, "lr_scale": scalar_lr * SCALAR_LR[key] / learning_rate})
    lr_factor, eps = depth_rules(model.config)
    if model.config.depth_scaling:
        groups = split_blocks(groups, {id(p) for n, p in named if n.startswith(BLOCKS)}, lr_factor, eps)
    adamw = torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device_type in ("cuda", "cpu"))
    if not muon and not any("lr_scale" in g for g in groups):
        return adamw  # today's optimizer, exactly
    optimizers = [adamw]
    if muon:
        splits = {id(p): 3 for n, p in named if n.endswith("attn.c_attn.weight")}  # q, k, v
        group = {"params": muon, "lr_scale": muon_lr / learning_rate * lr_factor}
        optimizers.append(Muon([group], splits, lr=learning_rate, weight_decay=weight_decay))
    return CombinedOptimizer(optimizers)


def depth_rules(model_config) -> tuple[float, float]:
    """depth_scaling a's (learning-rate factor, AdamW eps) for the parameters inside the blocks: m^(a-1) and
    ADAM_EPS * m^-a with m = n_layer / base_depth (CompleteP's Table 1); (1.0, ADAM_EPS) when off."""
    m, a = model_config.n_layer / model_config.base_depth, model_config.depth_scaling
    if not a:  # off (standard parametrization, Table 1's SP column): no rule at all, whatever m
        return 1.0, ADAM_EPS
    return m ** (a - 1), ADAM_EPS * m**-a


def split_blocks(groups: list[dict], in_blocks: set[int], lr_factor: float, eps: float) -> list[dict]:
    """Each group as two: its parameters outside the blocks as they were, then those inside at lr_scale *
    lr_factor and eps (empty halves left out)."""
    out = []
    for g in groups:
        outer = [p for p in g["params"] if id(p) not in in_blocks]
        inner = [p for p in g["params"] if id(p) in in_blocks]
        if outer:
            out.append({**g, "params": outer})
        if inner:
            out.append({**g, "params": inner, "lr_scale": g.get("lr_scale", 1.0) * lr_factor, "eps": eps})
    return out


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
