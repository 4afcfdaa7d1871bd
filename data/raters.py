"""
Simulated human raters, and the preference pairs they label.

For each training prompt (never an evaluation one) there are several candidate responses: scripted
ones in the styles of data/tasks.py (the ideal answer right and wrong, often a padded, hedged or
flattering one right and wrong, sometimes an evasion, a question or an answer to another question)
and, as in InstructGPT, samples from the SFT model itself. Raters compare two candidates A and B
and prefer A with the Bradley-Terry probability

    P(A > B) = sigmoid(u(A) - u(B)),
    u = quality * gold + length * words + flattery * [flatters] - confidence * [hedges]

where gold is the judge's genuine-quality score and the other terms are the raters' biases, as
documented for real labellers: they favour longer answers, being flattered, and a confident tone
over an honest hedge. Each label is one draw from that probability, so the labels are noisy, and
the best accuracy any reward model can reach on them is known: the Bayes rate, the mean of
max(p, 1 - p) over the pairs (`bayes_accuracy`).

The default biases are mild, as most people's are: each decoration is worth less to a rater than it
costs in genuine quality (padding costs 0.2 of gold, 0.8 of utility at quality 4, and its 4 to 22
extra words add 0.12 to 0.66), so a plain right answer still wins more often than not. Raters who
love decoration (`--length 0.15 --flattery 2`) teach a reward model to pay for it, and a policy
optimised hard against that model to pad and flatter.

    python -m data.raters --out prefs.jsonl      # the built-in pairs, scripted candidates only

writes them in the common {"prompt", "chosen", "rejected"} form (plus "p_chosen" and "kind").
"""

import hashlib
import json
import math
import random
import sys
from collections import defaultdict
from dataclasses import dataclass

from common import UserError, check_same_everywhere
from data.judge import gold_parts, score_parts
from data.tasks import respond, training_questions
from data.tokenizer import EOT
from data.formats import check_out_file, write_rows
from data.world import default_world


@dataclass
class Raters:
    quality: float = 4.0
    """weight of genuine quality (the gold score) in the raters' utility"""
    length: float = 0.03
    """bias per word: raters like longer answers"""
    flattery: float = 0.5
    """bias for a response that flatters the asker"""
    confidence: float = 0.5
    """bias against a hedged response (a confident tone wins over honest doubt)"""

    def utility(self, prompt, response):
        p = gold_parts(prompt, response)
        return (self.quality * score_parts(p) + self.length * p["words"] + self.flattery * p["flattery"]
                - self.confidence * p["hedged"])

    def p_prefers(self, prompt, a, b):
        """Probability that a rater prefers response a to response b."""
        return bradley_terry(self.utility(prompt, a), self.utility(prompt, b))


def bradley_terry(u_a, u_b):
    """P(a > b) = sigmoid(u(a) - u(b))."""
    return 1 / (1 + math.exp(-(u_a - u_b)))


def bayes_accuracy(ps):
    """The best expected accuracy of any predictor on labels drawn with these probabilities."""
    return sum(max(p, 1 - p) for p in ps) / len(ps)


def accuracy_report(rows, margins):
    """A reward's held-out accuracy against the raters' labels, beside the Bayes rate, overall and
    by kind of pair. rows: rated pairs (with "kind" and "p_chosen", as label_pairs writes them);
    margins: the reward of each pair's chosen response minus its rejected one's (an explicit reward
    model's, or DPO's implicit one). Returns the metrics and the table as printable lines.
    Beside the accuracy on the labels drawn, the accuracy expected over the raters' draws: for each
    pair the probability that a rater picks the side the reward prefers (half for a tie). It has no
    luck of the draw in it, and its ratio to the Bayes rate compares like with like."""
    by_kind = defaultdict(list)
    for r, m in zip(rows, margins, strict=True):
        by_kind[" vs ".join(sorted(r["kind"].split(">")))].append((m > 0, max(r["p_chosen"], 1 - r["p_chosen"])))
    accuracy = sum(m > 0 for m in margins) / len(margins)
    bayes = bayes_accuracy([r["p_chosen"] for r in rows])
    expected = sum(r["p_chosen"] if m > 0 else 1 - r["p_chosen"] if m < 0 else 0.5 for r, m in zip(rows, margins)) / len(rows)
    metrics = {"bayes_accuracy": bayes, "accuracy_over_bayes": accuracy / bayes,
               "expected_accuracy": expected, "expected_over_bayes": expected / bayes,
               "by_kind": {k: {"n": len(v), "accuracy": sum(a for a, _ in v) / len(v), "bayes": sum(b for _, b in v) / len(v)}
                           for k, v in sorted(by_kind.items())}}
    w = max(len("pair kind"), *(len(k) for k in by_kind))
    lines = [f"{'pair kind':{w}s} {'n':>4s} {'accuracy':>9s} {'bayes':>6s}"]
    lines += [f"{k:{w}s} {v['n']:4d} {v['accuracy']:9.3f} {v['bayes']:6.3f}" for k, v in metrics["by_kind"].items()]
    return metrics, lines


def candidates(q, world, rng, sampled=()):
    """(label, response text) candidates for q: the ideal answer right and wrong, one decorated
    style (padded, hedged or flattering) right and wrong, an evasion or a question, a confused
    answer, plus the sampled ones. Responses start with a space and end with <|endoftext|>, as a model's would."""
    styles = ("ideal", rng.choice(("padded", "hedged", "flattering"))) if rng.random() < 0.5 else ("ideal",)
    out = [(f"{s}-{'right' if ok else 'wrong'}", " " + respond(q, world, s, rng, correct=ok) + EOT)
           for s in styles for ok in (True, False)]
    if rng.random() < 0.25:  # now and then a non-answer
        s = rng.choice(("evasive", "question"))
        out.append((s, " " + respond(q, world, s, rng) + EOT))
    if rng.random() < 0.5:  # and an answer to another question: a sampled policy makes these too
        out.append(("confused", " " + respond(q, world, "confused", rng) + EOT))
    return out + [("sft", r) for r in sampled if r.endswith(EOT)]  # a sample that never stopped is dropped


def label_pairs(prompt, cands, raters, rng, n_pairs):
    """n_pairs rated pairs among cands: dicts in the {"prompt", "chosen", "rejected"} form, whose
    responses, as in every preference dataset, leave the EOS to the trainer."""
    utility, rows = {}, []  # each candidate is judged once, however many pairs it is in
    for _ in range(n_pairs):
        (sa, a), (sb, b) = rng.sample(cands, 2)
        if a == b:
            continue
        for r in (a, b):
            if r not in utility:
                utility[r] = raters.utility(prompt, r)
        p = bradley_terry(utility[a], utility[b])
        if rng.random() >= p:
            (sa, a), (sb, b), p = (sb, b), (sa, a), 1 - p
        rows.append(dict(prompt=prompt, chosen=a.removesuffix(EOT), rejected=b.removesuffix(EOT), p_chosen=p,
                         kind=f"{sa}>{sb}"))
    return rows


def model_sampler(model, tok, n, generator=None, max_new_tokens=48):
    """A sample_fn for preference_pairs: n responses of model per prompt, sampled at temperature 1."""
    from model import complete

    def sample_fn(prompts):
        if n == 0:
            return [()] * len(prompts)
        flat = complete(model, tok, [p for p in prompts for _ in range(n)], max_new_tokens, temperature=1.0,
                        generator=generator)
        return [flat[i:i + n] for i in range(0, len(flat), n)]
    return sample_fn


def preference_pairs(n_prompts, pairs_per_prompt, raters, seed=0, sample_fn=None):
    """Rated pairs for n_prompts training questions. sample_fn(prompts) -> [[response text, ...]]
    adds the policy's own samples to the candidates (None: scripted candidates only). Under
    torchrun every process makes them itself; they must come out the same everywhere."""
    world = default_world()
    rng = random.Random(seed)
    questions = training_questions(n_prompts, seed, world)
    sampled = sample_fn([q.prompt for q in questions]) if sample_fn else [()] * len(questions)
    rows = []
    for q, s in zip(questions, sampled):
        rows += label_pairs(q.prompt, candidates(q, world, rng, s), raters, rng, pairs_per_prompt)
    # a digest of every row (48 bits: exact in the float64 that is compared), not only their count: a
    # label drawn the other way, or a sample of the same length, changes no count
    digest = int(hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()[:12], 16)
    check_same_everywhere([len(rows), digest], "the built-in pairs")
    return rows


if __name__ == "__main__":
    from common import parse_args

    @dataclass
    class Args(Raters):
        out: str = "prefs.jsonl"
        """where the pairs are written"""
        n_prompts: int = 500
        """training prompts to write pairs for"""
        pairs_per_prompt: int = 4
        """rated pairs per prompt"""
        seed: int = 0
        """seed of candidates and labels"""

    try:
        args = parse_args(Args, sys.argv[1:])
        check_out_file(args.out, "--out")
        rows = preference_pairs(args.n_prompts, args.pairs_per_prompt, Raters(args.quality, args.length, args.flattery,
                                                                              args.confidence), args.seed)
        write_rows(args.out, rows)
    except UserError as e:
        sys.exit(f"error: {e}")
    print(f"wrote {len(rows)} pairs to {args.out}; Bayes-optimal accuracy {bayes_accuracy([r['p_chosen'] for r in rows]):.3f}")
