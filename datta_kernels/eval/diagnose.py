"""Which layer and which score separate single-domain from mixed batches — on data that may
decide it.

``python -m datta_kernels.eval.diagnose [--split validation|test] [--severities 3,5]
[--batch-sizes 16,64] [--batches 120] [--per-domain 500]``

The protocol (SPEC §2): every method choice — score mode, the parts of the dispersion score,
the score layer, the selector — is made on the **validation** split: the validation corruptions
(``validation.VALIDATION``: ``speckle_noise``, ``gaussian_blur`` and, since 2026-12-04,
``spatter``, of the held-out corruptions of the CIFAR-10-C protocol) plus clean *training*
images. Every number reported as a result is on the **test** split: the other 13 corruptions
of the test images (``--split test``, the default).

For each severity x batch size it draws random single-domain batches (all images from one
domain) and mixed batches (images from every domain of the split), runs the cached source model
converted to FusedDABN with every layer on the preset's ``multiple`` blend (what the layers
before the score layer use in DATTA), and scores the input of every layer against that
layer's source statistics: the SPEC §2 ``pixel`` and ``instance`` scores and the
``dispersion`` score with each choice of parts (``mean``, ``logstd``, ``both``) and of the
reduction over features (``mean`` as shipped, or the robust ``median``). It prints the AUROC of
"low score = single" (50 = chance, 100 = perfect) per layer and score, marks the default score
layer (:func:`datta_kernels.nn.first_nonlinear_layer`), and on ``--selectors`` compares the
selectors on a dynamic stream of scores (alternating single / mixed batches).
"""
from __future__ import annotations

import argparse
import copy
import math

import torch
from torch import Tensor, nn

from .. import reference as ref
from ..diversity import KDESelector, ThresholdSelector, calibrate_threshold
from ..nn import dabn_layers, first_nonlinear_layer
from ..presets import DISPERSION_PARTS
from ..surgery import convert_model
from .datasets import load_fashion_mnist
from .models import TrainConfig, load_or_train
from .runner import _auroc
from .streams import DomainPool
from .validation import TEST, VALIDATION, draw_batches, test_pool, validation_pool

__all__ = ["auroc_table", "layer_inputs", "main", "score_variants"]

@torch.no_grad()
def layer_inputs(model: nn.Module, x: Tensor) -> list[Tensor]:
    """Input of every FusedDABN layer of ``model`` for batch ``x``, in ``dabn_layers`` order."""
    layers = dabn_layers(model)
    out: list[Tensor | None] = [None] * len(layers)
    hooks = [lyr.register_forward_pre_hook(lambda mod, inp, i=i: out.__setitem__(i, inp[0]))
             for i, lyr in enumerate(layers)]
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    return out


def score_variants(x: Tensor, layer) -> dict[str, float]:
    """Every candidate score of batch ``x`` (the input of ``layer``), by name."""
    m = x.shape[2] * x.shape[3]
    mean_i, var_i = ref.instance_stats(x)
    smean, svar, eps = layer.source_mean, layer.source_var, layer.eps
    mu_b, _ = ref.batch_stats(mean_i, var_i, m)
    out = {"pixel": _pop_std(ref.diversity_angles(x, smean, mu_b)),
           "instance": _pop_std(ref.diversity_angles_instance(mean_i, smean, mu_b))}
    for parts in ("mean", "logstd", "both"):
        z = ref.dispersion_z(mean_i, var_i, smean, svar, m, eps, parts)
        spread = (z - z.mean(0)).square().mean(0).sqrt()
        out[f"disp:{parts}"] = float(spread.mean())
        out[f"disp:{parts}/median"] = float(spread.median())
    return out


def _pop_std(a: Tensor) -> float:
    return float((a - a.mean()).square().mean().sqrt())


def batch_scores(model: nn.Module, pool: DomainPool, batches: list[Tensor]) -> list[list[dict]]:
    """``scores[b][layer]``: every score variant of every layer for each batch."""
    layers = dabn_layers(model)
    return [[score_variants(x, lyr) for x, lyr in zip(layer_inputs(model, pool.x[idx]), layers)]
            for idx in batches]


def auroc_table(single: list[list[dict]], mixed: list[list[dict]]) -> dict[tuple[int, str], float]:
    """AUROC (%) of "low score = single" for every (layer index, score name)."""
    out = {}
    for li in range(len(single[0])):
        for name in single[0][li]:
            s = [b[li][name] for b in single]
            m = [b[li][name] for b in mixed]
            out[(li, name)] = 100 * _auroc(s, m)
    return out


def _selector_check(scores_s: list[float], scores_m: list[float], cal_s: list[float],
                    cal_m: list[float]) -> dict[str, tuple[float, float, float]]:
    """Precision / recall of "single" on an alternating stream of the given scores, and the
    share of "single" answers on a stream of the single-domain scores only, for the KDE rule
    and for a threshold calibrated on separate batches (``cal_s``, ``cal_m``)."""
    stream = [v for pair in zip(scores_s, scores_m) for v in pair]
    truth = [k % 2 == 0 for k in range(len(stream))]
    out = {}
    kde = KDESelector()
    thr = ThresholdSelector(calibrate_threshold(cal_s, cal_m))
    for name, sel in (("kde", kde), ("threshold", thr)):
        dec = [sel.update(v) == "single" for v in stream]
        skip = kde.warmup if name == "kde" else 0
        pairs = list(zip(dec[skip:], truth[skip:]))
        tp = sum(d and t for d, t in pairs)
        fp = sum(d and not t for d, t in pairs)
        fn = sum(t and not d for d, t in pairs)
        sel.reset()
        only = [sel.update(v) == "single" for v in scores_s * 2][skip:]
        out[name] = (tp / (tp + fp) if tp + fp else math.nan, tp / (tp + fn) if tp + fn else math.nan,
                     sum(only) / max(1, len(only)))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--split", choices=("validation", "test"), default="test")
    p.add_argument("--per-domain", type=int, default=500)
    p.add_argument("--severities", default="3,5")
    p.add_argument("--batch-sizes", default="16,64")
    p.add_argument("--batches", type=int, default=120, help="single and mixed batches each")
    p.add_argument("--selectors", action="store_true",
                   help="validation split: also compare the KDE rule and a threshold calibrated on "
                   "other validation batches, on alternating and on single-domain-only streams")
    p.add_argument("--all-variants", action="store_true",
                   help="print every dispersion variant (default: the shipped one and the SPEC modes)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    data = load_fashion_mnist()
    source, _ = load_or_train(TrainConfig(), data.train_x, data.train_y, progress=False)
    model = convert_model(copy.deepcopy(source), "datta").eval()
    for lyr in dabn_layers(model):
        lyr.set_decision("multiple")
    names = [n for n, m in model.named_modules() if m in set(dabn_layers(model))]
    auto = first_nonlinear_layer(model, data.test_x[:2])
    domains = (", ".join(VALIDATION) + " + clean held-out training images" if args.split == "validation"
               else ", ".join(TEST))
    print(f"split: {args.split} ({domains})")
    print(f"layers: {names}; default dispersion score layer: {names[auto]} (first whose input is "
          f"not affine in the image); SPEC pixel layer: {names[0]}")
    shown = None if args.all_variants else ("pixel", "instance", f"disp:{DISPERSION_PARTS}")
    for sev in (int(s) for s in args.severities.split(",")):
        if args.split == "validation":
            pool = validation_pool(data, args.per_domain, args.seed, severities=(sev,))
        else:
            pool = test_pool(data, args.per_domain, sev, args.seed)
        for bs in (int(b) for b in args.batch_sizes.split(",")):
            singles, mixed = draw_batches(pool, bs, args.batches, args.seed * 31 + sev)
            s_scores, m_scores = batch_scores(model, pool, singles), batch_scores(model, pool, mixed)
            table = auroc_table(s_scores, m_scores)
            cols = [c for c in s_scores[0][0] if shown is None or c in shown]
            print(f"\n== severity {sev}, batch size {bs}: AUROC (%) of 'low score = single', "
                  f"{args.batches} single vs {args.batches} mixed batches")
            print(f"{'layer':<22}" + "".join(f"{c:>18}" for c in cols))
            for li, name in enumerate(names):
                mark = " *" if li == auto else ""
                print(f"{name + mark:<22}" + "".join(f"{table[(li, c)]:>18.1f}" for c in cols))
            if args.selectors and args.split == "validation":
                key = f"disp:{DISPERSION_PARTS}"
                half = args.batches // 2
                ss = [b[auto][key] for b in s_scores]
                ms = [b[auto][key] for b in m_scores]
                res = _selector_check(ss[half:], ms[half:], ss[:half], ms[:half])
                n_stream = 2 * (args.batches - half)
                print(f"selectors on {names[auto]} / {key}, alternating stream of {n_stream} "
                      "batches (threshold calibrated on the other half): " +
                      ", ".join(f"{k} precision {p:.1%} recall {r:.1%}" for k, (p, r, _) in res.items()) +
                      "; share 'single' on a single-domain-only stream: " +
                      ", ".join(f"{k} {o:.1%}" for k, (_, _, o) in res.items()))
    print("\n* = default score layer of DATTA(score_mode='dispersion')")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
