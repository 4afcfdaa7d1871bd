"""
Evaluation: the same held-out prompts through every stage, one table.

    python eval.py                                    # every language model under out/: base, sft, ppo, dpo, ...
    python eval.py --checkpoints out/sft,out/ppo_nokl --temperature 1

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
from data.judge import gold_parts, score_parts
from data.tasks import covered_entities, eval_questions
from data.tokenizer import tokenizer_for
from data.world import default_world
from model import CheckpointError, checkpoint_config, complete_ids, left_pad, load_checkpoint

STAGES = ("pretrain", "sft", "ppo", "dpo")  # the order of the table


@dataclass
class Config:
    checkpoints: str = ""
    """comma-separated checkpoint directories; empty: every language model (lm head) directly under out/"""
    reward: str = "out/rm"
    """reward model for the rm column (skipped if it does not exist; empty: none)"""
    reference: str = "out/sft"
    """KL is measured against this model (skipped if it does not exist; empty: none)"""
    n_prompts: int = 600
    """held-out prompts to evaluate (at most 600)"""
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


def batches(prompts, responses, tok, device, batch_size=64):
    """Left-padded batches of prompt + response token ids: (idx, start, response ids of each row)."""
    for i in range(0, len(prompts), batch_size):
        seqs = [tok.encode_prompt(p) + r for p, r in zip(prompts[i:i + batch_size], responses[i:i + batch_size])]
        idx, start = left_pad(seqs, tok.pad_id, device)
        yield idx, start, responses[i:i + batch_size]


@torch.no_grad()
def response_kl(model, ref, tok, prompts, responses):
    """KL(model || ref) of each (prompt, response ids), summed over the response's positions, with
    the full-vocabulary formula at each. One batch at a time, the lm heads at the response
    positions only: at a vocabulary of 50257 the logits of 600 responses would take gigabytes."""
    kls = []
    for idx, start, rows in batches(prompts, responses, tok, model.transformer.wte.weight.device):
        T, L = idx.size(1), max(len(r) for r in rows)
        # left padded, so each row ends at T - 1; position t predicts t + 1: the last L predictions
        h, h_ref = (m.hidden_states(idx, start=start)[:, T - 1 - L:T - 1] for m in (model, ref))
        p, q = F.linear(h, model.transformer.wte.weight), F.linear(h_ref, ref.transformer.wte.weight)  # (B, L, V)
        n = torch.tensor([len(r) for r in rows], device=idx.device)
        mine = torch.arange(L, device=idx.device)[None] >= L - n[:, None]  # (B, L): this row's response positions
        kls += torch.where(mine, kernels.kl_div(p.float(), q.float()), 0.0).sum(1).tolist()
    return kls


@torch.no_grad()
def reward_scores(rm, tok, prompts, responses, norm=None):
    """The reward model's score of each (prompt, response ids), read at the last token, normalised
    with norm = {"gain", "bias"} (from the reward model's config) if given."""
    scores = []
    for idx, start, _ in batches(prompts, responses, tok, rm.transformer.wte.weight.device):
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


def summarize(questions, texts, k=1):
    """The gold judgement of the responses (texts) to questions, k responses per question, a question's
    side by side: a JSON-able dict. A question's gold score is the mean of its k; the standard error
    is over questions. The rates are over every response."""
    assert len(texts) == k * len(questions), (len(texts), k, len(questions))
    parts = [gold_parts(q.prompt, t) for q, t in zip((q for q in questions for _ in range(k)), texts)]
    scores = [score_parts(p) for p in parts]
    per_question = [sum(scores[i:i + k]) / k for i in range(0, len(scores), k)]
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


def evaluate(model, tok, questions, cfg, rm=None, ref=None):
    """Responses of model to questions (cfg.samples each when sampling), judged; with the reward
    model's score and the KL to ref, each a mean over every response."""
    k = cfg.samples if cfg.temperature > 0 else 1  # greedy decoding would give the same answer k times
    prompts = [q.prompt for q in questions for _ in range(k)]
    gen = torch.Generator(device=model.transformer.wte.weight.device).manual_seed(cfg.seed)
    responses = complete_ids(model, tok, prompts, cfg.max_new_tokens, temperature=cfg.temperature, generator=gen)
    result = summarize(questions, [tok.decode(r) for r in responses], k)
    result["length"] = sum(map(len, responses)) / len(responses)
    if rm is not None:
        result["rm"] = sum(reward_scores(rm[0], tok, prompts, responses, rm[1].get("reward_norm"))) / len(prompts)
    if ref is not None:
        kls = response_kl(model, ref, tok, prompts, responses)
        result["kl"] = sum(kls) / len(kls)
    return result


def best_of_n(policy, tok, questions, cfg, rm, ns):
    """Best-of-n: sample max(ns) responses per prompt (at cfg.best_of_temperature), keep the one the
    reward model scores highest among the first n. Its KL to the sampled distribution is at most
    log n - (n - 1) / n."""
    prompts = [q.prompt for q in questions]
    N = max(ns)
    gen = torch.Generator(device=policy.transformer.wte.weight.device).manual_seed(cfg.seed)
    flat = complete_ids(policy, tok, [p for p in prompts for _ in range(N)], cfg.max_new_tokens, temperature=cfg.best_of_temperature, generator=gen)
    scores = reward_scores(rm[0], tok, [p for p in prompts for _ in range(N)], flat, rm[1].get("reward_norm"))
    curve = {}
    for n in ns:
        best = [max(range(i * N, i * N + n), key=lambda j: scores[j]) for i in range(len(prompts))]
        result = summarize(questions, [tok.decode(flat[j]) for j in best])
        result.update(n=n, rm=sum(scores[j] for j in best) / len(best), kl_bound=math.log(n) - (n - 1) / n,
                      length=sum(len(flat[j]) for j in best) / len(best))
        curve[str(n)] = result
    return curve


def paired_difference(rows, reference):
    """Each row's gold minus the reference checkpoint's, prompt by prompt, with its standard error:
    most answers are the same, so this sees a change that the two intervals of the table hide."""
    ref = next((r["gold_scores"] for name, r in rows if name == reference), None)
    for _, r in rows:
        if ref is not None:
            r["gold_vs_reference"], r["gold_vs_reference_se"] = mean_se([a - b for a, b in zip(r["gold_scores"], ref)])


COLUMNS = ["gold", "±2se", "vs ref", "±2se", "accuracy", "answered", "eos", "words", "hedged", "flattery", "padded", "rm", "kl"]


def table_row(r):
    """The values of COLUMNS for one result (None where it has none)."""
    diff, diff_se = r.get("gold_vs_reference"), r.get("gold_vs_reference_se")
    return [r["gold"], 2 * r["gold_se"], diff, diff_se and 2 * diff_se, r["accuracy"], r["answered"], r["eos_rate"],
            r["words"], r["hedged"], r["flattery"], r["padded"], r.get("rm"), r.get("kl")]


def print_table(rows):
    print(f"{'checkpoint':24s}" + "".join(f"{c:>9s}" for c in COLUMNS))
    for name, r in rows:
        print(f"{name:24s}" + "".join(f"{v:9.3f}" if v is not None else f"{'-':>9s}" for v in table_row(r)))


def markdown(report, rows):
    """report.md: what the run compared, the table, the reward model's accuracy, a few responses."""
    cfg = report["config"]
    decoding = "greedy" if cfg["temperature"] == 0 else f"{cfg['samples']} samples per prompt at temperature {cfg['temperature']}"
    lines = [f"# eval.py: {report['n_prompts']} held-out prompts, {decoding}", "",
             "vs ref: gold minus the reference's (" + (cfg["reference"] or "none") + "), prompt by prompt. "
             "kl: KL(policy || reference) summed over a response (for best-of-n, its bound).", "",
             "| checkpoint | " + " | ".join(COLUMNS) + " |", "| --- |" + " --: |" * len(COLUMNS)]
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
    if not 1 <= cfg.n_prompts <= 600:
        raise common.UserError(f"--n_prompts must be between 1 and 600, got {cfg.n_prompts}")
    if cfg.samples < 1:
        raise common.UserError(f"--samples must be at least 1, got {cfg.samples}")
    questions = eval_questions()[:cfg.n_prompts]
    ns = cfg.best_of.split(",") if cfg.best_of else []
    if not all(n.strip().isdecimal() and int(n) > 0 for n in ns):
        raise common.UserError(f"--best_of must be positive integers separated by commas, not {cfg.best_of!r}")
    ns = [int(n) for n in ns]

    def optional(path, head):  # (model, config dict), or None
        if not (path and os.path.isdir(path)):
            return None
        model, info = load_checkpoint(path, head=head, device=device)
        tokenizer_for(info, path)  # refuses a checkpoint whose tokenizer has changed since
        return model.eval(), info
    rm, ref = optional(cfg.reward, "scalar"), optional(cfg.reference, "lm")
    # every checkpoint's tokenizer against the reward model's and the reference's, before any evaluation
    toks = {name: tokenizer_for(checkpoint_config(name)[1], name) for name in names}
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
    try:  # before the evaluation, not after it
        os.makedirs(cfg.out_dir, exist_ok=True)
    except OSError as e:
        raise common.UserError(f"--out_dir {cfg.out_dir}: cannot make a directory there for report.json and report.md "
                               f"({e.strerror})") from None
    report = {"config": asdict(cfg), "n_prompts": len(questions), "stages": {}}
    if rm is not None and "val_accuracy" in rm[1].get("metrics", {}):  # as reward.py measured it
        m = rm[1]["metrics"]
        report["rm"] = {"accuracy": m["val_accuracy"], "bayes_accuracy": m.get("bayes_accuracy"),
                        "accuracy_over_bayes": m.get("accuracy_over_bayes"), "pairs": m["val_pairs"]}
    rows = []
    for name, key in zip(names, report_names(names)):
        model, info = load_checkpoint(name, head="lm", device=device)
        result = evaluate(model.eval(), toks[name], questions, cfg, rm, ref and ref[0])
        result = {"checkpoint": name, "stage": info.get("stage"), **result}
        report["stages"][key] = result
        rows.append((name, result))
        print(f"{name}: gold {result['gold']:.3f} ± {2 * result['gold_se']:.3f}, accuracy {result['accuracy']:.1%}, "
              f"by kind {({k: round(v, 2) for k, v in result['accuracy_by_kind'].items()})}, "
              f"covered/uncovered entities {result['accuracy_by_coverage']}")
    if ns and rm is not None and ref is not None:
        tok = tokenizer_for(ref[1], cfg.reference)
        report["best_of_n"] = best_of_n(ref[0], tok, questions, cfg, rm, ns)
        for r in report["best_of_n"].values():
            r["kl"] = r["kl_bound"]
            rows.append((f"{cfg.reference} best-of-{r['n']}", r))
    paired_difference(rows, cfg.reference)  # the rows share their dicts with the report
    print()
    print_table(rows)
    texts = {"report.json": json.dumps(report, indent=2) + "\n", "report.md": markdown(report, rows)}
    for name, text in texts.items():  # each written beside, then renamed: a report is replaced whole or not at all
        with open(os.path.join(cfg.out_dir, f"{name}.tmp{os.getpid()}"), "w") as f:
            f.write(text)
    for name in texts:
        os.replace(os.path.join(cfg.out_dir, f"{name}.tmp{os.getpid()}"), os.path.join(cfg.out_dir, name))
    print(f"wrote {cfg.out_dir}/report.json and report.md")


if __name__ == "__main__":
    common.run(main, Config)
