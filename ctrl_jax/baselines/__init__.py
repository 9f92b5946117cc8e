"""Beside CTRL, never under it: inference-time guidance (`guidance`), CFG fine-tuned on (x, c, y)
triplets (`cfg_triplets`), the comparison on the digits benchmark (`compare`) and the studies
(`studies`)."""
