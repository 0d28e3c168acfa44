# nanoGPT's CPU recipe for char-level TinyShakespeare (its README, "I only have a macbook"): the reference
# configs/small.py races. Same data; 4 layers, 128 wide, batch 12, lr 1e-3, 2000 steps.
#   python -m scripts.bench configs/small.py --time_to_loss --compare=configs/nanogpt_cpu.py --thresholds=1.88
out_dir = "out-nanogpt-cpu"
dataset = "shakespeare_char"

n_layer = 4
n_head = 4
n_embd = 128
block_size = 64
dropout = 0.0
bias = False

batch_size = 12
max_iters = 2000
learning_rate = 1e-3
min_lr = 1e-4
warmup_iters = 100
beta2 = 0.99

eval_interval = 250
eval_iters = 20
log_interval = 10
compile = False
