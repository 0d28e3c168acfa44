"""The NaN watch: the first step whose loss or gradient norm was not finite, kept on the device until checked;
under float16, the step at which the GradScaler had skipped too many steps in a row. Steps are named as the log
lines name them: "step 13" is the 13th optimizer step (the one whose loss the line "step 13/N" includes)."""

import torch


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss became NaN); printed as one line."""


class Health:
    """Remembers, on the device, the first step whose loss or gradient norm was not finite; check()
    reads it back (at log time and before any checkpoint) and stops the run before bad weights are saved.
    Under fp16 (enabled=False) the GradScaler skips such steps itself; then the steps skipped in a row are
    counted instead, and check() stops the run once max_skipped of them (0: never) came one after another."""

    def __init__(self, device: str, enabled: bool, max_skipped: int = 0):
        self.enabled, self.max_skipped = enabled, max_skipped
        self.first = torch.full((3,), -1.0, device=device)  # (step, loss, gradient norm), step -1: none yet
        self.skipped = torch.zeros((), device=device)  # fp16: steps skipped in a row, up to now
        self.stalled = torch.full((), -1.0, device=device)  # fp16: the step that made max_skipped in a row

    def update(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor):
        """After the optimizer step of 0-based index step (train.py's state.step before it counts it)."""
        step += 1  # its number in the log lines: steps done
        if self.enabled:
            now = torch.stack([torch.full_like(loss, step), loss.float(), grad_norm.float()])
            bad = ~(torch.isfinite(loss) & torch.isfinite(grad_norm)) & (self.first[0] < 0)
            self.first = torch.where(bad, now, self.first)
        elif self.max_skipped:  # the scaler skips exactly the steps whose unscaled gradients are not all finite
            self.skipped = torch.where(torch.isfinite(grad_norm), 0.0, self.skipped + 1)
            hit = (self.skipped >= self.max_skipped) & (self.stalled < 0)
            self.stalled = torch.where(hit, float(step), self.stalled)

    def check(self, saved_step: int = -1):
        """Stop the run (TrainingError) if the watch saw a bad step. saved_step: the step of this run's newest
        checkpoint (-1: none written or resumed from), which the message says is kept, or that there is none."""
        if saved_step >= 0:
            kept, then = f"the last checkpoint (step {saved_step}) is kept", "resume"
        else:
            kept, then = "no checkpoint was written yet", "start again"
        step, loss, grad_norm = self.first.tolist()
        if step >= 0:
            raise TrainingError(
                f"step {int(step)}: loss {loss:.4g}, gradient norm {grad_norm:.4g} is not finite; {kept}; "
                f"lower learning_rate or use float32/bfloat16, then {then}"
            )
        stalled = int(self.stalled.item()) if self.max_skipped else -1
        if stalled >= 0:
            raise TrainingError(
                f"step {stalled}: float16 gradients overflowed {self.max_skipped} steps in a row (the GradScaler "
                f"skipped them all); {kept}; lower learning_rate or use dtype=bfloat16 or float32, then {then} "
                "(max_skipped_steps sets the limit)"
            )
