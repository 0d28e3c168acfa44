# configs/small.py with post-LN: every block renormalises the stream, x = norm(x + f(x)).
from pathlib import Path

exec((Path(__file__).parent / "small.py").read_text())
norm_position = "post"
out_dir = "out-post-ln"  # keep small.py's checkpoint in out/
