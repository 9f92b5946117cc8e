"""The compressibility classifier's two architectures side by side: "official" (full resolution,
stride-1 first block, as the official CTRL train_reward_cnn.py) and "resized" (images resized to
size / 4 first, as 128 is to 512).

Both are fitted by `compressibility.fit_classifier` on the same generated images (smooth colour
gradients, a few flat rectangles and noise at 1-, 2-, 4- or 8-pixel grain with a log-uniform
amplitude, so that JPEG size depends on detail at every scale) labelled with their real JPEG
sizes (PIL, quality 95) cut at the quartiles into 4 classes, as compress4. A seeded third of the
images is held out; the table gives held-out accuracy, NLL and ECE at the fitted temperature,
parameters, fit wall time (compiles included) and XLA's FLOP count of one forward (and the
FLOPs and temporary memory of the reward's gradient w.r.t. the image) at 512², for the fitted
width and for the SD configs' width.

  python bench/compress_cnn.py            # ~3 min on 2 CPU cores
"""
import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from ctrl_jax.core import calibration
from ctrl_jax.problems.sd import compressibility
from ctrl_jax.problems.sd import stages
import report  # bench/report.py: this script's folder is on sys.path


def synthetic_images(n: int, size: int, seed: int) -> np.ndarray:
  """n images float32 [n, 3, size, size] in [-1, 1] whose JPEG size varies over a wide range and
  depends on detail at several scales (see the module docstring)."""
  rng = np.random.default_rng(seed)
  out = np.empty((n, 3, size, size), np.float32)
  yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
  for i in range(n):
    angle = rng.uniform(0, 2 * np.pi)
    ramp = np.cos(angle) * xx + np.sin(angle) * yy
    lo, hi = rng.uniform(-0.8, 0.8, (2, 3, 1, 1))
    img = lo + (hi - lo) * ramp[None]
    for _ in range(rng.integers(0, 4)):
      y0, x0 = rng.integers(0, size - 4, 2)
      h, w = rng.integers(4, size // 2, 2)
      img[:, y0:y0 + h, x0:x0 + w] = rng.uniform(-0.9, 0.9, (3, 1, 1))
    grain = int(rng.choice([1, 2, 4, 8]))
    amplitude = np.exp(rng.uniform(np.log(0.01), np.log(0.6)))
    noise = rng.uniform(-1, 1, (3, size // grain, size // grain))
    img = img + amplitude * np.repeat(np.repeat(noise, grain, 1), grain, 2)
    out[i] = np.clip(img, -1, 1)
  return out


def cost_at(model, variables, side: int) -> dict:
  """XLA's FLOP count of one image [1, 3, side, side] through `model` (the reward's inference
  mode), and the FLOPs and temporary memory of the gradient of its log-softmax[0] w.r.t. that
  image (what the reward costs per image in RL); compiled, not run."""
  apply = compressibility.classifier_apply(model)
  image = jax.ShapeDtypeStruct((1, 3, side, side), jnp.float32)

  def compiled(fn):
    return jax.jit(fn).lower(variables, image).compile()

  def flops(c):
    cost = c.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])

  grad = jax.grad(lambda x, v: jax.nn.log_softmax(apply(v, x))[0, 0])
  grad_compiled = compiled(lambda v, x: grad(x, v))
  return {"gflops_forward": flops(compiled(apply)) / 1e9,
          "gflops_grad": flops(grad_compiled) / 1e9,
          "grad_temp_mib": grad_compiled.memory_analysis().temp_size_in_bytes / 2 ** 20}


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--n", type=int, default=480, help="images (a third held out)")
  ap.add_argument("--size", type=int, default=64, help="image side (resized arch: size / 4)")
  ap.add_argument("--width", type=int, default=16, help="channels of the first block")
  ap.add_argument("--sd_width", type=int, default=64, help="width of the SD configs (FLOPs)")
  ap.add_argument("--steps", type=int, default=300)
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--lr", type=float, default=3e-3)
  ap.add_argument("--seeds", type=int, nargs="+", default=[0])
  ap.add_argument("--out", default="bench/results/compress_cnn.json")
  args = ap.parse_args()

  images = synthetic_images(args.n, args.size, seed=1234)
  size_kb = compressibility.jpeg_size_kb(compressibility.to_uint8(images))
  edges = tuple(float(q) for q in np.quantile(size_kb, (0.25, 0.5, 0.75)))
  labels = stages.size_classes(size_kb, edges)
  test = np.random.default_rng(99).permutation(args.n)[:args.n // 3]
  train = np.setdiff1d(np.arange(args.n), test)
  print(f"{args.n} images {args.size}², JPEG {size_kb.min():.2f}–{size_kb.max():.2f} kB, "
        f"class edges {[round(e, 2) for e in edges]} kB; fit on {len(train)} (20 % of them "
        f"for the temperature), test on {len(test)}", flush=True)

  input_size = args.size // 4
  results = []
  for arch in compressibility.CNN_ARCHS:
    model = compressibility.CompressibilityCNN(4, width=args.width, input_size=input_size,
                                               arch=arch)
    apply = jax.jit(compressibility.classifier_apply(model))
    for seed in args.seeds:
      t0 = time.perf_counter()
      variables, info = compressibility.fit_classifier(
          images[train], labels[train], 4, seed, steps=args.steps, batch=args.batch, lr=args.lr,
          width=args.width, input_size=input_size, arch=arch)
      fit_s = time.perf_counter() - t0
      logits = np.concatenate([np.asarray(apply(variables, jnp.asarray(images[test[s:s + 64]])))
                               for s in range(0, len(test), 64)]).astype(np.float64)
      logp = logits - logits.max(-1, keepdims=True)
      logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
      results.append({
          "arch": arch, "seed": seed, "fit_s": fit_s,
          "test_acc": float((logits.argmax(-1) == labels[test]).mean()),
          "test_nll": float(-logp[np.arange(len(test)), labels[test]].mean()),
          "test_ece": calibration.expected_calibration_error(np.exp(logp), labels[test]),
          "calib_ece": info["ece_after"], "temperature": info["temperature"],
          "train_acc": info["train_acc"]})
      print(f"  {arch} seed {seed}: {results[-1]}", flush=True)

  costs = {}
  for arch in compressibility.CNN_ARCHS:
    for width in sorted({args.width, args.sd_width}):
      model = compressibility.CompressibilityCNN(4, width=width, input_size=128, arch=arch)
      variables = jax.eval_shape(lambda m=model: compressibility.init_variables(m, 0))
      params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(variables["params"]))
      costs[f"{arch}/{width}"] = {"arch": arch, "width": width, "params": params,
                                  **cost_at(model, variables, 512)}

  rows = []
  for arch in compressibility.CNN_ARCHS:
    mine = [r for r in results if r["arch"] == arch]
    mean = {k: float(np.mean([r[k] for r in mine]))
            for k in ("test_acc", "test_nll", "test_ece", "calib_ece", "temperature", "fit_s")}
    cost = costs[f"{arch}/{args.width}"]
    rows.append([arch, f"{args.size}²" if arch == "official" else f"{input_size}²",
                 f"{mean['test_acc']:.3f}", f"{mean['test_nll']:.3f}", f"{mean['test_ece']:.3f}",
                 f"{mean['temperature']:.2f}", f"{cost['params']:,}", f"{mean['fit_s']:.0f}",
                 f"{cost['gflops_forward']:.2f}"])
  print(f"\nwidth {args.width}, {len(args.seeds)} seed(s), {args.steps} steps × {args.batch}:")
  report.print_table(("arch", "CNN input", "test acc", "test NLL", "test ECE", "T", "params",
                      "fit s", "GFLOP fwd @512²"), rows)
  print("\nAt 512² (one image; the reward's gradient = forward + backward to the image):")
  report.print_table(("arch", "width", "params", "GFLOP forward", "GFLOP gradient",
                      "gradient temp MiB (XLA:CPU)"),
                     [[c["arch"], str(c["width"]), f"{c['params']:,}",
                       f"{c['gflops_forward']:.2f}", f"{c['gflops_grad']:.2f}",
                       f"{c['grad_temp_mib']:.0f}"] for c in costs.values()])
  report.write_json(args.out, {"args": vars(args), "edges_kb": list(edges),
                               "num_train": int(len(train)), "num_test": int(len(test)),
                               "fits": results, "costs_512": list(costs.values())})


if __name__ == "__main__":
  main()
