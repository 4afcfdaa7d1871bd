"""
Supervised fine-tuning (SFT), the first stage of RLHF: the base model learns to answer.

    python sft.py                          # out/base + built-in demonstrations -> out/sft (under a minute on CPU)
    python sft.py --data demos.jsonl       # your demonstrations instead (formats: data/formats.py)
    python sft.py --init gpt2-hf/ --data demos.jsonl   # from a Hugging Face GPT-2 directory, on your demonstrations

A demonstration is a prompt and the ideal response. The model sees prompt + response + <|endoftext|>
and is trained on next-token prediction of the response tokens only: the prompt's targets are
masked out, so the model learns to respond, not to write questions; the EOS is a target too, so it
learns to stop. As in InstructGPT (Ouyang et al. 2022), step 1.

The built-in demonstrations (data/tasks.py) are imperfect on purpose, as hurried human ones are:
a quarter are wrong, padded or hedged, and they cover half of the world's entities. SFT imitates
them, errors included; what it gets wrong is the headroom the later stages work on.
A long example keeps its whole response and loses the start of its prompt, or is dropped if the
response does not fit (data/formats.py, "Long examples"); the counts are printed.
Left out on purpose: packing several examples into one row, LoRA, chat templates beyond
"Human: ...\\n\\nAssistant:".
"""

import random
import time
from dataclasses import asdict, dataclass

import torch

import common
import kernels
from data.formats import encode_rows, prompt_completion_rows, split_by_prompt
from data.tasks import demonstrations, eval_questions
from data.tokenizer import tokenizer_for
from model import complete, load_checkpoint, save_checkpoint


@dataclass
class Config(common.Padded):  # and --save_every, --resume, --micro_batch_size, --length_groups (common.py)
    init: str = "out/base"
    """the checkpoint to fine-tune (a language model, or a Hugging Face GPT-2 directory)"""
    out_dir: str = "out/sft"
    """where the fine-tuned checkpoint is written"""
    data: str = ""
    """demonstrations: prompt/completion, Alpaca or chat rows (.jsonl, .jsonl.gz, .json); empty: the built-in ones"""
    n_demos: int = 2000
    """how many built-in demonstrations to write"""
    val_fraction: float = 0.05
    """share of the prompts whose demonstrations are held out for the validation loss (0: none)"""
    epochs: float = 4.0
    """passes over the training demonstrations"""
    batch_size: int = 32
    """demonstrations per step"""
    lr: float = 1e-3
    """peak learning rate"""
    warmup_steps: int = 10
    """steps of linear warm-up (0: none), then linear decay to zero"""
    weight_decay: float = 0.0
    """AdamW weight decay on matrices"""
    grad_clip: float = 1.0
    """clip the gradient norm to this (0: off)"""
    log_every: int = 20
    """steps between log lines (with the validation loss)"""
    n_samples: int = 4
    """held-out prompts answered before and after training"""
    seed: int = 0
    """seed of the data order and of the demonstrations"""
    device: str = "auto"
    """auto, cpu, cuda, ..."""
    dtype: str = "auto"
    """auto (bfloat16 on a CUDA card that has it, else float32), float32, bfloat16 (float16 is refused: no loss scaling)"""


def example(prompt, completion):
    """(x, y) of prompt ids + completion ids (which end with the EOS): the inputs x are every token
    but the last; the targets y are -100 (ignored) on every position whose next token is still the
    prompt, the next token on the rest. The caller fits the two to the context (formats.fit)."""
    x = prompt + completion[:-1]
    return x, [kernels.IGNORE_INDEX] * (len(prompt) - 1) + completion


def collate(examples, pad_id, device):
    """Right-pad a list of (x, y) to one (B, T) batch; padded targets are ignored."""
    T = max(len(x) for x, _ in examples)
    xs = torch.full((len(examples), T), pad_id, dtype=torch.long)
    ys = torch.full((len(examples), T), kernels.IGNORE_INDEX, dtype=torch.long)
    for i, (x, y) in enumerate(examples):
        xs[i, :len(x)] = torch.tensor(x)
        ys[i, :len(y)] = torch.tensor(y)
    return xs.to(device), ys.to(device)


def target_logprobs(model, x, y):
    """(log-probs of the target tokens (N,), mask (B, T) of where they are) for x, y (B, T) with
    y = IGNORE_INDEX on prompt and padding. The lm head runs at those N positions only (prompt and
    padding are often most of a batch), through the fused kernel, which on a GPU never materialises
    their (N, vocab) logits either."""
    hidden = model.hidden_states(x)  # (B, T, C)
    mask = y != kernels.IGNORE_INDEX  # (B, T)
    return kernels.fused_linear_logprobs(hidden[mask], model.transformer.wte.weight, y[mask]), mask


def held_out(rows, examples, fraction, seed):
    """(validation examples, training examples, validation prompts), shuffled: the demonstrations of
    about `fraction` of the distinct prompts are held out, so that no prompt is in both, as reward.py
    and dpo.py hold out pairs. A prompt often has several demonstrations (the built-in ones: 873
    prompts in 2,000), and a split by row would score the model on prompts it trained on. With a
    single prompt, or a fraction of 0, nothing is held out."""
    if fraction == 0 or len({r["prompt"] for r in rows}) < 2:
        return [], examples, []
    val, train = split_by_prompt([{"prompt": r["prompt"], "example": e} for r, e in zip(rows, examples, strict=True)],
                                 fraction, seed)
    return [r["example"] for r in val], [r["example"] for r in train], list(dict.fromkeys(r["prompt"] for r in val))


def n_targets_of(examples):
    """The number of response tokens (targets that count) in a list of (x, y)."""
    return sum(len(y) - y.count(kernels.IGNORE_INDEX) for _, y in examples)


def sft_loss(model, x, y):
    """Mean negative log-likelihood of the response tokens."""
    logps, mask = target_logprobs(model, x, y)
    return -logps.sum() / mask.sum()


def main(cfg):
    # before any work: a directory that is not a checkpoint, or one this run reads, would be lost
    common.check_out_dir(cfg.out_dir, reads={"--init": cfg.init})
    common.seed_everything(cfg.seed)
    device, autocast = common.setup_device(cfg.device, cfg.dtype)
    common.check_batch(cfg.batch_size, cfg.micro_batch_size)
    model, info = load_checkpoint(cfg.init, head="lm", device=device)
    tok = tokenizer_for(info, cfg.init)

    if cfg.data:
        rows = prompt_completion_rows(cfg.data)
    else:
        rows = [dict(prompt=p, completion=c) for p, c in demonstrations(cfg.n_demos, seed=cfg.seed)]
    encoded, rows, report = encode_rows(tok, rows, ("completion",), model.config.block_size)
    print(report)
    val, train, val_prompts = held_out(rows, [example(p, c[0]) for p, c in encoded], cfg.val_fraction, cfg.seed)
    steps = max(1, round(cfg.epochs * len(train) / cfg.batch_size))
    print(f"{len(train)} training and {len(val)} validation demonstrations (those of {len(val_prompts)} of the "
          f"{len({r['prompt'] for r in rows})} distinct prompts), {steps} steps")

    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95), fused=True)

    def lr_at(step):
        return cfg.lr * min((step + 1) / max(1, cfg.warmup_steps), (steps - step) / max(1, steps - cfg.warmup_steps))

    @torch.no_grad()
    def val_loss():
        if not val:  # one demonstration, trained on: no validation loss (null in the JSON, where NaN is not valid)
            return None
        model.eval()
        micro, nll = cfg.micro_batch_size or cfg.batch_size, 0.0
        for i in range(0, len(val), micro):  # the mean over every response token of the split
            part = val[i:i + micro]
            with autocast:
                nll += sft_loss(model, *collate(part, tok.pad_id, device)).item() * n_targets_of(part)
        model.train()
        return nll / n_targets_of(val)

    # the samples before and after answer held-out prompts: the evaluation's, or the file's (its first one if none is held out)
    if not cfg.data or val_prompts:
        sample_prompts = [q.prompt for q in eval_questions()] if not cfg.data else val_prompts
        sample_kind = "held-out prompts"
    else:
        sample_prompts, sample_kind = [rows[0]["prompt"]], "a training prompt (none is held out)"
    sample_prompts = sample_prompts[:cfg.n_samples]
    model.eval()
    before = complete(model, tok, sample_prompts, 32, temperature=0)
    model.train()

    def meta(metrics):
        return {**tok.identity, "stage": "sft", "parent": cfg.init, "args": asdict(cfg), "metrics": metrics}

    def loss_part(items):  # a micro-batch's share of the batch's loss: its tokens' NLL / the batch's tokens
        x, y = collate(items, tok.pad_id, device)
        with autocast:
            return sft_loss(train_model, x, y) * (y != kernels.IGNORE_INDEX).sum() / n_targets

    logger = common.Logger()
    rng = random.Random(cfg.seed)
    train_model = common.DataParallel(model)  # under torchrun: gradients averaged over processes
    state = common.TrainState(cfg, "sft", optimizers={"adamw": optimizer}, rngs={"order": rng},
                              data=common.data_summary(train))
    first, extra = state.restore(model, logger) if cfg.resume else (0, {"order": []})
    order = extra["order"]  # the rest of this epoch's shuffle
    t_last, tokens = time.time(), 0
    for step in range(first, steps):
        if len(order) < cfg.batch_size:  # a fresh shuffle of the training set for each epoch
            order += rng.sample(range(len(train)), len(train))
        batch, order = [train[i] for i in order[:cfg.batch_size]], order[cfg.batch_size:]
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        n_targets = n_targets_of(batch)
        loss = common.accumulate(train_model, common.shard(batch, cfg.micro_batch_size, lambda e: len(e[0]), cfg.length_groups), loss_part)
        common.check_finite(loss, step, cfg.out_dir)
        common.clip_gradients(model, cfg.grad_clip, step, cfg.out_dir)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += sum(len(x) for x, _ in batch)

        if step % cfg.log_every == 0 or step == steps - 1:
            dt, t_last = time.time() - t_last, time.time()
            logger.log(step=step, loss=loss.item(), val_loss=val_loss(), lr=lr_at(step), tok_per_s=round(tokens / dt))
            tokens = 0
        if state.due(step, steps):
            save_checkpoint(cfg.out_dir, model, meta({"steps_done": step + 1}), logger.rows,
                            resume=state.capture(step + 1, order=order))

    model.eval()
    after = complete(model, tok, sample_prompts, 32, temperature=0)
    print(f"{sample_kind}, before -> after SFT:")
    for p, b, a in zip(sample_prompts, before, after):
        print(f"  {p!r}\n    base: {b!r}\n    sft:  {a!r}")
    metrics = {"train_loss": loss.item(), "val_loss": val_loss(), "steps": steps, "demonstrations": len(train),
               "wall_s": round(time.time() - logger.t0, 1)}
    save_checkpoint(cfg.out_dir, model, meta(metrics), logger.rows)
    print(f"wrote {cfg.out_dir}: {metrics}")


if __name__ == "__main__":
    common.run(main, Config)
