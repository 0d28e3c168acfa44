# GPT-2 small (124M) on OpenWebText, for 8 GPUs:
#   torchrun --standalone --nproc_per_node=8 train.py configs/gpt2.py
# 12 sequences x 1024 tokens x 5 micro-steps x 8 GPUs = 491,520 tokens (~0.5M) per optimizer step.
# On one GPU keep the same batch with --gradient_accumulation_steps=40 (accumulation is per process).
out_dir = "out-gpt2"
dataset = "openwebtext"

n_layer = 12
n_head = 12
n_embd = 768
block_size = 1024
dropout = 0.0
bias = True  # as GPT-2, so pretrained weights map one to one

batch_size = 12
gradient_accumulation_steps = 5
max_iters = 600_000
learning_rate = 6e-4
min_lr = 6e-5
warmup_iters = 2000
lr_decay_iters = 600_000
weight_decay = 0.1
beta2 = 0.95

eval_interval = 1000
eval_iters = 200
log_interval = 10
checkpoint_interval = 1000
