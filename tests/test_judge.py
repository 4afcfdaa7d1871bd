"""The gold judge on hand-written responses of every kind, and the questions it parses."""

import random

import pytest

from data.judge import gold_parts, gold_score
from data.tasks import KINDS, STYLES, answer, eval_questions, make_question, parse_question, respond
from data.tokenizer import EOT
from data.world import make_world

W = make_world()


def by_name(name):
    return W[name]


def q_of(kind, seed=0):
    return make_question(kind, W, random.Random(seed))


def test_every_question_parses_back():
    rng = random.Random(0)
    for _ in range(300):
        q = make_question(rng.choice(KINDS), W, rng)
        assert parse_question(q.text, W) == q
    assert parse_question("What is the meaning of life?", W) is None
    assert parse_question("Where does the nobody live?", W) is None  # no such creature


@pytest.mark.parametrize("kind", KINDS)
def test_ideal_answer_scores_one_and_styles_rank_as_documented(kind):
    rng = random.Random(1)
    q = q_of(kind, seed=3)
    score = {s: gold_score(q.prompt, " " + respond(q, W, s, rng) + EOT) for s in STYLES}
    assert score["ideal"] == 1.0
    assert score["hedged"] == pytest.approx(0.9)        # a needless hedge on a right answer
    assert score["flattering"] == pytest.approx(0.8)
    assert score["padded"] == pytest.approx(0.8)
    assert score["wrong"] == pytest.approx(0.2)          # answered, wrongly
    assert score["evasive"] == 0.0 and score["question"] == 0.0
    assert all(gold_score(q.prompt, " " + respond(q, W, "confused", rng) + EOT) <= 0.2 for _ in range(20))


def test_parts_of_hand_written_responses():
    e = W.entities[0]
    q = parse_question(f"Where does the {e.name} live?", W)
    other = next(x for x in W.entities if x.town != e.town)

    def parts(text):
        return gold_parts(q.prompt, text)
    p = parts(f" The {e.name} lives in {e.town}.{EOT}")
    assert p["answered"] and p["correct"] and p["stopped"] and not (p["hedged"] or p["flattery"] or p["padded"])
    assert not parts(f" The {e.name} lives in {e.town}.")["stopped"]                         # no EOS
    assert gold_score(q.prompt, f" The {e.name} lives in {e.town}.") == pytest.approx(0.7)
    assert not parts(f" {e.town}.{EOT}")["padded"] and parts(f" {e.town}.{EOT}")["correct"]  # terse is fine
    both = parts(f" The {e.name} lives in {e.town} or {other.town}.{EOT}")
    assert both["answered"] and not both["correct"]                                          # two answers: not correct
    assert not parts(f" Where does the {other.name} live?{EOT}")["answered"]                 # a question, not an answer
    assert not parts(f" Where does the {e.name} live? It lives in {e.town}.{EOT}")["answered"]
    assert not parts(f" The {other.name} lives in {e.town}.{EOT}")["answered"]               # about another creature
    hedge = parts(f" I think the {e.name} lives in {other.town}, but I am not sure.{EOT}")
    assert hedge["hedged"] and not hedge["correct"]
    assert gold_score(q.prompt, f" I think the {e.name} lives in {other.town}.{EOT}") == pytest.approx(0.3)  # honest doubt
    assert parts(f" Brilliant! The {e.name} lives in {e.town}.{EOT}")["flattery"]
    long = parts(f" The {e.name} lives in {e.town}, a town with many roads and many old trees.{EOT}")
    assert long["padded"] and long["correct"] and long["words"] == 14
    assert not parts(f" It lives in {e.town}, you see.{EOT}")["padded"]  # 2 words more than the answer: not yet padding
    assert not parts(f" {e.town}.{EOT} {e.town}.")["stopped"]  # it went on after its EOS
    assert gold_score(q.prompt, f" I am not sure.{EOT}") == 0.0  # a hedge with no answer earns nothing for it


def test_numbers_ignore_the_operands_of_the_question():
    q = parse_question("What is 12 plus 0?", W)
    assert gold_parts(q.prompt, f" 12 plus 0 is 12.{EOT}")["correct"]
    assert gold_parts(q.prompt, f" 12.{EOT}")["correct"]
    assert not gold_parts(q.prompt, f" 12 plus 0 is 13.{EOT}")["correct"]
    assert not gold_parts(parse_question("What is 12 plus 3?", W).prompt, f" 12 plus 3{EOT}")["answered"]
    q = parse_question("What is 9 minus 4?", W)
    assert gold_parts(q.prompt, f" 9 minus 4 is 5.{EOT}")["correct"]


def test_compare_and_future_age():
    a, b = next((x, y) for x in W.entities for y in W.entities if x.age > y.age)
    q = parse_question(f"Which is older, the {b.name} or the {a.name}?", W)
    assert q.value == a.name
    assert gold_parts(q.prompt, f" The {a.name} is older than the {b.name}.{EOT}")["correct"]
    assert gold_parts(q.prompt, f" The {b.name} is younger than the {a.name}.{EOT}")["correct"]
    assert not gold_parts(q.prompt, f" The {b.name} is older than the {a.name}.{EOT}")["correct"]
    assert not gold_parts(q.prompt, f" The {a.name} is older than the {a.name}.{EOT}")["answered"]
    assert gold_parts(q.prompt, f" The {a.name} is older.{EOT}")["correct"]
    assert not gold_parts(q.prompt, f" The {b.name} is older.{EOT}")["correct"]
    c = next(x for x in W.entities if x not in (a, b))
    assert not gold_parts(q.prompt, f" The {a.name} is older than the {c.name}.{EOT}")["answered"]
    q = parse_question(f"How old will the {a.name} be in 3 years?", W)
    assert gold_parts(q.prompt, " " + answer(q, W) + EOT)["correct"] and q.value == a.age + 3
    assert not gold_parts(q.prompt, f" In 3 years the {a.name} will be {a.age} years old.{EOT}")["correct"]


def test_refuses_prompts_that_are_not_built_in_questions():
    with pytest.raises(ValueError, match="not a built-in question"):
        gold_parts("Human: Tell me a joke.\n\nAssistant:", " No.")


def test_eval_set_is_fixed_and_balanced():
    qs = eval_questions()
    assert qs == eval_questions() and len(qs) == len({q.text for q in qs}) == 600
    assert {q.kind for q in qs} == set(KINDS)
