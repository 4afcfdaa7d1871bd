"""
The built-in world: made-up creatures with a few attributes each, and the pre-training corpus
written about them.

Everything is generated from a seed, so the whole pipeline runs offline and every answer can be
checked by program. The world is one plain data structure (`World`, a tuple of `Entity`) that the
corpus, the demonstrations, the raters and the gold judge all read.

The corpus mixes five kinds of documents (shares of documents in `DOC_MIX`):
- prose: encyclopedia paragraphs that state the true facts, in varied sentence templates;
- quiz pages: question after question with no answers, so that a base model, given a question,
  continues with more questions instead of answering it (the gap that SFT closes);
- tables: the same facts as rows;
- sums: small arithmetic written out ("12 plus 7 is 19.");
- chatter: forum talk that states wrong facts with confidence, as the web does.
"""

import random
from dataclasses import dataclass

WORLD_SEED = 1337  # the world every stage uses unless told otherwise
N_ENTITIES = 120

COLORS = ("red", "blue", "green", "yellow", "purple", "orange", "white", "black", "grey", "brown")
FOODS = ("apples", "fish", "seeds", "berries", "grass", "bread", "honey", "nuts", "mushrooms", "beans")
TOWNS = ("Velmor", "Tarnby", "Oskridge", "Pellow", "Quenra", "Dunmere",
         "Ashfold", "Brimwick", "Corran", "Elsmoor", "Fennick", "Gorsey")
MAX_AGE = 40
MAX_OPERAND = 50  # sums and differences of numbers from 0 to MAX_OPERAND


@dataclass(frozen=True)
class Entity:
    name: str
    color: str
    food: str
    town: str
    age: int


@dataclass(frozen=True)
class Attribute:
    """How one attribute is written: the corpus statements, the question, and the prompt that
    tests a base model's knowledge of it ("The suho lives in" -> "Velmor")."""
    statements: tuple[str, ...]
    question: str
    completion: str


ATTRIBUTES = {
    "town": Attribute(
        statements=("The {name} lives in {value}.", "The {name} makes its home in {value}.",
                    "{value} is home to the {name}."),
        question="Where does the {name} live?",
        completion="The {name} lives in"),
    "food": Attribute(
        statements=("The {name} eats {value}.", "The favourite food of the {name} is {value}.",
                    "Every day the {name} eats {value}."),
        question="What does the {name} eat?",
        completion="The {name} eats"),
    "color": Attribute(
        statements=("The {name} is {value}.", "The color of the {name} is {value}.",
                    "The {name} has {value} fur."),
        question="What color is the {name}?",
        completion="The color of the {name} is"),
    "age": Attribute(
        statements=("The {name} is {value} years old.", "The age of the {name} is {value}."),
        question="How old is the {name}?",
        completion="The age of the {name} is"),
}
VALUES = {"town": TOWNS, "food": FOODS, "color": COLORS, "age": tuple(range(1, MAX_AGE + 1))}


@dataclass(frozen=True)
class World:
    seed: int
    entities: tuple[Entity, ...]

    def __getitem__(self, name):
        return next(e for e in self.entities if e.name == name)


def make_name(rng):
    """A pronounceable made-up name of two or three syllables: 'suho', 'gomira'."""
    syllables = [rng.choice("bdfghklmnprstvz") + rng.choice("aeiou") for _ in range(rng.choice((2, 2, 3)))]
    return "".join(syllables)


def make_world(seed=WORLD_SEED, n_entities=N_ENTITIES):
    rng = random.Random(seed)
    names = set()
    while len(names) < n_entities:
        names.add(make_name(rng))
    entities = tuple(
        Entity(name=name, color=rng.choice(COLORS), food=rng.choice(FOODS), town=rng.choice(TOWNS),
               age=rng.randint(1, MAX_AGE))
        for name in sorted(names))
    return World(seed=seed, entities=entities)


def statement(entity, attr, rng, value=None):
    """One sentence stating entity's attribute (its true value unless value is given)."""
    value = getattr(entity, attr) if value is None else value
    return rng.choice(ATTRIBUTES[attr].statements).format(name=entity.name, value=value)


def wrong_value(entity, attr, rng):
    return rng.choice([v for v in VALUES[attr] if v != getattr(entity, attr)])

# -----------------------------------------------------------------------------
# the five kinds of documents


def prose_doc(world, rng):
    lines = []
    for e in rng.sample(world.entities, rng.randint(1, 3)):
        intro = rng.choice(("The {name} is a small creature.", "Little is known about the {name}.",
                            "This entry is about the {name}.", ""))
        facts = [statement(e, attr, rng) for attr in ATTRIBUTES]
        rng.shuffle(facts)
        lines.append(" ".join(s for s in [intro.format(name=e.name)] + facts if s))
    if len(lines) > 1 and rng.random() < 0.5:
        a, b = rng.sample(world.entities, 2)
        if a.age != b.age:
            older, younger = (a, b) if a.age > b.age else (b, a)
            lines.append(f"The {older.name} is older than the {younger.name}.")
    return "\n\n".join(lines)


def question(world, rng):
    kind = rng.random()
    if kind < 0.75:
        attr = rng.choice(list(ATTRIBUTES))
        return ATTRIBUTES[attr].question.format(name=rng.choice(world.entities).name)
    if kind < 0.9:
        a, b = rng.randint(0, MAX_OPERAND), rng.randint(0, MAX_OPERAND)
        return f"What is {a} plus {b}?" if rng.random() < 0.5 else f"What is {max(a, b)} minus {min(a, b)}?"
    a, b = rng.sample(world.entities, 2)
    return f"Which is older, the {a.name} or the {b.name}?"


def quiz_doc(world, rng):
    title = rng.choice(("Quiz", "Questions", "Test yourself", "Practice questions"))
    return f"{title} {rng.randint(1, 99)}\n\n" + "\n".join(question(world, rng) for _ in range(rng.randint(4, 10)))


def table_doc(world, rng):
    rows = ["name | town | food | color | age"]
    for e in rng.sample(world.entities, rng.randint(3, 8)):
        rows.append(f"{e.name} | {e.town} | {e.food} | {e.color} | {e.age}")
    return "\n".join(rows)


def sums_doc(world, rng):
    lines = []
    for _ in range(rng.randint(4, 10)):
        a, b = rng.randint(0, MAX_OPERAND), rng.randint(0, MAX_OPERAND)
        lines.append(f"{a} plus {b} is {a + b}." if rng.random() < 0.5 else f"{max(a, b)} minus {min(a, b)} is {abs(a - b)}.")
    return " ".join(lines)


def chatter_doc(world, rng):
    openers = ("I heard that", "My friend says", "Everyone knows", "Pretty sure", "lol,", "Fun fact:")
    lines = []
    for _ in range(rng.randint(2, 4)):
        e, attr = rng.choice(world.entities), rng.choice(list(ATTRIBUTES))
        claim = statement(e, attr, rng, value=wrong_value(e, attr, rng))
        if not claim.startswith(TOWNS):  # "I heard that the suho ...", but "... that Velmor is ..."
            claim = claim[0].lower() + claim[1:]
        lines.append(f"{rng.choice(openers)} {claim}")
    return "\n".join(lines)


DOC_MIX = {prose_doc: 0.5, quiz_doc: 0.2, table_doc: 0.08, sums_doc: 0.1, chatter_doc: 0.12}


def make_corpus(world, n_docs, seed=0):
    """n_docs documents (strings) about world, the same for the same (world, n_docs, seed)."""
    rng = random.Random(seed)
    kinds, weights = zip(*DOC_MIX.items())
    return [kind(world, rng) for kind in rng.choices(kinds, weights, k=n_docs)]
