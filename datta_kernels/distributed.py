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

import torch
import torch.distributed as dist
import torch.distributed.nn  # noqa: F401  (before any process group exists: see below)
from torch import Tensor, nn

from . import ops
from . import reference as ref
from .adapt import DATTA, softmax_entropy
from .backends.base import acc_dtype
from .functional import _backend_for, _check_channel_vec
from .nn import _PRESET_DEFAULT, FusedDABN, _is_plain_bn, _swap, convert_model, first_nonlinear_layer
from .presets import DISPERSION_PARTS

# torch.distributed.nn, imported above, binds the default group (``group.WORLD``) into default
# arguments when it is first imported, and torch.optim imports it (through torch._dynamo) on
# first use.  Imported after init_process_group it would keep the group alive past
# destroy_process_group; gloo's threads would then die in interpreter shutdown: a rare SIGABRT,
# "terminate called without an active exception" (issue 22).  Imported first, it binds None.

__all__ = ["SyncFusedDABN", "DistributedDATTA", "convert_sync", "merge_moments",
           "gather_moments"]

_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}


def _require_group(group) -> tuple[int, int]:
    """(rank, world size) in ``group``, or a clear error when there is no process group."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("SyncFusedDABN / DistributedDATTA need torch.distributed: call "
                           "torch.distributed.init_process_group(...) first (or use FusedDABN "
                           "for a single process)")
    return dist.get_rank(group), dist.get_world_size(group)


def merge_moments(rows: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Chan's merge of per-rank moments, in rank order.

    rows: ``(W, 1 + 2F)`` float64, row r = ``[count_r, mean_r (F), M2_r (F)]`` -> ``(count,
    mean (F), M2 (F))`` of the union.  A row with count 0 changes nothing.  A fixed sequence
    of float64 operations on the same gathered tensor: every rank gets bitwise the same result.
    """
    f = (rows.shape[1] - 1) // 2
    count, mean, m2 = rows[0, 0], rows[0, 1:1 + f], rows[0, 1 + f:]
    for r in range(1, rows.shape[0]):
        n_b, mean_b, m2_b = rows[r, 0], rows[r, 1:1 + f], rows[r, 1 + f:]
        n_ab = count + n_b
        safe = n_ab.clamp(min=1)
        delta = mean_b - mean
        mean = mean + delta * (n_b / safe)
        m2 = m2 + m2_b + delta.square() * (count * n_b / safe)
        count = n_ab
    return count, mean, m2


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


def _global_batch_moments(mean_i: Tensor, var_i: Tensor, m: int, group):
    """Local instance statistics ``(n, C)`` -> ``(mu_B, var_B, count, samples)`` of the global
    batch: one ``all_gather`` of ``[count, mean (C), M2 (C), n]`` float64 per rank, merged in
    rank order (:func:`merge_moments`).  ``count`` (elements) and ``samples`` are 0-dim
    float64 tensors; nothing is read on the host."""
    n = mean_i.shape[0]
    mi, vi = mean_i.detach().double(), var_i.detach().double()
    mean_l = mi.sum(dim=0) / max(n, 1)
    m2_l = ((m - 1) * vi + m * (mi - mean_l).square()).sum(dim=0)
    packed = torch.cat([mean_l.new_full((1,), float(n * m)), mean_l, m2_l,
                        mean_l.new_full((1,), float(n))])
    rows = _all_gather_rows(packed, group)
    count, mu, m2 = merge_moments(rows[:, :-1])
    var = torch.where(count > 1, m2 / (count - 1).clamp(min=1), torch.zeros_like(m2))
    dt = mean_i.dtype
    return mu.to(dt), var.to(dt), count, rows[:, -1].sum()


_PURE_INSTANCE: dict = {}


def _apply_moments(x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None,
                   bias: Tensor | None, eps: float, backend: str) -> Tensor:
    """SPEC D3's last step with given per-(n, c) moments ``(N, C)``: ``y = gamma (x - m)
    rsqrt(max(v, 0) + eps) + beta`` in x's dtype and memory format.  One read and one write of
    x by the backend's fused ``dabn_normalize`` called with the blend ``(0, 0, 1)``: the given
    moments take the place of the instance statistics (no shrink, source unused)."""
    if backend == "reference" or x.shape[0] == 0 or x.shape[2] * x.shape[3] <= 1:
        y = ref.normalize(x, mean, var, weight, bias, eps)
        fmt = torch.channels_last if ops.is_channels_last(x) else torch.contiguous_format
        return y.contiguous(memory_format=fmt)
    key = (x.device, mean.dtype)
    if key not in _PURE_INSTANCE:
        _PURE_INSTANCE[key] = torch.tensor([0.0, 0.0, 1.0], dtype=mean.dtype, device=x.device)
    zeros = mean.new_zeros(mean.shape[1])
    return ops.run_dabn(x, weight, bias, zeros, zeros, _PURE_INSTANCE[key], None, eps, backend,
                        stats=(mean, var))


class _SyncNormalize(torch.autograd.Function):
    """SPEC §3 with the global batch statistics.  Forward: D1–D3 on the tiny ``(N, C)``
    statistics (:func:`reference.blend_moments`), then one fused pass over x.  Backward: SPEC
    D5: the backend's two passes (``dabn_backward_sums``, ``dabn_backward_apply``: kernels on
    ``cpu`` and ``triton``) around :func:`reference.dabn_backward_coefficients`, whose ``[dmu_B, dvar_B]`` are
    summed over the ranks (:func:`_sum_over_ranks`) when x needs a gradient; the
    ``gamma, beta`` gradients stay this rank's share (the adapter sums them)."""

    @staticmethod
    def forward(ctx, x, weight, bias, st: dict):
        mean, var = ref.blend_moments(st["mean_i"], st["var_i"], st["smean"], st["svar"],
                                      st["blend"], st["m"], st["shrink_k"], st["eps"],
                                      batch=st["batch"])
        x = ops.as_kernel_layout(x)
        ctx.save_for_backward(x, weight)
        ctx.st = st
        return _apply_moments(x, mean, var, weight, bias, st["eps"], st["backend"])

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        st = ctx.st
        mean_i = st["mean_i"]
        # the backend's two D5 passes (kernels reject an empty x: the reference's there)
        impl = ops.kernel_backend("reference" if x.shape[0] == 0 else st["backend"])
        fmt = torch.channels_last if ops.is_channels_last(x) else torch.contiguous_format
        dy = dy.contiguous(memory_format=fmt)
        sdy, sdyxc = impl.dabn_backward_sums(dy, x, mean_i)
        need_x = ctx.needs_input_grad[0]
        group = st["group"]
        a, coef_b, coef_c, dweight, dbias = ref.dabn_backward_coefficients(
            sdy, sdyxc, weight, st["smean"], st["svar"], st["blend"], st["shrink_k"], st["eps"],
            mean_i, st["var_i"], st["m"], batch=st["batch"],
            sum_batch=(lambda t: _sum_over_ranks(t.double(), group)) if need_x else None)
        dx = impl.dabn_backward_apply(dy, x, mean_i, a, coef_b, coef_c) if need_x else None
        dw = dweight.to(weight.dtype) if ctx.needs_input_grad[1] else None
        db = dbias.to(weight.dtype) if ctx.needs_input_grad[2] else None   # affine: both
        return dx, dw, db, None


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
            mu_b = _global_batch_moments(mean_i, var_i, m, self.process_group)[0]
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
        mu_b, var_b, count, total = _global_batch_moments(mean_i, var_i, m, self.process_group)
        self.last_global_batch = total
        self.last_bytes_sent = 8 * (2 * c + 2)
        if self.compute_score:
            self.last_score, self.last_per_sample = self._global_score(x, mean_i, var_i, mu_b, m)
            if self.score_callback is not None:
                self.score_callback(self, self.last_score)
        dt = mean_i.dtype
        st = {"mean_i": mean_i, "var_i": var_i, "m": m, "batch": (mu_b, var_b, count),
              "smean": self.source_mean.detach().to(dt), "svar": self.source_var.detach().to(dt),
              "blend": self.blend().detach().to(device=x.device, dtype=dt),
              "shrink_k": self.shrink_k, "eps": self.eps, "group": self.process_group,
              "backend": _backend_for(x, self.backend)}
        return _SyncNormalize.apply(x, self.weight, self.bias, st)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", synced=True"


def convert_sync(model: nn.Module, preset: str = "datta", process_group=None, **kwargs) -> nn.Module:
    """``convert_model`` into :class:`SyncFusedDABN` layers (plain ``FusedDABN`` layers are
    converted too, keeping their state and configuration)."""
    def make(layer: FusedDABN) -> SyncFusedDABN:
        new = SyncFusedDABN(layer.num_features, layer.eps, layer.momentum, layer.affine,
                            layer.track_running_stats, process_group=process_group,
                            backend=layer.backend, score_mode=layer.score_mode,
                            shrink_k=layer.shrink_k, preset="source",
                            device=layer.source_mean.device, dtype=layer.source_mean.dtype)
        new.load_state_dict(layer.state_dict(), strict=True)
        new.preset = layer.preset
        new.compute_score = layer.compute_score
        for name in ("weight", "bias"):
            s, d = getattr(layer, name), getattr(new, name)
            if s is not None:
                d.requires_grad_(s.requires_grad)
        return new.train(layer.training)

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
        kw = {} if weights is None else {"weights": weights}
        if shrink_k is not _PRESET_DEFAULT:
            kw["shrink_k"] = shrink_k
        model = convert_sync(model, preset or "datta", process_group=process_group,
                             backend=backend or "auto", **kw)
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

    def _entropy_step(self, logits: Tensor) -> None:
        """Loss = sum of local entropies / global batch size; gradients of ``gamma, beta``
        summed over ranks (one packed collective, :func:`_sum_over_ranks`) before the step."""
        total = self._layers[self._score_at].last_global_batch
        loss = softmax_entropy(logits).sum() / total.to(torch.float32).clamp(min=1)
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

