"""GPT-2 weights in Hugging Face's layout: loaded against a plain GPT-2 forward written here from that
layout, refused clearly when they do not fit, exported back tensor for tensor (and, where transformers
is installed, checked against GPT2LMHeadModel itself)."""

import json
import math
import runpy
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from model import GPT, CheckpointError, GPTConfig, export_hf, load_checkpoint, save_checkpoint

HF = dict(vocab_size=61, n_positions=24, n_embd=24, n_layer=2, n_head=3)


def hf_tensors(cfg, seed=0):
    """Random weights of a GPT-2 as GPT2Model names them: Conv1D matrices stored (in, out)."""
    g = torch.Generator().manual_seed(seed)
    C, V = cfg["n_embd"], cfg["vocab_size"]

    def r(*shape):
        return (torch.randn(*shape, generator=g) * 0.2).float()
    t = {"wte.weight": r(V, C), "wpe.weight": r(cfg["n_positions"], C), "ln_f.weight": 1 + r(C), "ln_f.bias": r(C)}
    for i in range(cfg["n_layer"]):
        p = f"h.{i}."
        t.update({p + "ln_1.weight": 1 + r(C), p + "ln_1.bias": r(C), p + "ln_2.weight": 1 + r(C), p + "ln_2.bias": r(C),
                  p + "attn.c_attn.weight": r(C, 3 * C), p + "attn.c_attn.bias": r(3 * C),
                  p + "attn.c_proj.weight": r(C, C), p + "attn.c_proj.bias": r(C),
                  p + "mlp.c_fc.weight": r(C, 4 * C), p + "mlp.c_fc.bias": r(4 * C),
                  p + "mlp.c_proj.weight": r(4 * C, C), p + "mlp.c_proj.bias": r(C)})
    return t


def write_hf_dir(path, cfg=HF, tensors=None, prefix="transformer.", buffers=True, lm_head=True, **config):
    """A directory as GPT2LMHeadModel.save_pretrained writes it (optionally with the old mask buffers
    and a saved copy of the tied lm_head)."""
    tensors = hf_tensors(cfg) if tensors is None else tensors
    state = {prefix + k: v for k, v in tensors.items()}
    if buffers:
        n = cfg["n_positions"]
        for i in range(cfg["n_layer"]):
            state[f"{prefix}h.{i}.attn.bias"] = torch.tril(torch.ones(n, n)).view(1, 1, n, n)
            state[f"{prefix}h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    if lm_head:
        state["lm_head.weight"] = tensors["wte.weight"].clone()
    path.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
                                                  "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
                                                  "resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1,
                                                  **cfg, **config}))
    return tensors


def gpt2_forward(t, cfg, ids):
    """GPT-2's forward pass from the HF tensors themselves, in float64: x @ W + b for every Conv1D."""
    t = {k: v.double() for k, v in t.items()}
    T, C, nh = ids.size(1), cfg["n_embd"], cfg["n_head"]
    x = t["wte.weight"][ids] + t["wpe.weight"][:T]

    def ln(x, name):
        mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
        return (x - mu) / torch.sqrt(var + 1e-5) * t[name + ".weight"] + t[name + ".bias"]

    def gelu_new(x):
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    mask = torch.tril(torch.ones(T, T, dtype=torch.bool))
    for i in range(cfg["n_layer"]):
        p = f"h.{i}."
        qkv = ln(x, p + "ln_1") @ t[p + "attn.c_attn.weight"] + t[p + "attn.c_attn.bias"]
        q, k, v = (z.view(*ids.shape, nh, C // nh).transpose(1, 2) for z in qkv.split(C, dim=-1))
        att = (q @ k.transpose(-1, -2) / math.sqrt(C // nh)).masked_fill(~mask, float("-inf")).softmax(-1)
        y = (att @ v).transpose(1, 2).reshape(*ids.shape, C)
        x = x + y @ t[p + "attn.c_proj.weight"] + t[p + "attn.c_proj.bias"]
        h = gelu_new(ln(x, p + "ln_2") @ t[p + "mlp.c_fc.weight"] + t[p + "mlp.c_fc.bias"])
        x = x + h @ t[p + "mlp.c_proj.weight"] + t[p + "mlp.c_proj.bias"]
    return ln(x, "ln_f") @ t["wte.weight"].T


IDS = torch.tensor([[5, 0, 60, 17, 17, 3, 42, 8, 1, 30, 59], [2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22]])


@pytest.mark.parametrize("prefix,buffers,lm_head", [("transformer.", True, True), ("", False, False)])
def test_loads_hf_layout_and_computes_gpt2(tmp_path, prefix, buffers, lm_head):
    tensors = write_hf_dir(tmp_path / "gpt2", prefix=prefix, buffers=buffers, lm_head=lm_head)
    model, info = GPT.from_pretrained(tmp_path / "gpt2")
    assert model.config == GPTConfig(block_size=24, vocab_size=61, n_layer=2, n_head=3, n_embd=24, dropout=0.0)
    assert info["tokenizer"] == "gpt2" and info["stage"] == "hf" and info["model"]["vocab_size"] == 61
    with torch.no_grad():
        logits, _ = model.double()(IDS)
    torch.testing.assert_close(logits, gpt2_forward(tensors, HF, IDS), rtol=1e-10, atol=1e-10)


def test_sharded_weights_under_an_older_config_load(tmp_path):
    """Weights split over the shards that model.safetensors.index.json lists (as save_pretrained
    writes a large model), under the config.json of an older transformers: no model_type, and the
    context length as n_ctx only."""
    d = tmp_path / "gpt2"
    tensors = write_hf_dir(d, buffers=False, lm_head=False)
    state = load_file(str(d / "model.safetensors"))
    (d / "model.safetensors").unlink()
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(d / file), metadata={"format": "pt"})
    weight_map = {k: file for file, keys in shards.items() for k in keys}
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = json.loads((d / "config.json").read_text())
    del config["model_type"]
    config["n_ctx"] = config.pop("n_positions")
    (d / "config.json").write_text(json.dumps(config))
    model, info = load_checkpoint(d)
    assert model.config == GPTConfig(block_size=24, vocab_size=61, n_layer=2, n_head=3, n_embd=24, dropout=0.0)
    assert info["tokenizer"] == "gpt2"
    with torch.no_grad():
        logits, _ = model.double()(IDS)
    torch.testing.assert_close(logits, gpt2_forward(tensors, HF, IDS), rtol=1e-10, atol=1e-10)
    # a shard the index names is missing, the index is not JSON, a field is null: refused by file
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model-00002-of-00002.safetensors cannot be read: "):
        load_checkpoint(d)
    (d / "model.safetensors.index.json").write_text("{oops")
    with pytest.raises(CheckpointError, match=r"gpt2/model.safetensors.index.json is not a safetensors index"):
        load_checkpoint(d)
    (d / "config.json").write_text(json.dumps({**config, "n_layer": None}))
    with pytest.raises(CheckpointError, match=r"gpt2/config.json is not a usable GPT-2 config: n_layer must be"):
        load_checkpoint(d)


def test_every_stage_loader_takes_a_hf_directory(tmp_path):
    write_hf_dir(tmp_path / "gpt2")
    model, info = load_checkpoint(tmp_path / "gpt2", head="lm", tokenizer="gpt2")
    assert model.config.head == "lm" and info["tokenizer"] == "gpt2"
    with pytest.raises(CheckpointError, match="has a lm head, but a scalar head is needed"):
        load_checkpoint(tmp_path / "gpt2", head="scalar")
    with pytest.raises(CheckpointError, match="trained with tokenizer 'gpt2', but this run uses 'builtin'"):
        load_checkpoint(tmp_path / "gpt2", tokenizer="builtin")


def test_bad_hf_directories_are_refused_by_file_and_key(tmp_path):
    d = tmp_path / "gpt2"
    tensors = hf_tensors(HF)
    bad = {**tensors, "h.1.mlp.c_fc.weight": tensors["h.1.mlp.c_fc.weight"].T.contiguous()}  # stored as nn.Linear
    write_hf_dir(d, tensors=bad)
    with pytest.raises(CheckpointError, match=r"gpt2/model.safetensors: transformer.h.1.mlp.c_fc.weight has shape "
                                              r"\(96, 24\), config.json implies \(24, 96\)"):
        load_checkpoint(d)
    write_hf_dir(d, tensors={k: v for k, v in tensors.items() if k != "h.0.ln_2.bias"})
    with pytest.raises(CheckpointError, match=r"gpt2: the weights have no tensor transformer.h.0.ln_2.bias"):
        load_checkpoint(d)
    write_hf_dir(d, n_layer=1)  # a 2-layer file under a 1-layer config
    with pytest.raises(CheckpointError, match=r"model.safetensors: unexpected tensor transformer.h.1.\S+ \(12 in all\)"):
        load_checkpoint(d)
    write_hf_dir(d, tensors=tensors, lm_head=False)
    state = load_file(str(d / "model.safetensors"))
    save_file({**state, "lm_head.weight": torch.zeros(61, 24)}, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match="lm_head.weight differs from wte.weight"):
        load_checkpoint(d)
    write_hf_dir(d, activation_function="relu")
    with pytest.raises(CheckpointError, match=r"config.json: activation_function 'relu' is not supported \(this GPT has gelu_new\)"):
        load_checkpoint(d)
    for field, value in [("tie_word_embeddings", False), ("n_inner", 100), ("layer_norm_epsilon", 1e-6),
                         ("scale_attn_by_inverse_layer_idx", True), ("scale_attn_weights", False),
                         ("add_cross_attention", True)]:  # every other variant this GPT does not compute
        write_hf_dir(d, **{field: value})
        with pytest.raises(CheckpointError, match=rf"config.json: {field} {value!r} is not supported"):
            load_checkpoint(d)
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"not loaded")
    write_hf_dir(tmp_path / "other")  # config.json only is left in d once the safetensors go
    (d / "config.json").write_text((tmp_path / "other" / "config.json").read_text())
    with pytest.raises(CheckpointError, match="pytorch_model.bin only, a pickle, which is never loaded"):
        load_checkpoint(d)


def test_export_writes_back_the_same_tensors_and_hf_config(tmp_path):
    tensors = write_hf_dir(tmp_path / "gpt2", buffers=False, lm_head=False)
    model, info = load_checkpoint(tmp_path / "gpt2")
    export_hf(model, tmp_path / "out", {"tokenizer": "gpt2"})
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert sorted(out) == sorted("transformer." + k for k in tensors)
    for k, v in tensors.items():
        assert out["transformer." + k].dtype == v.dtype and torch.equal(out["transformer." + k], v), k
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert {k: config[k] for k in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head")} == HF
    assert config["model_type"] == "gpt2" and config["architectures"] == ["GPT2LMHeadModel"]
    assert config["activation_function"] == "gelu_new" and config["tie_word_embeddings"] is True
    assert config["layer_norm_epsilon"] == 1e-5 and config["rlhf_tokenizer"] == "gpt2"
    assert config["eos_token_id"] == config["bos_token_id"] == 50256
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt2", "out"]  # no temporary directory left


def test_export_command_keeps_the_checkpoints_tokenizer(tmp_path, monkeypatch, capsys):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=50, n_layer=1, n_head=2, n_embd=16))
    save_checkpoint(tmp_path / "sft", model, {"tokenizer": "builtin", "tokenizer_fingerprint": "abc", "stage": "sft"})
    monkeypatch.setattr(sys, "argv", ["model", "export", str(tmp_path / "sft"), str(tmp_path / "hf")])
    runpy.run_module("model", run_name="__main__")
    assert "wrote" in capsys.readouterr().out
    back, info = load_checkpoint(tmp_path / "hf", head="lm")
    assert info["tokenizer"] == "builtin" and info["tokenizer_fingerprint"] == "abc"
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.state_dict().values()))
    scalar = GPT(GPTConfig(block_size=16, vocab_size=50, n_layer=1, n_head=2, n_embd=16, head="scalar"))
    with pytest.raises(CheckpointError, match="only a language model exports"):
        export_hf(scalar, tmp_path / "rm")
    # from Python without the tokenizer, the directory would read back as GPT-2's BPE: refused
    with pytest.raises(CheckpointError, match="a vocabulary of 50 is not GPT-2's: pass the checkpoint's tokenizer"):
        export_hf(model, tmp_path / "bare")
    assert not (tmp_path / "bare").exists()


def test_logits_match_transformers_gpt2(tmp_path):
    transformers = pytest.importorskip("transformers")
    write_hf_dir(tmp_path / "gpt2")
    model, _ = load_checkpoint(tmp_path / "gpt2")
    export_hf(model, tmp_path / "out", {"tokenizer": "gpt2"})
    for path in (tmp_path / "gpt2", tmp_path / "out"):
        hf = transformers.GPT2LMHeadModel.from_pretrained(path).eval()
        with torch.no_grad():
            torch.testing.assert_close(model.eval()(IDS)[0], hf(IDS).logits, rtol=1e-4, atol=1e-4)


def test_an_exported_builtin_model_stops_at_its_eos_in_transformers(tmp_path):
    """export_hf records the tokenizer's <|endoftext|> as eos_token_id: without it transformers took
    GPT-2's 50256, outside the builtin vocabulary, and its generate never stopped."""
    from data.tokenizer import get_tokenizer
    tok = get_tokenizer("builtin")
    model = GPT(GPTConfig(block_size=16, vocab_size=tok.n_vocab, n_layer=1, n_head=2, n_embd=16)).eval()
    with torch.no_grad():  # every position's logits peak at <|endoftext|>
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.fill_(1.0)
        model.transformer.wte.weight.zero_()
        model.transformer.wte.weight[tok.eot_id] = 1.0
    export_hf(model, tmp_path / "hf", tok.identity)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["eos_token_id"] == config["bos_token_id"] == tok.eot_id
    transformers = pytest.importorskip("transformers")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    prompt = torch.tensor([tok.encode("Human: Hi")])
    out = hf.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_id)
    assert out[0, prompt.size(1):].tolist() == [tok.eot_id]
