"""pyflm: a Python re-implementation of MOSFLM (ipmosflm)."""
import os

__version__ = "0.1.0"

# pyflm's linear algebra is on small matrices (a least-squares Jacobian of a few hundred spots by a
# dozen parameters); OpenBLAS's threads only wait for each other there, and when the cores are busy
# an SVD of one takes 80 ms instead of 0.5 ms.  The cores go to worker processes (NPROC) instead.
# Read when numpy loads, so it holds when pyflm is imported first (ipmosflm, worker processes); a
# setting of the user's own is kept.
for _v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")
del _v
