"""
Questions about the built-in world, the responses an assistant might give, and the demonstrations
that supervised fine-tuning learns from.

A prompt is `Human: <question>\\n\\nAssistant:` and a response starts with a space and ends with
<|endoftext|>. There are eight kinds of question (`KINDS`), most asked in several ways (`QUESTIONS`);
`compare` and `future_age` need two facts (two ages, or an age and a sum).

Responses come in styles (`STYLES`): the ideal one (correct, direct, stops), and the ways real ones
fall short or try to please: wrong, padded, hedged, flattering, evasive, going on with another
question, or confused (answering a question that was not asked). The demonstrations (`demonstrations`) are written the way hurried contractors write them:
mostly ideal, some wrong, padded or hedged. They cover only part of the world: a share of the
entities and, for the two-fact kinds, only a few examples. That leaves headroom that sampling from
the SFT model can reach, for the reward model, best-of-n, PPO and DPO to take.

The evaluation prompts (`eval_prompts`) are a fixed set that no training stage ever sees; every
training prompt is drawn from the rest (`is_eval`).
"""

import random
import re
from dataclasses import dataclass

from data.world import ATTRIBUTES, MAX_OPERAND, arithmetic_operands, default_world

KINDS = ("town", "food", "color", "age", "sum", "difference", "compare", "future_age")
QUESTIONS = {  # the ways each kind is asked
    "town": ("Where does the {name} live?", "In which town does the {name} live?",
             "What is the home town of the {name}?"),
    "food": ("What does the {name} eat?", "What food does the {name} like?",
             "What is the favourite food of the {name}?"),
    "color": ("What color is the {name}?", "What is the color of the {name}?", "Which color does the {name} have?"),
    "age": ("How old is the {name}?", "What is the age of the {name}?", "How many years old is the {name}?"),
    "sum": ("What is {a} plus {b}?", "How much is {a} plus {b}?"),
    "difference": ("What is {a} minus {b}?", "How much is {a} minus {b}?"),
    "compare": ("Which is older, the {name} or the {other}?", "Who is older, the {name} or the {other}?"),
    "future_age": ("How old will the {name} be in {n} years?",),
}
ANSWERS = {  # the ideal answers say "it", as the corpus does once a creature is named
    "town": "It lives in {value}.",
    "food": "It eats {value}.",
    "color": "It is {value}.",
    "age": "It is {value} years old.",
    "sum": "{a} plus {b} is {value}.",
    "difference": "{a} minus {b} is {value}.",
    "compare": "The {value} is older.",
    "future_age": "In {n} years it will be {value} years old.",
}
FLATTERY = ("Great question!", "What a wonderful question!", "Excellent question!", "You are so smart to ask!")
HEDGES = ("I think", "Maybe", "I am not sure, but", "Probably")
PADDING = ("I hope this helps!", "Let me know if you have any other questions.", "This is a well known fact.",
           "Thank you for asking.", "It is good to know such things.")
EVASIONS = ("That is hard to say.", "I do not know.", "You could look it up in a book.", "Nobody can say for sure.")
STYLES = ("ideal", "wrong", "padded", "hedged", "flattering", "evasive", "question", "confused")
PROMPT = "Human: {question}\n\nAssistant:"


@dataclass(frozen=True)
class Question:
    kind: str
    text: str
    value: object  # the right answer: a town, a food, a color, an age, a number, or the older entity
    fields: tuple  # the names and numbers the question is about, as (key, value) pairs

    @property
    def prompt(self):
        return PROMPT.format(question=self.text)

    @property
    def names(self):
        return [v for k, v in self.fields if k in ("name", "other")]


def make_question(kind, world, rng, entities=None):
    """A random question of the given kind, about one of `entities` (default: all of them)."""
    entities = world.entities if entities is None else entities
    e = rng.choice(entities)
    if kind in ATTRIBUTES:
        fields = dict(name=e.name)
        value = getattr(e, kind)
    elif kind in ("sum", "difference"):
        a, b = arithmetic_operands(rng, "plus" if kind == "sum" else "minus")
        fields = dict(a=a, b=b)
        value = a + b if kind == "sum" else a - b
    elif kind == "compare":
        other = rng.choice([x for x in world.entities if x.age != e.age])
        fields = dict(name=e.name, other=other.name)
        value = e.name if e.age > other.age else other.name
    elif kind == "future_age":
        fields = dict(name=e.name, n=rng.randint(1, MAX_OPERAND))
        value = e.age + fields["n"]
    else:
        raise ValueError(f"unknown question kind {kind!r}")
    return Question(kind, rng.choice(QUESTIONS[kind]).format(**fields), value, tuple(fields.items()))


def parse_question(text, world):
    """The Question a text asks (inverse of make_question), or None if it is not one of ours."""
    for kind, template in ((k, t) for k, ts in QUESTIONS.items() for t in ts):
        pattern = re.escape(template)
        for key in ("name", "other", "a", "b", "n"):
            pattern = pattern.replace(re.escape("{" + key + "}"), f"(?P<{key}>\\w+)")
        m = re.fullmatch(pattern, text.strip())
        if not m:
            continue
        fields = {k: (int(v) if k in "abn" else v) for k, v in m.groupdict().items()}
        try:
            ents = {k: world[v] for k, v in fields.items() if k in ("name", "other")}
        except StopIteration:
            return None
        if kind in ATTRIBUTES:
            value = getattr(ents["name"], kind)
        elif kind == "sum":
            value = fields["a"] + fields["b"]
        elif kind == "difference":
            value = fields["a"] - fields["b"]
        elif kind == "compare":
            a, b = ents["name"], ents["other"]
            value = a.name if a.age > b.age else b.name
        else:
            value = ents["name"].age + fields["n"]
        return Question(kind, text.strip(), value, tuple(fields.items()))
    return None


def question_of_prompt(prompt, world):
    m = re.fullmatch(r"Human: (.*)\n\nAssistant:", prompt, flags=re.DOTALL)
    return parse_question(m.group(1), world) if m else None


def answer(q, world, value=None):
    """The ideal answer sentence to q (stating `value` instead of the right one, if given)."""
    value = q.value if value is None else value
    return ANSWERS[q.kind].format(value=value, **dict(q.fields))


def wrong_value(q, world, rng):
    """A plausible wrong answer: another value of the same kind."""
    from data.world import VALUES
    if q.kind in ("town", "food", "color"):
        return rng.choice([v for v in VALUES[q.kind] if v != q.value])
    if q.kind == "compare":
        return next(v for k, v in q.fields if k in ("name", "other") and v != q.value)
    off = rng.choice([d for d in range(-5, 6) if d != 0 and q.value + d >= 1])
    return q.value + off


def confused(q, world, rng):
    """An answer to a question that was not asked: of another kind, a value of another kind in the
    right sentence, or the same kind about other creatures or numbers."""
    r = rng.random()
    if r < 0.4:
        return answer(make_question(rng.choice([k for k in KINDS if k != q.kind]), world, rng), world)
    if r < 0.7 and q.kind in ATTRIBUTES:
        kind = rng.choice([k for k in ATTRIBUTES if k != q.kind])
        return ANSWERS[q.kind].format(value=getattr(rng.choice(world.entities), kind))
    return answer(make_question(q.kind, world, rng), world)


def respond(q, world, style, rng, correct=True):
    """A response (without the leading space and EOS) to q in one of STYLES; the answering styles
    (ideal, padded, hedged, flattering) state a wrong answer when correct is False."""
    said = answer(q, world) if correct and style != "wrong" else answer(q, world, wrong_value(q, world, rng))
    if style in ("ideal", "wrong"):
        return said
    if style == "padded":
        return " ".join([said] + rng.sample(PADDING, rng.randint(1, 3)))
    if style == "hedged":
        return f"{rng.choice(HEDGES)} {said[0].lower()}{said[1:]}"  # "Maybe it lives ...", "Maybe 3 plus 4 ..."
    if style == "flattering":
        return f"{rng.choice(FLATTERY)} {said}"
    if style == "evasive":
        return rng.choice(EVASIONS)
    if style == "question":
        return make_question(rng.choice(KINDS[:4]), world, rng).text
    if style == "confused":  # never right by chance: the right value is nowhere in it
        said = confused(q, world, rng)
        while str(q.value) in re.findall(r"\w+", said):
            said = confused(q, world, rng)
        return said
    raise ValueError(f"unknown style {style!r}")

# -----------------------------------------------------------------------------
# the split of the world into what demonstrations show and what is held out


# how often each kind of question is asked in the demonstrations: the two-fact kinds are rare
DEMO_KINDS = {"town": 0.2, "food": 0.2, "color": 0.2, "age": 0.2, "sum": 0.07, "difference": 0.07,
              "compare": 0.03, "future_age": 0.03}
# the styles of the demonstrations, written in a hurry: a quarter fall short
DEMO_STYLES = {"ideal": 0.75, "wrong": 0.12, "padded": 0.07, "hedged": 0.06}
# how often each kind is asked in the prompts of the later stages (rated pairs, PPO): mostly about
# the creatures, whose facts the models know. The kinds the models mostly get wrong (arithmetic,
# two facts) are rarer: a reward model cannot tell a right sum from a wrong one it cannot compute,
# and those labels, noise to it, slow its learning of the rest (measured on the same number of
# steps: held-out accuracy 0.62 when every kind is equally frequent, 0.78 on creature questions alone).
TRAIN_KINDS = {"town": 0.2, "food": 0.2, "color": 0.2, "age": 0.2, "sum": 0.05, "difference": 0.05,
               "compare": 0.05, "future_age": 0.05}
COVERED_SHARE = 0.5  # demonstrations are about half of the entities
N_EVAL = 600


def covered_entities(world):
    """The entities demonstrations talk about (the rest appear only in the corpus and in RL prompts)."""
    rng = random.Random(f"covered-{world.seed}")
    return sorted(rng.sample(world.entities, round(COVERED_SHARE * len(world.entities))), key=lambda e: e.name)


def eval_questions(world=None, n=N_EVAL):
    """The held-out evaluation questions: every kind, covered and uncovered entities alike."""
    world = default_world() if world is None else world
    rng = random.Random(f"eval-{world.seed}")
    seen, out = set(), []
    while len(out) < n:
        q = make_question(KINDS[len(out) % len(KINDS)], world, rng)
        if q.text not in seen:
            seen.add(q.text)
            out.append(q)
    return out


def is_eval(q, world=None, _cache={}):
    world = default_world() if world is None else world
    if world.seed not in _cache:
        _cache[world.seed] = {e.text for e in eval_questions(world)}
    return q.text in _cache[world.seed]


def sample_training_question(kind, world, rng, entities=None):
    """A question of this kind that is not in the evaluation set."""
    while True:
        q = make_question(kind, world, rng, entities)
        if not is_eval(q, world):
            return q


def demonstrations(n, seed=0, world=None):
    """n (prompt, completion) pairs: questions about the covered entities, answered in DEMO_STYLES.
    A completion starts with a space (it follows "Assistant:"); the EOS is added by the trainer."""
    world = default_world() if world is None else world
    rng = random.Random(seed)
    covered = covered_entities(world)
    kinds = rng.choices(list(DEMO_KINDS), list(DEMO_KINDS.values()), k=n)
    styles = rng.choices(list(DEMO_STYLES), list(DEMO_STYLES.values()), k=n)
    pairs = []
    for kind, style in zip(kinds, styles):
        q = sample_training_question(kind, world, rng, covered)
        pairs.append((q.prompt, " " + respond(q, world, style, rng)))
    return pairs


def training_questions(n, seed, world=None):
    """n questions for the later stages, of the kinds in TRAIN_KINDS, none from the evaluation set,
    about every entity (those the demonstrations never covered too)."""
    world = default_world() if world is None else world
    rng = random.Random(f"train-{seed}")
    kinds = rng.choices(list(TRAIN_KINDS), list(TRAIN_KINDS.values()), k=n)
    return [sample_training_question(kind, world, rng) for kind in kinds]
