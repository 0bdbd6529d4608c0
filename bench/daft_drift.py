"""Does DAFT drift on the validation streams, and would a known guard against entropy-minimisation
drift help ``datta_cal``?  A study for SPEC §6 step 5, on the demo's validation set only (never
test data).

At severity 5 the demo's ``datta_cal_oracle`` (perfect decisions) trails ``tbn`` on the
single-domain stream at bs 64, and its deficit grows along the stream (the last corruptions
lose most): the pattern of DAFT's updates drifting over a long run of hard batches.  Two
guards from the test-time-adaptation literature are candidates for ``calibrate`` if the
validation streams favour them: EATA's reliable-sample filter (only samples whose softmax
entropy is below ``E0 = 0.4 ln K`` enter the loss; the loss is the sum over them divided by the
batch size) and an L2 anchor to the source ``gamma, beta`` (``+ lambda/2 ||theta - theta_0||^2``,
``lambda = 1``).  For each batch size, ``calibrate`` runs as the demo runs it (the DAFT rates
``cal_rates(1e-3)``), then its adapter runs the four validation streams (``calibrate``'s own:
every validation image once) with DAFT off, at the chosen rate, at half of it, with the filter
at the chosen rate and at twice it, and with the anchor at the chosen rate.  Besides the
per-stream accuracy, the single-domain stream's accuracy per validation domain, in stream order
(severity rising along it), shows where DAFT gains or loses.  Last, the closest the validation
set comes to the demo's severity-5 test stream (208 batches of severity 5 at bs 64): a
single-domain stream over only the validation domains of severity 4 and 5 (6,000 images, each
once), the same variants with the same calibration.

    python bench/daft_drift.py > bench/results/daft_drift.md
"""
from __future__ import annotations

import copy
import dataclasses
import math
import types

import numpy as np
import torch
from _validation_setup import setup

from datta_kernels import calibrate
from datta_kernels.adapt import softmax_entropy
from datta_kernels.calibration import _streams
from datta_kernels.eval.runner import cal_rates
from datta_kernels.eval.validation import pool_of

ANCHOR = 1.0        # lambda of the L2 anchor
E0 = 0.4            # the filter's entropy bound, in units of ln K (EATA's value)


def loss_step(loss_of):
    """A replacement for ``Adapter._entropy_step``: the adapter's optimizer step on
    ``loss_of(adapter, logits)``."""
    def step(self, logits):
        self._optimizer_step(loss_of(self, logits))
    return step


def filtered_step(e0: float):
    """The entropy step on the samples whose entropy is below ``e0`` (sum / batch size)."""
    def loss_of(_, logits):
        ent = softmax_entropy(logits)
        return torch.where(ent < e0, ent, torch.zeros_like(ent)).sum() / len(ent)
    return loss_step(loss_of)


def anchored_step(lam: float):
    """The entropy step plus ``lam / 2`` times the squared distance of ``gamma, beta`` from their
    values at the first step (the source model's)."""
    def loss_of(adapter, logits):
        params = [p for group in adapter.optimizer.param_groups for p in group["params"]]
        if "_theta0" not in adapter.__dict__:
            adapter.__dict__["_theta0"] = [p.detach().clone() for p in params]
        pull = sum(((p - q) ** 2).sum() for p, q in zip(params, adapter.__dict__["_theta0"]))
        return softmax_entropy(logits).mean() + 0.5 * lam * pull
    return loss_step(loss_of)


def run(c, model, x, y, domain, streams: dict, step=None) -> tuple[dict, np.ndarray]:
    """Accuracy (%) per stream of ``streams`` (batches as indices into ``x, y``), and per domain
    (``domain``: each image's index into the domains) on the single-domain stream."""
    n = int(domain.max()) + 1
    acc, per = {}, None
    for name, batches in streams.items():
        adapter = c.adapter(copy.deepcopy(model))
        if step is not None:
            adapter.__dict__["_entropy_step"] = types.MethodType(step, adapter)
        correct, total = np.zeros(n), np.zeros(n)
        for idx in batches:
            ok = (adapter(x[idx]).argmax(1) == y[idx]).numpy()
            np.add.at(correct, domain[idx].numpy(), ok)
            np.add.at(total, domain[idx].numpy(), 1)
        acc[name] = 100.0 * correct.sum() / total.sum()
        if name == "single":
            per = 100.0 * correct / np.maximum(total, 1)
    return acc, per


def short(names) -> list[str]:
    return [n.replace("_noise", "").replace("gaussian_", "").replace("clean_heldout", "clean") for n in names]


def per_domain_table(names, per_domain: dict) -> None:
    print("| variant | " + " | ".join(short(names)) + " |\n|---|" + "---|" * len(names))
    for label, per in per_domain.items():
        print(f"| {label} | " + " | ".join(f"{v:.1f}" for v in per) + " |")
    print()


def main() -> None:
    _, model, vdom = setup("DAFT's drift on the validation streams, and two guards against it", __doc__)
    e0 = E0 * math.log(int(torch.cat([lab for _, lab in vdom.values()]).max()) + 1)
    hard = {name: v for name, v in vdom.items() if name.endswith(("@4", "@5"))}
    domain = {"all": pool_of(vdom).domain, "hard": pool_of(hard).domain}
    for bs in (16, 64):
        c = calibrate(copy.deepcopy(model), vdom, bs, lr=cal_rates(1e-3)).calibration
        lr = c.lr

        def variant(daft: bool, rate: float, step=None, c=c):
            return dataclasses.replace(c, daft=daft, lr=rate), step
        variants = {"DAFT off": variant(False, lr), f"lr {lr:g} (chosen)": variant(True, lr),
                    f"lr {lr / 2:g}": variant(True, lr / 2),
                    f"filter, lr {lr:g}": variant(True, lr, filtered_step(e0)),
                    f"filter, lr {2 * lr:g}": variant(True, 2 * lr, filtered_step(e0)),
                    f"anchor, lr {lr:g}": variant(True, lr, anchored_step(ANCHOR))}
        print(f"## bs {bs}\n\n`calibrate` chose DAFT {'on' if c.daft else 'off'} at lr {c.lr:g} "
              f"({'single and multiple' if c.daft_multiple else 'single'} batches); the variants "
              "below change only DAFT.\n")
        print("| variant | single | mixed | dynamic | sorted | mean |\n|---|---|---|---|---|---|")
        x, y, streams = _streams(vdom, bs, 0)
        per_domain = {}
        for label, (cfg, step) in variants.items():
            acc, per_domain[label] = run(cfg, model, x, y, domain["all"], streams, step)
            cells = " | ".join(f"{acc[s]:.1f}" for s in ("single", "mixed", "dynamic", "sorted"))
            print(f"| {label} | {cells} | {np.mean(list(acc.values())):.2f} |", flush=True)
        print("\nSingle-domain stream, accuracy (%) per validation domain in stream order:\n")
        per_domain_table(list(vdom), per_domain)
        x, y, streams = _streams(hard, bs, 0)
        print(f"Single-domain stream over the severity-4 and -5 validation domains only "
              f"({len(streams['single'])} batches), accuracy (%) overall and per domain in stream order:\n")
        per_hard = {}
        for label, (cfg, step) in variants.items():
            acc, per = run(cfg, model, x, y, domain["hard"], {"single": streams["single"]}, step)
            per_hard[f"{label}: {acc['single']:.1f}"] = per
        per_domain_table(list(hard), per_hard)


if __name__ == "__main__":
    main()
