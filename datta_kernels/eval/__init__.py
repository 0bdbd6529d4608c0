"""The offline evaluation behind ``datta-kernels demo``.

- :mod:`.datasets`: Fashion-MNIST from local idx files (no downloads);
- :mod:`.corruptions`: CIFAR-10-C-style corruptions as batched, seeded torch functions;
- :mod:`.models`: a small BatchNorm ResNet, trained once and cached with a checksum;
- :mod:`.streams`: single-domain, mixed, dynamic and non-i.i.d. test streams (SPEC §5);
- :mod:`.runner`: every method on every stream through the public adapter API;
- :mod:`.oracle`: the true-batch-type selector behind the ``datta_oracle`` method;
- :mod:`.report`: terminal tables, ``results.json`` / ``.csv`` and the figure;
- :mod:`.benchmarks`, :mod:`.zoo`, :mod:`.protocols`, :mod:`.bench_runner`: ``datta-kernels run``:
  CIFAR-10-C / CIFAR-100-C / ImageNet-C in their published layouts (read lazily), WRN-28-10 /
  ResNet-26 / torchvision / saved models with zoo checkpoints, the literature's streams
  (continual, mixed_domains, correlated, dynamic, gradual) and the lockstep runner;
- :mod:`.diagnose`: score separation (single vs mixed) by layer, batch size, severity and
  score mode, with the hypothesis checks (``python -m datta_kernels.eval.diagnose``).
"""


def progress_bar(**kwargs):
    """A tqdm bar that redraws rarely when stderr is not a terminal (logs are not flooded)."""
    import sys

    from tqdm.auto import tqdm

    return tqdm(mininterval=0.1 if sys.stderr.isatty() else 30.0, leave=False, **kwargs)
