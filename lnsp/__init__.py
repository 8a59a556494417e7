"""lnsp: a two-tower retrieval trainer whose long runs cannot hang silently.

Importing the package sets the thread variables before numpy, torch or faiss load.
"""

from lnsp import threads as _threads

_threads.set_env_defaults()

__version__ = "0.1.0"
