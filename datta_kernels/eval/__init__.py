"""The offline evaluation behind ``datta-kernels demo``.

- :mod:`.datasets`: Fashion-MNIST from local idx files (no downloads);
- :mod:`.corruptions`: CIFAR-10-C-style corruptions as batched, seeded torch functions;
- :mod:`.models`: a small BatchNorm ResNet, trained once and cached with a checksum;
- :mod:`.streams`: single-domain, mixed, dynamic and non-i.i.d. test streams (SPEC §5);
- :mod:`.runner`: every method on every stream through the public adapter API;
- :mod:`.report`: terminal tables, ``results.json`` / ``.csv`` and the figure.
"""


def progress_bar(**kwargs):
    """A tqdm bar that redraws rarely when stderr is not a terminal (logs are not flooded)."""
    import sys

    from tqdm.auto import tqdm

    return tqdm(mininterval=0.1 if sys.stderr.isatty() else 30.0, leave=False, **kwargs)
