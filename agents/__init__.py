"""The precopy programs: daemons, their configuration, logs, progress and reports."""

import os as _os

# NumPy's OpenBLAS threads do no work here (no linear algebra), yet they
# were seen spinning on a core after NumPy calls (~5 % of the source agent's
# samples in a 1 GiB migration): one is enough.  Set before NumPy is imported.
_os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
