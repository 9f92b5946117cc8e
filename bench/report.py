"""What the benchmarks share: a markdown table on stdout and a JSON file of the results."""
import json
import os
import platform


def print_table(head: tuple[str, ...], rows: list[list[str]]) -> None:
  """Prints a markdown table: `head` and one list of already formatted cells per row."""
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  lines += ["| " + " | ".join(cells) + " |" for cells in rows]
  print("\n".join(lines))


def write_json(path: str, payload: dict) -> None:
  """Writes `payload` plus the machine's description to `path` (folders created)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump({**payload, "machine": platform.platform(), "cpu_count": os.cpu_count(),
               "libc": platform.libc_ver()}, f, indent=2)
  print(f"wrote {path}")
