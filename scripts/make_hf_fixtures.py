"""Build tiny random-weight Hugging Face checkpoints and reference attention outputs for tests/test_hf.py.

Needs torch (CPU) and transformers; the tests themselves do not. Run from the repository root:

    python scripts/make_hf_fixtures.py            # writes tests/fixtures/hf/<family>/ and tests/fixtures/hf/refused/

For each family (ALBERT, BERT, GPT-2, GPT-Neo; and ``bert_decoder``, BERT with ``is_decoder``) it saves
``config.json`` + ``model.safetensors`` and
``reference.npz`` with, for every layer l, captured with forward hooks during one model forward (eager
attention, no dropout):

- ``x_l`` (n, d): the hidden states seen by that layer's attention module, and ``y_l`` = O (sum_j a_ij
  (V x_j + bv)) + bo, that module's output (no FFN, no LayerNorm);
- ``h_l`` (n, d): the input of the whole layer (block), and ``out_l`` (n, d): its output, with the FFN and
  every LayerNorm as Hugging Face computes them (post-norm BERT/ALBERT: the output LayerNorm included;
  pre-norm GPT-2/GPT-Neo: the residual stream, before the final ``ln_f``);
- ``hs_0`` ... ``hs_L``: Hugging Face's ``hidden_states`` (``output_hidden_states=True``) for the token ids
  ``embed_ids`` (``hs_0`` = ``embed_h0``; for GPT-2/GPT-Neo ``hs_L`` has the final ``ln_f`` applied).

The configurations the first fixtures do not cover (written by the audit of docs/model.md section 8, tested by
tests/test_audit_hf.py): ``gpt2_scaling`` (``scale_attn_weights: false`` and ``scale_attn_by_inverse_layer_idx``,
``n_inner: null``, ``quick_gelu``, a large LayerNorm epsilon), ``gpt_neo_layers`` (``attention_layers`` set apart
from ``attention_types``, as ``GPTNeoConfig`` lets it decide; window 2, ``relu``), ``albert_groups`` (3 layers in 2
groups, ``mish``), ``distilbert_sinusoidal`` (``sinusoidal_pos_embds``, ``relu``); and ``activations/``, Hugging
Face's FFN activations (``ACT2FN``) on a grid. Regenerate one fixture with ``python scripts/make_hf_fixtures.py
gpt2_scaling``.
"""

from __future__ import annotations

import json
import pathlib
import sys

import numpy as np
import torch
import transformers as tf

ROOT = pathlib.Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "hf"
N_TOKENS = 7


def _configs():
    common = dict(initializer_range=0.35)
    return {
        "bert": tf.BertConfig(vocab_size=11, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=24, max_position_embeddings=16, type_vocab_size=2, **common),
        "albert": tf.AlbertConfig(vocab_size=11, embedding_size=8, hidden_size=16, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=24, max_position_embeddings=16, **common),
        "gpt2": tf.GPT2Config(vocab_size=11, n_embd=16, n_layer=2, n_head=4, n_positions=16, n_inner=24, **common),
        # BERT as a decoder: BertModel masks its self-attention causally
        "bert_decoder": tf.BertConfig(vocab_size=11, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=24, max_position_embeddings=16, type_vocab_size=2,
                                      is_decoder=True, **common),
        # BERT's layers with RoBERTa's position ids (pad_token_id 1: positions from 2)
        "roberta": tf.RobertaConfig(vocab_size=11, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=24, max_position_embeddings=18, type_vocab_size=1, pad_token_id=1,
                                    **common),
        # BERT's layers after an embedding of width 8 and its projection to d = 16
        "electra": tf.ElectraConfig(vocab_size=11, embedding_size=8, hidden_size=16, num_hidden_layers=2,
                                    num_attention_heads=4, intermediate_size=24, max_position_embeddings=16, **common),
        "distilbert": tf.DistilBertConfig(vocab_size=11, dim=16, n_layers=2, n_heads=4, hidden_dim=24,
                                          max_position_embeddings=16, **common),
        "gpt_neo": tf.GPTNeoConfig(vocab_size=11, hidden_size=16, num_layers=2, num_heads=2, max_position_embeddings=16,
                                   attention_types=[[["global", "local"], 1]], window_size=3, intermediate_size=24,
                                   **common),
        # GPT2Attention's scaling: 1 (scale_attn_weights false) divided by l + 1 (scale_attn_by_inverse_layer_idx)
        "gpt2_scaling": tf.GPT2Config(vocab_size=11, n_embd=8, n_layer=3, n_head=2, n_positions=12, n_inner=None,
                                      scale_attn_weights=False, scale_attn_by_inverse_layer_idx=True,
                                      activation_function="quick_gelu", layer_norm_epsilon=0.5, **common),
        # attention_layers (set below) decides over attention_types' expansion (local, global, local)
        "gpt_neo_layers": tf.GPTNeoConfig(vocab_size=11, hidden_size=8, num_layers=3, num_heads=2,
                                          max_position_embeddings=12, attention_types=[[["local", "global"], 1],
                                                                                       [["local"], 1]],
                                          window_size=2, intermediate_size=None, activation_function="relu",
                                          layer_norm_epsilon=0.5, **common),
        # 3 layers in 2 groups: layers 0, 1 use group 0 and layer 2 group 1 (int(l / (3 / 2)))
        "albert_groups": tf.AlbertConfig(vocab_size=11, embedding_size=4, hidden_size=8, num_hidden_layers=3,
                                         num_hidden_groups=2, num_attention_heads=2, intermediate_size=12,
                                         max_position_embeddings=12, hidden_act="mish", layer_norm_eps=0.5, **common),
        "distilbert_sinusoidal": tf.DistilBertConfig(vocab_size=11, dim=8, n_layers=2, n_heads=2, hidden_dim=12,
                                                     max_position_embeddings=12, sinusoidal_pos_embds=True,
                                                     activation="relu", **common),
    }


_EDITS = {"gpt_neo_layers": {"attention_layers": ["global", "local", "local"]}}
"""Config attributes set after construction (written to config.json by save_pretrained)."""


def _attention_hooks(family, model):
    """(module whose input is the attention input x, module whose output is O(...) + bo) per layer."""
    if family in ("bert", "roberta", "electra"):
        return [(l.attention.self, l.attention.output.dense) for l in model.encoder.layer]
    if family == "distilbert":
        return [(l.attention, l.attention.out_lin) for l in model.transformer.layer]
    if family == "albert":  # every group's shared layer (called in layer order, so the captures are too)
        return [(g.albert_layers[0].attention, g.albert_layers[0].attention.dense) for g in model.encoder.albert_layer_groups]
    if family == "gpt2":
        return [(b.attn, b.attn) for b in model.h]
    if family == "gpt_neo":
        return [(b.attn.attention, b.attn.attention) for b in model.h]
    raise ValueError(family)


def _block_modules(family, model):
    """The module computing one whole layer, called once per layer (ALBERT: the shared layer, called L times)."""
    if family in ("bert", "roberta", "electra"):
        return list(model.encoder.layer)
    if family == "distilbert":
        return list(model.transformer.layer)
    if family == "albert":
        return [g.albert_layers[0] for g in model.encoder.albert_layer_groups]
    if family in ("gpt2", "gpt_neo"):
        return list(model.h)
    raise ValueError(family)


def _first(o):
    return o[0] if isinstance(o, tuple) else o


def build(family, config, seed=0):
    torch.manual_seed(seed)
    for k, v in _EDITS.get(family, {}).items():
        setattr(config, k, v)
    config._attn_implementation = "eager"
    model = tf.AutoModel.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():  # non-zero biases and LayerNorm affine parts, so the tests can see them
        for name, p in model.named_parameters():
            if name.endswith("bias") or "LayerNorm.weight" in name or "layer_norm.weight" in name or ".ln_" in name:
                p.add_(0.3 * torch.randn_like(p))
    out = ROOT / family
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    xs, ys = [], []
    hooks = []
    kind = config.model_type  # the fixture's folder may name a variant (bert_decoder)
    for inp_mod, out_mod in _attention_hooks(kind, model):
        hooks.append(inp_mod.register_forward_hook(
            lambda m, args, kwargs, o: xs.append((kwargs.get("hidden_states", args[0] if args else None)).detach()),
            with_kwargs=True))
        hooks.append(out_mod.register_forward_hook(
            lambda m, args, o: ys.append(_first(o).detach())))
    hs, outs = [], []

    def block_hook(m, args, kwargs, o):  # returns None: the module's output is left as it is
        hs.append(kwargs.get("hidden_states", args[0] if args else None).detach())
        outs.append(_first(o).detach())

    for blk in _block_modules(kind, model):
        hooks.append(blk.register_forward_hook(block_hook, with_kwargs=True))
    gen = torch.Generator().manual_seed(seed + 1)
    emb = torch.randn(1, N_TOKENS, model.get_input_embeddings().weight.shape[1], generator=gen)
    with torch.no_grad():
        model(inputs_embeds=emb)
    # the embedding of token ids (with the padding id among them, for RoBERTa's position ids): layer 0's input
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2]])[:, :N_TOKENS]
    nx, ny, nh = len(xs), len(ys), len(hs)
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
    embedded = hs[nh]
    del xs[nx:], ys[ny:], hs[nh:], outs[nh:]
    for h in hooks:
        h.remove()
    ref = {"embed_ids": ids[0].numpy(), "embed_h0": embedded[0].numpy().astype(np.float32)}
    ref.update({f"hs_{i}": h[0].numpy().astype(np.float32) for i, h in enumerate(hidden)})
    for l, (x, y) in enumerate(zip(xs, ys)):
        ref[f"x_{l}"] = x[0].numpy().astype(np.float32)
        ref[f"y_{l}"] = y[0].numpy().astype(np.float32)
    for l, (h, o) in enumerate(zip(hs, outs)):
        ref[f"h_{l}"] = h[0].numpy().astype(np.float32)
        ref[f"out_{l}"] = o[0].numpy().astype(np.float32)
    np.savez(out / "reference.npz", **ref)
    meta = {"family": kind, "fixture": family, "layers_captured": len(xs), "blocks_captured": len(hs), "tokens": N_TOKENS, "torch": torch.__version__,
            "transformers": tf.__version__}
    (out / "reference.json").write_text(json.dumps(meta, indent=1) + "\n")
    return out


def refused_bin():
    """``refused/``: BERT's config.json and a ``pytorch_model.bin`` whose pickle holds a non-tensor object (a
    ``pathlib`` path), which torch's weights-only loader refuses; attnflow must say so in one line of its own."""
    out = ROOT / "refused"
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text((ROOT / "bert" / "config.json").read_text())
    torch.save({"w": torch.zeros(2), "obj": pathlib.PurePosixPath("not/a/tensor")}, out / "pytorch_model.bin")
    return out


LEARNED_ACTIVATIONS = ("prelu", "xielu")
"""ACT2FN entries with learned parameters: not FFN activations attnflow can name, left out of ``activations/``."""


def activations():
    """``activations/reference.npz``: ``x`` (a float64 grid over [-12, 12]) and, for every parameter-free name in
    ``transformers.activations.ACT2FN``, its values there (float64), to check attnflow's FFN activations."""
    from transformers.activations import ACT2CLS, ACT2FN

    out = ROOT / "activations"
    out.mkdir(parents=True, exist_ok=True)
    x = np.concatenate([np.linspace(-12.0, 12.0, 49), [-0.3, -0.1, -1e-3, 1e-3, 0.1, 0.3]])
    ref = {"x": x}
    for name in ACT2CLS:
        if name not in LEARNED_ACTIVATIONS:
            ref[name] = ACT2FN[name](torch.tensor(x, dtype=torch.float64)).numpy()
    np.savez_compressed(out / "reference.npz", **ref)
    meta = {"names": sorted(k for k in ref if k != "x"), "torch": torch.__version__, "transformers": tf.__version__}
    (out / "reference.json").write_text(json.dumps(meta, indent=1) + "\n")
    return out


def main(argv=None):
    families = (argv or sys.argv[1:]) or list(_configs()) + ["refused", "activations"]
    cfgs = _configs()
    for fam in families:
        p = refused_bin() if fam == "refused" else activations() if fam == "activations" else build(fam, cfgs[fam])
        print(fam, "->", p, sorted(f.name for f in p.iterdir()))


if __name__ == "__main__":
    main()
