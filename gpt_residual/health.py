"""The NaN watch: the first step whose loss or gradient norm was not finite, kept on the device until checked."""

import torch


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss became NaN); printed as one line."""


class Health:
    """Remembers, on the device, the first step whose loss or gradient norm was not finite; check()
    reads it back (at log time and before any checkpoint) and stops the run before bad weights are saved.
    Under fp16 the GradScaler skips such steps itself, so nothing is tracked."""

    def __init__(self, device: str, enabled: bool):
        self.enabled = enabled
        self.first = torch.full((3,), -1.0, device=device)  # (step, loss, gradient norm), step -1: none yet

    def update(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor):
        if self.enabled:
            now = torch.stack([torch.full_like(loss, step), loss.float(), grad_norm.float()])
            bad = ~(torch.isfinite(loss) & torch.isfinite(grad_norm)) & (self.first[0] < 0)
            self.first = torch.where(bad, now, self.first)

    def check(self):
        step, loss, grad_norm = self.first.tolist()
        if step >= 0:
            raise TrainingError(
                f"step {int(step)}: loss {loss:.4g}, gradient norm {grad_norm:.4g} is not finite; the last "
                "checkpoint is kept; lower learning_rate or use float32/bfloat16, then resume"
            )
