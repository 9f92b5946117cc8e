"""Exports a CTRL run to a PyTorch diffusers folder (safetensors + json; see ctrl_jax.export).

  python -m ctrl_jax.launch.export --config=configs/digits.py --workdir=runs/digits \
      --out=runs/digits_torch [--lora_only]
"""
from ctrl_jax.runtime import hugepages

if __name__ == "__main__":  # before jax is imported (glibc reads its tunables at start-up)
  hugepages.reexec_with_hugepages()

from absl import flags  # noqa: E402

from ctrl_jax import export  # noqa: E402
from ctrl_jax.launch import common  # noqa: E402

flags.adopt_module_key_flags(common)  # --config and --workdir in --help

_OUT = flags.DEFINE_string("out", None, "Output folder (created; must be empty unless "
                           "--overwrite).")
_OVERWRITE = flags.DEFINE_bool(
    "overwrite", False, "Write into a non-empty --out, replacing only the files an export "
    "writes (others are kept).")
_LORA_ONLY = flags.DEFINE_bool(
    "lora_only", False, "Write the un-merged LoRA + label table (ctrl_lora.safetensors) instead "
    "of a merged UNet.")
flags.mark_flag_as_required("out")

if __name__ == "__main__":
  common.run(lambda config, workdir: export.export(config, workdir, _OUT.value,
                                                    _LORA_ONLY.value, _OVERWRITE.value))
