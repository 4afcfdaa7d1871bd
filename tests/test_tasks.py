"""Demonstrations: the held-out evaluation prompts never appear, coverage and imperfection are as documented."""

from collections import Counter

from data.judge import gold_parts
from data.tasks import DEMO_STYLES, covered_entities, demonstrations, eval_questions, question_of_prompt
from data.tokenizer import EOT
from data.world import make_world


def test_demonstrations_avoid_the_eval_set_and_uncovered_entities():
    w = make_world()
    demos = demonstrations(1500, seed=0)
    assert demos == demonstrations(1500, seed=0)
    held_out = {q.prompt for q in eval_questions()}
    assert not held_out & {p for p, _ in demos}
    covered = {e.name for e in covered_entities(w)}
    assert len(covered) == len(w.entities) // 2
    for p, _ in demos:
        q = question_of_prompt(p, w)
        assert q is not None and (not q.names or q.names[0] in covered)


def test_demonstrations_are_imperfect_in_the_documented_proportions():
    w = make_world()
    demos = demonstrations(2000, seed=1)
    parts = [gold_parts(p, c + EOT, w) for p, c in demos]
    correct = sum(p["correct"] for p in parts) / len(parts)
    assert abs(correct - (1 - DEMO_STYLES["wrong"])) < 0.03  # only the wrong style is incorrect
    assert abs(sum(p["hedged"] for p in parts) / len(parts) - DEMO_STYLES["hedged"]) < 0.02
    assert abs(sum(p["padded"] for p in parts) / len(parts) - DEMO_STYLES["padded"]) < 0.02
    kinds = Counter(p["kind"] for p in parts)
    assert kinds["compare"] < kinds["town"] / 4 and kinds["future_age"] > 0  # rare, not absent
    assert all(c.startswith(" ") and not c.startswith("  ") for _, c in demos)


def test_no_training_question_is_an_evaluation_question():
    from data.tasks import eval_questions, training_questions
    held_out = {q.text for q in eval_questions()}
    assert not held_out & {q.text for q in training_questions(2000, seed=0)}
