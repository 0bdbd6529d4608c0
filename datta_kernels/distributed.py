"""DATTA across processes (``torch.distributed``): global batch statistics, one global
decision, DAFT gradients reduced across ranks.

Each rank holds a slice of the global batch.  Every collective goes through
``torch.distributed`` on the layer's ``process_group`` (``None``: the default group), so the
same code runs on CPU with gloo and on GPUs with NCCL.

* :class:`SyncFusedDABN` (``convert_model(model, process_group=...)``; converting an
  ``nn.SyncBatchNorm`` keeps its group): the batch statistics ``mu_B, var_B`` are those of the
  global batch.  Each rank packs its per-channel ``(count, mean, M2)`` (from its instance
  statistics, SPEC §1) into one float64 tensor; one ``all_gather`` per layer; every rank merges
  the gathered rows in rank order with Chan's formula, so every rank computes bitwise the same
  ``mu_B, var_B``.  Instance statistics stay local.  The normalisation is SPEC D1–D3 on the
  tiny ``(N, C)`` statistics (``reference.blend_moments`` with the global batch) and one pass
  of the backend's fused kernel over x.  Backward (:class:`_SyncNormalize`): SPEC D5
  (``reference.dabn_backward_coefficients``) with its batch terms ``[sum_n dm, sum_n dv]``
  ``(2C,)`` summed over the ranks in one collective (:func:`_sum_over_ranks`).  Uneven batches
  and ranks with an empty batch work (count 0 drops out of the merge).  The state dict is
  that of ``FusedDABN`` (plain ``BatchNorm2d`` compatible).
* The score layer scores the global batch: ``dispersion`` merges per-feature ``(count, mean,
  M2)`` of the standardised statistics ``z``, ``pixel`` / ``instance`` compute local angles
  against the global ``mu_B`` and merge ``(count, mean, M2)`` of the angles: one more
  ``all_gather`` on the score layer.  ``last_per_sample`` holds the local samples' values.
* :class:`DistributedDATTA`: the DATTA adapter whose selector sees the same global score on
  every rank (same decision) and whose DAFT step uses the loss ``sum of local entropies /
  global batch size`` and sums the ``gamma, beta`` gradients of all ranks with one packed
  collective (:func:`_sum_over_ranks`) before the optimizer step: the update of the global
  batch's mean entropy, so the parameters stay identical on every rank.  (Do not wrap the
  model in DDP as well: the gradients would be reduced twice.)

Collectives per step of an L-layer model: forward L ``all_gather`` of ``(2C + 2)`` float64
values per rank (+1 small one on the score layer); backward (DAFT ``single`` batches only) one
per layer whose input needs a gradient, of ``2C`` float64 values (``all_gather`` on gloo,
``all_reduce`` elsewhere), + 1 of all ``gamma, beta`` (the same kind).  On the first call each
layer also gathers a small header (channels, dtype, layer index) and raises on a mismatch.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .adapt import DATTA, _overrides
from .nn import FusedDABN, first_nonlinear_layer
from .presets import _PRESET_DEFAULT
from .surgery import _is_plain_bn, _rebuild, _swap, convert_model
from .sync import SyncFusedDABN, _require_group, _sum_over_ranks, gather_moments, merge_moments

__all__ = ["SyncFusedDABN", "DistributedDATTA", "convert_sync", "merge_moments",
           "gather_moments"]


def convert_sync(model: nn.Module, preset: str = "datta", process_group=None, **kwargs) -> nn.Module:
    """``convert_model`` into :class:`SyncFusedDABN` layers (plain ``FusedDABN`` layers are
    converted too, keeping their state and configuration)."""
    def make(layer: FusedDABN) -> SyncFusedDABN:
        new = _rebuild(layer, SyncFusedDABN, process_group=process_group, backend=layer.backend,
                       score_mode=layer.score_mode, shrink_k=layer.shrink_k, cluster=layer.cluster,
                       preset="source")
        new.preset, new.compute_score = layer.preset, layer.compute_score
        new.stream_momentum = getattr(layer, "stream_momentum", None)    # its buffers came with the state
        new.stream_reset = getattr(layer, "stream_reset", None)
        return new

    if any(_is_plain_bn(m) for m in model.modules()):
        model = convert_model(model, preset, process_group=process_group, **kwargs)
    model, _ = _swap(model, lambda m: isinstance(m, FusedDABN) and not isinstance(m, SyncFusedDABN),
                     make)
    return model


class DistributedDATTA(DATTA):
    """:class:`~datta_kernels.DATTA` over a process group: each rank passes its slice of the
    global batch; scores, decisions, outputs and parameters are those of one process on the
    concatenated batch (see the module docstring).  Plain BatchNorm2d / FusedDABN layers are
    converted to :class:`SyncFusedDABN` on ``process_group``.  Other arguments as ``DATTA``.
    """

    def __init__(self, model: nn.Module, preset: str | None = "datta", *, process_group=None,
                 backend: str | None = "auto", shrink_k=_PRESET_DEFAULT, weights=None, **kwargs):
        _require_group(process_group)
        model = convert_sync(model, preset or "datta", process_group=process_group,
                             backend=backend or "auto", **_overrides(shrink_k, weights))
        self.process_group = process_group
        super().__init__(model, preset, backend=backend, shrink_k=shrink_k, weights=weights,
                         **kwargs)
        if not all(isinstance(lyr, SyncFusedDABN) for lyr in self._layers):
            raise ValueError("DistributedDATTA: every DABN layer must be a SyncFusedDABN")

    def _step(self, x: Tensor) -> Tensor:
        if self._score_at is None:
            # probe with one zero sample of this shape: a rank with an empty slice probes too
            self._score_at = first_nonlinear_layer(self.model, x.new_zeros((1, *x.shape[1:])))
        return super()._step(x)

    def _output_spread(self, logits: Tensor) -> Tensor:
        """The output check's spread of the global batch: the per-class population std of the
        softmax over every rank's rows (:func:`gather_moments`, one ``all_gather`` of ``1 + 2K``
        float64 values, the same bits on every rank, so every rank releases the same batches)."""
        p = torch.softmax(logits.detach().to(torch.float64), dim=1)
        count, _, m2 = gather_moments(p, self.process_group)
        std = (m2 / count.clamp(min=1)).clamp(min=0).sqrt()
        return (std.sum() / math.sqrt(max(p.shape[1] - 1, 1))).to(torch.float32)

    def _entropy_step(self, logits: Tensor) -> None:
        """Loss = sum of local entropies / global batch size; gradients of ``gamma, beta``
        summed over ranks (one packed collective, :func:`_sum_over_ranks`) before the step."""
        total = self._layers[self._score_at].last_global_batch
        loss = self._entropy_terms(logits).sum() / total.to(torch.float32).clamp(min=1)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = _sum_over_ranks(torch.cat([g.reshape(-1) for g in grads]), self.process_group)
        offset = 0
        for p in params:
            k = p.numel()
            p.grad = flat[offset:offset + k].view_as(p).clone()
            offset += k
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.n_updates += 1

