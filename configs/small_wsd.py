# configs/small.py with the warmup-stable-decay schedule: 5e-3 from step 30 to step 1600, then linear to
# 1e-3 at step 2000 (the last warmdown_frac = 20% of the run). The race against small.py's cosine:
#   python -m scripts.bench configs/small.py --time_to_loss --compare=configs/small_wsd.py --thresholds=1.88 --repeats=3
from pathlib import Path

exec((Path(__file__).parent / "small.py").read_text())
lr_schedule = "wsd"
lr_decay_iters = 0  # the warmdown ends at max_iters, so a longer run (a larger max_iters) warms down at its end
out_dir = "out-wsd"  # keep small.py's checkpoint in out/
