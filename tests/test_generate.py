"""Using a trained model: ``seqpar.load`` (run, checkpoint or export), the Hugging Face
layout round trip (identical logits), sampling, streaming generation with the
recurrent/KV caches, the ``seqpar generate`` / ``seqpar export`` commands, and pure
bf16 / float64 inference for every mixer. Budget: ~20 s.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch

import seqpar
from conftest import flip_bytes, small_cfg, write_corpus
from seqpar import cli, hub
from seqpar.generate import TextStream, generate, sample
from seqpar.layers import MIXERS
from seqpar.models import HybridLM, ModelConfig
from seqpar.train import checkpoint as ckpt
from seqpar.train import run
from seqpar.train.data import ByteTokenizer

PATTERN = "gdn,attn"


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 4-step run with checkpoints at steps 2 and 4, and its corpus."""
    root = tmp_path_factory.mktemp("gen")
    data = write_corpus(root / "corpus.jsonl")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run(small_cfg(data, root / "run", PATTERN, steps=4, save_every=2))
    finally:
        torch.set_num_threads(n)
    return root / "run", data


def ids_of(tokenizer, text: str) -> torch.Tensor:
    return torch.as_tensor(tokenizer.encode(text), dtype=torch.int64)[None]


def test_load_run_checkpoint_and_weights(trained):
    out, _ = trained
    model, tok = seqpar.load(out)
    assert isinstance(model, HybridLM) and isinstance(tok, ByteTokenizer)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    same, _ = seqpar.load(ckpt.checkpoint_root(out) / "step_000004")
    older, _ = seqpar.load(ckpt.checkpoint_root(out) / "step_000002")
    x = ids_of(tok, "def seqpar(x):")
    assert torch.equal(model(x), same(x))
    assert not torch.equal(model(x), older(x)), "the newest checkpoint, not another"
    assert model.config.pattern == ("gdn", "attn") and model.config.d_model == 32


def test_load_passes_over_a_damaged_newest_checkpoint(trained, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained[0], out)
    flip_bytes(ckpt.checkpoint_root(out) / "step_000004" / "__0_0.distcp")
    with pytest.warns(UserWarning, match="step_000004 is damaged: __0_0.distcp: content differs"):
        model, tok = seqpar.load(out)
    ref, _ = seqpar.load(ckpt.checkpoint_root(out) / "step_000002")
    x = ids_of(tok, "import λ")
    assert torch.equal(model(x), ref(x))
    with pytest.raises(ValueError, match="a checkpoint that verifies"):
        seqpar.load(ckpt.checkpoint_root(out) / "step_000004")
    with pytest.raises(ValueError, match="source: expected a run directory"):
        seqpar.load(tmp_path / "nothing")


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_export_import_round_trip_gives_identical_logits(trained, tmp_path, dtype):
    out, _ = trained
    model, tok = seqpar.load(out, dtype=dtype)
    exported = hub.export(out, tmp_path / "hf", dtype=dtype)
    assert sorted(p.name for p in exported.iterdir()) == [
        "config.json", "model.safetensors", "special_tokens_map.json", "tokenizer.json",
        "tokenizer_config.json"]
    back, tok2 = seqpar.load(exported)
    x = ids_of(tok, "def f(x):\n    return x")
    assert next(back.parameters()).dtype == (dtype or torch.float32)
    assert torch.equal(model(x), back(x))
    for (name, p), (name2, p2) in zip(model.state_dict().items(), back.state_dict().items()):
        assert name == name2 and torch.equal(p, p2), name
    assert tok2.describe() == tok.describe()
    config = json.loads((exported / "config.json").read_text())
    assert config["model_type"] == "seqpar_hybrid" and config["hidden_size"] == 32
    assert config["seqpar_step"] == 4 and config["eos_token_id"] == 256
    with pytest.raises(ValueError, match="new or empty directory"):
        hub.export(out, exported)


def test_byte_tokenizer_file_encodes_like_the_byte_tokenizer():
    tokenizers = pytest.importorskip("tokenizers", reason="optional extra: pip install seqpar[tokenizers]")
    tok = tokenizers.Tokenizer.from_str(json.dumps(hub.byte_tokenizer_json()))
    ours = ByteTokenizer()
    text = "héllo wörld\n\tdef λ(x): return x  # ☃ \x1b[0m"
    assert tok.encode(text).ids == ours.encode(text).tolist()
    assert tok.decode(ours.encode(text).tolist()) == text
    assert tok.token_to_id("<|endoftext|>") == ours.eos_id and tok.get_vocab_size() == 257


def test_checkpoint_and_export_carry_a_tokenizers_file(tmp_path):
    tokenizers = pytest.importorskip("tokenizers", reason="optional extra: pip install seqpar[tokenizers]")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["def f(x): return seqpar(x)"] * 20, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["[UNK]", "<|endoftext|>"]))
    path = tmp_path / "tok.json"
    tok.save(str(path))
    data = write_corpus(tmp_path / "corpus.jsonl")
    out = tmp_path / "run"
    cfg = small_cfg(data, out, "gdn", steps=1, save_every=1)
    cfg.tokenizer = str(path)
    run(cfg)
    path.unlink()  # the checkpoint holds its own copy
    model, loaded = seqpar.load(out)
    assert loaded.describe()["name"].startswith("tokenizers:sha256:")
    exported = hub.export(out, tmp_path / "hf")
    back, tok2 = seqpar.load(exported)
    x = ids_of(loaded, "def f(x): return x")
    assert tok2.describe() == loaded.describe() and torch.equal(model(x), back(x))


def test_sample_respects_temperature_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    def draws(**kw):
        return {int(sample(logits, generator=g, **kw)) for _ in range(200)}

    assert draws(temperature=0) == {0}
    assert draws(top_k=1) == {0}
    assert draws(top_k=2) == {0, 1}
    assert draws(top_p=0.7) == {0, 1}, "0.5 + 0.3 reaches 0.7"
    assert draws(top_p=0.5) == {0}
    assert draws() == {0, 1, 2, 3}
    a = sample(logits.expand(8, 4), generator=torch.Generator().manual_seed(3))
    b = sample(logits.expand(8, 4), generator=torch.Generator().manual_seed(3))
    assert a.shape == (8, 1) and a.dtype == torch.int64 and torch.equal(a, b)


def test_text_stream_waits_for_whole_characters():
    stream = TextStream(ByteTokenizer())
    pieces = [stream.push(b) for b in "aé☃".encode()]
    assert pieces == ["a", "", "é", "", "", "☃"]
    assert stream.push(256) == "" and stream.flush() == ""


def test_generate_with_caches_equals_recomputing_everything(trained):
    """Greedy generation through prefill + one step per token gives the tokens that a full
    forward over the whole text picks at every position (float64: no near ties)."""
    model, tok = seqpar.load(trained[0], dtype=torch.float64)
    streamed = []
    out = generate(model, tok, "def ", max_new_tokens=12, temperature=0, stop_at_eos=False,
                   on_text=streamed.append)
    ids = ids_of(tok, "def ")
    for _ in range(12):
        ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], 1)
    assert out.tokens == ids[0, 4:].tolist()
    assert "".join(streamed) == out.text and out.prompt_tokens == 4
    assert out.tokens_per_s > 0
    again = generate(model, tok, "def ", max_new_tokens=12, temperature=1.0, top_p=0.9, seed=5)
    assert again.tokens == generate(model, tok, "def ", max_new_tokens=12, temperature=1.0,
                                    top_p=0.9, seed=5).tokens
    with pytest.raises(ValueError, match="prompt"):
        generate(model, tok, "", max_new_tokens=3)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, tok, "x", top_p=1.5)


def test_generate_and_export_commands(trained, tmp_path, capsys):
    out, _ = trained
    argv = ["generate", str(out), "--prompt", "def ", "--max-new-tokens", "8", "--seed", "0",
            "--top-k", "20", "--top-p", "0.95"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr()
    assert printed.out.startswith("def ") and "tokens/s" in printed.err and "step 4" in printed.err
    assert cli.main(["export", str(out), "--out", str(tmp_path / "hf")]) == 0
    capsys.readouterr()
    assert cli.main(["generate", str(tmp_path / "hf"), "--prompt", "def ", "--max-new-tokens",
                     "8", "--seed", "0", "--top-k", "20", "--top-p", "0.95"]) == 0
    assert capsys.readouterr().out == printed.out, "the export generates the same text"
    assert cli.main(["generate", str(out), "--prompt", "x", "--top-p", "0"]) == 2
    assert "top_p: expected" in capsys.readouterr().err
    assert cli.main(["generate", str(tmp_path / "none"), "--prompt", "x"]) == 2
    assert cli.main(["export", str(out), "--out", str(tmp_path / "hf")]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_every_mixer_runs_in_pure_bf16_and_float64():
    """``HybridLM(cfg).to(dtype)``: the forward runs in that dtype for every mixer (Hyena's
    filter MLP included) and, in float64, prefill + steps equal the forward."""
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=len(MIXERS), n_heads=2, head_dim=16,
                      pattern=",".join(MIXERS), chunk_size=16, max_seq_len=64)
    x = torch.randint(0, 64, (2, 20), generator=torch.Generator().manual_seed(0))
    for dtype in (torch.bfloat16, torch.float64):
        model = HybridLM(cfg).to(dtype).eval()
        with torch.no_grad():
            full = model(x)
            logits, caches = model.prefill(x[:, :12])
            steps = [logits]
            for i in range(12, 20):
                logits, caches = model.step(x[:, i:i + 1], caches)
                steps.append(logits)
        assert full.dtype == dtype and torch.isfinite(full).all()
        if dtype == torch.float64:
            err = (torch.cat(steps, 1) - full).norm() / full.norm()
            assert err < 1e-7, err

