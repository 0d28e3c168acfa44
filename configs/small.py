# Char-level TinyShakespeare: a useful model in a few minutes on a laptop CPU; uses a GPU if there is one.
#   python train.py configs/small.py && python sample.py
out_dir = "out"
dataset = "shakespeare_char"

# model: 4 pre-LN blocks, 128 wide, 64 characters of context
n_layer = 4
n_head = 4
n_embd = 128
block_size = 64
dropout = 0.0
bias = False
norm = "layernorm"
norm_position = "pre"

# optimization
batch_size = 32
max_iters = 2000
learning_rate = 2e-3
min_lr = 2e-4
warmup_iters = 50
beta2 = 0.99
weight_decay = 0.1

# evaluation and logging
eval_interval = 500
eval_iters = 20
log_interval = 100
checkpoint_interval = 500
