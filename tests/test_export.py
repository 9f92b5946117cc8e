"""Flax ↔ PyTorch: our name mapping per component, checked against diffusers' / transformers'
own PyTorch models (the reference no one here wrote), on tiny random models built here.

Every parameter is perturbed away from its init (norm scales ≠ 1, biases ≠ 0, LoRA up ≠ 0), so
a swapped or untransposed tensor changes the outputs. Max-abs differences are printed (-s).
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import diffusers  # noqa: E402
import transformers  # noqa: E402
from diffusers.models import activations as torch_activations  # noqa: E402
from flax import traverse_util  # noqa: E402

from ctrl_jax.models import diffusers_export  # noqa: E402
from ctrl_jax.models import augmented  # noqa: E402
from ctrl_jax.models import convert  # noqa: E402
from ctrl_jax.models import sd as sd_lib  # noqa: E402
from ctrl_jax.models import torch_client  # noqa: E402
from ctrl_jax.models import unet as unet_lib  # noqa: E402
from ctrl_jax.models import weights  # noqa: E402

VAE_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=4, sample_size=32,
                  down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64),
                  layers_per_block=1, norm_num_groups=32)
CLIP_CONFIG = dict(vocab_size=64, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                   num_attention_heads=4, max_position_embeddings=12, projection_dim=16)


def perturb(params, seed, scale=0.1):
  flat = traverse_util.flatten_dict(dict(params))
  out = {}
  for i, (k, v) in enumerate(sorted(flat.items())):
    noise = jax.random.normal(jax.random.fold_in(jax.random.key(seed), i), v.shape, jnp.float32)
    out[k] = np.asarray(v, np.float32) + scale * np.asarray(noise)
  return traverse_util.unflatten_dict(out)


def perturb_torch(module, seed, scale=0.1):
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in module.parameters():
      p.add_(scale * torch.randn(p.shape, generator=g))
  return module


class TanhGEGLU:
  """diffusers' Flax GEGLU uses the tanh-approximate GELU, its PyTorch GEGLU the exact one;
  patching PyTorch to tanh isolates the weight mapping from that (real) model difference."""

  def __enter__(self):
    self._orig = torch_activations.GEGLU.gelu
    torch_activations.GEGLU.gelu = lambda _, g: torch.nn.functional.gelu(g, approximate="tanh")

  def __exit__(self, *exc):
    torch_activations.GEGLU.gelu = self._orig


def test_torch_key_names_per_component():
  unet_attn = ("down_blocks_0", "attentions_0", "transformer_blocks_0", "attn1", "to_out_0",
               "kernel")
  assert (convert.torch_key(unet_attn, "unet")
          == "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.weight")
  geglu = ("mid_block", "attentions_0", "transformer_blocks_0", "ff", "net_0", "proj", "bias")
  assert (convert.torch_key(geglu, "unet")
          == "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj.bias")
  assert convert.torch_key(("time_embedding", "linear_1", "kernel"), "unet") == (
      "time_embedding.linear_1.weight")  # "linear_1" is a name, not a list index
  assert convert.torch_key(("conv_norm_out", "scale"), "unet") == "conv_norm_out.weight"
  assert convert.torch_key(("decoder", "mid_block", "attentions_0", "query", "kernel"),
                           "vae") == "decoder.mid_block.attentions.0.to_q.weight"
  assert convert.torch_key(("decoder", "mid_block", "attentions_0", "proj_attn", "bias"),
                           "vae") == "decoder.mid_block.attentions.0.to_out.0.bias"
  assert convert.torch_key(("text_model", "embeddings", "token_embedding", "embedding"),
                           "text_encoder") == "text_model.embeddings.token_embedding.weight"
  assert convert.torch_key(("text_model", "encoder", "layers", "1", "mlp", "fc2", "kernel"),
                           "text_encoder") == "text_model.encoder.layers.1.mlp.fc2.weight"


def _ctrl_unet(seed=0, num_labels=3):
  unet = unet_lib.build_unet(unet_lib.tiny_unet_config(sample_size=8, in_channels=4))
  params = perturb(unet_lib.init_unet_params(unet, jax.random.key(seed)), seed + 1)
  model = augmented.AugmentedUNet(unet, num_labels=num_labels, lora_rank=2)
  ctrl = model.init_ctrl_params(jax.random.key(seed + 2), params)
  ctrl = jax.tree_util.tree_map(np.array, ctrl)
  ctrl["lora"] = jax.tree_util.tree_map(lambda a: a + 0.2 * np.sign(a) + 0.1, ctrl["lora"])
  table = np.array(jax.random.normal(jax.random.key(seed + 3), ctrl["label_embedding"].shape))
  table[num_labels] = 0.0
  ctrl["label_embedding"] = table
  return model, params, ctrl


def _unet_inputs(seed=0, b=4, num_labels=3):
  g = np.random.default_rng(seed)
  x = g.standard_normal((b, 4, 8, 8)).astype(np.float32)
  t = np.array([1, 250, 600, 999][:b], np.int32)
  ctx = g.standard_normal((b, 3, 32)).astype(np.float32)
  labels = np.array([0, 1, 2, num_labels][:b], np.int32)
  return x, t, ctx, labels


def _torch_unet_out(unet, x, t, ctx, labels):
  with torch.no_grad():
    return unet(torch.from_numpy(x), torch.from_numpy(t.astype(np.int64)),
                encoder_hidden_states=torch.from_numpy(ctx),
                class_labels=torch.from_numpy(labels.astype(np.int64))).sample.numpy()


def test_unet_export_with_label_embedding_and_merged_lora(tmp_path):
  model, params, ctrl = _ctrl_unet()
  diffusers_export.export_unet(str(tmp_path / "unet"), model, params, ctrl)
  assert sorted(os.listdir(tmp_path / "unet")) == ["config.json",
                                                   "diffusion_pytorch_model.safetensors"]
  tu = diffusers.UNet2DConditionModel.from_pretrained(str(tmp_path / "unet")).eval()
  assert tu.config.num_class_embeds == 4
  np.testing.assert_array_equal(tu.class_embedding.weight.detach().numpy(),
                                ctrl["label_embedding"])
  x, t, ctx, labels = _unet_inputs()
  ours = np.asarray(model.apply(params, ctrl, jnp.asarray(x), jnp.asarray(t), jnp.asarray(ctx),
                                jnp.asarray(labels)))
  plain = np.asarray(model.apply_pretrained(params, jnp.asarray(x), jnp.asarray(t),
                                            jnp.asarray(ctx)))
  assert np.abs(ours - plain).max() > 1e-2  # the CTRL params do change the output
  exact = np.abs(_torch_unet_out(tu, x, t, ctx, labels) - ours).max()
  with TanhGEGLU():
    tanh = np.abs(_torch_unet_out(tu, x, t, ctx, labels) - ours).max()
  print(f"\nUNet Flax vs PyTorch max|Δ|: {exact:.2e} (PyTorch exact GELU), {tanh:.2e} (tanh)")
  assert tanh <= 1e-4
  assert exact <= 1e-3


def test_lora_only_export_applied_in_pytorch_equals_merged(tmp_path):
  model, params, ctrl = _ctrl_unet(seed=5)
  diffusers_export.export_unet(str(tmp_path / "base"), model, params, None)
  diffusers_export.export_lora(str(tmp_path / "ctrl_lora.safetensors"), model, ctrl)
  diffusers_export.export_unet(str(tmp_path / "merged"), model, params, ctrl)
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  with safe_open(str(tmp_path / "ctrl_lora.safetensors"), framework="numpy") as f:
    keys, meta = list(f.keys()), f.metadata()
  assert meta["format"] == "ctrl_jax.lora.v1" and meta["null_label"] == "3"
  assert "class_embedding.weight" in keys
  assert "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_down.weight" in keys
  assert len(keys) == 1 + 2 * len(augmented.dense_paths(params, model.lora_targets))
  applied = torch_client.apply_ctrl_lora(str(tmp_path / "base"),
                                         str(tmp_path / "ctrl_lora.safetensors")).eval()
  merged = diffusers.UNet2DConditionModel.from_pretrained(str(tmp_path / "merged")).eval()
  x, t, ctx, labels = _unet_inputs(1)
  a = _torch_unet_out(applied, x, t, ctx, labels)
  m = _torch_unet_out(merged, x, t, ctx, labels)
  np.testing.assert_allclose(a, m, atol=1e-5)


def test_export_refuses_a_trained_null_row(tmp_path):
  model, params, ctrl = _ctrl_unet()
  ctrl["label_embedding"][model.null_label] = 0.5
  with pytest.raises(ValueError, match="NULL row 3"):
    diffusers_export.export_unet(str(tmp_path / "unet"), model, params, ctrl)


def _flax_vae(seed=0):
  vae = diffusers.FlaxAutoencoderKL(**VAE_CONFIG)
  params = perturb(jax.jit(vae.init_weights)(jax.random.key(seed)), seed + 1)
  return vae, params


def _torch_vae_decode(tv, z):
  with torch.no_grad():
    return tv.decode(torch.from_numpy(z)).sample.numpy()


def test_vae_export_decode_and_mid_block_attention(tmp_path):
  vae, params = _flax_vae()
  folder = str(tmp_path / "vae")
  weights.save_torch_component(folder, "vae", weights.flax_to_torch_config(vae, "AutoencoderKL"),
                               params)
  tv = diffusers.AutoencoderKL.from_pretrained(folder).eval()
  # The tensor diffusers' own converter leaves random: decoder mid-block attention.
  attn = params["decoder"]["mid_block"]["attentions_0"]
  mid = tv.decoder.mid_block.attentions[0]
  np.testing.assert_array_equal(mid.to_q.weight.detach().numpy(), attn["query"]["kernel"].T)
  np.testing.assert_array_equal(mid.to_out[0].bias.detach().numpy(), attn["proj_attn"]["bias"])
  np.testing.assert_array_equal(mid.group_norm.weight.detach().numpy(),
                                attn["group_norm"]["scale"])
  z = np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32)
  ours = np.asarray(vae.apply({"params": params}, jnp.asarray(z), method=vae.decode).sample)
  diff = np.abs(_torch_vae_decode(tv, z) - ours).max()
  print(f"\nVAE decode Flax vs PyTorch max|Δ|: {diff:.2e}")
  assert diff <= 1e-3


def _flax_clip(seed=0):
  cfg = transformers.CLIPTextConfig(**CLIP_CONFIG)
  model = transformers.FlaxCLIPTextModel(cfg, seed=seed)
  return model, perturb(model.params, seed + 1)


def test_text_encoder_export(tmp_path):
  model, params = _flax_clip()
  weights.save_text_encoder(str(tmp_path / "te"), model, params)
  tm = transformers.CLIPTextModel.from_pretrained(str(tmp_path / "te")).eval()
  ids = np.array([[0, 5, 9, 33, 1, 1], [0, 7, 1, 1, 1, 1]], np.int32)
  ours = np.asarray(model(ids, params=params).last_hidden_state)
  with torch.no_grad():
    ref = tm(torch.from_numpy(ids.astype(np.int64))).last_hidden_state.numpy()
  diff = np.abs(ref - ours).max()
  print(f"\nCLIP text encoder Flax vs PyTorch max|Δ|: {diff:.2e}")
  assert diff <= 1e-3


def _write_tokenizer(folder):
  return sd_lib.write_tiny_tokenizer(folder, max_length=12)


def _torch_sd_folder(folder, seed=0):
  """A safetensors-only PyTorch SD folder of tiny random components (no Flax files)."""
  tu = perturb_torch(diffusers.UNet2DConditionModel(
      **unet_lib.tiny_unet_config(sample_size=8, in_channels=4)), seed)
  tv = perturb_torch(diffusers.AutoencoderKL(**VAE_CONFIG), seed + 1)
  tm = perturb_torch(transformers.CLIPTextModel(transformers.CLIPTextConfig(**CLIP_CONFIG)),
                     seed + 2)
  tu.save_pretrained(os.path.join(folder, "unet"), safe_serialization=True)
  tv.save_pretrained(os.path.join(folder, "vae"), safe_serialization=True)
  tm.save_pretrained(os.path.join(folder, "text_encoder"), safe_serialization=True)
  for sub in ("unet", "vae", "text_encoder"):
    files = os.listdir(os.path.join(folder, sub))
    assert not [f for f in files if f.endswith((".bin", ".msgpack", ".pt", ".pth"))], files
  return tu.eval(), tv.eval(), tm.eval()


def test_pytorch_safetensors_sd_folder_loads_into_flax(tmp_path):
  tu, tv, tm = _torch_sd_folder(str(tmp_path))
  unet, up = weights.load_unet(str(tmp_path))
  x, t, ctx, _ = _unet_inputs(2)
  ours = np.asarray(unet.apply({"params": up}, jnp.asarray(x), jnp.asarray(t),
                               jnp.asarray(ctx)).sample)
  with torch.no_grad(), TanhGEGLU():
    ref_tanh = tu(torch.from_numpy(x), torch.from_numpy(t.astype(np.int64)),
                  encoder_hidden_states=torch.from_numpy(ctx)).sample.numpy()
  with torch.no_grad():
    ref = tu(torch.from_numpy(x), torch.from_numpy(t.astype(np.int64)),
             encoder_hidden_states=torch.from_numpy(ctx)).sample.numpy()
  vae, vp = weights.load_vae(str(tmp_path))
  z = np.random.default_rng(3).standard_normal((2, 4, 8, 8)).astype(np.float32)
  vae_diff = np.abs(np.asarray(vae.apply({"params": vp}, jnp.asarray(z), method=vae.decode)
                               .sample) - _torch_vae_decode(tv, z)).max()
  te, tp = weights.load_text_encoder(str(tmp_path))
  ids = np.array([[0, 3, 4, 1]], np.int32)
  with torch.no_grad():
    te_ref = tm(torch.from_numpy(ids.astype(np.int64))).last_hidden_state.numpy()
  te_diff = np.abs(np.asarray(te(ids, params=tp).last_hidden_state) - te_ref).max()
  unet_diff, unet_tanh = np.abs(ours - ref).max(), np.abs(ours - ref_tanh).max()
  print(f"\nPyTorch → Flax max|Δ|: UNet {unet_diff:.2e} (tanh GELU {unet_tanh:.2e}), "
        f"VAE decode {vae_diff:.2e}, text encoder {te_diff:.2e}")
  assert unet_tanh <= 1e-4 and unet_diff <= 1e-3 and vae_diff <= 1e-3 and te_diff <= 1e-3


def test_legacy_vae_attention_names_and_missing_tensors(tmp_path):
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  _, tv, _ = _torch_sd_folder(str(tmp_path))
  path = os.path.join(str(tmp_path), "vae", "diffusion_pytorch_model.safetensors")
  sd = weights.read_safetensors(path)
  legacy = {}
  for k, v in sd.items():
    for new, old in ((".to_q.", ".query."), (".to_k.", ".key."), (".to_v.", ".value."),
                     (".to_out.0.", ".proj_attn.")):
      if "mid_block.attentions" in k:
        k = k.replace(new, old)
    legacy[k] = v
  assert "decoder.mid_block.attentions.0.query.weight" in legacy
  save_file(legacy, path)
  vae, vp = weights.load_vae(str(tmp_path))
  np.testing.assert_array_equal(vp["decoder"]["mid_block"]["attentions_0"]["query"]["kernel"],
                                tv.decoder.mid_block.attentions[0].to_q.weight.detach().numpy().T)
  del legacy["decoder.mid_block.attentions.0.value.bias"]
  legacy["decoder.extra.weight"] = np.zeros(3, np.float32)
  save_file(legacy, path)
  with pytest.raises(ValueError, match=r"mid_block\.attentions\.0\.to_v\.bias.*decoder\.extra"):
    weights.load_vae(str(tmp_path))


def test_missing_folder_errors_name_the_path(tmp_path):
  with pytest.raises(FileNotFoundError, match="no config.json"):
    weights.load_unet(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    weights.resolve_folder(str(tmp_path / "nope"))


def test_sd_export_folder_runs_in_the_stock_pytorch_pipeline(tmp_path):
  model, params, ctrl = _ctrl_unet(seed=7)
  vae, vp = _flax_vae(1)
  te, tp = _flax_clip(2)
  tok_dir = str(tmp_path / "tok")
  _write_tokenizer(tok_dir)
  out = str(tmp_path / "sd")
  diffusers_export.export_unet(os.path.join(out, "unet"), model, params, ctrl)
  diffusers_export.export_sd_components(
      out, vae=vae, vae_params=vp, text_encoder=te, text_encoder_params=tp,
      tokenizer_dir=tok_dir, scheduler_config=diffusers_export.ddim_scheduler_config(
          beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, eta=1.0))
  pipe = diffusers.StableDiffusionPipeline.from_pretrained(out)
  assert isinstance(pipe.scheduler, diffusers.DDIMScheduler)
  assert pipe.unet.config.num_class_embeds == 4
  images = {}
  for label in (0, 2):
    handle = torch_client.set_class_labels(pipe.unet, label, null_label=3)
    images[label] = pipe(["a cat"], num_inference_steps=3, guidance_scale=7.5, height=16,
                         width=16, output_type="np", eta=1.0,
                         generator=torch.Generator().manual_seed(0)).images
    handle.remove()
  assert images[0].shape == (1, 16, 16, 3) and np.isfinite(images[0]).all()
  assert np.abs(images[0] - images[2]).max() > 1e-3  # the label reaches the UNet
