"""Build the Cython kernels in ext/ as pyflm._ext.<name>.

Every ext/*.pyx becomes an extension module; each has a numpy twin in pyflm/ that tests compare to.
"""
import glob
import os

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

here = os.path.dirname(os.path.abspath(__file__))
extensions = [
    Extension(
        "pyflm._ext." + os.path.splitext(os.path.basename(p))[0],
        [os.path.relpath(p, here)],
        include_dirs=[numpy.get_include()],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        extra_compile_args=["-O3", "-fopenmp-simd"],   # simd pragmas only: no OpenMP runtime
    )
    for p in sorted(glob.glob(os.path.join(here, "ext", "*.pyx")))
]

setup(
    packages=["pyflm", "pyflm._ext", "pyflm.help"],
    package_dir={"pyflm._ext": "ext", "pyflm.help": "help"},
    package_data={"pyflm": ["demo/*"], "pyflm.help": ["*.hlp"]},
    ext_modules=cythonize(extensions, language_level=3,
                          compiler_directives={"boundscheck": False, "wraparound": False, "cdivision": True}),
)
