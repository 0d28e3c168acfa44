# Fine-tune OpenAI's GPT-2 (124M) on TinyShakespeare with the GPT-2 BPE, as in nanoGPT:
#   python data/shakespeare/prepare.py          # (or let train.py prepare it on first use)
#   python train.py configs/finetune_shakespeare.py && python sample.py --out_dir=out-shakespeare
# Needs transformers (pip install transformers) and the Hub, or a local copy: --init_from=path/to/folder.
# --init_from=gpt2-medium / gpt2-large / gpt2-xl for the bigger ones (gpt2-xl: ~1.5B, wants a large GPU).
# The model's shape (layers, heads, width, vocabulary, 1024 positions, biases) comes from the checkpoint;
# it is GPT-2's pre-LN LayerNorm architecture, so the norm keys stay at their defaults.
out_dir = "out-shakespeare"
dataset = "shakespeare"
init_from = "gpt2"

block_size = 1024
dropout = 0.1

# 1 sequence x 1024 tokens x 32 micro-steps = 32,768 tokens per step; the whole set is ~300k tokens,
# so 20 steps see it about twice
batch_size = 1
gradient_accumulation_steps = 32
max_iters = 20
learning_rate = 3e-5  # small and constant: nudge the pretrained weights, do not retrain them
decay_lr = False
min_lr = 3e-5  # unused without decay; must not exceed learning_rate
beta2 = 0.95

eval_interval = 5
eval_iters = 20
log_interval = 1
checkpoint_interval = 0  # only the best and the last
