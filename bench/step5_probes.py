"""Two changes to ``calibrate``'s step 5 probed on the validation streams: the ``multiple`` cut
re-chosen with DAFT on, and DAFT restarted from the source parameters at a domain change.

``calibrate`` chooses the decision rule's cuts (steps 3-4) without DAFT and DAFT's setting
(step 5) behind them.  With DAFT on, a ``single``-domain batch decided ``single`` also takes an
entropy step, so deciding ``single`` is worth more than the cuts assumed, and the best
``multiple`` cut (``score >= high``) might lie higher.  This script asks the validation streams:
with a saved calibration (the demo's, from its cache: steps 1-5 as chosen), it runs step 5's five
validation streams (the four and the hard stream over the calibration's hard domains) with the
chosen DAFT setting and ``high`` scaled by each factor (the other cuts unchanged), and prints
each stream's accuracy and their mean (step 5's objective).  Validation data only; factor 1
reproduces the calibration's own ``daft_table`` row.

A second probe, prompted by the demo's test numbers on the AVX-512 copy (said plainly: DAFT's
fast rates lose most on the test's last single-domain corruptions, drift that a long stream
builds up): restart DAFT when the domain changes, as RDumb (Press et al., NeurIPS 2023) restarts
periodically.  Study-only wrapper, not library code: on each batch DAFT fine-tunes, the per-channel
moments of the first BatchNorm layer's input (the first convolution's output, which no adapted
parameter touches) are compared with an exponential average of those of the previous
fine-tuned batches (momentum ``--reset-momentum``) by the symmetric KL divergence of SPEC §3c;
above ``tau`` every layer's ``gamma, beta`` return to the source values and the optimizer's state
is cleared before the batch's step, and the average restarts at the batch.  Each ``tau`` runs
the same five streams with the calibration's chosen DAFT setting and cuts.

    python bench/step5_probes.py --calibration 16=FILE --calibration 64=FILE \
        --factors 1,1.1,1.2,1.35,1.5,0.9 --resets 4,1,0.25
    python bench/step5_probes.py --calibration 16=FILE --calibration 64=FILE --factors "" --resets "" --skewed

A third probe (``--skewed``): DAFT's entropy step on ``skewed`` batches too, which DATTA never
takes (SPEC §4: a label-sorted batch's entropy step pulls the model towards its few classes);
with the stream statistics that ``skewed`` batches now get, is that still so?
"""
from __future__ import annotations

import argparse
import copy
import time

import torch
from step5_lofo import saved_calibrations

from datta_kernels.adapt import SKEWED
from datta_kernels.calibration import _mean, _stream_accuracy, _streams
from datta_kernels.diversity import ThresholdSelector
from datta_kernels.reference import gaussian_sym_kl


def restart_on_shift(adapter, tau: float, momentum: float) -> dict:
    """Wrap ``adapter`` (a DATTA with DAFT) with the domain-change restart of the module doc;
    returns its counters (``resets``, ``divergences``)."""
    layers = adapter._layers
    init = [(lyr.weight.detach().clone(), lyr.bias.detach().clone()) for lyr in layers]
    state = {"ref": None, "resets": 0, "divergences": []}

    def hook(module, args):
        if not torch.is_grad_enabled():     # DATTA's first forward records no graph: not fine-tuned yet
            return
        x = args[0].detach().double()
        m, v = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
        ref = state["ref"]
        far = ref is None
        if ref is not None:
            d = float(gaussian_sym_kl(m, v, ref[0], ref[1], 1e-5))
            state["divergences"].append(d)
            far = d > tau
        if far:
            state["resets"] += ref is not None
            with torch.no_grad():
                for lyr, (w, b) in zip(layers, init):
                    lyr.weight.copy_(w)
                    lyr.bias.copy_(b)
            adapter.optimizer.state.clear()
            state["ref"] = (m, v)
        else:
            state["ref"] = (torch.lerp(ref[0], m, momentum), torch.lerp(ref[1], v, momentum))

    layers[0].register_forward_pre_hook(hook)
    return state


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--factors", default="1,1.1,1.2,1.35,1.5,0.9")
    p.add_argument("--resets", default="4,1,0.25", help="the restart's divergence cuts tau")
    p.add_argument("--reset-momentum", type=float, default=0.1)
    p.add_argument("--skewed", action="store_true", help="also the third probe: DAFT on skewed batches")
    title = "Step 5 probes: the `multiple` cut with DAFT on, DAFT restarted at a domain change"
    cfg, model, vdom, cals, args = saved_calibrations(title, __doc__, p)
    factors = [float(f) for f in args.factors.split(",") if f]
    taus = [float(t) for t in args.resets.split(",") if t]
    for bs, path, cal in cals:
        print(f"\n## bs {bs}\n\n- calibration `{path}`: high {cal.threshold:.4g}, DAFT lr {cal.lr:g}, "
              f"filter {cal.entropy_filter}, hard domains {', '.join(cal.hard_domains)}\n")
        xs, ys, st = _streams(vdom, bs, cfg.seed)
        five = {k: (xs, ys, b) for k, b in st.items()}
        hx, hy, hs = _streams({k: vdom[k] for k in cal.hard_domains}, bs, cfg.seed, ("single",))
        five["hard"] = (hx, hy, hs["single"])
        if factors:
            print("### The `multiple` cut\n\n| high x | " + " | ".join(five) + " | mean |\n|---|"
                  + "---|" * (len(five) + 1))
        for f in factors:
            t = time.perf_counter()
            acc = {}
            for k, (x, y, b) in five.items():       # a fresh adapter per stream, as calibrate runs them
                sel = ThresholdSelector(cal.threshold * f, cal.low, cal.skew_cut, cal.shift_cut)
                adapter = cal.adapter(copy.deepcopy(model), selector=sel, backend=cfg.backend)
                acc[k] = _stream_accuracy(adapter, x, y, b)
            print(f"| {f:g} | " + " | ".join(f"{v:.2f}" for v in acc.values())
                  + f" | {_mean(acc):.3f} |  <!-- {time.perf_counter() - t:.0f} s -->", flush=True)
        if taus:
            print(f"\n### DAFT restarted at a domain change (momentum {args.reset_momentum:g})\n\n"
                  "| tau | " + " | ".join(five) + " | mean | restarts per stream | hard stream per domain |\n"
                  "|---|" + "---|" * (len(five) + 3))
        for tau in [None] + taus if taus else []:
            acc, resets, per_domain = {}, {}, []
            for k, (x, y, b) in five.items():
                adapter = cal.adapter(copy.deepcopy(model), backend=cfg.backend)
                state = None if tau is None else restart_on_shift(adapter, tau, args.reset_momentum)
                hits = [int((adapter(x[idx]).argmax(1) == y[idx]).sum()) for idx in b]
                acc[k] = 100.0 * sum(hits) / sum(len(idx) for idx in b)
                resets[k] = 0 if state is None else state["resets"]
                if k == "hard":             # one domain after another, equally many batches each
                    per = len(b) // len(cal.hard_domains)
                    per_domain = [100.0 * sum(hits[i:i + per]) / sum(len(idx) for idx in b[i:i + per])
                                  for i in range(0, per * len(cal.hard_domains), per)]
            name = "off" if tau is None else f"{tau:g}"
            print(f"| {name} | " + " | ".join(f"{v:.2f}" for v in acc.values())
                  + f" | {_mean(acc):.3f} | " + ", ".join(f"{k} {v}" for k, v in resets.items())
                  + " | " + " / ".join(f"{v:.1f}" for v in per_domain) + " |", flush=True)
        if args.skewed:
            print("\n### DAFT also on `skewed` batches\n\n| DAFT steps on | " + " | ".join(five)
                  + " | mean |\n|---|" + "---|" * (len(five) + 1))
            for extra in ((), (SKEWED,)):
                acc = {}
                for k, (x, y, b) in five.items():
                    adapter = cal.adapter(copy.deepcopy(model), backend=cfg.backend)
                    adapter._daft_on = adapter._daft_on + extra     # study only: not a DATTA option
                    acc[k] = _stream_accuracy(adapter, x, y, b)
                print(f"| {', '.join(adapter._daft_on)} | " + " | ".join(f"{v:.2f}" for v in acc.values())
                      + f" | {_mean(acc):.3f} |", flush=True)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
