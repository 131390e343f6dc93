"""pcapvault.index, imported before anything of pcapvault loads numpy.

OpenBLAS starts one thread per core when numpy is imported, and they spin for a while
looking for work before they sleep: CPU that, on this project's 2-core machines, is taken
from the extraction or the recorder running next to it (docs/BENCHMARKS.md, D2). pcapvault does no
matrix products, so one thread is all it needs; an explicit setting in the environment wins.
"""

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
