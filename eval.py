"""
Evaluation: the same held-out prompts through every stage, one table.

    python eval.py                                    # every language model under out/: base, sft, ppo, dpo, ...
    python eval.py --checkpoints out/sft,out/ppo_nokl --temperature 1
    python eval.py --data hh/helpful-base-test.jsonl.gz --checkpoints out/gpt2-sft,out/gpt2-ppo,out/gpt2-dpo \
        --reward out/gpt2-rm --reference out/gpt2-sft --max_new_tokens 128 --out_dir out/gpt2-eval

Each checkpoint answers the held-out evaluation prompts of the built-in task (data/tasks.py; no
training stage ever sees them), greedily by default; at a temperature above 0 it samples --samples
responses per prompt, and a prompt's gold score is their mean (the standard errors are then over
prompts, the unit the intervals are about). The gold judge (data/judge.py) scores every response;
the table shows the mean gold score with two standard errors, its parts, and:
- rm: the reward model's score of the responses (when out/rm exists), the proxy the policy optimises;
- kl: KL(policy || reference) summed over the response tokens, with the full-vocabulary formula at
  each position (a policy's drift from the SFT model). The summed log-ratio log pi/pi_ref of the
  sampled tokens estimates the same thing from one sample per position; the exact sum has no
  sampling noise, and its kernel reads the logits once (kernels.kl_div);
- vs ref: the gold score minus the reference's (the SFT model's), prompt by prompt, with two
  standard errors of that paired difference: most answers do not change, so it is much tighter
  than the two intervals side by side.
With a reward model it also runs best-of-n on the reference model: n samples at temperature 1, the
one the reward model likes best kept (its KL is the analytic bound log n - (n - 1) / n). The n share
their samples (the first n of the largest n's), so each smaller n costs nothing more.
It writes --out_dir/report.md (the table, and a few responses of each checkpoint) and
--out_dir/report.json, for other tools to read:
    {"config": {...}, "n_prompts": 600,
     "stages": {"<name>": {"gold", "gold_se", "accuracy", "answered", "eos_rate", "length", "words",
                           "rm", "kl", "gold_vs_reference", ..., "accuracy_by_kind", "samples", ...}},
     "rm": {"accuracy", "bayes_accuracy", "accuracy_over_bayes", "pairs"},
     "best_of_n": {"<n>": {"gold", "rm", "kl_bound", ...}}}
On prompts of your own (--data: any file ppo.py reads, its first --n_prompts distinct prompts) there
is no gold judge, and the reward model is the judge instead: the table compares its mean score (rm),
that score minus the reference's prompt by prompt (rm vs ref), and its win rate against the
reference (win rate: how often it prefers a response to the reference's response to the same prompt,
a tie counting half; every sample against every sample of the reference at a temperature above 0),
each with two standard errors over prompts, beside the EOS rate, length and KL. A reward model is a
proxy, the one PPO optimised: a policy trained against it wins by its errors too (the built-in task's
gold column shows how much), so read its win rate next to the KL it cost. A stage entry then holds
"samples_per_prompt", "eos_rate", "length", "samples", "rm", "rm_se" and "rm_scores", "kl" (with a
reference), "rm_vs_reference" and "win_rate" (each with "_se"; when the reference is among the
checkpoints), and no gold fields. On the built-in task they are in the JSON too, beside the gold.
A prompt that leaves less than --max_new_tokens of a model's context loses its start
(model.fit_prompt, as in ppo.py), and the reward model and the reference read it so cut.
<name> is the checkpoint directory's name (base, sft, ppo, dpo with the defaults; its path where two
share a name), and each entry also holds its "stage" and "checkpoint". "rm" is the reward model's
held-out accuracy against the raters' Bayes rate (from its checkpoint); "length" is the mean
response length in tokens, the EOS included.
"""

import json
import math
import os
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

import common
import kernels
from data.formats import prompt_rows
from data.judge import gold_parts, score_parts
from data.tasks import covered_entities, eval_questions
from data.tokenizer import tokenizer_for
from data.world import default_world
from model import CheckpointError, checkpoint_config, complete_ids, fit_prompt, left_pad, load_checkpoint, require_head

STAGES = ("pretrain", "sft", "ppo", "dpo")  # the order of the table


@dataclass
class Config:
    checkpoints: str = ""
    """comma-separated checkpoint directories; empty: every language model (lm head) directly under out/"""
    reward: str = "out/rm"
    """reward model for the rm column (skipped if it does not exist; empty: none)"""
    reference: str = "out/sft"
    """KL is measured against this model (skipped if it does not exist; empty: none)"""
    data: str = ""
    """prompts from a file instead of the built-in task's (any file ppo.py reads); judged by the reward model, since no gold judge knows them"""
    n_prompts: int = 600
    """prompts to evaluate: the first n of the built-in held-out set (at most 600), or of --data's distinct prompts"""
    temperature: float = 0.0
    """sampling temperature; 0 is greedy decoding"""
    samples: int = 4
    """responses sampled per prompt when --temperature > 0 (a prompt's gold score is their mean)"""
    max_new_tokens: int = 48
    """longest response"""
    best_of: str = "1,2,4,8,16"
    """best-of-n from the reference model with the reward model, for these n (empty: none)"""
    best_of_temperature: float = 1.0
    """temperature of best-of-n's samples (compare with ppo.py at the same --temperature)"""
    out_dir: str = "out/eval"
    """where report.json and report.md are written"""
    seed: int = 0
    """seed of sampling when temperature > 0"""
    device: str = "auto"
    """auto, cpu, cuda, ..."""


def batches(prompts, responses, tok, device, cut=None, batch_size=64):
    """Left-padded batches of prompt + response token ids: (idx, start, response ids of each row).
    cut = (block_size, max_new_tokens): each prompt loses its start as model.fit_prompt cut it for
    the model that sampled the responses, so that other models read what it read (None: no cut)."""
    for i in range(0, len(prompts), batch_size):
        seqs = [(fit_prompt(tok.encode_prompt(p), *cut) if cut else tok.encode_prompt(p)) + r
                for p, r in zip(prompts[i:i + batch_size], responses[i:i + batch_size])]
        idx, start = left_pad(seqs, tok.pad_id, device)
        yield idx, start, responses[i:i + batch_size]


@torch.no_grad()
def response_kl(model, ref, tok, prompts, responses, cut=None):
    """KL(model || ref) of each (prompt, response ids), summed over the response's positions, with
    the full-vocabulary formula at each. One batch at a time, the lm heads at the response
    positions only: at a vocabulary of 50257 the logits of 600 responses would take gigabytes."""
    kls = []
    for idx, start, rows in batches(prompts, responses, tok, model.transformer.wte.weight.device, cut):
        T, L = idx.size(1), max(len(r) for r in rows)
        # left padded, so each row ends at T - 1; position t predicts t + 1: the last L predictions
        h, h_ref = (m.hidden_states(idx, start=start)[:, T - 1 - L:T - 1] for m in (model, ref))
        p, q = F.linear(h, model.transformer.wte.weight), F.linear(h_ref, ref.transformer.wte.weight)  # (B, L, V)
        n = torch.tensor([len(r) for r in rows], device=idx.device)
        mine = torch.arange(L, device=idx.device)[None] >= L - n[:, None]  # (B, L): this row's response positions
        kls += torch.where(mine, kernels.kl_div(p.float(), q.float()), 0.0).sum(1).tolist()
    return kls


@torch.no_grad()
def reward_scores(rm, tok, prompts, responses, norm=None, cut=None):
    """The reward model's score of each (prompt, response ids), read at the last token, normalised
    with norm = {"gain", "bias"} (from the reward model's config) if given."""
    scores = []
    for idx, start, _ in batches(prompts, responses, tok, rm.transformer.wte.weight.device, cut):
        values, _ = rm(idx, start=start)
        scores += values[:, -1].tolist()  # left padded: every row ends at the last position
    if norm:
        scores = [norm["gain"] * s + norm["bias"] for s in scores]
    return scores


def mean_se(xs):
    n = len(xs)
    mean = sum(xs) / n
    var = sum((x - mean) ** 2 for x in xs) / max(1, n - 1)
    return mean, math.sqrt(var / n)


def rate(rows, key):
    return sum(r[key] for r in rows) / len(rows) if rows else None  # null in the JSON: no NaN, which strict readers refuse


def per_prompt(scores, k):
    """Scores of k samples a prompt, a prompt's side by side -> one list of k per prompt."""
    return [scores[i:i + k] for i in range(0, len(scores), k)]


def summarize(questions, texts, k=1):
    """The gold judgement of the responses (texts) to questions, k responses per question, a question's
    side by side: a JSON-able dict. A question's gold score is the mean of its k; the standard error
    is over questions. The rates are over every response."""
    assert len(texts) == k * len(questions), (len(texts), k, len(questions))
    parts = [gold_parts(q.prompt, t) for q, t in zip((q for q in questions for _ in range(k)), texts)]
    scores = [score_parts(p) for p in parts]
    per_question = [sum(s) / k for s in per_prompt(scores, k)]
    gold, se = mean_se(per_question)
    covered = {e.name for e in covered_entities(default_world())}
    split = {"covered": [], "uncovered": []}
    for i, q in enumerate(questions):
        if q.names and all(n in covered for n in q.names):
            split["covered"] += parts[i * k:(i + 1) * k]
        elif q.names and not any(n in covered for n in q.names):
            split["uncovered"] += parts[i * k:(i + 1) * k]
    kinds = sorted({q.kind for q in questions})
    return {
        "gold": gold, "gold_se": se, "gold_scores": per_question, "samples_per_prompt": k,
        "accuracy": rate(parts, "correct"), "answered": rate(parts, "answered"), "eos_rate": rate(parts, "stopped"),
        **{flag: rate(parts, flag) for flag in ("hedged", "flattery", "padded")},
        "words": sum(p["words"] for p in parts) / len(parts),
        "accuracy_by_kind": {kind: rate([p for p in parts if p["kind"] == kind], "correct") for kind in kinds},
        "accuracy_by_coverage": {c: rate(v, "correct") for c, v in split.items()},
        "n_by_coverage": {c: len(v) // k for c, v in split.items()},  # questions
        "samples": [{"prompt": q.prompt, "response": t} for q, t in zip(questions[:8], texts[::k])],
    }


def describe(prompts, responses, tok, k, questions=None):
    """What the report says of responses (token ids, k per prompt, a prompt's side by side) whatever
    their score: the gold judge's verdict (summarize) when the prompts are the built-in task's
    questions, else whether they stop; and their mean length in tokens."""
    texts = [tok.decode(r) for r in responses]
    if questions is not None:
        result = summarize(questions, texts, k)
    else:
        stopped = [bool(r) and r[-1] == tok.eot_id for r in responses]
        result = {"samples_per_prompt": k, "eos_rate": sum(stopped) / len(stopped),
                  "samples": [{"prompt": p, "response": t} for p, t in zip(prompts[:8], texts[::k])]}
    result["length"] = sum(map(len, responses)) / len(responses)
    return result


def add_rm(result, scores):
    """The reward model's scores of a result's responses: their mean, its standard error over prompts
    (a prompt's score being the mean of its samples'), and every score, for paired_difference."""
    result["rm"] = sum(scores) / len(scores)
    result["rm_se"] = mean_se([sum(s) / len(s) for s in per_prompt(scores, result["samples_per_prompt"])])[1]
    result["rm_scores"] = scores


def evaluate(model, tok, prompts, cfg, rm=None, ref=None, questions=None):
    """Responses of model to prompts (cfg.samples each when sampling), described (and judged, when
    questions holds the built-in task's questions behind the prompts); with the reward model's score
    and the KL to ref, each a mean over every response. Each prompt loses its start if it leaves less
    than cfg.max_new_tokens of the context (model.fit_prompt), as in ppo.py, and every model reads it
    so cut."""
    k = cfg.samples if cfg.temperature > 0 else 1  # greedy decoding would give the same answer k times
    repeated = [p for p in prompts for _ in range(k)]
    gen = torch.Generator(device=model.transformer.wte.weight.device).manual_seed(cfg.seed)
    responses = complete_ids(model, tok, repeated, cfg.max_new_tokens, leave_room=True, temperature=cfg.temperature,
                             generator=gen)
    cut = (model.config.block_size, cfg.max_new_tokens)
    result = describe(prompts, responses, tok, k, questions)
    if rm is not None:
        add_rm(result, reward_scores(rm[0], tok, repeated, responses, rm[1].get("reward_norm"), cut))
    if ref is not None:
        kls = response_kl(model, ref, tok, repeated, responses, cut)
        result["kl"] = sum(kls) / len(kls)
    return result


def best_of_n(policy, tok, prompts, cfg, rm, ns, questions=None):
    """Best-of-n: sample max(ns) responses per prompt (at cfg.best_of_temperature), keep the one the
    reward model scores highest among the first n. Its KL to the sampled distribution is at most
    log n - (n - 1) / n."""
    N = max(ns)
    repeated = [p for p in prompts for _ in range(N)]
    gen = torch.Generator(device=policy.transformer.wte.weight.device).manual_seed(cfg.seed)
    samples = complete_ids(policy, tok, repeated, cfg.max_new_tokens, leave_room=True, temperature=cfg.best_of_temperature,
                           generator=gen)
    scores = reward_scores(rm[0], tok, repeated, samples, rm[1].get("reward_norm"), (policy.config.block_size, cfg.max_new_tokens))
    curve = {}
    for n in ns:
        best = [max(range(i * N, i * N + n), key=lambda j: scores[j]) for i in range(len(prompts))]
        result = describe(prompts, [samples[j] for j in best], tok, 1, questions)
        add_rm(result, [scores[j] for j in best])
        result.update(n=n, kl_bound=math.log(n) - (n - 1) / n)
        curve[str(n)] = result
    return curve


TIE = 1e-4  # reward scores closer than this are a tie: one response scores ~1e-7 apart in differently padded batches


def win_rate(mine, theirs):
    """The chance that one of my responses to a prompt outscores one of theirs (every pair of samples),
    a tie counting half. mine, theirs: the reward model's scores of each side's samples of one prompt."""
    return sum(1.0 if x > y + TIE else 0.0 if y > x + TIE else 0.5 for x in mine for y in theirs) / (len(mine) * len(theirs))


def paired_difference(rows, reference):
    """Each row against the reference checkpoint's, prompt by prompt, with standard errors over prompts:
    its gold score minus the reference's (gold_vs_reference), and with a reward model its score minus
    the reference's (rm_vs_reference) and its win_rate. Most answers are the same, so these see a
    change that the two intervals of the table side by side hide."""
    ref = next((r for name, r in rows if common.same_path(name, reference)), None)
    if ref is None:
        return
    for _, r in rows:
        if "gold_scores" in r and "gold_scores" in ref:
            r["gold_vs_reference"], r["gold_vs_reference_se"] = mean_se([a - b for a, b in zip(r["gold_scores"], ref["gold_scores"])])
        if "rm_scores" in r and "rm_scores" in ref:
            pairs = list(zip(per_prompt(r["rm_scores"], r["samples_per_prompt"]),
                             per_prompt(ref["rm_scores"], ref["samples_per_prompt"])))
            r["rm_vs_reference"], r["rm_vs_reference_se"] = mean_se([sum(a) / len(a) - sum(b) / len(b) for a, b in pairs])
            r["win_rate"], r["win_rate_se"] = mean_se([win_rate(a, b) for a, b in pairs])


GOLD_COLUMNS = ["gold", "±2se", "vs ref", "±2se", "accuracy", "answered", "eos", "words", "hedged", "flattery", "padded", "rm", "kl"]
RM_COLUMNS = ["rm", "±2se", "vs ref", "±2se", "win rate", "±2se", "eos", "length", "kl"]  # --data: no gold judge


def twice(x):
    return None if x is None else 2 * x


def table_row(r):
    """The values of the table's columns for one result (None where it has none): GOLD_COLUMNS on the
    built-in task's prompts, RM_COLUMNS on --data's."""
    if "gold" in r:
        return [r["gold"], twice(r["gold_se"]), r.get("gold_vs_reference"), twice(r.get("gold_vs_reference_se")),
                r["accuracy"], r["answered"], r["eos_rate"], r["words"], r["hedged"], r["flattery"], r["padded"],
                r.get("rm"), r.get("kl")]
    return [r.get("rm"), twice(r.get("rm_se")), r.get("rm_vs_reference"), twice(r.get("rm_vs_reference_se")),
            r.get("win_rate"), twice(r.get("win_rate_se")), r["eos_rate"], r["length"], r.get("kl")]


def print_table(rows, columns):
    print(f"{'checkpoint':24s}" + "".join(f"{c:>9s}" for c in columns))
    for name, r in rows:
        print(f"{name:24s}" + "".join(f"{v:9.3f}" if v is not None else f"{'-':>9s}" for v in table_row(r)))


def markdown(report, rows, columns):
    """report.md: what the run compared, the table, the reward model's accuracy, a few responses."""
    cfg = report["config"]
    decoding = "greedy" if cfg["temperature"] == 0 else f"{cfg['samples']} samples per prompt at temperature {cfg['temperature']}"
    reference = cfg["reference"] or "none"
    if cfg["data"]:
        lines = [f"# eval.py: {report['n_prompts']} prompts of {cfg['data']}, {decoding}", "",
                 f"Judged by the reward model ({cfg['reward'] or 'none'}): no gold judge knows these prompts. rm: its mean "
                 f"score; vs ref: that minus the reference's ({reference}), prompt by prompt; win rate: how often it "
                 "prefers a response to the reference's, a tie counting half."]
    else:
        lines = [f"# eval.py: {report['n_prompts']} held-out prompts, {decoding}", "",
                 f"vs ref: gold minus the reference's ({reference}), prompt by prompt."]
    lines[-1] += " kl: KL(policy || reference) summed over a response (for best-of-n, its bound)."
    lines += ["", "| checkpoint | " + " | ".join(columns) + " |", "| --- |" + " --: |" * len(columns)]
    for name, r in rows:
        lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" if v is not None else "-" for v in table_row(r)) + " |")
    if "best_of_n" in report:
        lines += ["", f"best-of-n: one response per prompt, the reward model's favourite of n samples at temperature "
                      f"{cfg['best_of_temperature']} (whatever --samples)."]
    if "rm" in report:
        rm = report["rm"]
        bayes = f" (the raters' Bayes rate: {rm['bayes_accuracy']:.3f})" if rm.get("bayes_accuracy") is not None else ""
        lines += ["", f"Reward model ({cfg['reward']}): held-out accuracy {rm['accuracy']:.3f}{bayes} on {rm['pairs']} pairs."]
    for name, r in report["stages"].items():
        lines += ["", f"## {name} ({r['checkpoint']}, stage {r['stage']})", ""]
        lines += [f"- {s['prompt']!r} -> {s['response']!r}" for s in r["samples"][:4]]
    return "\n".join(lines) + "\n"


def found_checkpoints(root="out"):
    """Every language-model checkpoint directly under root, in the order of STAGES, then by name (the
    reward model, with its scalar head, is not one; an interrupted save's .tmp and .old are skipped)."""
    found = []
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        path = os.path.join(root, name)
        if name.endswith(".old") or ".tmp" in name:
            continue
        try:
            config, info = checkpoint_config(path)
        except CheckpointError:
            continue
        if config.head == "lm":
            stage = info.get("stage")
            found.append((STAGES.index(stage) if stage in STAGES else len(STAGES), path))
    return [path for _, path in sorted(found)]


def report_names(paths):
    """Each checkpoint's key in report.json's "stages": its directory's name (base, sft, ppo, dpo with
    the defaults), or its path where two directories share a name."""
    paths = [os.path.normpath(p) for p in paths]
    names = [os.path.basename(p) for p in paths]
    return [n if names.count(n) == 1 else p for n, p in zip(names, paths)]



def main(cfg):
    device, _ = common.setup_device(cfg.device, "float32", training=False)
    names = [c for c in cfg.checkpoints.split(",") if c] if cfg.checkpoints else found_checkpoints()
    if len({os.path.realpath(n) for n in names}) < len(names):
        raise common.UserError(f"--checkpoints names a checkpoint twice: {cfg.checkpoints}")
    if cfg.n_prompts < 1:
        raise common.UserError(f"--n_prompts must be at least 1, got {cfg.n_prompts}")
    if cfg.n_prompts > 600 and not cfg.data:
        raise common.UserError(f"--n_prompts: the built-in task has 600 held-out prompts, got {cfg.n_prompts}")
    if cfg.samples < 1:
        raise common.UserError(f"--samples must be at least 1, got {cfg.samples}")
    if cfg.max_new_tokens < 1:
        raise common.UserError(f"--max_new_tokens must be at least 1, got {cfg.max_new_tokens}")
    if not cfg.temperature >= 0:
        raise common.UserError(f"--temperature must be 0 (greedy) or more, got {cfg.temperature}")
    if not cfg.best_of_temperature > 0:  # n greedy answers are one answer n times
        raise common.UserError(f"--best_of_temperature must be positive, got {cfg.best_of_temperature}")
    ns = cfg.best_of.split(",") if cfg.best_of else []
    if not all(n.strip().isdecimal() and int(n) > 0 for n in ns):
        raise common.UserError(f"--best_of must be positive integers separated by commas, not {cfg.best_of!r}")
    ns = [int(n) for n in ns]
    if cfg.data:  # distinct prompts in the file's order: a prompt rated in several pairs counts once
        questions, prompts = None, list(dict.fromkeys(prompt_rows(cfg.data)))[:cfg.n_prompts]
        if len(prompts) < cfg.n_prompts:
            print(f"{cfg.data} has {len(prompts)} distinct prompts: evaluating them all")
    else:
        questions = eval_questions()[:cfg.n_prompts]
        prompts = [q.prompt for q in questions]

    def optional(path, head, flag, without):  # (model, config dict), or None
        if not (path and os.path.isdir(path)):
            if path:
                print(f"no checkpoint at --{flag} {path}: {without}")
            return None
        model, info = load_checkpoint(path, head=head, device=device)
        tokenizer_for(info, path)  # refuses a checkpoint whose tokenizer has changed since
        return model.eval(), info
    if cfg.data and not (cfg.reward and os.path.isdir(cfg.reward)):
        raise common.UserError(f"--data needs a reward model to judge its prompts, which no gold judge knows: "
                               f"--reward {cfg.reward or '(empty)'} is not a checkpoint directory")
    rm = optional(cfg.reward, "scalar", "reward", "no rm column, no best-of-n")
    ref = optional(cfg.reference, "lm", "reference", "no kl and vs ref columns, no best-of-n")
    # every checkpoint's tokenizer against the reward model's and the reference's, before any evaluation
    configs = {name: checkpoint_config(name) for name in names}
    for name, (config, _) in configs.items():  # before any evaluation, not after those listed before it
        require_head(name, config, "lm")
    toks = {name: tokenizer_for(configs[name][1], name) for name in names}
    clashes = {name: path for name in names for other, path in ((rm, cfg.reward), (ref, cfg.reference))
               if other and other[1].get("tokenizer_fingerprint") != toks[name].fingerprint}
    if cfg.checkpoints and clashes:
        name, path = next(iter(clashes.items()))
        raise common.UserError(f"{path} and {name} were trained with different tokenizers")
    if clashes:  # found under out/: a run with another tokenizer (GPT-2's, beside the built-in chain) is left out
        print(f"left out, trained with another tokenizer than {', '.join(sorted(set(clashes.values())))}: {', '.join(clashes)}")
        names = [n for n in names if n not in clashes]
    if not names:
        raise common.UserError("no checkpoint to evaluate: run pretrain.py and sft.py first, or pass --checkpoints")
    samplers = {name: configs[name][0].block_size for name in names}
    if ns and rm and ref:  # best-of-n samples the reference
        samplers[cfg.reference] = ref[0].config.block_size
    for name, n_ctx in samplers.items():  # the reward model and the reference read each response whole, as the policy read it
        for other, path in ((rm, cfg.reward), (ref, cfg.reference)):
            if other and other[0].config.block_size < n_ctx:
                raise common.UserError(f"{path} has a context of {other[0].config.block_size} tokens, shorter than {name}'s {n_ctx}")
    if ref and not any(common.same_path(n, cfg.reference) for n in names):
        print(f"the reference {cfg.reference} is not among the checkpoints evaluated: no vs ref column (nor win rate)")
    try:  # before the evaluation, not after it
        os.makedirs(cfg.out_dir, exist_ok=True)
    except OSError as e:
        raise common.UserError(f"--out_dir {cfg.out_dir}: cannot make a directory there for report.json and report.md "
                               f"({e.strerror})") from None
    report = {"config": asdict(cfg), "n_prompts": len(prompts), "stages": {}}
    if rm is not None and "val_accuracy" in rm[1].get("metrics", {}):  # as reward.py measured it
        m = rm[1]["metrics"]
        report["rm"] = {"accuracy": m["val_accuracy"], "bayes_accuracy": m.get("bayes_accuracy"),
                        "accuracy_over_bayes": m.get("accuracy_over_bayes"), "pairs": m["val_pairs"]}
    rows = []
    for name, key in zip(names, report_names(names)):
        model, info = load_checkpoint(name, head="lm", device=device)
        result = evaluate(model.eval(), toks[name], prompts, cfg, rm, ref and ref[0], questions)
        result = {"checkpoint": name, "stage": info.get("stage"), **result}
        report["stages"][key] = result
        rows.append((name, result))
        if questions is not None:
            print(f"{name}: gold {result['gold']:.3f} ± {2 * result['gold_se']:.3f}, accuracy {result['accuracy']:.1%}, "
                  f"by kind {({k: round(v, 2) for k, v in result['accuracy_by_kind'].items()})}, "
                  f"covered/uncovered entities {result['accuracy_by_coverage']}")
        else:
            print(f"{name}: " + ", ".join(f"{k} {result[k]:.3f}" for k in ("rm", "kl", "eos_rate", "length") if k in result))
    if ns and rm is not None and ref is not None:
        tok = tokenizer_for(ref[1], cfg.reference)
        report["best_of_n"] = best_of_n(ref[0], tok, prompts, cfg, rm, ns, questions)
        for r in report["best_of_n"].values():
            r["kl"] = r["kl_bound"]
            rows.append((f"{cfg.reference} best-of-{r['n']}", r))
    paired_difference(rows, cfg.reference)  # the rows share their dicts with the report
    print()
    columns = RM_COLUMNS if cfg.data else GOLD_COLUMNS
    print_table(rows, columns)
    texts = {"report.json": json.dumps(report, indent=2) + "\n", "report.md": markdown(report, rows, columns)}
    for name, text in texts.items():  # each written beside, then renamed: a report is replaced whole or not at all
        with open(os.path.join(cfg.out_dir, f"{name}.tmp{os.getpid()}"), "w") as f:
            f.write(text)
    for name in texts:
        os.replace(os.path.join(cfg.out_dir, f"{name}.tmp{os.getpid()}"), os.path.join(cfg.out_dir, name))
    print(f"wrote {cfg.out_dir}/report.json and report.md")


if __name__ == "__main__":
    common.run(main, Config)
