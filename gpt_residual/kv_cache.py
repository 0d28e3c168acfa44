"""The KV cache of sampling (gpt_residual/engine.py): every layer's keys and values in buffers allocated once, which
model.py's attention writes into and reads (CausalSelfAttention.forward with a cache)."""

import torch


class KVCache:
    """Keys and values of every layer, allocated once to block_size and written in place, so that a
    one-token decode step has fixed shapes (a CUDA graph can replay it). A prompt fills slots 0..T-1
    (reset the cache first); each later token goes to slot `pos` and attends to the first `span` slots
    (a Python int, so a step's shapes stay fixed while it holds) through the mask of filled ones."""

    def __init__(self, config):  # model.GPTConfig: n_layer, block_size
        self.block_size = config.block_size
        self.k = [None] * config.n_layer  # per layer: (B, nh, block_size, hs), made on first use
        self.v = [None] * config.n_layer
        self.pos = None  # (1,) long tensor: the slot of the next token
        self.filled = None  # (1, 1, 1, block_size) bool: the slots that hold the current context
        self.span = config.block_size  # slots a one-token step reads (set by the Decoder): all the filled ones
        self.length = 0  # slots filled since reset, on the host (compiled steps: kept by the Decoder)

    def reset(self, device):
        """Start a new context at slot 0; the old entries stay in place, masked out."""
        if self.pos is None:
            self.pos = torch.zeros(1, dtype=torch.long, device=device)
            self.filled = torch.zeros(1, 1, 1, self.block_size, dtype=torch.bool, device=device)
        self.pos.zero_()
        self.filled.zero_()
        self.length = 0

    def claim(self, T: int) -> torch.Tensor:
        """The slots (T,) of the next T tokens, marked filled; pos moves past them (no host sync). Several
        tokens at once only from slot 0 (a prompt attends to itself, not to a cached prefix)."""
        if self.pos is None:
            raise ValueError("reset the KV cache before its first use")
        if not torch.compiler.is_compiling():  # a compiled or graphed step is checked by its caller
            if self.length + T > self.block_size or (T > 1 and self.length):
                raise ValueError(
                    f"the KV cache cannot take {T} token(s) after {self.length} of its {self.block_size} slots: "
                    "a prompt goes in from slot 0 (reset first), later tokens one at a time, within block_size"
                )
            self.length += T
        slots = self.pos + torch.arange(T, device=self.pos.device)
        self.filled.index_fill_(3, slots, True)
        self.pos.add_(T)
        return slots

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor):
        """Write k, v (B, nh, T, hs) at slots; return the whole cache of this layer (B, nh, block_size, hs)."""
        if self.k[layer] is None:  # allocate with the dtype autocast gives k and v
            B, nh, _, hs = k.shape
            self.k[layer] = k.new_zeros(B, nh, self.block_size, hs)
            self.v[layer] = v.new_zeros(B, nh, self.block_size, hs)
        self.k[layer].index_copy_(2, slots, k)
        self.v[layer].index_copy_(2, slots, v)
        return self.k[layer], self.v[layer]
