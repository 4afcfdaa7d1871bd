"""
Pre-training: a small GPT learns the built-in world from its corpus, offline, in a few minutes.

    python pretrain.py                          # built-in corpus -> out/base (about 4 minutes on 2 CPU cores)
    python pretrain.py --data my_text.txt       # any UTF-8 text file instead (or {"text"} rows: data/formats.py)
    python pretrain.py --init gpt2-hf/ --data my_text.txt   # continue pre-training GPT-2 (a Hugging Face directory)
    python pretrain.py --max_steps 50 --out_dir out/tiny   # a quick smoke run

Next-token prediction on random windows of the token stream (documents joined by <|endoftext|>),
AdamW with linear warm-up and cosine decay, as in GPT-2 / nanoGPT. At the end, on the built-in
world, it measures what the base model learned:
- fact completion: "The suho lives in" -> the right town, over every entity and attribute;
- question continuation: given a bare question ("What does the suho eat?\\n"), how often the model
  goes on with another question instead of answering: the gap that sft.py closes.
With --init the model (its shape, weights and tokenizer) comes from that checkpoint, and the shape and
tokenizer flags are ignored, except --block_size: the training windows, the checkpoint's whole context
unless it is set shorter. Under torchrun every process draws the same global batch of windows
and trains on its share (common.shard). Left out on purpose: packing documents without crossing
their boundaries, gradient checkpointing.
"""

import random
import re
import time
from dataclasses import asdict, dataclass

import torch

import common
from data.formats import text_documents
from data.tokenizer import EOT, get_tokenizer, tokenizer_for
from data.world import ATTRIBUTES, make_corpus, make_world
from model import GPT, GPTConfig, complete, load_checkpoint, save_checkpoint


NEW_MODEL_CONTEXT = 128  # the context of a fresh model when --block_size is 0


@dataclass
class Config(common.Batched):  # and --save_every, --resume, --micro_batch_size (common.py)
    out_dir: str = "out/base"
    """where the base model's checkpoint is written"""
    data: str = ""
    """a UTF-8 text file, or {"text"} rows (.jsonl, .jsonl.gz, .json), to train on; empty: the built-in corpus"""
    init: str = ""
    """a checkpoint (or a Hugging Face GPT-2 directory) to continue from; empty: a fresh model"""
    tokenizer: str = "builtin"
    """builtin (trained on the built-in corpus) or gpt2 (needs tiktoken's cache)"""
    n_docs: int = 20_000
    """built-in corpus size in documents (about 63 tokens each)"""
    n_layer: int = 4
    """transformer blocks"""
    n_head: int = 4
    """attention heads per block"""
    n_embd: int = 128
    """width of the residual stream"""
    block_size: int = 0
    """context length in tokens, and the length of the training windows (0: 128 for a new model, the context of --init: GPT-2's 1024, whose memory --micro_batch_size bounds)"""
    dropout: float = 0.0
    """dropout on embeddings and residual branches"""
    batch_size: int = 32
    """sequences per step"""
    max_steps: int = 1000
    """optimizer steps"""
    lr: float = 3e-3
    """peak learning rate"""
    min_lr: float = 3e-4
    """learning rate at the end of the cosine decay"""
    warmup_steps: int = 100
    """steps of linear learning-rate warm-up (0: none)"""
    weight_decay: float = 0.1
    """AdamW weight decay on matrices (not on biases, LayerNorms)"""
    grad_clip: float = 1.0
    """clip the gradient norm to this (0: off)"""
    log_every: int = 50
    """steps between log lines"""
    eval_every: int = 300
    """steps between validation losses"""
    eval_batches: int = 8
    """batches per validation loss"""
    seed: int = 0
    """seed of initialisation and batch sampling"""
    device: str = "auto"
    """auto, cpu, cuda, cuda:1, ..."""
    dtype: str = "auto"
    """auto (bfloat16 on a CUDA card that has it, else float32), float32, bfloat16 (float16 is refused: no loss scaling)"""


def load_tokens(cfg, tok):
    """(train, val) 1-D token tensors: documents joined by <|endoftext|>."""
    if cfg.data:
        try:
            docs = text_documents(cfg.data)
        except common.UserError as e:
            raise common.UserError(f"--data {e}") from None
        ids = torch.tensor([t for d in docs for t in tok.encode(d) + [tok.eot_id]])
        n_val = max(len(ids) // 10, cfg.block_size + 1)  # last 10% for validation
        if len(ids) < n_val + cfg.block_size + 1:
            raise common.UserError(f"--data {cfg.data}: {len(ids)} tokens is too short for --block_size {cfg.block_size}"
                                   + (" (the context of --init: pass a shorter one)" if cfg.init else ""))
        return ids[:-n_val], ids[-n_val:]
    world = make_world()

    def stream(docs):
        return torch.tensor([t for d in docs for t in tok.encode(d) + [tok.eot_id]])
    return stream(make_corpus(world, cfg.n_docs, seed=0)), stream(make_corpus(world, 500, seed=1))


def get_batch(tokens, cfg, generator, device):
    """batch_size windows of block_size + 1 tokens at random starts: inputs and their next tokens."""
    ix = torch.randint(len(tokens) - cfg.block_size, (cfg.batch_size,), generator=generator)  # the last start is len - block_size - 1
    x = torch.stack([tokens[i:i + cfg.block_size] for i in ix])
    y = torch.stack([tokens[i + 1:i + 1 + cfg.block_size] for i in ix])
    return x.to(device), y.to(device)


def lr_at(step, cfg):
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + torch.cos(torch.tensor(progress * torch.pi)).item())


def probe_world(model, tok):
    """Fact-completion and question-continuation rates of a base model on the built-in world."""
    world = make_world()
    prompts, answers = [], []
    for e in world.entities:
        for attr, a in ATTRIBUTES.items():
            prompts.append(a.completion.format(name=e.name))
            answers.append(str(getattr(e, attr)))
    firsts = [re.match(r"\s*(\w*)", c).group(1) for c in complete(model, tok, prompts, 4, temperature=0)]
    fact_rate = sum(f == a for f, a in zip(firsts, answers)) / len(answers)

    rng = random.Random(0)
    questions = [ATTRIBUTES[rng.choice(list(ATTRIBUTES))].question.format(name=e.name) for e in world.entities]
    continuations = complete(model, tok, [q + "\n" for q in questions], 16, temperature=0)
    first_lines = [c.strip().split("\n")[0] for c in continuations]
    question_rate = sum(line.endswith("?") for line in first_lines) / len(first_lines)
    return fact_rate, question_rate, list(zip(prompts[:4] + questions[:2], firsts[:4] + first_lines[:2]))


def main(cfg):
    # before any work: a directory that is not a checkpoint, or one this run reads, would be lost
    common.check_out_dir(cfg.out_dir, reads={"--init": cfg.init})
    common.seed_everything(cfg.seed)
    device, autocast = common.setup_device(cfg.device, cfg.dtype)
    common.check_batch(cfg.batch_size, cfg.micro_batch_size)
    if cfg.block_size < 0:
        raise common.UserError(f"--block_size must be positive (or 0: the default), got {cfg.block_size}")
    if cfg.init:
        model, info = load_checkpoint(cfg.init, head="lm", device=device)
        tok = tokenizer_for(info, cfg.init)
        cfg.block_size = cfg.block_size or model.config.block_size  # GPT-2 goes on with windows of 1024
        if cfg.block_size > model.config.block_size:
            raise common.UserError(f"--block_size {cfg.block_size} is longer than {cfg.init}'s context "
                                   f"of {model.config.block_size}")
    else:
        cfg.block_size = cfg.block_size or NEW_MODEL_CONTEXT
        tok = get_tokenizer(cfg.tokenizer)
        model = GPT(GPTConfig(block_size=cfg.block_size, vocab_size=tok.n_vocab, n_layer=cfg.n_layer,
                              n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=cfg.dropout)).to(device)
    train_tokens, val_tokens = load_tokens(cfg, tok)
    print(f"train {len(train_tokens):,} tokens, val {len(val_tokens):,} tokens, vocabulary {tok.n_vocab}")
    print(f"model: {model.num_params():,} parameters")
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95), fused=True)

    gen = torch.Generator().manual_seed(cfg.seed)
    val_gen = torch.Generator()

    @torch.no_grad()
    def val_loss():
        training = model.training  # restored at the end: the final evaluation below runs in eval mode
        model.eval()
        val_gen.manual_seed(0)  # the same validation batches every time
        micro, losses = cfg.micro_batch_size or cfg.batch_size, []
        for _ in range(cfg.eval_batches):
            x, y = get_batch(val_tokens, cfg, val_gen, device)
            with autocast:  # as the training runs: a whole batch of 1024-token windows in float32 may not fit
                losses.append(sum(model(x[i:i + micro], y[i:i + micro])[1].item() * len(x[i:i + micro])
                                  for i in range(0, len(x), micro)) / len(x))
        model.train(training)
        return sum(losses) / len(losses)

    def meta(metrics):
        return {**tok.identity, "stage": "pretrain", "parent": cfg.init or None, "args": asdict(cfg), "metrics": metrics}

    def loss_part(rows):  # a micro-batch's share of the batch's mean loss (every row has block_size targets)
        with autocast:
            return train_model(x[rows], y[rows])[1] * len(rows) / cfg.batch_size

    logger = common.Logger()
    train_model = common.DataParallel(model)  # under torchrun: gradients averaged over processes
    state = common.TrainState(cfg, "pretrain", optimizers={"adamw": optimizer}, generators={"batches": gen},
                              data=common.data_summary(train_tokens))
    first = state.restore(model, logger)[0] if cfg.resume else 0
    tokens_per_step = cfg.batch_size * cfg.block_size
    t_last, logged = time.time(), first - 1  # the time and step of the last log line
    for step in range(first, cfg.max_steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        x, y = get_batch(train_tokens, cfg, gen, device)  # the global batch: every process draws the same
        loss = common.accumulate(train_model, common.shard(list(range(cfg.batch_size)), cfg.micro_batch_size), loss_part)
        common.check_finite(loss, step, cfg.out_dir)
        common.clip_gradients(model, cfg.grad_clip, step, cfg.out_dir)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        last = step == cfg.max_steps - 1
        evaluating = step % cfg.eval_every == 0 or last
        if step % cfg.log_every == 0 or evaluating:
            dt, t_last = time.time() - t_last, time.time()
            steps, logged = step - logged, step  # steps since the last log line
            elapsed = time.time() - logger.t0
            row = dict(step=step, loss=loss.item(), lr=lr_at(step, cfg), tok_per_s=round(steps * tokens_per_step / dt),
                       eta_s=round(elapsed / (step + 1) * (cfg.max_steps - step - 1)))
            if evaluating:
                row["val_loss"] = val_loss()
            logger.log(**row)
        if state.due(step, cfg.max_steps):
            save_checkpoint(cfg.out_dir, model, meta({"steps_done": step + 1}), logger.rows, resume=state.capture(step + 1))

    model.eval()
    metrics = {"train_loss": loss.item(), "val_loss": val_loss(), "tokens_seen": cfg.max_steps * tokens_per_step,
               "wall_s": round(time.time() - logger.t0, 1)}
    if not cfg.data:
        fact_rate, question_rate, examples = probe_world(model, tok)
        metrics.update(fact_completion=fact_rate, question_continuation=question_rate)
        print(f"fact completion {fact_rate:.1%} | bare questions continued with a question {question_rate:.1%}")
        for prompt, cont in examples:
            print(f"  {prompt!r} -> {cont!r}")
    print("samples:")
    for s in complete(model, tok, ["The", "What", "Human: What does the"], 40, temperature=0):
        print("  ", repr(s.replace(EOT, "")))
    save_checkpoint(cfg.out_dir, model, meta(metrics), logger.rows)
    print(f"wrote {cfg.out_dir}: {metrics}")


if __name__ == "__main__":
    common.run(main, Config)
