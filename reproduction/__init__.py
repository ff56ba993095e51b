"""A faithful PyTorch reproduction of Krizhevsky, Sutskever & Hinton (NIPS 2012).

    import reproduction
    model = reproduction.alexnet()                                 # the paper's net
    model = reproduction.alexnet(weights="runs/x/checkpoint.pt")   # with model.weights, its record
    model = reproduction.alexnet_caffe("bvlc_alexnet.caffemodel")  # Caffe's bvlc_alexnet, in memory

See reproduction/weights.py. The names are loaded on first use, so that `python -m data_prep`
(which imports reproduction.errors) does not pay for torch and the model.
"""

import signal
import sys

if sys.argv[:1] == ["-m"]:  # `python -m reproduction...` is starting: a Ctrl-C while torch loads exits
    signal.signal(signal.SIGINT, lambda signum, frame: sys.exit(130))  # quietly (run_cli restores Ctrl-C)

_EXPORTS = ("alexnet", "alexnet_caffe", "load_weights", "Weights")
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        from reproduction import weights
        return getattr(weights, name)
    raise AttributeError(f"module 'reproduction' has no attribute {name!r}")
