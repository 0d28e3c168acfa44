# configs/small.py with RMSNorm in place of LayerNorm (no mean subtraction, no bias).
from pathlib import Path

exec((Path(__file__).parent / "small.py").read_text())
norm = "rmsnorm"
out_dir = "out-rmsnorm"  # keep small.py's checkpoint in out/
