"""A minimal `.env` reader: KEY=VALUE lines, `#` comments, optional quotes."""

from __future__ import annotations

from pathlib import Path


def read_dotenv(path: str | Path = ".env") -> dict[str, str]:
    """The key/value pairs of a .env file; {} when it does not exist."""
    try:
        text = Path(path).read_text()
    except OSError:
        return {}
    values = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, value = line.split("=", 1)
        value = value.split(" #", 1)[0].strip().strip("'\"")
        values[key.strip().removeprefix("export ").strip()] = value
    return values
