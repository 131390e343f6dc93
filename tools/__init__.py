"""pcapvault.tools"""

import pcapvault.index  # noqa: F401  (first: it limits numpy's BLAS threads)
