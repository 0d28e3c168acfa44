# GPT-2 small (124M) on OpenWebText, trained from scratch:
#   python train.py configs/gpt2.py                                         # one GPU
#   torchrun --standalone --nproc_per_node=8 train.py configs/gpt2.py       # 8 GPUs
# 524,288 tokens (~0.5M) per optimizer step on any number of GPUs: micro-batches of 32 x 1024 tokens
# (~22 GiB with bf16 and compile), and gradient_accumulation_steps derived from batch_tokens
# (16 on one GPU, 2 on eight). A micro-batch of 32 ran 12% faster than nanoGPT's 12 on an H100.
out_dir = "out-gpt2"
dataset = "openwebtext"

n_layer = 12
n_head = 12
n_embd = 768
block_size = 1024
dropout = 0.0
bias = False  # from scratch: no biases (faster, no worse); pretrained GPT-2 (init_from=gpt2) keeps its own

batch_size = 32
batch_tokens = 524_288
max_iters = 600_000
learning_rate = 6e-4
min_lr = 6e-5
warmup_iters = 2000
weight_decay = 0.1
beta2 = 0.95

eval_interval = 1000
eval_iters = 200
log_interval = 10
checkpoint_interval = 1000
# a days-long run: compile the whole model as one graph (measured at 525k tokens/s on an H200); the default,
# "blocks", compiles in a fraction of the time, for runs of minutes (its throughput here: see the GPU suite)
compile_scope = "model"
