"""Training: the one loop (loop.py), the builder of net, optimiser and step (build.py),
checkpoints (checkpoints.py), the run folder (runfolder.py) and torchrun's replicas
(distributed.py)."""
