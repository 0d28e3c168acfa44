# configs/small.py trained with Muon: torch.optim.Muon for the blocks' matrices (muon_lr 0.02), AdamW for the rest,
# and the cosine floored at step 600 instead of 1000. The CPU race's recipe (README, "Fast on a laptop CPU"):
# the study found Muon ahead of AdamW at the same steps (docs/benchmarks.md); here it reaches val 1.88 at step 400
# instead of 750, though each step costs ~25% more (Newton-Schulz on every matrix). Needs torch >= 2.9.
#   python -m scripts.bench configs/small_muon.py --time_to_loss --compare=configs/nanogpt_cpu.py \
#       --thresholds=2.0,1.88,1.8 --repeats=3
from pathlib import Path

exec((Path(__file__).parent / "small.py").read_text())
optimizer = "muon"
lr_decay_iters = 600  # the cosine's floor (min_lr) at step 600: the loss falls early
eval_interval = 200  # an estimate at step 400, where the loss crosses 1.88
out_dir = "out-muon"  # keep small.py's checkpoint in out/
