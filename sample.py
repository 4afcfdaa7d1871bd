"""
Samples from any checkpoint, side by side: what a stage learned, on your prompts or the built-in ones.

    python sample.py                                            # out/sft on 4 held-out prompts of the built-in task, greedy
    python sample.py --checkpoints out/sft,out/ppo,out/dpo --reward out/rm   # each answer scored by the reward model
    python sample.py --checkpoints out/gpt2-dpo --chat "How do I bake bread?" --temperature 0.7 --n_samples 3
    python sample.py --checkpoints out/gpt2-ppo --data hh/helpful-base-test.jsonl.gz --n_prompts 8 --out samples.jsonl

--chat puts one user message into the chat template that every stage trains on ("Human: {chat}\\n\\nAssistant:",
data/formats.py); --prompt is continued as it is; --data takes the prompts of any file ppo.py reads.
eval.py puts numbers on them: the built-in task's gold judge, or on real data (eval.py --data) the
reward model's score and win rate against the reference. Each checkpoint samples with the same seed. A prompt
that leaves less than --max_new_tokens of a model's context loses its start (model.fit_prompt, as
in ppo.py), and the reward model reads the prompt as the policy did.
"""

from dataclasses import dataclass

import torch

import common
from data.formats import chat_prompt, check_out_file, prompt_rows, write_rows
from data.tasks import eval_questions
from data.tokenizer import tokenizer_for
from model import checkpoint_config, complete_ids, fit_prompt, load_checkpoint, require_head
from reward import rewards


@dataclass
class Config:
    checkpoints: str = "out/sft"
    """comma-separated checkpoints with an lm head (any stage's, or Hugging Face GPT-2 directories)"""
    chat: str = ""
    """a user message, put into the chat template: "Human: {chat}\\n\\nAssistant:" """
    prompt: str = ""
    """a prompt continued as it is"""
    data: str = ""
    """prompts from a file: {"prompt"} or chat rows, or the prompts of any SFT or preference file (data/formats.py)"""
    n_prompts: int = 4
    """prompts taken from --data, or from the built-in task's held-out set when no prompt is given"""
    n_samples: int = 1
    """responses per prompt and checkpoint (above 1 needs --temperature above 0)"""
    max_new_tokens: int = 64
    """the longest response"""
    temperature: float = 0.0
    """sampling temperature; 0 is greedy decoding"""
    top_k: int = 0
    """sample among the k most likely tokens only (0: all)"""
    top_p: float = 1.0
    """sample among the most likely tokens whose mass reaches p only (1: all)"""
    reward: str = ""
    """a reward model (scalar head) that scores each response, normalised as PPO sees it (empty: none)"""
    out: str = ""
    """also write the samples here as JSON lines: {"checkpoint", "prompt", "response", "stopped", "reward"}"""
    seed: int = 0
    """seed of the sampling (the same for every checkpoint)"""
    device: str = "auto"
    """auto, cpu, cuda, ..."""
    dtype: str = "auto"
    """auto (bfloat16 on CUDA, float16 on a card without it, float32 on CPU), float32, bfloat16, float16"""


def main(cfg):
    if sum(map(bool, (cfg.chat, cfg.prompt, cfg.data))) > 1:
        raise common.UserError("give one of --chat, --prompt and --data, not several")
    for name in ("n_prompts", "n_samples", "max_new_tokens"):
        if getattr(cfg, name) < 1:
            raise common.UserError(f"--{name} must be at least 1, got {getattr(cfg, name)}")
    if not cfg.temperature >= 0:
        raise common.UserError(f"--temperature must be 0 (greedy) or more, got {cfg.temperature}")
    if cfg.top_k < 0:
        raise common.UserError(f"--top_k must be 0 (all) or more, got {cfg.top_k}")
    if not 0 < cfg.top_p <= 1:  # at 0 no token is left to sample
        raise common.UserError(f"--top_p must be in (0, 1], got {cfg.top_p}")
    if cfg.temperature == 0 and cfg.n_samples > 1:
        raise common.UserError(f"--n_samples {cfg.n_samples} needs --temperature above 0: greedy answers are all the same")
    paths = [c for c in cfg.checkpoints.split(",") if c]
    if not paths:
        raise common.UserError(f"--checkpoints names no checkpoint: {cfg.checkpoints!r}")
    if cfg.out:  # before the sampling, not after it
        check_out_file(cfg.out, "--out", reads={"--data": cfg.data})
    device, autocast = common.setup_device(cfg.device, cfg.dtype, training=False)

    if cfg.chat:
        prompts = [chat_prompt([{"role": "user", "content": cfg.chat}])]
    elif cfg.prompt:
        prompts = [cfg.prompt]
    elif cfg.data:
        prompts = prompt_rows(cfg.data)[:cfg.n_prompts]
    else:
        prompts = [q.prompt for q in eval_questions()[:cfg.n_prompts]]
    if cfg.reward:
        rm, rm_info = load_checkpoint(cfg.reward, head="scalar", device=device)
        rm_tok = tokenizer_for(rm_info, cfg.reward)
        rm.eval()

    toks = {}
    for path in paths:  # every checkpoint checked before any samples, not after those listed before it
        config, info = checkpoint_config(path)
        require_head(path, config, "lm")
        tok = toks[path] = tokenizer_for(info, path)
        if cfg.reward and rm_tok.fingerprint != tok.fingerprint:
            raise common.UserError(f"{cfg.reward} and {path} were trained with different tokenizers")
        if cfg.reward and rm.config.block_size < config.block_size:  # as ppo.py: it must read every sample whole
            raise common.UserError(f"{cfg.reward} has a context of {rm.config.block_size} tokens, shorter than "
                                   f"{path}'s {config.block_size}")

    # every checkpoint answers every prompt n_samples times
    flat = [p for p in prompts for _ in range(cfg.n_samples)]
    blocks = []  # one list of samples per checkpoint, in the order of flat
    for path in paths:
        model, tok = load_checkpoint(path, head="lm", device=device)[0], toks[path]
        gen = torch.Generator(device=device).manual_seed(cfg.seed)
        with torch.no_grad(), autocast:
            responses = complete_ids(model.eval(), tok, flat, cfg.max_new_tokens, leave_room=True,
                                     temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, generator=gen)
            scores = [None] * len(flat)
            if cfg.reward:  # read at each sample's last token, normalised as PPO sees it
                seqs = [fit_prompt(tok.encode_prompt(p), model.config.block_size, cfg.max_new_tokens) + r for p, r in zip(flat, responses)]
                raw = torch.cat([rewards(rm, seqs[i:i + 64], tok.pad_id, device) for i in range(0, len(seqs), 64)])
                norm = rm_info.get("reward_norm", {"gain": 1.0, "bias": 0.0})
                scores = (norm["gain"] * raw.float() + norm["bias"]).tolist()
        blocks.append([])
        for p, r, s in zip(flat, responses, scores):
            stopped = bool(r) and r[-1] == tok.eot_id
            blocks[-1].append({"checkpoint": path, "prompt": p, "response": tok.decode(r[:-1] if stopped else r),
                               "stopped": stopped, "reward": s})

    width = max(len(block[0]["checkpoint"]) for block in blocks)
    for i, p in enumerate(prompts):  # grouped by prompt, the checkpoints one under the other
        print(f"{p!r}")
        for s in (s for block in blocks for s in block[i * cfg.n_samples:(i + 1) * cfg.n_samples]):
            score = "" if s["reward"] is None else f"  (reward {s['reward']:+.3f})"
            print(f"  {s['checkpoint']:{width}s} -> {s['response']!r}{'' if s['stopped'] else ' [no EOS]'}{score}")
    if cfg.out and common.is_main():  # under torchrun every process samples the same: one writes
        write_rows(cfg.out, [s for block in blocks for s in block])
        print(f"wrote {len(flat) * len(blocks)} samples to {cfg.out}")


if __name__ == "__main__":
    common.run(main, Config)
