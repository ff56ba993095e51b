"""The operators and their kernels: §3.3's response normalisation as the torch.library
operator reproduction::lrn (lrn.py) with C (kernels.py, kernels.c) and Triton (lrn_triton.py)
kernels, and the C kernel of §5's fused update."""
