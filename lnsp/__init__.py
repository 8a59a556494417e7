"""lnsp: a two-tower retrieval trainer whose long runs cannot hang silently.

Importing the package sets the thread variables before numpy, torch or faiss load,
except in a process the guard runs (`lnsp run`): there the policy was set in its
environment before the interpreter started, and the user's interpreter may lack
lnsp's dependencies (the policy's .env reader among them).
"""

import os as _os

if "LNSP_GUARD" not in _os.environ:
    from lnsp.guard import threads as _threads

    _threads.set_env_defaults()

__version__ = "0.1.0"
