"""The built-in world and its corpus: deterministic for a seed, true where it should be, wrong where it should be."""

import re

from data.world import (ATTRIBUTES, COLORS, FOODS, MAX_AGE, TOWNS, chatter_doc, make_corpus, make_world,
                        prose_doc, quiz_doc)


def test_world_is_deterministic_for_a_seed():
    assert make_world(7) == make_world(7)
    assert make_world(7) != make_world(8)


def test_world_entities_are_well_formed():
    w = make_world(3, n_entities=50)
    assert len({e.name for e in w.entities}) == 50
    for e in w.entities:
        assert e.color in COLORS and e.food in FOODS and e.town in TOWNS and 1 <= e.age <= MAX_AGE
    assert w[w.entities[5].name] == w.entities[5]


def test_corpus_is_deterministic_for_a_seed():
    w = make_world(0)
    assert make_corpus(w, 300, seed=5) == make_corpus(w, 300, seed=5)
    assert make_corpus(w, 300, seed=5) != make_corpus(w, 300, seed=6)
    assert make_corpus(w, 300, seed=5) != make_corpus(make_world(1), 300, seed=5)


def stated_facts(text, world):
    """(entity, attribute, value) for every sentence of text written with an attribute template
    (after a chatter opener such as "I heard that", if any)."""
    facts = []
    for sentence in re.split(r"(?<=\.)\s+", text):
        sentence = re.sub(r"^(I heard that|My friend says|Everyone knows|Pretty sure|lol,|Fun fact:) ", "", sentence)
        for attr, a in ATTRIBUTES.items():
            for template in a.statements:
                pattern = re.escape(template).replace(r"\{name\}", r"(?P<name>[a-z]+)").replace(r"\{value\}", r"(?P<value>\w+)")
                m = re.fullmatch(pattern, sentence, flags=re.IGNORECASE)
                if m and any(e.name == m["name"] for e in world.entities):
                    facts.append((world[m["name"]], attr, m["value"]))
    return facts


def test_prose_states_true_facts_and_chatter_wrong_ones():
    import random
    w = make_world()
    rng = random.Random(0)
    prose = stated_facts("\n".join(prose_doc(w, rng) for _ in range(50)), w)
    chatter = stated_facts("\n".join(chatter_doc(w, rng) for _ in range(50)), w)
    assert len(prose) > 150 and len(chatter) > 50
    assert all(str(getattr(e, attr)) == value for e, attr, value in prose)
    assert all(str(getattr(e, attr)) != value for e, attr, value in chatter)


def test_quiz_pages_are_questions_without_answers():
    import random
    w = make_world()
    rng = random.Random(0)
    for _ in range(20):
        lines = quiz_doc(w, rng).split("\n")[2:]
        assert len(lines) >= 4 and all(line.endswith("?") for line in lines)


def test_corpus_mixes_every_kind_of_document():
    docs = make_corpus(make_world(), 500, seed=0)
    assert any(" plus " in d and " is " in d for d in docs)      # sums
    assert any(d.startswith("name | town") for d in docs)        # tables
    assert any(d.split("\n")[-1].endswith("?") for d in docs)    # quiz pages
    assert sum(len(d) for d in docs) > 500 * 100
