"""Which label-skew signal survives an unseen corruption (SPEC §6, step 4): AUROC of "i.i.d.
single-domain batch vs label-sorted batch" on the demo's validation set (never test data).

For each validation family (clean held-out and each validation corruption at severities 1-5)
a class probe (``ClassProbe``) is fitted at the score layer either on every family (``in``) or
on the other families only (``held-out``, as a test corruption is unseen), the layers before the
score layer on the blend ``--multiple`` (pass the blend ``datta_cal`` chose for them), on
features either per sample (``source``: source-standardised instance mean and log std, the
probe's features until 2026-12-04) or centred on the batch (``batch``: each column minus its
batch mean, the probe's features since); ``--features`` adds two scalings of the centred
features tried on 2026-12-05 and not adopted (``rms``: divided by the batch's root mean square;
``col``: each column by its batch std).  Signals of the probe's logits per batch: ``entropy`` =
normalised entropy of the batch-mean softmax; ``spread`` = ``datta_kernels.prediction_spread``;
``logit-std`` = mean over classes of the std over the batch of the logits.  Batches: images
500-999 of each validation domain, i.i.d. or label-sorted; the probe is fitted on images 0-399
in batches of the same size.  Columns: per family (all severities), per severity (``@0`` =
clean held-out; all families), pooled.

    python bench/skew_signal.py --batch-size 16 --multiple 0.8,0.2,0.0 > bench/results/skew_signal.md
"""
from __future__ import annotations

import argparse
import copy
import math

import numpy as np
import torch

import datta_kernels as dk
from datta_kernels import calibration as cal
from datta_kernels.benchmarking import describe_machine, provenance
from datta_kernels.diversity import ClassProbe, prediction_spread
from datta_kernels.eval.datasets import load_fashion_mnist
from datta_kernels.eval.models import TrainConfig, load_or_train
from datta_kernels.eval.validation import validation_domains
from datta_kernels.nn import dabn_layers


def _entropy(logits):
    p = logits.softmax(1).mean(0)
    return float(-(p * p.clamp_min(1e-12).log()).sum() / math.log(logits.shape[1]))


SIGNALS = {"entropy": _entropy, "spread": lambda lg: float(prediction_spread(lg)),
           "logit-std": lambda lg: float(lg.std(0).mean())}


def _auroc(pos, neg) -> float:
    pos, neg = np.asarray(pos)[:, None], np.asarray(neg)[None]
    return 100 * ((pos > neg).mean() + 0.5 * (pos == neg).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--multiple", default="0.6,0.2,0.2", help="blend of the layers before the score layer")
    ap.add_argument("--features", default="source,batch",
                    help="feature kinds, comma-separated: source, batch, rms (batch-centred, then divided by "
                         "the batch's root mean square), col (batch-centred, each column divided by its "
                         "batch std)")
    ap.add_argument("--signals", default=",".join(SIGNALS), help="signals, comma-separated")
    args = ap.parse_args()
    kinds = args.features.split(",")
    signals = {k: SIGNALS[k] for k in args.signals.split(",")}
    bs = args.batch_size
    data = load_fashion_mnist()
    model, _ = load_or_train(TrainConfig(), data.train_x, data.train_y, progress=False)
    vdom = validation_domains(data, 1000, 0, train=TrainConfig())
    work = dk.convert_model(copy.deepcopy(model).eval(), "datta", shrink_k=4.0, cluster=False)
    layers = dabn_layers(work)
    w = tuple(float(v) for v in args.multiple.split(","))
    cal._configure(layers, 0, None, (w, w, w), "instance")
    fam_names = sorted({n.split("@")[0] for n in vdom})

    scorer = dk.DATTA(copy.deepcopy(work), preset=None, selector=dk.ThresholdSelector(0.0), daft=False,
                      score_mode="dispersion", backend=None)

    def feats_of(x):          # the per-sample (uncentred) features at the score layer
        scorer(x)
        layer = scorer.layers[scorer._score_at]
        return ClassProbe.features(*layer.last_stats, layer.source_mean, layer.source_var, layer.eps,
                                   centred=False)

    def centred(z):           # batch-centred features (ClassProbe's): every column minus its batch mean
        return z - z.mean(0, keepdim=True)

    def rms(z):               # centred, then one scale per batch: unit root mean square
        g = centred(z)
        return g / g.square().mean().sqrt().clamp_min(1e-6)

    def per_column(z):        # centred, each column divided by its std over the batch
        g = centred(z)
        return g / g.square().mean(0, keepdim=True).sqrt().clamp_min(1e-6)
    transform = {"source": lambda z: z, "batch": centred, "rms": rms, "col": per_column}
    feats, labels, fams = [], [], []
    for name, (x, y) in vdom.items():
        for i in range(0, 400, bs):
            feats.append(feats_of(x[i:i + bs]))
            labels.append(y[i:i + bs])
            fams += [name.split("@")[0]] * len(y[i:i + bs])
    labels, fams = torch.cat(labels), np.array(fams)
    probes = {}
    for centre in kinds:
        fz = torch.cat([transform[centre](f) for f in feats])
        full = ClassProbe.fit(fz, labels, 10)            # one probe on every family
        probes["in", centre] = dict.fromkeys(fam_names, full)
        probes["held-out", centre] = {
            f: ClassProbe.fit(fz[torch.from_numpy(fams != f)], labels[torch.from_numpy(fams != f)], 10)
            for f in fam_names}
    g = torch.Generator().manual_seed(0)
    res: dict = {}
    with torch.no_grad():
        for name, (x, y) in vdom.items():
            f = name.split("@")[0]
            idx = 500 + torch.randperm(500, generator=g)
            for kind, order in (("single", idx), ("sorted", idx[torch.sort(y[idx], stable=True).indices])):
                for j in range(0, 500 - bs + 1, bs):
                    z = feats_of(x[order[j:j + bs]])
                    sev = name.split("@")[1] if "@" in name else "0"
                    for (pname, centre), per_fam in probes.items():
                        lg = per_fam[f].logits(transform[centre](z))
                        for sig, fn in signals.items():
                            for col in (f, "@" + sev):
                                res.setdefault((pname, centre, sig, kind, col), []).append(fn(lg))
    prov = provenance()
    m = describe_machine()
    print("# Which label-skew signal survives an unseen corruption\n")
    print(f"- command: `{prov['command']}`\n- commit: {prov['commit']}\n- machine: {m.get('cpu', '')}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads (accuracy-only: no timing)\n")
    print(__doc__.split("\n\n")[1].replace("\n", " ") + "\n")
    print(f"Batch size {bs}; AUROC (%) of 'higher signal = i.i.d. single', per family and pooled over "
          "the families (one cut serves all of them):\n")
    sevs = sorted({k[-1] for k in res if k[-1].startswith("@")})
    cols = fam_names + sevs
    print("| probe | features | signal | " + " | ".join(cols) + " | pooled |")
    print("|---" * (len(cols) + 4) + "|")
    for pname, centre in probes:
        for sig in signals:
            per = [_auroc(res[(pname, centre, sig, "single", c)], res[(pname, centre, sig, "sorted", c)])
                   for c in cols]
            pooled = _auroc(sum((res[(pname, centre, sig, "single", f)] for f in fam_names), []),
                            sum((res[(pname, centre, sig, "sorted", f)] for f in fam_names), []))
            print(f"| {pname} | {centre} | {sig} | " + " | ".join(f"{v:.1f}" for v in per)
                  + f" | {pooled:.1f} |")


if __name__ == "__main__":
    main()
