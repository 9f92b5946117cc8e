"""Converts the LAION aesthetic predictor's PyTorch pickle to safetensors, once, on any machine
with torch (`pip install torch==2.13.0`, or the `export` extra); the machines that fit the
classifier then read the copy without torch.

  python -m ctrl_jax.launch.convert_laion sac+logos+ava1-l14-linearMSE.pth laion.safetensors

and pass --config.classifier.laion_weights=laion.safetensors. Exit status 0 done,
1 any error (one line), 2 wrong arguments.
"""
import sys

from ctrl_jax.launch import common
from ctrl_jax.models import aesthetic


def main(argv: list[str]) -> int:
  if len(argv) != 3 or argv[1].startswith("-"):
    print(__doc__.strip(), file=sys.stderr)
    return 2
  try:
    aesthetic.laion_pth_to_safetensors(argv[1], argv[2])
  except Exception as e:  # pylint: disable=broad-except
    print(f"error: {common.one_line(e)}", file=sys.stderr, flush=True)
    return 1
  print(f"[convert_laion] wrote {argv[2]}; use --config.classifier.laion_weights={argv[2]}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
