"""Print the runtime dependencies of lnsp, one a line, from pyproject.toml: the one
list that the Dockerfile and the wheelhouse script install (versions: constraints.txt),
with those of the optional extras named after it.
Usage: python3 scripts/dependencies.py [PYPROJECT [EXTRA...]]"""

import sys
import tomllib

path = sys.argv[1] if len(sys.argv) > 1 else "pyproject.toml"
with open(path, "rb") as f:
    project = tomllib.load(f)["project"]
print("\n".join(project["dependencies"] + [dep for extra in sys.argv[2:]
                                           for dep in project["optional-dependencies"][extra]]))
