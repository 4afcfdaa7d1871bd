"""
The GPT, with GPT-2's architecture so that GPT-2 weights load into it unchanged:
pre-LayerNorm blocks, GELU (tanh approximation), learned position embeddings, and the output
projection tied to the token embedding. Read it bottom-up: attention, MLP, block, GPT.

Beyond nanoGPT it has what RLHF needs:
- a scalar head (`GPTConfig.head = "scalar"`): one number per position instead of logits, for
  reward and value models; a reward is read at the last real token (`last_token_index`);
- left-padded batches: `start[b]` is the index of row b's first real token; position ids start at 0
  there and the padding is masked out of attention, so a row's result does not depend on its padding;
- `generate`: batched sampling with a static KV cache, temperature, top-k, top-p, a per-row stop at
  EOS, greedy decoding at temperature 0;
- checkpoints (a directory: model.safetensors, config.json, metrics.jsonl), written atomically and
  loaded strictly (every name and shape checked; a wrong head or tokenizer refused).

Attention runs through kernels.attention, the one place that picks Triton or PyTorch. Left out on
purpose: dropout on the attention probabilities (the fused kernels have none), biasless variants.
"""

import json
import math
import os
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import kernels
from common import UserError, atomic_directory, write_json


@dataclass
class GPTConfig:
    block_size: int = 128  # the longest sequence (number of position embeddings)
    vocab_size: int = 984
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0  # on embeddings and residual branches
    head: str = "lm"  # "lm": next-token logits; "scalar": one number per position (reward, value)

    def __post_init__(self):
        if self.head not in ("lm", "scalar"):
            raise ValueError(f"head must be 'lm' or 'scalar', not {self.head!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not a multiple of n_head={self.n_head}")


class KVCache:
    """Keys and values of every layer in static buffers [n_layer, B, n_head, max_len, head_size].
    A forward pass writes its T new keys at [pos, pos + T) in each layer, then advances pos."""

    def __init__(self, config, batch_size, max_len, device, dtype):
        shape = (config.n_layer, batch_size, config.n_head, max_len, config.n_embd // config.n_head)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0

    def update(self, layer, k, v):
        """Store k, v [B, nh, T, hs] of one layer; return all keys and values so far."""
        end = self.pos + k.size(2)
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class CausalSelfAttention(nn.Module):

    def __init__(self, config, layer):
        super().__init__()
        self.layer = layer
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v for all heads at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, start=None, cache=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, nh, pos + T, hs)
        y = kernels.attention(q, k, v, causal=True, kv_start=start)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):

    def __init__(self, config, layer):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x, start=None, cache=None):
        x = x + self.attn(self.ln_1(x), start, cache)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd),
        ))
        # the lm head is the token embedding itself (tied, as in GPT-2): see forward
        if config.head == "scalar":
            self.score = nn.Linear(config.n_embd, 1, bias=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale the residual projections by depth
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        if config.head == "scalar":
            nn.init.normal_(self.score.weight, std=1 / math.sqrt(config.n_embd + 1))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def hidden_states(self, idx, start=None, cache=None):
        """The final hidden states (B, T, n_embd) after ln_f, before any head.
        idx: (B, T) token ids; start: (B,) first real token of each left-padded row;
        cache: a KVCache holding the keys of the tokens before idx."""
        B, T = idx.size()
        past = 0 if cache is None else cache.pos
        if past + T > self.config.block_size:
            raise ValueError(f"sequence of {past + T} tokens is longer than block_size {self.config.block_size}")
        pos = torch.arange(past, past + T, device=idx.device).expand(B, T)  # (B, T)
        if start is not None:
            pos = (pos - start.view(B, 1)).clamp(min=0)  # position 0 on each row's first real token
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x, start, cache)
        if cache is not None:
            cache.pos += T
        return self.transformer.ln_f(x)

    def forward(self, idx, targets=None, start=None, cache=None):
        """Returns (logits (B, T, vocab), loss) for the lm head, (values (B, T), None) for the scalar
        head. loss: mean cross-entropy over targets that are not kernels.IGNORE_INDEX."""
        x = self.hidden_states(idx, start, cache)
        if self.config.head == "scalar":
            return self.score(x).squeeze(-1), None
        logits = F.linear(x, self.transformer.wte.weight)  # (B, T, vocab), the tied lm head
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=kernels.IGNORE_INDEX)
        return logits, loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, start=None, temperature=1.0, top_k=0, top_p=1.0,
                 eos_id=None, pad_id=0, generator=None, use_cache=True):
        """Continue a left-padded batch of prompts.
        idx: (B, T) prompts; start: (B,) index of each row's first real token (None: no padding).
        temperature 0 is greedy decoding; top_k 0 and top_p 1 turn those filters off.
        After a row samples eos_id it is done: its later tokens are pad_id. Stops early when every
        row is done. Returns (B, T + n) with n <= max_new_tokens: the prompts, then the new tokens.
        use_cache=False recomputes the whole sequence at every step (the slow reference)."""
        B, T = idx.size()
        if T + max_new_tokens > self.config.block_size:
            raise ValueError(f"{T} prompt + {max_new_tokens} new tokens exceed block_size {self.config.block_size}")
        if start is not None and not start.any():
            start = None  # no row is padded: skip the masks at every layer and step
        dtype = self.transformer.wte.weight.dtype
        cache = KVCache(self.config, B, T + max_new_tokens, idx.device, dtype) if use_cache else None
        tokens = idx.new_full((B, T + max_new_tokens), pad_id)  # written in place, one column per step
        tokens[:, :T] = idx
        done = torch.zeros(B, dtype=torch.bool, device=idx.device)
        end = T
        while end < T + max_new_tokens:
            # with the cache only the newest token goes in (all of the prompt at the first step)
            x = self.hidden_states(tokens[:, (cache.pos if use_cache else 0):end], start, cache)
            logits = F.linear(x[:, -1], self.transformer.wte.weight)  # (B, vocab): the lm head at the last position only
            nxt = sample(logits, temperature, top_k, top_p, generator)  # (B,)
            if eos_id is not None:
                nxt = nxt.masked_fill(done, pad_id)
                done = done | (nxt == eos_id)
            tokens[:, end] = nxt
            end += 1
            if eos_id is not None and done.all():
                break
        return tokens[:, :end]


@torch.no_grad()
def complete_ids(model, tok, prompts, max_new_tokens, batch_size=256, **sampling):
    """Continue each prompt (a string) with model, in left-padded batches. tok: a data.tokenizer.Tokenizer.
    Returns the token ids of each continuation, up to and including <|endoftext|> if the model
    emitted it. sampling: temperature, top_k, top_p, generator (see GPT.generate)."""
    device = model.transformer.wte.weight.device
    responses = []
    for i in range(0, len(prompts), batch_size):
        idx, start = left_pad([tok.encode(p) for p in prompts[i:i + batch_size]], tok.pad_id, device)
        n = min(max_new_tokens, model.config.block_size - idx.size(1))
        out = model.generate(idx, n, start=start, eos_id=tok.eot_id, pad_id=tok.pad_id, **sampling)
        for row in out[:, idx.size(1):].tolist():
            responses.append(row[:row.index(tok.eot_id) + 1] if tok.eot_id in row else row)
    return responses


def complete(model, tok, prompts, max_new_tokens, **kwargs):
    """complete_ids, decoded: the text of each continuation (ending in <|endoftext|> if it stopped)."""
    return [tok.decode(r) for r in complete_ids(model, tok, prompts, max_new_tokens, **kwargs)]


def sample(logits, temperature=1.0, top_k=0, top_p=1.0, generator=None):
    """One token per row from logits (B, V): greedy at temperature 0, else softmax(logits/temperature)
    restricted to the top_k most likely tokens and to the smallest set whose mass reaches top_p."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        mass_before = sorted_logits.softmax(dim=-1).cumsum(dim=-1) - sorted_logits.softmax(dim=-1)
        sorted_logits = sorted_logits.masked_fill(mass_before >= top_p, float("-inf"))  # keeps the first
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    # inverse transform sampling: one uniform number per row, located in the cumulative distribution.
    # It draws as torch.multinomial does, at a tenth of its cost on a CPU (multinomial draws one
    # exponential per vocabulary entry). A filtered token (probability 0) adds a flat step to the
    # CDF, which the search for the first entry above u never stops on.
    cdf = logits.softmax(dim=-1).cumsum(dim=-1)  # (B, V)
    total = cdf[:, -1:]  # 1 up to rounding
    u = torch.rand(total.shape, generator=generator, device=total.device, dtype=total.dtype) * total
    u = torch.minimum(u, total.nextafter(torch.zeros_like(total)))  # u * total may round up to total
    return torch.searchsorted(cdf, u, right=True).squeeze(-1)


def left_pad(seqs, pad_id, device=None):
    """A batch of token lists -> (idx (B, T) padded on the left, start (B,) first real index)."""
    T = max(len(s) for s in seqs)
    idx = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        idx[i, T - len(s):] = torch.tensor(s, dtype=torch.long)
    start = torch.tensor([T - len(s) for s in seqs], dtype=torch.long)
    return idx.to(device), start.to(device)


def last_token_index(mask):
    """Index of the last True in each row of mask (B, T): where a reward model reads its score.
    Works for left padding, right padding and both."""
    T = mask.size(1)
    return T - 1 - mask.flip(1).int().argmax(dim=1)

# -----------------------------------------------------------------------------
# checkpoints: a directory with model.safetensors, config.json and metrics.jsonl


class CheckpointError(UserError):
    pass


def save_checkpoint(path, model, meta, log_rows=()):
    """Write model and meta (tokenizer, stage, parent, args, metrics, ...) to the directory path,
    atomically: a failure at any point leaves the previous checkpoint at path untouched."""
    with atomic_directory(path) as tmp:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, os.path.join(tmp, "model.safetensors"))
        write_json(os.path.join(tmp, "config.json"), {"model": asdict(model.config), **meta})
        with open(os.path.join(tmp, "metrics.jsonl"), "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in log_rows)


def read_checkpoint_config(path):
    """config.json of the checkpoint directory path, or a CheckpointError that says what is wrong."""
    if not os.path.isdir(path):
        hint = f" (an interrupted save left the previous one at {path}.old)" if os.path.isdir(f"{path}.old") else ""
        raise CheckpointError(f"{path}: no such checkpoint directory{hint}")
    for name in ("config.json", "model.safetensors"):
        if not os.path.isfile(os.path.join(path, name)):
            raise CheckpointError(f"{path} is not a checkpoint: it has no {name}")
    try:
        with open(os.path.join(path, "config.json")) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}/config.json is not valid JSON: {e}") from None


def load_checkpoint(path, head=None, tokenizer=None, device="cpu"):
    """Load a checkpoint directory -> (model, config dict). Refuses, with a message naming both
    sides, a head other than `head` or a tokenizer other than `tokenizer` (None: accept any)."""
    info = read_checkpoint_config(path)
    try:
        config = GPTConfig(**info["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}/config.json has no valid model config: {e}") from None
    if head is not None and config.head != head:
        raise CheckpointError(f"{path} has a {config.head} head, but a {head} head is needed here")
    if tokenizer is not None and info.get("tokenizer") != tokenizer:
        raise CheckpointError(f"{path} was trained with tokenizer {info.get('tokenizer')!r}, "
                              f"but this run uses {tokenizer!r}")
    model = GPT(config)
    load_state(model, load_file(os.path.join(path, "model.safetensors")), f"{path}/model.safetensors")
    return model.to(device), info


def load_state(model, state, source):
    """model.load_state_dict(state), after checking every name and shape with a clear message."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{source} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise CheckpointError(f"{source}: {name} has shape {tuple(tensor.shape)}, "
                                  f"the model expects {tuple(expected[name].shape)}")
    model.load_state_dict(state)
