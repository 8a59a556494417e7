"""Print the runtime dependencies of lnsp, one a line, from pyproject.toml: the one
list that the Dockerfile and the wheelhouse script install (versions: constraints.txt).
Usage: python3 scripts/dependencies.py [PYPROJECT]"""

import sys
import tomllib

path = sys.argv[1] if len(sys.argv) > 1 else "pyproject.toml"
with open(path, "rb") as f:
    print("\n".join(tomllib.load(f)["project"]["dependencies"]))
