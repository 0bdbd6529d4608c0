"""The offline evaluation behind ``datta-kernels demo``.

- :mod:`.datasets`: Fashion-MNIST from local idx files (no downloads);
- :mod:`.corruptions`: CIFAR-10-C-style corruptions as batched, seeded torch functions;
- :mod:`.models`: a small BatchNorm ResNet, trained once and cached with a checksum;
- :mod:`.streams`: single-domain, mixed, dynamic and non-i.i.d. test streams (SPEC §5);
- :mod:`.runner`: every method on every stream through the public adapter API;
- :mod:`.report`: terminal tables, ``results.json`` / ``.csv`` and the figure.
"""
