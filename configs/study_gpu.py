# The study on one GPU: python -m scripts.study configs/study_gpu.py --preset=gpu
# The variants train GPT-2 small's shape (12 layers, 768 wide) on TinyShakespeare with the GPT-2 BPE; every
# question's runs take the same width (--preset=gpu: scripts/study/presets.py sets their steps, 8 runs at a time).
# Every run is short, so none is compiled: a compile per run would cost more than it saves. Sized by the
# study's cost model for 15 minutes on one GPU (not yet measured on a GPU).
out_dir = "out-study-gpu"
dataset = "shakespeare"

n_layer = 12
n_head = 12
n_embd = 768
block_size = 256
dropout = 0.0
bias = False

batch_size = 32
max_iters = 500
learning_rate = 1e-3
min_lr = 1e-4
warmup_iters = 50
beta2 = 0.99

eval_interval = 50
eval_iters = 20
log_interval = 25
compile = False
