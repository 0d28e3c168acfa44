# nanoGPT's Shakespeare-char GPU model: 6 layers, 6 heads, 384 wide, 256 characters of context.
# About 10.7M parameters; reaches val loss ~1.47 on one GPU.
out_dir = "out-shakespeare-char"
dataset = "shakespeare_char"

n_layer = 6
n_head = 6
n_embd = 384
block_size = 256
dropout = 0.2
bias = False

batch_size = 64
gradient_accumulation_steps = 1
max_iters = 5000
learning_rate = 1e-3
min_lr = 1e-4
warmup_iters = 100
weight_decay = 0.1
beta2 = 0.99  # a small model on few tokens per step: a shorter second-moment memory helps

eval_interval = 250
eval_iters = 200
log_interval = 10
checkpoint_interval = 1000
