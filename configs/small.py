# Char-level TinyShakespeare: a useful model in about 2 minutes on a 2-core laptop CPU; uses a GPU if there is one.
#   python train.py configs/small.py && python sample.py
# Tuned for time-to-loss on a CPU (README, "Fast on a laptop CPU"): on 2 cores the run is compute-bound,
# so a 2-layer, 128-wide model (0.40M parameters) at a high learning rate learns more per second than
# nanoGPT's 4-layer, 128-wide CPU recipe; the cosine reaches its floor at step 1000, so the loss falls
# early (val 1.865 at step 750) and keeps falling at the floor rate; torch.compile did not pay here.
out_dir = "out"
dataset = "shakespeare_char"

# model: 2 pre-LN blocks, 128 wide, 64 characters of context
n_layer = 2
n_head = 4
n_embd = 128
block_size = 64
dropout = 0.0
bias = False
norm = "layernorm"
norm_position = "pre"

# optimization: 24 x 64 = 1,536 tokens per step
batch_size = 24
max_iters = 2000
learning_rate = 5e-3
lr_decay_iters = 1000  # fixed, not max_iters: the cosine floors at 1000 so the loss falls early (see above)
min_lr = 1e-3
warmup_iters = 30
beta2 = 0.99
weight_decay = 0.1

# evaluation (val and train loss on 20 fixed batches each, every 250 steps) and logging
eval_interval = 250
eval_iters = 20
log_interval = 100
checkpoint_interval = 500
