"""Hugging Face configurations the first fixtures of tests/test_hf.py do not cover, checked against Hugging Face's
own modules (fixtures made by scripts/make_hf_fixtures.py with torch + transformers; these tests need neither).

Fixtures (docs/model.md section 8): ``gpt2_scaling`` (``scale_attn_weights: false`` and
``scale_attn_by_inverse_layer_idx: true``, ``n_inner: null``, ``quick_gelu``, LayerNorm epsilon 0.5),
``gpt_neo_layers`` (config.json's ``attention_layers`` differs from ``attention_types``' expansion, window 2,
``relu``), ``albert_groups`` (3 layers in 2 hidden groups, ``mish``), ``distilbert_sinusoidal``; ``activations``:
``transformers.activations.ACT2FN`` on a grid.

Tolerances: the references are float32 (Hugging Face's float32 forward, torch 2.13 CPU). attnflow runs in float32
too: each attention module and block from Hugging Face's own input, 1e-5 (abs) + 1e-5 (rel) (measured at most 1e-6);
the layers chained from attnflow's own embedding against every entry of ``hidden_states``, 2e-5 + 1e-5 rel (measured
at most 1.4e-6; the error compounds over layers). Activations: float64 against Hugging Face's float64, 1e-9 (measured
at most 3e-10: gelu_fast's rounded constant, torch's softplus threshold in sqrtsoftplus). The fixtures' layers are
also checked the fast way (``stack.layer(l).step``, no ``lax.switch`` to compile); test_transformer.py runs whole
stacks through ``simulate``.
"""

import dataclasses
import json
import pathlib
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from attnflow import Heads, SelfAttention
from attnflow.io.hf import CheckpointError, load_hf
from attnflow.model import transformer as T

FIX = pathlib.Path(__file__).parent / "fixtures" / "hf"
NEW = ("gpt2_scaling", "gpt_neo_layers", "albert_groups", "distilbert_sinusoidal")


def _errs(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@pytest.mark.parametrize("family", NEW)
def test_attention_blocks_embedding_and_hidden_states_match_hf(family):
    """Each layer's attention module and whole block (FFN, LayerNorms, with and without folding), the embedding of
    token ids, and the whole stack against Hugging Face's ``hidden_states`` (``output_hidden_states=True``), the
    last one through :meth:`HFModel.final_norm` (GPT-2/GPT-Neo's ``ln_f``)."""
    m = load_hf(FIX / family)
    r = np.load(FIX / family / "reference.npz")
    L = m.num_layers
    assert L == 3 or family == "distilbert_sinusoidal"
    for l, lay in enumerate(m.layers):
        y = SelfAttention(lay.heads, lay.attention, m.beta)(jnp.asarray(r[f"x_{l}"], jnp.float32))
        np.testing.assert_allclose(np.asarray(y), r[f"y_{l}"], atol=1e-5, rtol=1e-5, err_msg=f"attention {l}")
    for fold in (False, True):
        stack = T.build_stack(m, ffn=True, layernorm=True, biases=True, fold_layernorm=fold)
        for l in range(L):
            y = stack.layer(l).step(l, jnp.asarray(r[f"h_{l}"], jnp.float32))  # = stack.step(l, .), without lax.switch
            np.testing.assert_allclose(np.asarray(y), r[f"out_{l}"], atol=1e-5, rtol=1e-5, err_msg=f"block {l} fold={fold}")
    x0 = m.embed(r["embed_ids"])
    np.testing.assert_allclose(x0, r["hs_0"], atol=1e-5, rtol=1e-5)
    stack = T.build_stack(m, ffn=True, layernorm=True, biases=True)
    x = jnp.asarray(x0, jnp.float32)
    for l in range(L):  # layer by layer from attnflow's own embedding, in float32
        x = stack.layer(l).step(l, x)
        y = m.final_norm(np.asarray(x)) if l == L - 1 else np.asarray(x)
        assert y.dtype == np.float32
        np.testing.assert_allclose(y, r[f"hs_{l + 1}"], atol=2e-5, rtol=1e-5, err_msg=f"hidden_states[{l + 1}]")


def test_final_norm_is_ln_f_for_pre_norm_only():
    """GPT-2's last hidden state is ln_f of the last block's output (off by O(1) without it); BERT's is the block's."""
    g = load_hf(FIX / "gpt2_scaling")
    r = np.load(FIX / "gpt2_scaling" / "reference.npz")
    y = np.asarray(T.build_stack(g, ffn=True, layernorm=True, biases=True).layer(2).step(2, jnp.asarray(r["hs_2"], jnp.float32)))
    assert _errs(y, r["hs_3"]) > 0.1
    np.testing.assert_allclose(g.final_norm(y), r["hs_3"], atol=1e-5, rtol=1e-5)
    b = load_hf(FIX / "bert")
    x = np.ones((2, 16), np.float32)
    assert b.final_norm(x) is x or np.array_equal(b.final_norm(x), x)


def test_gpt2_attention_scaling_flags():
    """``scale_attn_weights: false`` -> beta = 1; ``scale_attn_by_inverse_layer_idx: true`` divides layer l's scores
    by l + 1, which attnflow folds into that layer's Q and bq (one beta per model), leaving W = sum O_h V_h as stored.
    The old loader refused the checkpoint; without the division layers 1 and 2 miss Hugging Face by O(0.1)."""
    m = load_hf(FIX / "gpt2_scaling")
    r = np.load(FIX / "gpt2_scaling" / "reference.npz")
    assert m.beta == 1.0
    from safetensors.numpy import load_file

    t = load_file(FIX / "gpt2_scaling" / "model.safetensors")
    for l, lay in enumerate(m.layers):
        Wq = t[f"h.{l}.attn.c_attn.weight"].T[:8]  # Conv1D [in, out]: q | k | v along the output axis
        np.testing.assert_allclose(np.asarray(lay.heads.Q).reshape(8, 8), Wq / (l + 1), rtol=1e-6, atol=0)
        np.testing.assert_array_equal(np.asarray(lay.heads.K).reshape(8, 8), t[f"h.{l}.attn.c_attn.weight"].T[8:16])
        x = jnp.asarray(r[f"x_{l}"], jnp.float32)
        h = lay.heads
        raw_q = Heads(Q=np.asarray(h.Q) * (l + 1), K=h.K, V=h.V, O=h.O, bq=np.asarray(h.bq) * (l + 1), bk=h.bk, bv=h.bv,
                      bo=h.bo)  # Hugging Face's stored Q and bq
        miss = _errs(SelfAttention(raw_q, lay.attention, m.beta)(x), r[f"y_{l}"])
        assert (miss < 1e-5) if l == 0 else (miss > 1e-2), (l, miss)
    # scale_attn_weights alone: beta = 1/sqrt(dh) would miss layer 0 too
    lay = m.layers[0]
    assert _errs(SelfAttention(lay.heads, lay.attention, 1 / np.sqrt(4))(jnp.asarray(r["x_0"], jnp.float32)), r["y_0"]) > 1e-2


def _edit(tmp_path, family, drop=(), **changes):
    d = tmp_path / family
    shutil.copytree(FIX / family, d)
    cfg = json.loads((d / "config.json").read_text())
    for k in drop:
        cfg.pop(k, None)
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def test_gpt_neo_attention_layers_decide(tmp_path):
    """GPTNeoConfig takes config.json's ``attention_layers`` over the expansion of ``attention_types`` (fixture:
    global, local, local vs local, global, local); the old loader used attention_types and missed Hugging Face's
    layers 0 and 1 by O(1). Without attention_layers, attention_types decides (as in Hugging Face)."""
    m = load_hf(FIX / "gpt_neo_layers")
    r = np.load(FIX / "gpt_neo_layers" / "reference.npz")
    assert [lay.attention.mask for lay in m.layers] == ["causal", "window", "window"]
    assert m.layers[1].attention.window == 2
    alt = load_hf(_edit(tmp_path, "gpt_neo_layers", drop=("attention_layers",)))
    assert [lay.attention.mask for lay in alt.layers] == ["window", "causal", "window"]
    for l in (0, 1):
        x = jnp.asarray(r[f"x_{l}"], jnp.float32)
        assert _errs(SelfAttention(alt.layers[l].heads, alt.layers[l].attention, alt.beta)(x), r[f"y_{l}"]) > 1e-2
    with pytest.raises(CheckpointError, match=r"'attention_types' lists 1 layers, config\.json has 3"):
        load_hf(_edit(tmp_path / "a", "gpt_neo_layers", drop=("attention_layers",), attention_types=[[["global"], 1]]))
    with pytest.raises(CheckpointError, match=r"'attention_layers' lists 2 layers, config\.json has 3"):
        load_hf(_edit(tmp_path / "b", "gpt_neo_layers", attention_layers=["global", "local"]))
    with pytest.raises(CheckpointError, match=r"'attention_layers' must be a list of") as e:
        load_hf(_edit(tmp_path / "c", "gpt_neo_layers", attention_layers="global"))
    assert "\n" not in str(e.value)


def test_albert_hidden_groups():
    """num_hidden_groups = 2 over 3 layers: layer l uses group int(l / (3 / 2)) = 0, 0, 1, as AlbertTransformer."""
    m = load_hf(FIX / "albert_groups")
    Q = [np.asarray(lay.heads.Q) for lay in m.layers]
    assert np.array_equal(Q[0], Q[1]) and not np.array_equal(Q[1], Q[2])
    assert m.layers[0].ln_in is None and m.layers[0].act == "mish" and m.eps == 0.5


def test_activations_match_hf():
    """Every parameter-free ``ACT2FN`` activation, as Hugging Face computes it (float64). The old table had 6 names:
    ``gelu_fast``, ``quick_gelu``, ``gelu_10``, ``mish``, ... were refused by build_stack(ffn=True)."""
    r = np.load(FIX / "activations" / "reference.npz")
    x = jnp.asarray(r["x"], jnp.float64)
    names = [k for k in r.files if k != "x"]
    assert len(names) >= 20
    for name in names:
        assert name in T.ACTIVATIONS, name
        np.testing.assert_allclose(np.asarray(T.ACTIVATIONS[name](x)), r[name], atol=1e-9, rtol=1e-9, err_msg=name)
    # a learned activation is refused in one line, not silently replaced
    m = load_hf(FIX / "gpt2")
    bad = dataclasses.replace(m, layers=tuple(dataclasses.replace(lay, act="prelu") for lay in m.layers))
    with pytest.raises(ValueError, match="unsupported FFN activation 'prelu'") as e:
        T.build_stack(bad, ffn=True)
    assert "\n" not in str(e.value)
    T.build_stack(bad)  # the reduced dynamics never evaluate the FFN


def test_legacy_layernorm_gamma_beta_names(tmp_path):
    """Old checkpoints (bert-base-uncased) name LayerNorm parameters ``LayerNorm.gamma`` / ``LayerNorm.beta``; Hugging
    Face renames them on load, and so does attnflow (the old loader refused: missing 'embeddings.LayerNorm.weight')."""
    from safetensors.numpy import load_file, save_file

    d = tmp_path / "old"
    shutil.copytree(FIX / "bert", d)
    t = load_file(d / "model.safetensors")
    t = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
         for k, v in t.items()}
    assert "embeddings.LayerNorm.gamma" in t
    save_file(t, d / "model.safetensors")
    a, b = load_hf(FIX / "bert"), load_hf(d)
    for la, lb in zip(a.layers, b.layers):
        for name in ("ln_in", "ln_attn", "ln_out"):
            if getattr(la, name) is not None:
                np.testing.assert_array_equal(getattr(la, name)[1], getattr(lb, name)[1])
    np.testing.assert_array_equal(a.embed([3, 1, 4]), b.embed([3, 1, 4]))


def test_hugging_face_defaults_for_omitted_keys(tmp_path):
    """Keys a config.json may omit get Hugging Face's config defaults: GPT-Neo ``window_size`` 256, DistilBERT
    ``hidden_dim`` 3072 (only checked: the FFN width comes from the weights), ELECTRA / ALBERT ``embedding_size``
    128 (ELECTRA's old default was d, which refused a checkpoint with E = 128 that Hugging Face loads)."""
    neo = load_hf(_edit(tmp_path / "neo", "gpt_neo", drop=("window_size",)))
    assert neo.layers[1].attention.window == 256
    assert load_hf(_edit(tmp_path / "db", "distilbert", drop=("hidden_dim",))).num_layers == 2
    from safetensors.numpy import load_file, save_file

    for family, proj in (("electra", "embeddings_project"), ("albert", "encoder.embedding_hidden_mapping_in")):
        d = _edit(tmp_path / family, family, drop=("embedding_size",))
        t = load_file(d / "model.safetensors")
        rng = np.random.default_rng(0)
        for k in list(t):
            if k.startswith("embeddings."):
                t[k] = rng.normal(size=t[k].shape[:-1] + (128,)).astype(np.float32)
        t[proj + ".weight"] = rng.normal(size=(16, 128)).astype(np.float32)
        save_file(t, d / "model.safetensors")
        m = load_hf(d)
        assert m.embedding["word"].shape == (11, 128) and m.embedding["project"][0].shape == (16, 128)
        assert m.embed([1, 2]).shape == (2, 16)


@pytest.mark.parametrize("family", ["distilbert", "albert"])
def test_is_decoder_does_not_mask_distilbert_or_albert(tmp_path, family):
    """DistilBertModel and AlbertModel attend bidirectionally whatever ``is_decoder`` says (checked against
    DistilBertModel / AlbertModel built with is_decoder=True: max error 1.5e-6 / 4e-7); the old loader refused a
    DistilBERT config with ``is_decoder: true`` although Hugging Face runs it."""
    m = load_hf(_edit(tmp_path, family, is_decoder=True))
    r = np.load(FIX / family / "reference.npz")
    assert [lay.attention.mask for lay in m.layers] == ["full", "full"]
    for l, lay in enumerate(m.layers):
        y = SelfAttention(lay.heads, lay.attention, m.beta)(jnp.asarray(r[f"x_{l}"], jnp.float32))
        np.testing.assert_allclose(np.asarray(y), r[f"y_{l}"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family, key, eps", [("gpt2", "layer_norm_eps", 1e-5), ("gpt_neo", "layer_norm_eps", 1e-5),
                                              ("bert", "layer_norm_epsilon", 1e-12), ("albert", "layer_norm_epsilon", 1e-12)])
def test_layer_norm_eps_key_is_the_familys_own(tmp_path, family, key, eps):
    """GPT2Config / GPTNeoConfig read ``layer_norm_epsilon`` and the BERT-like configs ``layer_norm_eps``; the other
    key is an unused attribute to Hugging Face. The old loader took whichever of the two came first (GPT-2 with a stray
    ``layer_norm_eps: 0.5`` got eps 0.5; BERT with only ``layer_norm_epsilon: 0.5`` too, Hugging Face: 1e-12)."""
    d = _edit(tmp_path, family, drop=("layer_norm_eps", "layer_norm_epsilon"), **{key: 0.5})
    assert load_hf(d).eps == eps


def test_gpt_neo_attention_layers_decide_whatever_attention_types_says(tmp_path):
    """With ``attention_layers`` in config.json, Hugging Face never reads the length of ``attention_types``: a
    config without it (its default expands to 24 layers) or with one too long loads, with the layers
    attention_layers names; attnflow refused both, naming attention_types."""
    want = [lay.attention.mask for lay in load_hf(FIX / "gpt_neo_layers").layers]
    for i, changes in enumerate(({}, {"attention_types": [[["global", "local"], 5]]})):
        m = load_hf(_edit(tmp_path / str(i), "gpt_neo_layers", drop=("attention_types",), **changes))
        assert [lay.attention.mask for lay in m.layers] == want
    with pytest.raises(CheckpointError, match="'attention_types' must be a list"):  # its form is still checked
        load_hf(_edit(tmp_path / "x", "gpt_neo_layers", attention_types=[["global", 3]]))


def test_roberta_pad_token_beyond_the_embeddings_is_refused(tmp_path):
    # Hugging Face cannot build it (padding_idx within num_embeddings); it loaded with max_tokens = -9
    with pytest.raises(CheckpointError, match="pad_token_id = 30 must be below"):
        load_hf(_edit(tmp_path, "roberta", pad_token_id=30))


def test_embed_refuses_ids_outside_the_vocabulary_and_computes_in_float64():
    m = load_hf(FIX / "roberta")
    r = np.load(FIX / "roberta" / "reference.npz")
    V = m.embedding["word"].shape[0]
    for bad in ([-1, 2], [V, 2]):  # -1 was the last word, silently
        with pytest.raises(ValueError, match="token ids must be in"):
            m.embed(bad)
    with pytest.raises(ValueError, match=r"shape \(n,\)"):
        m.embed([[1, 2, 3], [3, 2, 1]])  # a batch: a bare NumPy broadcasting error
    x = m.embed(r["embed_ids"])
    assert x.dtype == np.float64  # computed from the float32 weights in float64, as a float64 model of HF's does
    np.testing.assert_allclose(x, r["embed_h0"], atol=1e-5, rtol=1e-5)


def test_folded_heads_in_float64_are_the_exact_products():
    m = load_hf(FIX / "bert")
    g, b = (np.asarray(a, np.float64) for a in m.layers[0].ln_in)
    h64 = m.heads(0, fold_layernorm=True, dtype=np.float64)
    Q = np.asarray(m.layers[0].heads.Q, np.float64)
    assert np.asarray(h64.Q).dtype == np.float64 and np.array_equal(np.asarray(h64.Q), Q * g)
    assert np.asarray(m.heads(0, fold_layernorm=True).Q).dtype == np.float32
