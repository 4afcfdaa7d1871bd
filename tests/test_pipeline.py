"""The stages chained end to end on a minute-sized config: pretrain -> sft -> eval."""

import json

import pytest

import eval as evaluation
import ppo
import pretrain
import reward
import sft
from model import load_checkpoint

TINY_MODEL = dict(n_layer=1, n_head=2, n_embd=32, block_size=64)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "base"
    pretrain.main(pretrain.Config(out_dir=str(out), max_steps=40, n_docs=300, batch_size=8, warmup_steps=5,
                                  log_every=20, eval_every=40, eval_batches=1, device="cpu", **TINY_MODEL))
    return out


@pytest.fixture(scope="module")
def sft_ckpt(base):
    out = base.parent / "sft"
    sft.main(sft.Config(init=str(base), out_dir=str(out), n_demos=200, epochs=1, batch_size=16, log_every=5,
                        n_samples=2, device="cpu"))
    return out


def test_sft_writes_a_child_of_the_base(base, sft_ckpt):
    model, info = load_checkpoint(sft_ckpt, head="lm", tokenizer="builtin")
    assert info["stage"] == "sft" and info["parent"] == str(base)
    # 200 demonstrations, 4 of them dropped (their responses do not fit the tiny context of 64), and 10 held out:
    # those of 5% of the distinct prompts
    assert info["metrics"]["steps"] == round(186 / 16) and info["metrics"]["demonstrations"] == 186
    lines = (sft_ckpt / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["step"] == 0 and "val_loss" in json.loads(lines[-1])


def test_sft_on_a_jsonl_file(base, tmp_path):
    data = tmp_path / "demos.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Human: Say {w}.\n\nAssistant:", "completion": f" {w}."}) + "\n"
                            for w in ["yes", "no", "maybe", "hello", "goodbye"] * 4))
    out = tmp_path / "sft"
    sft.main(sft.Config(init=str(base), out_dir=str(out), data=str(data), epochs=3, batch_size=4, device="cpu"))
    assert load_checkpoint(out)[1]["args"]["data"] == str(data)


def test_eval_report_schema(base, sft_ckpt, tmp_path):
    """report.json in the form issue #3 set: {"stages": {"<name>": {"gold", "gold_se", "accuracy",
    "eos_rate", "length", ...}}, ...}, keyed by the checkpoint directory's name; report.md beside it."""
    out = tmp_path / "eval"
    evaluation.main(evaluation.Config(checkpoints=f"{base},{sft_ckpt}", reward="", reference=str(sft_ckpt),
                                      n_prompts=24, max_new_tokens=12, out_dir=str(out), device="cpu"))
    report = json.loads((out / "report.json").read_text())
    assert report["n_prompts"] == 24 and report["config"]["max_new_tokens"] == 12
    assert list(report["stages"]) == ["base", "sft"]
    assert [r["checkpoint"] for r in report["stages"].values()] == [str(base), str(sft_ckpt)]
    assert [r["stage"] for r in report["stages"].values()] == ["pretrain", "sft"]
    for r in report["stages"].values():
        for key in ("gold", "accuracy", "answered", "eos_rate", "length", "words", "hedged", "flattery", "padded"):
            assert isinstance(r[key], float)
        assert -1 <= r["gold"] <= 1 and r["gold_se"] >= 0 and r["samples_per_prompt"] == 1 and len(r["gold_scores"]) == 24
        assert 0 <= r["accuracy"] <= r["answered"] <= 1
        assert 1 <= r["length"] <= 12  # tokens, the EOS included
        assert set(r["accuracy_by_kind"]) == {"town", "food", "color", "age", "sum", "difference", "compare", "future_age"}
        assert set(r["accuracy_by_coverage"]) == {"covered", "uncovered"} and sum(r["n_by_coverage"].values()) <= 24
        assert r["kl"] >= 0 and "rm" not in r
        assert len(r["samples"]) == 8 and set(r["samples"][0]) == {"prompt", "response"}
    assert "rm" not in report and "best_of_n" not in report  # no reward model given
    base_r, sft_r = report["stages"].values()
    assert sft_r["kl"] < 1e-4  # the reference itself
    assert sft_r["gold_vs_reference"] == 0 and sft_r["gold_vs_reference_se"] == 0
    assert base_r["gold_vs_reference"] == pytest.approx(base_r["gold"] - sft_r["gold"])  # a paired mean is the difference of means
    diffs = [a - b for a, b in zip(base_r["gold_scores"], sft_r["gold_scores"])]
    sd = (sum((d - base_r["gold_vs_reference"]) ** 2 for d in diffs) / (len(diffs) - 1)) ** 0.5
    assert base_r["gold_vs_reference_se"] == pytest.approx(sd / len(diffs) ** 0.5)
    md = (out / "report.md").read_text().splitlines()
    table = [line for line in md if line.startswith(f"| {base} |") or line.startswith(f"| {sft_ckpt} |")]
    assert len(table) == 2 and f"{base_r['gold']:.3f}" in table[0] and f"{sft_r['accuracy']:.3f}" in table[1]
    assert "## base (" in "\n".join(md) and repr(sft_r["samples"][0]["response"]) in "\n".join(md)


@pytest.fixture(scope="module")
def rm_ckpt(sft_ckpt):
    out = sft_ckpt.parent / "rm"
    reward.main(reward.Config(init=str(sft_ckpt), out_dir=str(out), n_prompts=40, pairs_per_prompt=2, sft_samples=1,
                              norm_prompts=16, batch_size=8, log_every=2, device="cpu"))
    return out


def test_reward_model_is_normalised_and_reports_the_bayes_rate(rm_ckpt, sft_ckpt):
    model, info = load_checkpoint(rm_ckpt, head="scalar", tokenizer="builtin")
    assert info["stage"] == "reward" and info["parent"] == str(sft_ckpt)
    m = info["metrics"]
    assert 0.5 < m["bayes_accuracy"] <= 1 and 0 <= m["val_accuracy"] <= 1
    assert info["reward_norm"]["gain"] > 0 and set(m["by_kind"]) and m["train_pairs"] + m["val_pairs"] <= 80


def test_ppo_is_on_policy_at_the_first_minibatch_and_logs_every_diagnostic(sft_ckpt, rm_ckpt):
    out = sft_ckpt.parent / "ppo"
    ppo.main(ppo.Config(policy=str(sft_ckpt), reward=str(rm_ckpt), out_dir=str(out), iterations=3, rollout_batch=8,
                        minibatch_size=4, ppo_epochs=2, max_new_tokens=8, warmup_iterations=1, device="cpu"))
    _, info = load_checkpoint(out, head="lm", tokenizer="builtin")
    assert info["stage"] == "ppo" and info["parent"] == str(sft_ckpt)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    for r in rows:
        # a freshly sampled batch is on-policy: before the first update its ratio is exactly 1
        assert r["first_ratio"] == pytest.approx(1.0, abs=1e-5)
        for key in ("score", "non_score_reward", "kl", "kl_full", "entropy", "approx_kl", "clipfrac", "vf_loss",
                    "explained_variance", "ratio_mean", "ratio_max", "length", "eos_rate", "gold"):
            assert isinstance(r[key], float), key
        assert 1 <= r["length"] <= 8 and 0 <= r["eos_rate"] <= 1 and r["kl_full"] >= -1e-5
    assert rows[0]["kl"] == pytest.approx(0, abs=1e-4)  # the policy starts as the reference


def test_ppo_against_the_gold_judge_scores_rollouts_with_it(sft_ckpt, rm_ckpt):
    """--reward gold: each rollout's score is the judge's gold score, less the penalty for a missing EOS."""
    out = sft_ckpt.parent / "ppo_gold"
    ppo.main(ppo.Config(policy=str(sft_ckpt), reward="gold", value=str(rm_ckpt), out_dir=str(out), iterations=2,
                        rollout_batch=8, minibatch_size=4, ppo_epochs=1, max_new_tokens=8, warmup_iterations=1,
                        missing_eos_penalty=1.0, device="cpu"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and load_checkpoint(out, head="lm")[1]["reward"] == "gold"
    for r in rows:
        assert r["score"] == pytest.approx(r["gold"] - (1 - r["eos_rate"]), abs=1e-5)
        assert r["first_ratio"] == pytest.approx(1.0, abs=1e-5)


def test_ppo_refuses_a_reward_model_as_policy(sft_ckpt, rm_ckpt, tmp_path):
    with pytest.raises(Exception, match="has a scalar head, but a lm head is needed"):
        ppo.main(ppo.Config(policy=str(rm_ckpt), reward=str(rm_ckpt), out_dir=str(tmp_path / "x"), device="cpu"))
    assert not (tmp_path / "x").exists()
