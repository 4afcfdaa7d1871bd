import json
import math
from pathlib import Path

import pytest
import torch

import eval as evaluation
from common import UserError
from data.tasks import eval_questions
from data.tokenizer import get_tokenizer
from model import GPT, GPTConfig


def test_response_kl_sums_each_responses_own_positions():
    """eval's KL, batched and left-padded, against each row alone (no padding) in float64:
    sum over the response tokens of sum_v p log(p / q), p and q the two models' next-token softmax."""
    torch.manual_seed(0)
    tok = get_tokenizer("builtin")
    cfg = GPTConfig(block_size=48, vocab_size=tok.n_vocab, n_layer=1, n_head=2, n_embd=16)
    model, ref = GPT(cfg).eval(), GPT(cfg).eval()
    prompts = ["Human: What does the suho eat?\n\nAssistant:", "", "Human: Hi.\n\nAssistant:"]
    responses = [[5, 9, tok.eot_id], [7], [3, 4, 5, 6, 8, 2]]  # ragged, so that rows pad differently
    got = evaluation.response_kl(model, ref, tok, prompts, responses)
    for p, r, kl in zip(prompts, responses, got):
        ids = torch.tensor([tok.encode_prompt(p) + r])
        with torch.no_grad():
            logp, logq = (m(ids)[0][0, -len(r) - 1:-1].double().log_softmax(-1) for m in (model, ref))
        want = (logp.exp() * (logp - logq)).sum().item()
        assert abs(kl - want) < 1e-5 * max(1.0, want), (kl, want)
    assert min(got) > 0  # two different random models


def test_best_of_n_keeps_the_reward_models_favourite_of_the_first_n(monkeypatch):
    """Three prompts, four samples each, with rewards set by hand: best-of-n must keep, for each
    prompt, the best scored of its first n samples, and report that sample's reward and gold."""
    tok = get_tokenizer("builtin")
    questions = eval_questions()[:3]
    rewards = [[0.1, 0.5, -1.0, 2.0], [3.0, 0.0, 0.0, 4.0], [-1.0, -2.0, 1.0, 0.5]]
    words = ["zero", "one", "two", "three"]  # sample j of each prompt answers " <words[j]>"
    monkeypatch.setattr(evaluation, "complete_ids", lambda policy, tok, prompts, *a, **k:
                        [tok.encode(" " + words[j % 4]) for j in range(len(prompts))])
    monkeypatch.setattr(evaluation, "reward_scores", lambda rm, tok, prompts, responses, norm, cut:
                        [r for row in rewards for r in row])
    kept = []
    real = evaluation.summarize
    monkeypatch.setattr(evaluation, "summarize", lambda qs, texts, k: kept.append(texts) or real(qs, texts, k))
    cfg = evaluation.Config(best_of_temperature=1.0, max_new_tokens=4)
    curve = evaluation.best_of_n(GPT(GPTConfig(vocab_size=tok.n_vocab, n_layer=1, n_head=1, n_embd=8)), tok,
                                 [q.prompt for q in questions], cfg, (None, {}), [1, 2, 4], questions)
    assert kept == [[" zero", " zero", " zero"], [" one", " zero", " zero"], [" three", " three", " two"]]
    assert list(curve) == ["1", "2", "4"]
    assert [curve[n]["rm"] for n in curve] == pytest.approx([(0.1 + 3.0 - 1.0) / 3, (0.5 + 3.0 - 1.0) / 3, (2.0 + 4.0 + 1.0) / 3])
    assert [curve[n]["kl_bound"] for n in curve] == pytest.approx([0.0, math.log(2) - 1 / 2, math.log(4) - 3 / 4])
    assert curve["4"]["gold"] == real(questions, kept[2])["gold"]


def test_report_holds_the_reward_models_accuracy_and_the_best_of_n_curve(tiny_chain, tmp_path):
    out = tmp_path / "eval"
    evaluation.main(evaluation.Config(checkpoints=tiny_chain["sft"], reward=tiny_chain["rm"], reference=tiny_chain["sft"],
                                      n_prompts=8, max_new_tokens=8, best_of="1,2", out_dir=str(out), device="cpu"))
    report = json.loads((out / "report.json").read_text())
    metrics = json.loads((Path(tiny_chain["rm"]) / "config.json").read_text())["metrics"]
    assert report["rm"] == {"accuracy": metrics["val_accuracy"], "bayes_accuracy": metrics["bayes_accuracy"],
                            "accuracy_over_bayes": metrics["accuracy_over_bayes"], "pairs": metrics["val_pairs"]}
    assert list(report["best_of_n"]) == ["1", "2"]
    assert report["best_of_n"]["2"]["rm"] >= report["best_of_n"]["1"]["rm"]  # the best of two includes the first
    assert isinstance(report["stages"]["sft"]["rm"], float) and isinstance(report["best_of_n"]["2"]["length"], float)
    assert f"held-out accuracy {metrics['val_accuracy']:.3f}" in (out / "report.md").read_text()


@pytest.mark.parametrize("best_of", ["1,x", "0,4", "4,", "\u00b2"])
def test_a_bad_best_of_is_refused_in_one_line(best_of, tiny_chain, tmp_path):
    with pytest.raises(UserError, match=f"--best_of must be positive integers separated by commas, not '{best_of}'"):
        evaluation.main(evaluation.Config(checkpoints=tiny_chain["sft"], reward=tiny_chain["rm"], reference=tiny_chain["sft"],
                                          n_prompts=2, max_new_tokens=4, best_of=best_of, out_dir=str(tmp_path / "e"), device="cpu"))


def test_paired_difference_by_hand():
    rows = [("a", {"gold_scores": [1.0, 0.0, 1.0]}), ("ref", {"gold_scores": [0.0, 0.0, 0.5]})]
    evaluation.paired_difference(rows, "ref")
    a, ref = rows[0][1], rows[1][1]
    # differences 1, 0, 0.5: mean 0.5, sample variance 0.25, standard error sqrt(0.25 / 3)
    assert a["gold_vs_reference"] == pytest.approx(0.5) and a["gold_vs_reference_se"] == pytest.approx(math.sqrt(0.25 / 3))
    assert ref["gold_vs_reference"] == 0 and ref["gold_vs_reference_se"] == 0


def test_reward_scores_apply_the_normalisation(tiny_chain):
    from model import load_checkpoint
    tok = get_tokenizer("builtin")
    rm = load_checkpoint(tiny_chain["rm"], head="scalar")[0].eval()
    prompts = [q.prompt for q in eval_questions()[:3]]
    responses = [tok.encode(" It lives in Velmor.") + [tok.eot_id], tok.encode(" Blue."), [tok.eot_id]]
    raw = evaluation.reward_scores(rm, tok, prompts, responses)
    scaled = evaluation.reward_scores(rm, tok, prompts, responses, {"gain": 2.0, "bias": -1.0})
    assert scaled == pytest.approx([2 * r - 1 for r in raw]) and len(set(raw)) == 3


def test_summarize_counts_words_and_coverage_by_hand():
    from data.tasks import covered_entities
    from data.world import default_world
    covered = {e.name for e in covered_entities(default_world())}
    mixed = next(q for q in eval_questions() if len(q.names) == 2 and len(set(q.names) & covered) == 1)
    single = next(q for q in eval_questions() if len(q.names) == 1)
    s = evaluation.summarize([mixed, single], [" one two three", " one two three four five"])
    assert s["words"] == 4  # the mean over responses
    inside = "covered" if single.names[0] in covered else "uncovered"
    assert s["n_by_coverage"] == {"covered": inside == "covered", "uncovered": inside == "uncovered"}  # the mixed one in neither


def test_several_samples_a_prompt_average_into_its_gold_score():
    """k responses per question: a question's gold score is the mean of its k, the standard error is over
    the questions (their number, not the responses', is the sample size), and the rates count every response."""
    from data.tasks import answer
    from data.tokenizer import EOT
    from data.world import default_world
    questions = eval_questions()[:3]
    right = [f" {answer(q, default_world())}{EOT}" for q in questions]
    texts = [right[0], " I am not sure.", right[1], right[1], " Why do you ask?", " 42." + EOT]  # question i: texts 2i, 2i + 1
    alone = [evaluation.summarize([q], [t]) for q, t in zip([q for q in questions for _ in range(2)], texts)]
    s = evaluation.summarize(questions, texts, k=2)
    means = [(alone[2 * i]["gold"] + alone[2 * i + 1]["gold"]) / 2 for i in range(3)]
    assert len(set(means)) == 3 and alone[0]["gold"] != alone[1]["gold"]  # the case tells the two ways apart
    assert s["gold_scores"] == pytest.approx(means) and s["gold"] == pytest.approx(sum(means) / 3)
    sd = (sum((m - sum(means) / 3) ** 2 for m in means) / 2) ** 0.5
    assert s["gold_se"] == pytest.approx(sd / 3 ** 0.5)  # over 3 questions, not 6 responses
    assert s["accuracy"] == pytest.approx(sum(a["accuracy"] for a in alone) / 6) == pytest.approx(3 / 6)
    assert s["eos_rate"] == pytest.approx(4 / 6)
    assert s["samples"] == [{"prompt": q.prompt, "response": texts[2 * i]} for i, q in enumerate(questions)]
    assert s["samples_per_prompt"] == 2
    assert sum(s["n_by_coverage"].values()) == sum(sum(a["n_by_coverage"].values()) for a in alone[::2])  # questions, not responses


def test_sampling_draws_samples_responses_per_prompt_and_greedy_one(monkeypatch):
    tok = get_tokenizer("builtin")
    seen = []
    monkeypatch.setattr(evaluation, "complete_ids", lambda model, tok, prompts, n, **kw:
                        seen.append((list(prompts), kw["temperature"])) or [tok.encode(" Blue.") + [tok.eot_id]] * len(prompts))
    model = GPT(GPTConfig(vocab_size=tok.n_vocab, n_layer=1, n_head=1, n_embd=8))
    questions = eval_questions()[:3]
    prompts = [q.prompt for q in questions]
    r = evaluation.evaluate(model, tok, prompts, evaluation.Config(temperature=0.7, samples=3), questions=questions)
    assert seen[0] == ([q.prompt for q in questions for _ in range(3)], 0.7)
    assert r["samples_per_prompt"] == 3 and len(r["gold_scores"]) == 3 and r["length"] == len(tok.encode(" Blue.")) + 1
    evaluation.evaluate(model, tok, prompts, evaluation.Config(temperature=0.0, samples=3), questions=questions)
    assert seen[1] == ([q.prompt for q in questions], 0.0)  # greedy: one answer per prompt


def test_report_names_are_directory_names_unless_two_share_one():
    assert evaluation.report_names(["out/base", "out/sft", "out/ppo/", "out/dpo"]) == ["base", "sft", "ppo", "dpo"]
    assert evaluation.report_names(["out/sft", "out/ppo", "runs/a/sft/"]) == ["out/sft", "ppo", "runs/a/sft"]


@pytest.mark.parametrize("args, message", [
    (dict(checkpoints="{sft},{sft}/"), "--checkpoints names a checkpoint twice"),
    (dict(samples=0), "--samples must be at least 1, got 0"),
    (dict(temperature=-1.0), r"--temperature must be 0 \(greedy\) or more, got -1.0"),  # it sampled softmax(-logits)
    (dict(best_of_temperature=0.0), "--best_of_temperature must be positive, got 0.0"),
    (dict(checkpoints="{sft},{rm}"), "{rm} has a scalar head, but a lm head is needed here"),  # before evaluating {sft}
    (dict(out_dir="{file}"), "--out_dir {file}: cannot make a directory there for report.json and report.md"),
    (dict(out_dir="{file}/eval"), "--out_dir {file}/eval: cannot make a directory there"),
])
def test_bad_eval_arguments_are_refused_before_any_work(args, message, tiny_chain, tmp_path, monkeypatch):
    (tmp_path / "taken").write_text("not a directory")
    names = dict(sft=tiny_chain["sft"], rm=tiny_chain["rm"], file=str(tmp_path / "taken"))
    args = {"checkpoints": tiny_chain["sft"], "out_dir": str(tmp_path / "e"), **{k: v.format(**names) if isinstance(v, str) else v
                                                                                  for k, v in args.items()}}
    evaluated = []
    monkeypatch.setattr(evaluation, "evaluate", lambda *a, **k: evaluated.append(1))  # must never be reached
    with pytest.raises(UserError, match=message.format(**names)):
        evaluation.main(evaluation.Config(reward="", reference="", n_prompts=2, device="cpu", **args))
    assert not evaluated
    assert (tmp_path / "taken").read_text() == "not a directory"


def test_the_default_evaluates_every_language_model_under_out_in_stage_order(tiny_chain, tmp_path, monkeypatch):
    import shutil
    out = tmp_path / "out"
    for src, name in (("sft", "a_sft"), ("base", "z_base"), ("rm", "rm"), ("sft", "sft.old"), ("sft", "sft.tmp123")):
        shutil.copytree(tiny_chain[src], out / name)
    (out / "eval").mkdir()  # a report directory, no checkpoint
    (out / "notes.txt").write_text("not a checkpoint")
    monkeypatch.chdir(tmp_path)
    assert evaluation.found_checkpoints() == [str(out.relative_to(tmp_path) / n) for n in ("z_base", "a_sft")]
    evaluation.main(evaluation.Config(reward="", reference="", n_prompts=2, max_new_tokens=4, best_of="", device="cpu"))
    report = json.loads((out / "eval" / "report.json").read_text())
    assert list(report["stages"]) == ["z_base", "a_sft"] and report["stages"]["a_sft"]["stage"] == "sft"


def test_sampled_evaluation_scores_and_measures_every_sample(tiny_chain, tmp_path, monkeypatch):
    """main at temperature 1 with 2 samples a prompt: rm and kl are the means over every (prompt, sample),
    each scored against its own prompt (checked one by one), and the report says how it sampled."""
    from model import load_checkpoint
    tok = get_tokenizer("builtin")
    texts = [" It is blue.", " Seeds.", " I do not know.", " It lives in Pellow.", " 4 plus 1 is 5.", " Why?"]
    drawn = []

    def complete(model, tok, prompts, n, **kw):  # distinct responses, so a misaligned prompt would show
        drawn.append(list(prompts))
        return [tok.encode(texts[i % len(texts)]) + [tok.eot_id] for i in range(len(prompts))]
    monkeypatch.setattr(evaluation, "complete_ids", complete)
    out = tmp_path / "eval"
    evaluation.main(evaluation.Config(checkpoints=tiny_chain["base"], reward=tiny_chain["rm"], reference=tiny_chain["sft"],
                                      n_prompts=3, temperature=1.0, samples=2, max_new_tokens=8, best_of="", out_dir=str(out),
                                      device="cpu"))  # prompts of up to 29 tokens + 8 fit the context of 64 whole
    r = json.loads((out / "report.json").read_text())["stages"]["base"]
    prompts = [q.prompt for q in eval_questions()[:3] for _ in range(2)]
    assert drawn == [prompts] and r["samples_per_prompt"] == 2
    responses = complete(None, tok, prompts, 0)
    rm = load_checkpoint(tiny_chain["rm"], head="scalar")
    rewards = [evaluation.reward_scores(rm[0].eval(), tok, [p], [x], rm[1]["reward_norm"])[0] for p, x in zip(prompts, responses)]
    base, ref = (load_checkpoint(tiny_chain[n], head="lm")[0].eval() for n in ("base", "sft"))
    kls = [evaluation.response_kl(base, ref, tok, [p], [x])[0] for p, x in zip(prompts, responses)]
    assert r["rm"] == pytest.approx(sum(rewards) / 6, abs=1e-5) and r["kl"] == pytest.approx(sum(kls) / 6, rel=1e-5)
    assert r["length"] == pytest.approx(sum(map(len, responses)) / 6)
    assert "2 samples per prompt at temperature 1.0" in (out / "report.md").read_text()


def test_a_checkpoint_with_another_tokenizer_is_refused_when_named_and_left_out_when_found(tiny_chain, tmp_path,
                                                                                          monkeypatch, capsys):
    """Named in --checkpoints: a one-line error before any evaluation. Found under out/ (a GPT-2 run beside
    the built-in chain): left out, and said so."""
    import shutil
    import types
    for src, name in (("sft", "a_sft"), ("base", "z_other")):
        shutil.copytree(tiny_chain[src], tmp_path / "out" / name)
    real = evaluation.tokenizer_for
    monkeypatch.setattr(evaluation, "tokenizer_for", lambda info, path: types.SimpleNamespace(fingerprint="another")
                        if "z_other" in str(path) else real(info, path))
    monkeypatch.chdir(tmp_path)
    args = dict(reward="", reference="out/a_sft", n_prompts=2, max_new_tokens=4, best_of="", device="cpu")
    with pytest.raises(UserError, match="out/a_sft and out/z_other were trained with different tokenizers"):
        evaluation.main(evaluation.Config(checkpoints="out/a_sft,out/z_other", **args))
    assert not (tmp_path / "out" / "eval" / "report.json").exists()
    evaluation.main(evaluation.Config(**args))
    assert list(json.loads((tmp_path / "out" / "eval" / "report.json").read_text())["stages"]) == ["a_sft"]
    assert "left out, trained with another tokenizer than out/a_sft: out/z_other" in capsys.readouterr().out


def test_paired_reward_difference_and_win_rate_by_hand():
    """A row of two samples a prompt against a greedy reference (one a prompt): a prompt's win rate is
    the share of (sample, reference sample) pairs the row's sample wins, a tie counting half."""
    rows = [("a", {"rm_scores": [1.0, 0.0, 2.0, 2.0, 3.0, 1.0 + 3e-7], "samples_per_prompt": 2}),  # 1 + 3e-7: the
            # reference's response scored again in another batch, whose padding moves it by float noise
            ("out/ref/", {"rm_scores": [0.5, 1.0, 1.0], "samples_per_prompt": 1}),
            ("b", {"rm_scores": [1.0, 2.0, 0.0, 0.0, 5.0, -5.0], "samples_per_prompt": 2})]
    evaluation.paired_difference(rows, "out/ref")  # the same directory, spelt without the slash
    a, ref, b = (r for _, r in rows)
    # prompt by prompt: wins 1 of 2, 2 of 2, 1.5 of 2 (3 > 1, a tie); score differences 0.5 - 0.5, 2 - 1, 2 - 1
    assert a["win_rate"] == pytest.approx(0.75) and a["win_rate_se"] == pytest.approx(math.sqrt(0.0625 / 3))
    assert a["rm_vs_reference"] == pytest.approx(2 / 3) and a["rm_vs_reference_se"] == pytest.approx(1 / 3)
    assert ref["win_rate"] == 0.5 and ref["win_rate_se"] == 0 and ref["rm_vs_reference"] == 0
    # b: wins 2 of 2, 0 of 2, 1 of 2 (5 > 1 > -5); differences 1.5 - 0.5, 0 - 1, 0 - 1: it wins half, by less on average
    assert b["win_rate"] == pytest.approx((1 + 0 + 0.5) / 3) and b["rm_vs_reference"] == pytest.approx((1 - 1 - 1) / 3)
    assert "gold_vs_reference" not in a  # no gold scores, no gold difference
    rows = [("ref", {"rm_scores": [1.0, 2.0, 7.0, 7.0], "samples_per_prompt": 2})]
    evaluation.paired_difference(rows, "ref")  # sampled, against itself: every pair and its mirror, so one half
    assert rows[0][1]["win_rate"] == 0.5 and rows[0][1]["rm_vs_reference"] == 0


def test_the_reward_models_standard_error_is_over_prompts():
    result = {"samples_per_prompt": 2}
    evaluation.add_rm(result, [1.0, 3.0, 0.0, 0.0, 5.0, 7.0])  # prompts' means 2, 0, 6: sample variance 28 / 3
    assert result["rm"] == pytest.approx(16 / 6) and result["rm_se"] == pytest.approx(math.sqrt(28 / 3 / 3))


def test_prompts_of_a_file_are_judged_by_the_reward_model(tiny_chain, tmp_path, monkeypatch):
    """--data: the file's distinct prompts, a long one cut from the left as the policy read it; each
    response scored by the reward model on exactly what the policy read (checked one sequence at a time,
    unpadded), though the reward model's context is longer; the reference wins half against itself; no
    gold anywhere; best-of-n scored the same way."""
    from dataclasses import asdict
    from model import load_checkpoint, save_checkpoint
    from reward import rewards
    tok = get_tokenizer("builtin")
    rm, info = load_checkpoint(tiny_chain["rm"], head="scalar")  # the same reward model with a context of 96, not 64
    rm96 = GPT(GPTConfig(**{**asdict(rm.config), "block_size": 96})).eval()
    state = rm.state_dict()
    rm96.load_state_dict({**state, "transformer.wpe.weight": torch.cat([state["transformer.wpe.weight"], torch.zeros(32, 32)])})
    save_checkpoint(tmp_path / "rm96", rm96, {k: v for k, v in info.items() if k != "model"})
    long = "Human: " + " ".join(["Where does the suho live and what does it eat?"] * 12) + "\n\nAssistant:"
    assert len(tok.encode_prompt(long)) > 64  # longer than the whole context
    prompts = ["Human: What color is the gomi?\n\nAssistant:", long, "Human: Hi!\n\nAssistant:"]
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in [prompts[0], prompts[1], prompts[0], prompts[2]]))
    calls = []
    real = evaluation.complete_ids
    monkeypatch.setattr(evaluation, "complete_ids", lambda model, tok, ps, n, **kw: calls.append((ps, n, kw)) or
                        calls[-1][2].setdefault("out", real(model, tok, ps, n, **kw)))
    out = tmp_path / "eval"
    evaluation.main(evaluation.Config(data=str(data), checkpoints=f"{tiny_chain['base']},{tiny_chain['sft']}", reward=str(tmp_path / "rm96"),
                                      reference=tiny_chain["sft"], n_prompts=700, max_new_tokens=8, best_of="1,2",
                                      out_dir=str(out), device="cpu"))
    report = json.loads((out / "report.json").read_text())
    assert report["n_prompts"] == 3 and calls[0][0] == prompts and all(kw["leave_room"] for _, _, kw in calls)
    base, sft = report["stages"]["base"], report["stages"]["sft"]
    assert not any(k.startswith("gold") for k in base) and sft["win_rate"] == 0.5 and sft["rm_vs_reference"] == 0
    norm = info["reward_norm"]

    def score(p, r):  # alone, unpadded, on the prompt cut to leave the policy's 8 new tokens of its 64
        return norm["gain"] * rewards(rm96, [tok.encode_prompt(p)[-(64 - 8):] + r], tok.pad_id, "cpu").item() + norm["bias"]
    for stage, (_, _, kw) in zip((base, sft), calls):
        responses = kw["out"]
        want = [score(p, r) for p, r in zip(prompts, responses)]
        assert stage["rm_scores"] == pytest.approx(want, abs=1e-5) and stage["rm"] == pytest.approx(sum(want) / 3, abs=1e-5)
        assert stage["eos_rate"] == sum(bool(r) and r[-1] == tok.eot_id for r in responses) / 3
        assert stage["length"] == sum(map(len, responses)) / 3 and stage["samples"][1]["prompt"] == long
    wins = [0.5 if x == y else float(a > b)  # the same response is a tie, whatever its batch
            for a, b, x, y in zip(base["rm_scores"], sft["rm_scores"], calls[0][2]["out"], calls[1][2]["out"])]
    assert base["win_rate"] == pytest.approx(sum(wins) / 3) and base["kl"] > 0
    best, samples = report["best_of_n"], calls[2][2]["out"]  # 2 samples a prompt; best-of-1 keeps the first
    assert calls[2][0] == [p for p in prompts for _ in range(2)]
    assert best["1"]["rm_scores"] == pytest.approx([score(p, samples[2 * i]) for i, p in enumerate(prompts)], abs=1e-5)
    assert list(best) == ["1", "2"] and best["2"]["rm"] >= best["1"]["rm"] and "gold" not in best["2"]
    assert 0 <= best["2"]["win_rate"] <= 1
    md = (out / "report.md").read_text()
    assert f"3 prompts of {data}" in md and "| win rate |" in md and "Judged by the reward model" in md


@pytest.mark.parametrize("args, message", [
    (dict(n_prompts=0), "--n_prompts must be at least 1, got 0"),
    (dict(n_prompts=601), "--n_prompts: the built-in task has 600 held-out prompts, got 601"),
    (dict(max_new_tokens=0), "--max_new_tokens must be at least 1, got 0"),
    (dict(data="{missing}"), "{missing}"),
    (dict(reward="{short}", data="{prompts}"), "{short} has a context of 32 tokens, shorter than {sft}'s 64"),
    (dict(reference="{short_lm}"), "{short_lm} has a context of 32 tokens, shorter than {sft}'s 64"),
    (dict(checkpoints="{short_lm}", reference="{sft}", reward="{short}", best_of="2", data="{prompts}"),
     "{short} has a context of 32 tokens, shorter than {sft}'s 64"),  # best-of-n samples the reference
    (dict(data="{prompts}"), r"--data needs a reward model to judge its prompts, which no gold judge knows: --reward \(empty\)"),
    (dict(data="{prompts}", reward="{missing}"), "--data needs a reward model .* --reward {missing} is not a checkpoint directory"),
])
def test_bad_eval_inputs_are_refused_in_one_line(args, message, tiny_chain, tmp_path):
    from dataclasses import asdict
    from model import load_checkpoint, save_checkpoint
    rm, info = load_checkpoint(tiny_chain["rm"], head="scalar")
    save_checkpoint(tmp_path / "short", GPT(GPTConfig(**{**asdict(rm.config), "block_size": 32})),
                    {k: v for k, v in info.items() if k != "model"})
    save_checkpoint(tmp_path / "short_lm", GPT(GPTConfig(**{**asdict(rm.config), "block_size": 32, "head": "lm"})),
                    {k: v for k, v in info.items() if k != "model"})
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "Human: Hi?\n\nAssistant:"}) + "\n")
    names = dict(sft=tiny_chain["sft"], short=str(tmp_path / "short"), short_lm=str(tmp_path / "short_lm"), missing=str(tmp_path / "none.jsonl"),
                 prompts=str(tmp_path / "p.jsonl"))
    args = {"reward": "", "reference": "", **{k: v.format(**names) if isinstance(v, str) else v for k, v in args.items()}}
    with pytest.raises(UserError, match=message.format(**names)):
        evaluation.main(evaluation.Config(**{"checkpoints": tiny_chain["sft"], "out_dir": str(tmp_path / "e"), "best_of": "",
                                             "device": "cpu", **args}))
    assert not (tmp_path / "e").exists()


def test_what_is_left_out_of_the_table_is_said(tiny_chain, tmp_path, capsys):
    """A reference that is not evaluated leaves the vs ref column empty, and a reward model that is not
    there the rm column: each said in a line, not left for the reader to puzzle over."""
    evaluation.main(evaluation.Config(checkpoints=tiny_chain["base"], reward=str(tmp_path / "no_rm"), reference=tiny_chain["sft"],
                                      n_prompts=2, max_new_tokens=4, best_of="1", out_dir=str(tmp_path / "e"), device="cpu"))
    out = capsys.readouterr().out
    assert f"no checkpoint at --reward {tmp_path / 'no_rm'}: no rm column, no best-of-n" in out
    assert f"the reference {tiny_chain['sft']} is not among the checkpoints evaluated: no vs ref column" in out
    r = json.loads((tmp_path / "e" / "report.json").read_text())
    assert "rm" not in r["stages"]["base"] and "gold_vs_reference" not in r["stages"]["base"] and r["stages"]["base"]["kl"] > 0
