"""The run-time side of a chain: the custom ops the rewritten graph calls (``ops.py``: the argument schema defined
once, the fake kernels, the autograd wiring) and the solve records they leave (``records.py``)."""
