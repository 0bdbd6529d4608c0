"""A stem that follows the previous batch's decision, on the validation streams (validation data
only; nothing is chosen here).

The layers before the score layer normalise before a batch's decision exists, so ``calibrate``
gives them one blend for every batch (step 2b).  Each batch type's best stem blend differs
(``stem_blend_severity.md``), and a stream's consecutive batches are mostly of one type, so the
stem could take the blend of the type the previous batch was decided to be (the first batch:
``single``'s).  This script measures that on the validation streams ``calibrate`` ranks by:
``calibrate`` runs as the demo runs it (one DAFT rate, lr 2e-3, to save time: DAFT is switched
off below, and steps 1-4 do not depend on the rate), then its adapter without DAFT runs the
four validation streams and the hard stream twice: as calibrated (one stem blend), and with
the stem on each type's best blend of the step-2b table (``pre_table``: accuracy of each type
with the later layers on its right blend), set before each batch from the previous batch's
decision.  The score layer's input, so the score the cuts read, then depends on the previous
decision: whatever feedback that has is in these numbers.

    python bench/lagged_stem.py [--batch-size 64] > bench/results/lagged_stem.md
"""
from __future__ import annotations

import copy

import numpy as np
import torch
from _validation_setup import calibrated_study

from datta_kernels.calibration import INSTANCE_MODES, KINDS, _hard_domains, _streams
from datta_kernels.nn import dabn_layers

#: decision -> the batch type whose column of the step-2b table serves it
TYPE_OF = {"single": "single", "multiple": "mixed", "skewed": "sorted"}


@torch.no_grad()
def stream_accuracy(adapter, x, y, batches, pre_layers, pre_for=None, mode="instance") -> tuple[float, dict]:
    """Accuracy (%) over one stream; with ``pre_for`` (decision -> stem blend) the layers before
    the score layer are set before each batch from the previous batch's decision.  Also the
    share of batches per decision."""
    correct = total = 0
    prev, said = "single", {d: 0 for d in TYPE_OF}
    for idx in batches:
        if pre_for is not None:
            for layer in pre_layers:
                layer.set_preset("datta", weights=(pre_for[prev],) * 3, **INSTANCE_MODES[mode])
        correct += int((adapter(x[idx]).argmax(1) == y[idx]).sum())
        total += len(idx)
        prev = adapter.last_decision
        said[prev] += 1
    return 100.0 * correct / total, {d: n / len(batches) for d, n in said.items()}


def main() -> None:
    args, cfg, model, vdom, rep = calibrated_study("A stem that follows the previous batch's decision",
                                                   __doc__)
    bs = args.batch_size
    pre_for = {d: max(rep.pre_table, key=lambda w: rep.pre_table[w][TYPE_OF[d]]) for d in TYPE_OF}
    print(f"- batch size {bs}; calibrated stem blend {rep.pre_blend}; each decision's best stem blend "
          f"(step-2b table): " + ", ".join(f"{d} {w} ({rep.pre_table[w][TYPE_OF[d]]:.1f} %)"
                                           for d, w in pre_for.items()))
    print("- the calibrated stem's step-2b accuracies: "
          + ", ".join(f"{k} {rep.pre_table[rep.pre_blend][k]:.1f} %" for k in KINDS) + "\n")
    xs, ys, streams = _streams(vdom, bs, cfg.seed)
    runs = {name: (xs, ys, b) for name, b in streams.items()}
    hard = _hard_domains(lambda: rep.adapter(copy.deepcopy(model), backend=cfg.backend), vdom, bs, cfg.seed)
    hx, hy, hs = _streams({k: vdom[k] for k in hard}, bs, cfg.seed, ("single",))
    runs["hard"] = (hx, hy, hs["single"])
    print(f"- hard stream: {', '.join(hard)}\n")
    print("| stem | " + " | ".join(runs) + " | mean of the four | mean of the five |")
    print("|---|" + "---|" * (len(runs) + 2))
    shares = {}
    for label, follow in (("one blend (calibrated)", None), ("follows the previous decision", pre_for)):
        acc = {}
        for name, (x, y, batches) in runs.items():
            adapter = rep.adapter(copy.deepcopy(model), backend=cfg.backend)
            pre_layers = dabn_layers(adapter.model)[:adapter._score_at]    # set by score_layer=
            acc[name], shares[label, name] = stream_accuracy(adapter, x, y, batches, pre_layers, follow,
                                                            rep.instance_mode)
        four = np.mean([acc[k] for k in streams])
        print(f"| {label} | " + " | ".join(f"{acc[k]:.2f}" for k in runs)
              + f" | {four:.2f} | {np.mean(list(acc.values())):.2f} |", flush=True)
    print("\nShare of batches per decision (single / multiple / skewed):\n")
    print("| stem | " + " | ".join(runs) + " |")
    print("|---|" + "---|" * len(runs))
    for label in ("one blend (calibrated)", "follows the previous decision"):
        print(f"| {label} | " + " | ".join(" / ".join(f"{v:.2f}" for v in shares[label, k].values())
                                          for k in runs) + " |")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
