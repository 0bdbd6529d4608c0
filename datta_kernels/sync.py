"""The synced layer: :class:`SyncFusedDABN`, a :class:`~datta_kernels.FusedDABN` whose batch
statistics (and score) are those of the global batch over a process group, and its collectives.
The whole design (what is gathered, merged and summed, and in which order) is described in
:mod:`datta_kernels.distributed`, which adds the adapter, :class:`DistributedDATTA`.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn  # noqa: F401  (before any process group exists: see below)
from torch import Tensor

from . import ops
from . import reference as ref
from .functional import _backend_for, _check_channel_vec, normalize_with_moments
from .nn import FusedDABN, stream_anchor_moments
from .presets import DISPERSION_PARTS, acc_dtype

# torch.distributed.nn, imported above, binds the default group (``group.WORLD``) into default
# arguments when it is first imported, and torch.optim imports it (through torch._dynamo) on
# first use.  Imported after init_process_group it would keep the group alive past
# destroy_process_group; gloo's threads would then die in interpreter shutdown: a rare SIGABRT,
# "terminate called without an active exception".  Imported first (this module is imported by
# ``import datta_kernels``), it binds None.

__all__ = ["SyncFusedDABN", "merge_moments", "gather_moments"]

_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}


def _require_group(group) -> tuple[int, int]:
    """(rank, world size) in ``group``, or a clear error when there is no process group."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("SyncFusedDABN / DistributedDATTA need torch.distributed: call "
                           "torch.distributed.init_process_group(...) first (or use FusedDABN "
                           "for a single process)")
    return dist.get_rank(group), dist.get_world_size(group)


merge_moments = ref.merge_moments


def _local_moments(values: Tensor) -> Tensor:
    """``[count, mean (F), M2 (F)]`` float64 of the rows of ``values`` ``(n, F)`` (n may be 0)."""
    v = values.detach().to(torch.float64)
    n = v.shape[0]
    mean = v.sum(dim=0) / max(n, 1)
    m2 = (v - mean).square().sum(dim=0)
    return torch.cat([v.new_full((1,), float(n)), mean, m2])


def _all_gather_rows(packed: Tensor, group) -> Tensor:
    """``(W, K)``: row r = rank r's ``packed`` ``(K,)`` (same K on every rank)."""
    world = dist.get_world_size(group)
    out = packed.new_empty((world * packed.shape[0],))
    # one flat output buffer (no list of views); all_gather_single from torch 2.10 on
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, packed.contiguous(), group=group)
    return out.view(world, packed.shape[0])


def _sum_over_ranks(packed: Tensor, group) -> Tensor:
    """Sum of every rank's ``packed`` ``(K,)``, bitwise the same on every rank.  On gloo: one
    ``all_gather`` and the rows added in rank order (for the per-layer vectors a fraction of
    the latency of gloo's ``all_reduce``, bench/results/cpu_distributed.md); on other
    backends (NCCL) one ``all_reduce``, whose ring / tree algorithms hand every rank the same
    bits and receive ``O(K)`` instead of ``O(W K)`` bytes."""
    if dist.get_backend(group) != "gloo":
        out = packed.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out
    rows = _all_gather_rows(packed, group)
    total = rows[0].clone()
    for r in range(1, rows.shape[0]):
        total += rows[r]
    return total


def gather_moments(values: Tensor, group=None) -> tuple[Tensor, Tensor, Tensor]:
    """Global ``(count, mean (F), M2 (F))`` float64 of the rows of every rank's ``values``
    ``(n_r, F)``: one ``all_gather`` of ``1 + 2F`` values per rank, merged in rank order."""
    return merge_moments(_all_gather_rows(_local_moments(values), group))


def _global_batch_moments(mean_i: Tensor, var_i: Tensor, m: int, group, backend: str):
    """Local instance statistics ``(n, C)`` -> ``(mu_B, var_B, count, samples)`` of the global
    batch: one ``all_gather`` of ``[count, mean (C), M2 (C), n]`` float64 per rank, merged in
    rank order (the backend's ``batch_moments_local`` / ``batch_moments_merge``: Chan's merge
    as in :func:`merge_moments`).  ``count`` (elements) and ``samples`` are 0-dim float64
    tensors; nothing is read on the host."""
    impl = ops.kernel_backend(backend)
    rows = _all_gather_rows(impl.batch_moments_local(mean_i, var_i, m), group)
    return impl.batch_moments_merge(rows, mean_i.dtype)


class _SyncNormalize(torch.autograd.Function):
    """SPEC §3 with the global batch statistics.  Forward: D1–D3 on the tiny ``(N, C)``
    statistics (the backend's ``blend_moments``), then one fused pass over x.  Backward: SPEC
    D5: the backend's two passes (``dabn_backward_sums``, ``dabn_backward_apply``) around its
    ``dabn_backward_batch_terms`` / ``dabn_backward_coefficients``, between which the packed
    ``[dmu_B, dvar_B]`` are summed over the ranks (:func:`_sum_over_ranks`) when x needs a
    gradient; the ``gamma, beta`` gradients stay this rank's share (the adapter sums them).
    The per-(n, c) steps are one kernel op each on ``cpu``, ``cuda`` and ``triton`` (the
    reference's torch ops, ``reference.blend_moments`` / ``dabn_backward_coefficients``, on
    ``reference`` and for an empty slice)."""

    @staticmethod
    def forward(ctx, x, weight, bias, st: dict):
        impl = _stat_backend(x, st)
        mean, var = impl.blend_moments(st["mean_i"], st["var_i"], st["smean"], st["svar"],
                                       st["blend"], st["batch"], st["m"], st["shrink_k"], st["eps"])
        x = ops.as_kernel_layout(x)
        ctx.save_for_backward(x, weight)
        ctx.st = st
        return normalize_with_moments(x, mean, var, weight, bias, st["eps"], st["backend"])

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        st = ctx.st
        mean_i, var_i = st["mean_i"], st["var_i"]
        # the backend's D5 kernels (they reject an empty x: the reference's there)
        impl = _stat_backend(x, st)
        fmt = torch.channels_last if ops.is_channels_last(x) else torch.contiguous_format
        dy = dy.contiguous(memory_format=fmt)
        sdy, sdyxc = impl.dabn_backward_sums(dy, x, mean_i)
        coef_args = (sdy, sdyxc, weight, st["smean"], st["svar"], st["blend"], st["batch"], mean_i,
                     var_i, st["m"], st["shrink_k"], st["eps"])
        terms, dweight, dbias = impl.dabn_backward_batch_terms(*coef_args)
        dx = None
        if ctx.needs_input_grad[0]:
            terms = _sum_over_ranks(terms, st["group"])
            a, coef_b, coef_c = impl.dabn_backward_coefficients(*coef_args, terms)
            dx = impl.dabn_backward_apply(dy, x, mean_i, a, coef_b, coef_c)
        dw = dweight.to(weight.dtype) if ctx.needs_input_grad[1] else None
        db = dbias.to(weight.dtype) if ctx.needs_input_grad[2] else None   # affine: both
        return dx, dw, db, None


def _stat_backend(x: Tensor, st: dict):
    """The kernel backend of the synced layer's steps (the reference's for an empty slice)."""
    return ops.kernel_backend("reference" if x.shape[0] == 0 else st["backend"])


class SyncFusedDABN(FusedDABN):
    """:class:`FusedDABN` whose test-batch statistics (and score, on the score layer) are those
    of the global batch over ``process_group`` (``None``: the default group).  See the module
    docstring.  Every rank must call ``forward`` on every layer in the same order (as with
    ``nn.SyncBatchNorm``); a rank may hold an empty batch ``(0, C, H, W)``.

    Extra state after a forward: ``last_global_batch`` (0-dim float64 tensor, the number of
    samples over all ranks) and ``last_bytes_sent`` (bytes this rank contributed to the
    collectives of that forward).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None,
                 *, process_group=None, **kwargs):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         **kwargs)
        self.process_group = process_group
        self.last_global_batch: Tensor | None = None
        self.last_bytes_sent = 0
        self._header_checked = False

    # ------------------------------------------------------------------ checks
    def _check_header(self, x: Tensor) -> None:
        """Gather ``[C, dtype, layer call index]`` once and raise on a mismatch between ranks
        (an all_gather of different sizes could otherwise hang or corrupt)."""
        head = torch.tensor([self.num_features, x.shape[1], _DTYPE_CODES.get(x.dtype, 9)],
                            dtype=torch.float64, device=x.device)
        rows = _all_gather_rows(head, self.process_group)
        if not bool((rows == rows[0]).all()):
            got = [tuple(int(v) for v in r) for r in rows.cpu()]
            raise RuntimeError("SyncFusedDABN: ranks disagree on (num_features, input channels, "
                               f"dtype code) of this layer: {got} (dtype codes {_DTYPE_CODES}); "
                               "every rank must run the same model on inputs of the same dtype")
        self._header_checked = True

    # ------------------------------------------------------------------ forward
    def _local_stats(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Instance statistics of this rank's slice from the backend (no graph: the backward
        of :class:`_SyncNormalize` accounts for them)."""
        if x.shape[0] == 0:
            z = x.new_zeros((0, x.shape[1]), dtype=acc_dtype(x.dtype))
            return z, z
        return ops.run_instance_stats(x.detach(), _backend_for(x, self.backend))

    def _global_score(self, x: Tensor, mean_i: Tensor, var_i: Tensor, mu_b: Tensor, m: int):
        mode = self.score_mode
        smean = self.source_mean.detach()
        with torch.no_grad():
            mean_i, var_i = mean_i.detach(), var_i.detach()
            if mode == "dispersion":
                z = ref.dispersion_z(mean_i, var_i, smean, self.source_var.detach(), m, self.eps,
                                 DISPERSION_PARTS).float()
                count, mean, m2 = gather_moments(z, self.process_group)
                var_f = (m2 / count.clamp(min=1)).float()
                per = (z - mean.float()).square().mean(dim=1).sqrt()
                self.last_bytes_sent += 8 * (1 + 2 * z.shape[1])
                return var_f.sqrt().mean(), per
            if x.shape[0] == 0:
                angles = x.new_zeros((0,), dtype=torch.float32)
            elif mode == "pixel":
                angles = ops.diversity_angles_op(x.detach(), smean, mu_b.detach().float(),
                                              _backend_for(x, self.backend)).float()
            else:
                angles = ref.diversity_angles_instance(mean_i, smean, mu_b.detach()).float()
            count, _, m2 = gather_moments(angles[:, None], self.process_group)
            self.last_bytes_sent += 8 * 3
            return (m2 / count.clamp(min=1)).float().sqrt().reshape(()), angles

    def score(self, x: Tensor) -> Tensor:
        """The diversity score of the GLOBAL batch (every rank calls it with its slice);
        ``last_per_sample`` holds the local samples' values."""
        self._check_input_dim(x)
        _require_group(self.process_group)
        if not self._header_checked:
            self._check_header(x)
        m = x.shape[2] * x.shape[3]
        with torch.no_grad():
            mean_i, var_i = self._local_stats(x)
            mu_b = _global_batch_moments(mean_i, var_i, m, self.process_group,
                                        _backend_for(x, self.backend))[0]
            self.last_score, self.last_per_sample = self._global_score(x, mean_i, var_i, mu_b, m)
        return self.last_score

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
        _require_group(self.process_group)
        for t, name in ((self.weight, "weight"), (self.source_mean, "source_mean")):
            _check_channel_vec(t, name, x)
        if not self._header_checked:
            self._check_header(x)
        n, c, h, w = x.shape
        m = h * w
        mean_i, var_i = self._local_stats(x)
        mu_b, var_b, count, total = _global_batch_moments(mean_i, var_i, m, self.process_group,
                                        _backend_for(x, self.backend))
        self.last_global_batch = total
        self.last_bytes_sent = 8 * (2 * c + 2)
        if self.compute_score:
            self.last_score, self.last_per_sample = self._global_score(x, mean_i, var_i, mu_b, m)
            if self.score_callback is not None:
                self.score_callback(self, self.last_score)
        dt = mean_i.dtype
        smean, svar = self.source_mean, self.source_var
        if getattr(self, "stream_momentum", None) is not None:
            # SPEC §3c on the global batch's statistics: the same fold on every rank
            smean, svar = stream_anchor_moments(mu_b, var_b, self.stream_mean, self.stream_var, smean, svar,
                                                self.decision, self.skewed, self.stream_momentum,
                                                valid=total > 0, reset=getattr(self, "stream_reset", None),
                                                eps=self.eps)
        st = {"mean_i": mean_i, "var_i": var_i, "m": m, "batch": (mu_b, var_b, count),
              "smean": smean.detach().to(dt), "svar": svar.detach().to(dt),
              "blend": self.blend().detach().to(device=x.device, dtype=dt),
              "shrink_k": self.shrink_k, "eps": self.eps, "group": self.process_group,
              "backend": _backend_for(x, self.backend)}
        return _SyncNormalize.apply(x, self.weight, self.bias, st)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", synced=True"
