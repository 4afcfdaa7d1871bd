"""
The built-in world: made-up creatures with a few attributes each, and the pre-training corpus
written about them.

Everything is generated from a seed, so the whole pipeline runs offline and every answer can be
checked by program. The world is one plain data structure (`World`, a tuple of `Entity`) that the
corpus, the demonstrations, the raters and the gold judge all read.

The corpus mixes seven kinds of documents (shares of documents in `DOC_MIX`):
- prose: encyclopedia paragraphs that state the true facts, in varied sentence templates, often
  saying "it" once the creature is named;
- dialogues: two people chatting about creatures, true facts in the replies (never answers to
  "where" or "what" questions);
- quiz pages: question after question with no answers, so that a base model, given a question,
  continues with more questions instead of answering it (the gap that SFT closes);
- tables: the same facts as rows;
- sums: small arithmetic written out ("12 plus 7 is 19.");
- chatter: forum talk that states wrong facts with confidence, as the web does;
- fact checks: claims marked True or False, so the model has a notion of a claim being wrong.
"""

import functools
import random
from dataclasses import dataclass

WORLD_SEED = 1337  # the world every stage uses unless told otherwise
N_ENTITIES = 120

COLORS = ("red", "blue", "green", "yellow", "purple", "orange", "white", "black", "grey", "brown")
FOODS = ("apples", "fish", "seeds", "berries", "grass", "bread", "honey", "nuts", "mushrooms", "beans")
TOWNS = ("Velmor", "Tarnby", "Oskridge", "Pellow", "Quenra", "Dunmere",
         "Ashfold", "Brimwick", "Corran", "Elsmoor", "Fennick", "Gorsey")
MAX_AGE = 20
MAX_OPERAND = 10  # small arithmetic: a plus b and a minus b for a up to MAX_AGE, b up to MAX_OPERAND


@dataclass(frozen=True)
class Entity:
    name: str
    color: str
    food: str
    town: str
    age: int


@dataclass(frozen=True)
class Attribute:
    """How one attribute is written: the corpus statements (about "the {name}", or about "it" once
    the paragraph has named it), the question, and the prompt that tests a base model's knowledge
    of it ("The suho lives in" -> "Velmor")."""
    statements: tuple[str, ...]
    pronoun_statements: tuple[str, ...]
    question: str
    completion: str


ATTRIBUTES = {
    "town": Attribute(
        statements=("The {name} lives in {value}.", "The {name} makes its home in {value}.",
                    "{value} is home to the {name}."),
        pronoun_statements=("It lives in {value}.", "Its home is {value}."),
        question="Where does the {name} live?",
        completion="The {name} lives in"),
    "food": Attribute(
        statements=("The {name} eats {value}.", "The favourite food of the {name} is {value}.",
                    "Every day the {name} eats {value}."),
        pronoun_statements=("It eats {value}.", "Its favourite food is {value}."),
        question="What does the {name} eat?",
        completion="The {name} eats"),
    "color": Attribute(
        statements=("The {name} is {value}.", "The color of the {name} is {value}.",
                    "The {name} has {value} fur."),
        pronoun_statements=("It is {value}.", "It has {value} fur."),
        question="What color is the {name}?",
        completion="The color of the {name} is"),
    "age": Attribute(
        statements=("The {name} is {value} years old.", "The age of the {name} is {value}."),
        pronoun_statements=("It is {value} years old.", "Its age is {value}."),
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


@functools.cache
def default_world():
    """make_world() with the defaults, made once: the judge and the raters ask for it thousands of
    times a stage (World is frozen, so one object serves every caller)."""
    return make_world()


def statement(entity, attr, rng, value=None, pronoun=False):
    """One sentence stating entity's attribute (its true value unless value is given)."""
    value = getattr(entity, attr) if value is None else value
    templates = ATTRIBUTES[attr].pronoun_statements if pronoun else ATTRIBUTES[attr].statements
    return rng.choice(templates).format(name=entity.name, value=value)


def arithmetic_operands(rng, op):
    """(a, b) for "a plus b" or "a minus b": a up to MAX_AGE, b up to MAX_OPERAND (and b <= a for
    minus). The sums include every age a few years on."""
    a = rng.randint(0, MAX_AGE)
    return a, rng.randint(0, MAX_OPERAND if op == "plus" else min(a, MAX_OPERAND))


def wrong_value(entity, attr, rng):
    return rng.choice([v for v in VALUES[attr] if v != getattr(entity, attr)])

# -----------------------------------------------------------------------------
# the five kinds of documents


def prose_doc(world, rng):
    paragraphs = []
    for e in rng.sample(world.entities, rng.randint(1, 3)):
        intro = rng.choice(("The {name} is a small creature.", "Little is known about the {name}.",
                            "This entry is about the {name}.", "What do we know about the {name}?",
                            "Have you ever seen the {name}?", "Who has not heard of the {name}?", ""))
        title = rng.random() < 0.3  # an entry headed by the name: "The suho\n\nIt lives in ..."
        attrs = rng.sample(list(ATTRIBUTES), len(ATTRIBUTES))
        # once the creature is named, the text may say "it": recalling a fact then means looking
        # back to the name (in a title, a question, an earlier sentence), the skill an assistant needs
        named = [title or bool(intro) or i > 0 for i in range(len(attrs))]
        facts = [statement(e, a, rng, pronoun=n and rng.random() < 0.5) for a, n in zip(attrs, named)]
        paragraph = " ".join(s for s in [intro.format(name=e.name)] + facts if s)
        paragraphs.append(f"The {e.name}\n\n{paragraph}" if title else paragraph)
    if len(paragraphs) > 1 and rng.random() < 0.5:
        a, b = rng.sample(world.entities, 2)
        if a.age != b.age:
            older, younger = (a, b) if a.age > b.age else (b, a)
            paragraphs.append(f"The {older.name} is older than the {younger.name}.")
    return "\n\n".join(paragraphs)


def question(world, rng):
    kind = rng.random()
    if kind < 0.75:
        attr = rng.choice(list(ATTRIBUTES))
        return ATTRIBUTES[attr].question.format(name=rng.choice(world.entities).name)
    if kind < 0.9:
        op = rng.choice(("plus", "minus"))
        a, b = arithmetic_operands(rng, op)
        return f"What is {a} {op} {b}?"
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
        op = rng.choice(("plus", "minus"))
        a, b = arithmetic_operands(rng, op)
        lines.append(f"{a} {op} {b} is {a + b if op == 'plus' else a - b}.")
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


SPEAKERS = ("Ann", "Tom", "Mia", "Sam", "Lea", "Ben")


def dialogue_doc(world, rng):
    """Two people talking about creatures, turn by turn: a reply says "it" for the creature the
    other one named, across the line break and the speaker's name. Nobody asks "where" or "what"."""
    a, b = rng.sample(SPEAKERS, 2)
    turns = []
    for _ in range(rng.randint(1, 3)):
        e = rng.choice(world.entities)
        opener = rng.choice(("Do you know the {name}?", "Have you seen the {name}?", "I saw a {name} today.",
                             "Tell me about the {name}."))
        facts = [statement(e, attr, rng, pronoun=True) for attr in rng.sample(list(ATTRIBUTES), rng.randint(1, 2))]
        reply = " ".join([rng.choice(("Yes.", "Of course.", "I do.", "Oh, nice."))] + facts)
        turns += [f"{a}: {opener.format(name=e.name)}", f"{b}: {reply}"]
    return "\n\n".join(turns)


def fact_check_doc(world, rng):
    """Claims marked True or False, as fact-checking pages and quiz answer keys print them."""
    lines = []
    for _ in range(rng.randint(3, 6)):
        true, kind = rng.random() < 0.5, rng.random()
        if kind < 0.7:
            e, attr = rng.choice(world.entities), rng.choice(list(ATTRIBUTES))
            claim = statement(e, attr, rng, value=None if true else wrong_value(e, attr, rng))
        elif kind < 0.9:
            op = rng.choice(("plus", "minus"))
            a, b = arithmetic_operands(rng, op)
            result = a + b if op == "plus" else a - b
            claim = f"{a} {op} {b} is {result if true else result + rng.choice((-2, -1, 1, 2))}."
        else:
            a, b = sorted(rng.sample(world.entities, 2), key=lambda e: e.age)  # a is not older than b
            claim = f"The {b.name if true else a.name} is older than the {a.name if true else b.name}."
            true = true and a.age != b.age
        lines.append(f"{claim} {'True' if true else 'False'}.")
    return "Fact check\n\n" + "\n".join(lines)


DOC_MIX = {prose_doc: 0.4, quiz_doc: 0.17, table_doc: 0.06, sums_doc: 0.14, chatter_doc: 0.09, dialogue_doc: 0.08,
           fact_check_doc: 0.06}


def make_corpus(world, n_docs, seed=0):
    """n_docs documents (strings) about world, the same for the same (world, n_docs, seed)."""
    rng = random.Random(seed)
    kinds, weights = zip(*DOC_MIX.items())
    return [kind(world, rng) for kind in rng.choices(kinds, weights, k=n_docs)]
