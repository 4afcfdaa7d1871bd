"""
The GPT, with GPT-2's architecture so that GPT-2 weights load into it unchanged:
pre-LayerNorm blocks, GELU (tanh approximation), learned position embeddings, and the output
projection tied to the token embedding. Read it bottom-up: attention, MLP, block, GPT.

Beyond nanoGPT it has what RLHF needs:
- a scalar head (`GPTConfig.head = "scalar"`): one number per position instead of logits, for
  reward and value models; a reward is read at the last real token (reward.py's `rewards`);
- left-padded batches: `start[b]` is the index of row b's first real token; position ids start at 0
  there and the padding is masked out of attention, so a row's result does not depend on its padding;
- `generate`: batched sampling with a static KV cache, temperature, top-k, top-p, a per-row stop at
  EOS, greedy decoding at temperature 0;
- checkpoints (a directory: model.safetensors, config.json, metrics.jsonl), written atomically and
  loaded strictly (every name and shape checked; a wrong head or tokenizer refused).

Attention runs through kernels.attention, the one place that picks Triton or PyTorch, except in
generate's one-token steps (decode_step), which call PyTorch's SDPA themselves. Left out on
purpose: dropout on the attention probabilities (the fused kernels have none), biasless variants.
"""

import json
import math
import os
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

import kernels
from common import UserError, atomic_directory, check_out_dir, is_main, read_safetensors, save_state, write_json


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
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, not {value!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), not {self.dropout!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not a multiple of n_head={self.n_head}")


class KVCache:
    """Keys and values of every layer in static buffers [n_layer, B, n_head, max_len, head_size].
    A forward pass writes its T new keys at [pos, pos + T) in each layer, then advances pos. The
    buffers are allocated at the first write, in the dtype the layers produce (bf16 under autocast,
    whatever the weights are), so attention always sees q, k and v in one dtype."""

    def __init__(self, config, batch_size, max_len):
        self.shape = (config.n_layer, batch_size, config.n_head, max_len, config.n_embd // config.n_head)
        self.k = self.v = None
        self.pos = 0

    def update(self, layer, k, v):
        """Store k, v [B, nh, T, hs] of one layer; return all keys and values so far."""
        if self.k is None:
            self.k = k.new_zeros(self.shape)
            self.v = v.new_zeros(self.shape)
        if k.dtype != self.k.dtype:
            raise ValueError(f"KVCache holds {self.k.dtype}, got {k.dtype} keys: keep autocast the same across one generation")
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

    @classmethod
    def from_pretrained(cls, path):
        """A GPT-2 from a local Hugging Face directory (config.json + model.safetensors, as
        GPT2LMHeadModel saves it, any size), and the checkpoint config dict that load_checkpoint
        returns. See the "GPT-2 weights" section below for the layout."""
        return load_hf_gpt2(path)

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
        """Without targets: (logits (B, T, vocab), None) for the lm head, (values (B, T) in float32 or
        wider, None) for the scalar head. With targets: (None, loss) for the lm head, (values, loss) for
        the scalar head. loss: mean cross-entropy over targets that are not kernels.IGNORE_INDEX (0 if
        there are none), computed by kernels.fused_linear_logprobs from the hidden states at those
        targets only: on a GPU the (B, T, vocab) logits never exist, which is most of a step's memory
        with GPT-2's vocabulary. The scalar head's lm loss (reward.py --lm_coef) goes through the tied
        embedding the same way."""
        x = self.hidden_states(idx, start, cache)
        out = None
        if self.config.head == "scalar":
            # in float32 even under autocast: Bradley-Terry fixes a reward only up to an offset, which
            # may be large next to the differences between responses, and bf16 keeps 8 bits of it
            dtype = torch.promote_types(x.dtype, torch.float32)  # a float64 model stays float64
            with torch.autocast(x.device.type, enabled=False):
                out = F.linear(x.to(dtype), self.score.weight.to(dtype)).squeeze(-1)
        elif targets is None:
            out = F.linear(x, self.transformer.wte.weight)  # (B, T, vocab), the tied lm head
        if targets is None:
            return out, None
        mask = targets != kernels.IGNORE_INDEX  # the lm head at the target positions only
        logps = kernels.fused_linear_logprobs(x[mask], self.transformer.wte.weight, targets[mask])
        return out, -logps.sum() / mask.sum().clamp(min=1)

    def decode_step(self, idx, cache, start=None):
        """One new token per row through every layer: idx (B,) -> its final hidden state (B, n_embd),
        its keys and values added to the cache; start as in hidden_states (every start[b] <= cache.pos).
        The same ops as hidden_states(idx[:, None], start, cache)[:, 0] without dropout, so the same
        bits wherever kernels.attention runs PyTorch's reference (as on a CPU), but on the modules'
        weights without calling a module, and with the padding mask built once for all layers: at
        small batch a step is mostly such overhead (BENCHMARKS.md). Its attention is PyTorch's SDPA
        on every device."""
        assert idx.dim() == 1, f"decode_step takes one token per row, (B,), not {tuple(idx.shape)}"
        B, C, nh = idx.size(0), self.config.n_embd, self.config.n_head
        pos = cache.pos
        if pos >= self.config.block_size:
            raise ValueError(f"sequence of {pos + 1} tokens is longer than block_size {self.config.block_size}")
        wte, wpe = self.transformer.wte.weight, self.transformer.wpe.weight
        if start is None:
            x, visible = wte[idx] + wpe[pos], None
        else:  # position 0 on each row's first real token; its padding keys stay hidden
            x = wte[idx] + wpe[(pos - start).clamp(min=0)]
            visible = torch.arange(pos + 1, device=idx.device) >= start.view(B, 1, 1, 1)  # (B, 1, 1, pos + 1)
        for layer, block in enumerate(self.transformer.h):
            attn, mlp = block.attn, block.mlp
            h = F.layer_norm(x, (C,), block.ln_1.weight, block.ln_1.bias)
            # c_attn's output is [q | k | v], each head after head: (B, 3, nh, 1 query, hs)
            q, k, v = F.linear(h, attn.c_attn.weight, attn.c_attn.bias).view(B, 3, nh, 1, C // nh).unbind(1)
            k, v = cache.update(layer, k, v)  # (B, nh, pos + 1, hs)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=visible)  # (B, nh, 1, hs)
            y = y.reshape(B, C)  # the heads side by side, as the transpose in CausalSelfAttention lays them
            x = x + F.linear(y, attn.c_proj.weight, attn.c_proj.bias)
            h = F.layer_norm(x, (C,), block.ln_2.weight, block.ln_2.bias)
            h = F.gelu(F.linear(h, mlp.c_fc.weight, mlp.c_fc.bias), approximate="tanh")
            x = x + F.linear(h, mlp.c_proj.weight, mlp.c_proj.bias)
        cache.pos += 1
        return F.layer_norm(x, (C,), self.transformer.ln_f.weight, self.transformer.ln_f.bias)

    def generate(self, idx, max_new_tokens, start=None, temperature=1.0, top_k=0, top_p=1.0,
                 eos_id=None, pad_id=0, generator=None, use_cache=True):
        """Continue a left-padded batch of prompts.
        idx: (B, T) prompts; start: (B,) index of each row's first real token, in [0, T) (None: no padding).
        temperature 0 is greedy decoding; top_k 0 and top_p 1 turn those filters off.
        After a row samples eos_id it is done: its later tokens are pad_id. Stops early when every
        row is done. Returns (B, T + n) with n <= max_new_tokens: the prompts, then the new tokens.
        use_cache=False recomputes the whole sequence at every step (the slow reference).
        The loop runs in inference mode (no autograd bookkeeping at all: 8-13% more tokens/s than
        no_grad on a CPU at batch 1-16); the tokens come back as an ordinary tensor, which a
        training step (PPO's) may take as input."""
        with torch.inference_mode():
            B, T = idx.size()
            if T + max_new_tokens > self.config.block_size:
                raise ValueError(f"{T} prompt + {max_new_tokens} new tokens exceed block_size {self.config.block_size}")
            if start is not None:
                bad = (start < 0) | (start >= T)
                if bad.any():
                    b = int(bad.nonzero()[0, 0])
                    raise ValueError(f"start[{b}] = {int(start[b])}: every row needs a prompt token in [0, {T})")
                if not start.any():
                    start = None  # no row is padded: skip the masks at every layer and step
            cache = KVCache(self.config, B, T + max_new_tokens) if use_cache else None
            tokens = idx.new_full((B, T + max_new_tokens), pad_id)  # written in place, one column per step
            tokens[:, :T] = idx
            done = torch.zeros(B, dtype=torch.bool, device=idx.device)
            # decode_step has no dropout: with dropout active, every token takes the module path
            fast = use_cache and not (self.training and self.config.dropout > 0)
            end = T
            while end < T + max_new_tokens:
                if fast and end > T:  # one new token against the cache
                    x = self.decode_step(tokens[:, end - 1], cache, start)
                else:  # the prompt, into the cache; or the whole sequence again
                    x = self.hidden_states(tokens[:, (cache.pos if use_cache else 0):end], start, cache)[:, -1]
                logits = F.linear(x, self.transformer.wte.weight)  # (B, vocab): the lm head at the last position only
                nxt = sample(logits, temperature, top_k, top_p, generator)  # (B,)
                if eos_id is not None:
                    nxt = nxt.masked_fill(done, pad_id)
                    done = done | (nxt == eos_id)
                tokens[:, end] = nxt
                end += 1
                if eos_id is not None and done.all():
                    break
        return tokens[:, :end].clone()  # outside inference mode: an ordinary tensor, which PPO may train on


def fit_prompt(ids, block_size, max_new_tokens):
    """A prompt's token ids, cut from the left if need be to leave max_new_tokens of the context (its
    last token is always kept): ppo.py, sample.py and eval.py cut every prompt so, complete_ids one
    that fills the context."""
    return ids[-max(1, block_size - max_new_tokens):]


@torch.no_grad()
def complete_ids(model, tok, prompts, max_new_tokens, batch_size=256, leave_room=False, **sampling):
    """Continue each prompt (a string) with model, in left-padded batches. tok: a data.tokenizer.Tokenizer.
    Returns the token ids of each continuation, up to and including <|endoftext|> if the model
    emitted it. A prompt that fills the context loses its start (fit_prompt), as in every stage
    (formats.fit); one that fits is kept whole, and a batch's continuations get the room its longest
    prompt leaves. leave_room=True cuts every prompt to leave max_new_tokens instead, as ppo.py does:
    no prompt then shortens the continuations of the others.
    sampling: temperature, top_k, top_p, generator (see GPT.generate)."""
    device = model.transformer.wte.weight.device
    n_ctx = model.config.block_size
    responses = []
    for i in range(0, len(prompts), batch_size):
        ids = [tok.encode_prompt(p) for p in prompts[i:i + batch_size]]
        ids = [fit_prompt(p, n_ctx, max_new_tokens) if leave_room or len(p) >= n_ctx else p for p in ids]
        idx, start = left_pad(ids, tok.pad_id, device)
        n = min(max_new_tokens, n_ctx - idx.size(1))
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
    wide = torch.float32 if logits.device.type == "mps" else torch.float64  # (MPS has no float64)
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        # the mass before each token, in float64 (a float32 sum less the token's own probability rounds
        # up at a boundary, and kept one token too many)
        mass_before = F.pad(sorted_logits.softmax(dim=-1, dtype=wide).cumsum(dim=-1)[:, :-1], (1, 0))
        sorted_logits = sorted_logits.masked_fill(mass_before >= top_p, float("-inf"))  # keeps the first
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    # inverse transform sampling: one uniform number per row, located in the cumulative distribution.
    # It draws as torch.multinomial does, at a tenth of its cost on a CPU (multinomial draws one
    # exponential per vocabulary entry). A filtered token (probability 0) adds a flat step to the
    # CDF, which the search for the first entry above u never stops on. Both the CDF and u are
    # float64: in float32 their steps near 1 are 6e-8, so over GPT-2's 50257 tokens (random logits)
    # the draws were 5e-4 away from the softmax in total variation, and the rarest tokens were never
    # drawn; in float64, 4e-8.
    cdf = logits.softmax(dim=-1, dtype=wide).cumsum(dim=-1)  # (B, V)
    if cdf.device.type != "cpu":  # a parallel scan (a GPU's) may dip by a rounding; the CPU sums in order, never down
        cdf = cdf.cummax(dim=-1).values
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


# -----------------------------------------------------------------------------
# checkpoints: a directory with model.safetensors, config.json and metrics.jsonl


class CheckpointError(UserError):
    pass


def save_checkpoint(path, model, meta, log_rows=(), resume=None):
    """Write model and meta (tokenizer, stage, parent, args, metrics, ...) to the directory path,
    atomically: a failure at any point leaves the previous checkpoint at path untouched. resume:
    (tensors, info) from common.TrainState.capture, written beside the weights (resume.safetensors,
    resume.json). Under torchrun only rank 0 writes; the other processes return at once."""
    if not is_main():
        return
    with atomic_directory(path) as tmp:
        if resume is not None:
            save_state(tmp, *resume)
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, os.path.join(tmp, "model.safetensors"))
        write_json(os.path.join(tmp, "config.json"), {"model": asdict(model.config), **meta})
        with open(os.path.join(tmp, "metrics.jsonl"), "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in log_rows)


def read_checkpoint_config(path):
    """config.json of the checkpoint directory path, or a CheckpointError that says what is wrong.
    A Hugging Face GPT-2 directory counts as a checkpoint too (see is_hf_gpt2)."""
    if os.path.isfile(path):
        raise CheckpointError(f"{path} is a file: a checkpoint is a directory (model.safetensors + config.json)")
    if not os.path.isdir(path):
        hint = f" (an interrupted save left the previous one at {path}.old)" if os.path.isdir(f"{path}.old") else ""
        raise CheckpointError(f"{path}: no such checkpoint directory{hint}")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise CheckpointError(f"{path} is not a checkpoint: it has no config.json")
    try:
        with open(os.path.join(path, "config.json")) as f:
            info = json.load(f)
    except ValueError as e:  # not JSON, not UTF-8
        raise CheckpointError(f"{path}/config.json is not valid JSON: {e}") from None
    except OSError as e:
        raise CheckpointError(f"{path}/config.json cannot be read: {e}") from None
    if not isinstance(info, dict):
        raise CheckpointError(f"{path}/config.json is not a JSON object")
    if not is_hf_gpt2(info) and not os.path.isfile(os.path.join(path, "model.safetensors")):
        raise CheckpointError(f"{path} is not a checkpoint: it has no model.safetensors")
    return info


def load_checkpoint(path, head=None, tokenizer=None, device="cpu"):
    """Load a checkpoint directory -> (model, config dict). Refuses, with a message naming both
    sides, a head other than `head` or a tokenizer other than `tokenizer` (None: accept any).
    A Hugging Face GPT-2 directory loads too, as an lm checkpoint of tokenizer "gpt2": so every
    stage's --init (or --policy) takes one with no change to the stage."""
    config, info = checkpoint_config(path)
    if head is not None:
        require_head(path, config, head)
    if tokenizer is not None and info.get("tokenizer") != tokenizer:
        raise CheckpointError(f"{path} was trained with tokenizer {info.get('tokenizer')!r}, "
                              f"but this run uses {tokenizer!r}")
    model = GPT(config)
    if info.get("stage") == "hf":  # hf_checkpoint_info's mark: the weights are in Hugging Face's layout
        load_hf_state(model, path)
    else:
        weights = os.path.join(path, "model.safetensors")
        load_state(model, read_safetensors(weights, CheckpointError), weights)
    return model.to(device), info


def require_head(path, config, head):
    """Refuse a checkpoint (its GPTConfig) whose head is not the one needed ("lm" or "scalar")."""
    if config.head != head:
        raise CheckpointError(f"{path} has a {config.head} head, but a {head} head is needed here")


def checkpoint_config(path):
    """(GPTConfig, checkpoint config dict) of a checkpoint directory (or a Hugging Face GPT-2 one),
    without loading its weights: what load_checkpoint builds the model from."""
    info = read_checkpoint_config(path)
    if is_hf_gpt2(info):
        return hf_checkpoint_info(info, path)
    try:
        return GPTConfig(**info["model"]), info
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}/config.json has no valid model config: {e}") from None


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

# -----------------------------------------------------------------------------
# GPT-2 weights: a Hugging Face GPT2LMHeadModel directory, read and written
#
# The directory holds config.json (HF's field names) and model.safetensors. Tensor names are ours
# with or without the "transformer." prefix (GPT2LMHeadModel saves them with it, GPT2Model without).
# GPT-2's four matrices per block are Conv1D modules, whose weight is stored (in, out): the
# transpose of nn.Linear's (out, in). The lm head is wte itself, so lm_head.weight is absent or a
# copy of wte. attn.bias and attn.masked_bias, in files from older transformers, are the causal
# mask, not weights: skipped. Dropout is off in a model loaded this way (RLHF fine-tuning runs
# without it); GPT-2's own configs say 0.1.

HF_CONV1D = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")
HF_BUFFERS = (".attn.bias", ".attn.masked_bias")  # not "c_attn.bias"
HF_DEFAULTS = dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12)  # GPT2Config's


def is_hf_gpt2(info):
    """Whether a config.json (a dict) is Hugging Face's GPT-2 config rather than one of ours."""
    return info.get("model_type") == "gpt2" or ("n_embd" in info and "n_layer" in info)


def hf_checkpoint_info(hf, path):
    """(GPTConfig, checkpoint config dict) of a HF GPT-2 config.json, refusing a variant this GPT
    does not compute the same way. The tokenizer is GPT-2's, unless the directory was written by
    export_hf, which records the one it was trained with."""
    def field(name):
        return hf.get(name, HF_DEFAULTS.get(name))
    refusals = {  # what this GPT cannot compute: the field, and what this GPT has instead
        "activation_function": (field("activation_function") in (None, "gelu_new", "gelu_pytorch_tanh"), "gelu_new"),
        "n_inner": (field("n_inner") in (None, 4 * field("n_embd")), "4 * n_embd"),
        "layer_norm_epsilon": (field("layer_norm_epsilon") in (None, 1e-5), "1e-5"),
        "tie_word_embeddings": (field("tie_word_embeddings") is not False, "lm_head tied to wte"),
        "scale_attn_by_inverse_layer_idx": (not field("scale_attn_by_inverse_layer_idx"), "false"),
        "scale_attn_weights": (field("scale_attn_weights") is not False, "true"),
        "add_cross_attention": (not field("add_cross_attention"), "false"),
    }
    for name, (ok, ours) in refusals.items():
        if not ok:
            raise CheckpointError(f"{path}/config.json: {name} {field(name)!r} is not supported (this GPT has {ours})")
    try:
        config = GPTConfig(block_size=hf.get("n_positions", hf.get("n_ctx", HF_DEFAULTS["n_positions"])),
                           vocab_size=field("vocab_size"), n_layer=field("n_layer"), n_head=field("n_head"),
                           n_embd=field("n_embd"), dropout=0.0)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}/config.json is not a usable GPT-2 config: {e}") from None
    info = {"model": asdict(config), "tokenizer": hf.get("rlhf_tokenizer", "gpt2"), "stage": "hf", "parent": None,
            "args": {}, "metrics": {}}
    if "rlhf_tokenizer_fingerprint" in hf:
        info["tokenizer_fingerprint"] = hf["rlhf_tokenizer_fingerprint"]
    return config, info


def read_hf_tensors(path):
    """{name: tensor} of a HF directory's model.safetensors, or of the shards that
    model.safetensors.index.json lists; each name mapped to the file it came from."""
    single, index = os.path.join(path, "model.safetensors"), os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(single):
        files = [single]
    elif os.path.isfile(index):
        try:
            with open(index) as f:
                files = [os.path.join(path, name) for name in sorted(set(json.load(f)["weight_map"].values()))]
        except (ValueError, OSError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index} is not a safetensors index (a JSON object with a weight_map): {e!r}") from None
    elif os.path.isfile(os.path.join(path, "pytorch_model.bin")):
        raise CheckpointError(f"{path} has pytorch_model.bin only, a pickle, which is never loaded here: "
                              f"use the model.safetensors that the model's page also offers")
    else:
        raise CheckpointError(f"{path} is not a checkpoint: it has no model.safetensors")
    tensors, where = {}, {}
    for file in files:
        for name, tensor in read_safetensors(file, CheckpointError).items():
            tensors[name], where[name] = tensor, file
    return tensors, where


def load_hf_state(model, path):
    """Copy a HF GPT-2 directory's weights into model (built from its config), checking that every
    tensor is there, has the right shape, and that nothing else is."""
    tensors, where = read_hf_tensors(path)
    prefix = "transformer." if any(k.startswith("transformer.") for k in tensors) else ""
    state = {}
    for name, want in model.state_dict().items():
        key = prefix + name.removeprefix("transformer.")
        if key not in tensors:
            raise CheckpointError(f"{path}: the weights have no tensor {key}")
        tensor, conv1d = tensors.pop(key), name.endswith(HF_CONV1D)
        expected = want.shape[::-1] if conv1d else want.shape  # Conv1D: (in, out)
        if tensor.shape != expected:
            raise CheckpointError(f"{where[key]}: {key} has shape {tuple(tensor.shape)}, "
                                  f"config.json implies {tuple(expected)}")
        state[name] = tensor.t() if conv1d else tensor
    head = tensors.pop("lm_head.weight", None)
    if head is not None and not torch.equal(head, state["transformer.wte.weight"].to(head.dtype)):
        raise CheckpointError(f"{path}: lm_head.weight differs from wte.weight; this GPT ties them")
    extra = [k for k in tensors if not k.endswith(HF_BUFFERS)]
    if extra:
        raise CheckpointError(f"{where[extra[0]]}: unexpected tensor {extra[0]} ({len(extra)} in all) for the "
                              f"config.json beside it")
    model.load_state_dict(state)


def load_hf_gpt2(path):
    """(GPT, checkpoint config dict) of a HF GPT-2 directory: GPT.from_pretrained."""
    info = read_checkpoint_config(path)
    if not is_hf_gpt2(info):
        raise CheckpointError(f"{path}/config.json is not a Hugging Face GPT-2 config (no model_type 'gpt2')")
    config, info = hf_checkpoint_info(info, path)
    model = GPT(config)
    load_hf_state(model, path)
    return model, info


def export_hf(model, out_dir, tokenizer=None):
    """Write model (an lm head) to out_dir as a Hugging Face GPT-2 directory that
    transformers.GPT2LMHeadModel.from_pretrained loads: model.safetensors with HF's names and
    Conv1D layout, config.json with HF's fields. tokenizer: the checkpoint's {"tokenizer",
    "tokenizer_fingerprint"}, recorded as rlhf_* fields so that load_checkpoint reads it back.
    Atomic, like save_checkpoint."""
    if model.config.head != "lm":
        raise CheckpointError(f"only a language model exports to GPT-2's layout, not a {model.config.head} head")
    c = model.config
    if not tokenizer and c.vocab_size != 50257:  # read back, a directory that records no tokenizer means GPT-2's
        raise CheckpointError(f"a vocabulary of {c.vocab_size} is not GPT-2's: pass the checkpoint's tokenizer "
                              f"(its config dict from load_checkpoint) so that the export records it")
    eot = 50256  # GPT-2's <|endoftext|>, whatever its vocabulary; the builtin tokenizer's own id otherwise
    if tokenizer and tokenizer["tokenizer"] == "builtin":
        from data.tokenizer import get_tokenizer  # here only: the model needs no tokenizer to run
        eot = get_tokenizer("builtin").eot_id
    state = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu()
        state[name] = (tensor.t() if name.endswith(HF_CONV1D) else tensor).contiguous()
    config = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": c.vocab_size,
              "n_positions": c.block_size, "n_ctx": c.block_size, "n_embd": c.n_embd, "n_layer": c.n_layer,
              "n_head": c.n_head, "n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
              "resid_pdrop": c.dropout, "embd_pdrop": c.dropout, "attn_pdrop": 0.0, "initializer_range": 0.02,
              "scale_attn_weights": True, "tie_word_embeddings": True, "torch_dtype": "float32",
              # <|endoftext|>, where HF's generate stops: without it, it never stopped on a builtin model
              "bos_token_id": eot, "eos_token_id": eot}
    if tokenizer:
        config["rlhf_tokenizer"] = tokenizer["tokenizer"]
        if "tokenizer_fingerprint" in tokenizer:
            config["rlhf_tokenizer_fingerprint"] = tokenizer["tokenizer_fingerprint"]
    check_out_dir(out_dir, "the export directory")  # a directory of other files is refused, not mixed in
    with atomic_directory(out_dir) as tmp:
        save_file(state, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        write_json(os.path.join(tmp, "config.json"), config)


if __name__ == "__main__":
    # python -m model export CKPT_DIR OUT_DIR: a checkpoint of any stage (lm head) -> HF GPT-2 directory
    import sys
    if len(sys.argv) != 4 or sys.argv[1] != "export":
        sys.exit("usage: python -m model export CKPT_DIR OUT_DIR")
    try:
        check_out_dir(sys.argv[3], "OUT_DIR", reads={"CKPT_DIR": sys.argv[2]})
        exported, meta = load_checkpoint(sys.argv[2], head="lm")
        export_hf(exported, sys.argv[3], {k: meta[k] for k in ("tokenizer", "tokenizer_fingerprint") if k in meta})
    except UserError as e:  # a bad checkpoint, or an OUT_DIR that is not a new directory
        sys.exit(f"error: {e}")
    print(f"wrote {sys.argv[3]}: GPT-2 layout, {exported.num_params():,} parameters, tokenizer {meta.get('tokenizer')}")
