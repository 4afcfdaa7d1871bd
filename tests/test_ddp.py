"""Data parallel on CPU: `torchrun --nproc_per_node=2` (gloo) trains as one process does with the
same global batch (the same losses and weights within float tolerance: only the order of the
gradient sums differs), and only rank 0 prints and writes."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import common
import dpo
import reward
import sft

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def torchrun(script, args, n=2):
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", script] + \
        [f"--{k}={v}" for k, v in args.items()]
    out = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def rows(path):
    return [json.loads(line) for line in open(os.path.join(path, "metrics.jsonl"))]


def assert_same_training(one, two, keys):
    for a, b in zip(rows(one), rows(two), strict=True):
        for k in keys:
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-5), (a["step"], k)
    # Adam divides by the root of the squared gradients, so where a gradient is nearly 0 a rounding
    # difference moves a weight by up to a step of lr (1e-4 to 1e-3 here): the weights agree to within one such step
    wa, wb = load_file(os.path.join(one, "model.safetensors")), load_file(os.path.join(two, "model.safetensors"))
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-3  # (measured: up to 1.05e-4 with two threads per process)


def test_sft_on_two_processes_matches_one(tiny_chain, tmp_path):
    args = dict(init=tiny_chain["base"], n_demos=200, epochs=1, batch_size=8, log_every=1, n_samples=1, device="cpu")
    sft.main(sft.Config(out_dir=str(tmp_path / "one"), **args))
    stdout = torchrun("sft.py", {**args, "out_dir": tmp_path / "two"})
    assert stdout.count("step 0 |") == 1  # rank 0 alone prints
    assert_same_training(tmp_path / "one", tmp_path / "two", ("loss", "val_loss", "lr"))
    assert sorted(os.listdir(tmp_path)) == ["one", "two"]


def test_dpo_on_two_processes_with_accumulation_matches_one(tiny_chain, tmp_path):
    """2 processes x 2 micro-batches of 2 pairs = the global batch of 8, as one process takes it at once."""
    args = dict(init=tiny_chain["sft"], n_prompts=20, pairs_per_prompt=2, sft_samples=1, batch_size=8, log_every=1,
                n_samples=1, device="cpu")
    dpo.main(dpo.Config(out_dir=str(tmp_path / "one"), **args))
    torchrun("dpo.py", {**args, "out_dir": tmp_path / "two", "micro_batch_size": 2})
    # not "accuracy": at step 0 the policy is the reference, and chosen > rejected compares rounding noise
    assert_same_training(tmp_path / "one", tmp_path / "two", ("loss", "margin", "chosen_reward", "logp_chosen"))
    # the held-out pairs, each process a share of them (the reference log-probs too): the same figures
    held_out = [[{k: r[k] for k in ("val_loss", "val_margin")} for r in rows(tmp_path / d) if "val_loss" in r] for d in ("one", "two")]
    assert len(held_out[0]) == 2 and held_out[1] == [{k: pytest.approx(v, rel=1e-4, abs=1e-5) for k, v in r.items()} for r in held_out[0]]


def test_reward_model_on_two_processes_matches_one(tiny_chain, tmp_path):
    """The reward model's training, and its held-out margins, each process scoring a share of the pairs."""
    args = dict(init=tiny_chain["sft"], n_prompts=20, pairs_per_prompt=2, sft_samples=1, val_fraction=0.3, batch_size=8,
                norm_prompts=8, log_every=1, eval_every=2, micro_batch_size=2, device="cpu")  # held-out passes of 2 pairs
    reward.main(reward.Config(out_dir=str(tmp_path / "one"), **args))
    torchrun("reward.py", {**args, "out_dir": tmp_path / "two"})
    assert_same_training(tmp_path / "one", tmp_path / "two", ("loss", "margin"))
    held_out = [[r["val_margin"] for r in rows(tmp_path / d) if "val_margin" in r] for d in ("one", "two")]
    assert len(held_out[0]) >= 2 and held_out[1] == pytest.approx(held_out[0], rel=1e-4, abs=1e-5)


def test_ppo_runs_two_iterations_on_two_processes(tiny_chain, tmp_path):
    args = dict(policy=tiny_chain["sft"], reward=tiny_chain["rm"], out_dir=tmp_path / "ppo", iterations=2, rollout_batch=8,
                minibatch_size=4, ppo_epochs=2, max_new_tokens=8, warmup_iterations=1, device="cpu", save_every=1)  # a resume save gathers both samplers
    stdout = torchrun("ppo.py", args)
    assert stdout.count("iteration 0 |") == 1
    logged = rows(tmp_path / "ppo")
    assert [r["iteration"] for r in logged] == [0, 1]
    for r in logged:
        assert r["first_ratio"] == pytest.approx(1.0, abs=1e-5) and r["skipped"] == 0 and 1 <= r["length"] <= 8
    assert logged[0]["kl"] == pytest.approx(0, abs=1e-4)
    info = json.loads((tmp_path / "ppo" / "config.json").read_text())
    assert info["stage"] == "ppo" and info["metrics"]["kl_coef"] == 0.2
    assert sorted(os.listdir(tmp_path)) == ["ppo"]


def _divergent(rank, world, port, path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        common.check_same_everywhere([10, 20], "the same numbers")  # passes
        common.check_same_everywhere([10 + rank, 20], "the built-in pairs")
    except common.UserError as e:
        with open(f"{path}.{rank}", "w") as f:
            f.write(str(e))
    finally:
        torch.distributed.destroy_process_group()


def test_data_that_differs_between_processes_stops_every_process(tmp_path):
    """Each process samples the built-in pairs for itself: if they came out different (nondeterministic
    GPU sampling), every process must stop with the same error, not wait on a collective forever."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_divergent, args=(2, port, str(tmp_path / "err")), nprocs=2)
    errors = [(tmp_path / f"err.{r}").read_text() for r in range(2)]
    assert errors[0] == errors[1] and errors[0].startswith("the built-in pairs differ between processes ([10.0, 20.0], [11.0, 20.0])")
