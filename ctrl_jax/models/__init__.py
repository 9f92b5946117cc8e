"""Everything that touches diffusers / transformers lives under this package.

Importing it installs a logging filter that drops diffusers' "Flax classes are deprecated"
message (printed by every Flax module's `setup`, i.e. on every trace); other diffusers
warnings still come through.
"""
import logging

_DEPRECATION_PREFIX = "Flax classes are deprecated"


class _DropFlaxDeprecation(logging.Filter):

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.getMessage()).startswith(_DEPRECATION_PREFIX)


def silence_flax_deprecation() -> None:
  """Drops only diffusers' Flax deprecation message, keeping real warnings (idempotent)."""
  from diffusers.utils import logging as dlogging  # pylint: disable=g-import-not-at-top
  root = dlogging._get_library_root_logger()  # pylint: disable=protected-access
  for target in [root, *root.handlers]:
    if not any(isinstance(f, _DropFlaxDeprecation) for f in target.filters):
      target.addFilter(_DropFlaxDeprecation())


silence_flax_deprecation()
