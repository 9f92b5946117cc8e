"""Workdir I/O goes through `ctrl_jax.runtime.fs`: a source scan for direct file I/O, fs itself on
fsspec's in-memory store (`memory://`, offline), and file:// URIs as local paths."""
import ast
import io
import json
import pathlib
import struct
import uuid

import numpy as np
import pytest

from ctrl_jax.runtime import fs

ROOT = pathlib.Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------- the source scan

# (module, function) → why its direct file I/O is not workdir I/O. Every entry must still match a
# call (a stale entry fails too).
ALLOWED = {
    ("ctrl_jax/export.py", "_publish"):
        "moves a finished export into --out, a local folder by design (diffusers-style files)",
    ("ctrl_jax/export.py", "_write"): "the temporary export folder beside --out (local by design)",
    ("ctrl_jax/models/aesthetic.py", "_clip_vision_from_msgpack"):
        "reads a CLIP weight file (an input, not the workdir)",
    ("ctrl_jax/models/clip_score.py", "ClipScorer.__init__"):
        "reads a CLIP model folder (an input, not the workdir)",
    ("ctrl_jax/models/diffusers_export.py", "export_sd_components"):
        "copies the tokenizer into a diffusers export folder (local by design)",
    ("ctrl_jax/models/sd.py", "write_tiny_tokenizer"):
        "random tiny model of the :tiny configs, in a local folder (sd.stages.tiny_folder)",
    ("ctrl_jax/models/sd.py", "write_tiny_sd"):
        "random tiny model of the :tiny configs, in a local folder (sd.stages.tiny_folder)",
    ("ctrl_jax/models/torch_client.py", "read_labels"):
        "reads an export folder (local by design)",
    ("ctrl_jax/models/weights.py", "write_safetensors"):
        "export folders and converted weight files (local by design)",
    ("ctrl_jax/models/weights.py", "_load_diffusers_component"):
        "reads a model weight folder (an input, not the workdir)",
    ("ctrl_jax/problems/sd/aesthetic.py", "load_embeddings_npz"):
        "reads the embeddings file named in the config (an input, not the workdir)",
    ("ctrl_jax/problems/sd/stages.py", "write_tiny_data"):
        "synthetic images of the :tiny configs, in a local folder (tiny_folder)",
    ("ctrl_jax/runtime/hugepages.py", "thp_mode"): "/sys/kernel/mm/transparent_hugepage/enabled",
    ("ctrl_jax/runtime/workdir.py", "check"):
        "creates a local --workdir (a remote one is returned from before)",
}

_NUMPY_IO = {"save", "savez", "savez_compressed", "load"}
_OS_IO = {"makedirs", "replace", "remove"}
_BUFFERS = {"io.BytesIO", "io.StringIO"}


def _aliases(tree: ast.Module) -> dict:
  """Local name → what it names ("np" → "numpy", "rmtree" → "shutil.rmtree")."""
  out = {}
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for a in node.names:
        out[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      for a in node.names:
        out[a.asname or a.name] = f"{node.module}.{a.name}"
  return out


def _dotted(node, aliases: dict):
  parts = []
  while isinstance(node, ast.Attribute):
    parts.append(node.attr)
    node = node.value
  if not isinstance(node, ast.Name):
    return None
  parts.append(aliases.get(node.id, node.id))
  return ".".join(reversed(parts))


class _Scan(ast.NodeVisitor):
  """Calls of builtin open, os.makedirs / replace / remove, shutil.*, np.save / savez /
  savez_compressed / load, *.savefig and json.dump, each with its enclosing function. An
  np.save* / np.load / savefig / json.dump whose file is an in-memory buffer (io.BytesIO(…), or a
  name bound to one in the same function) is not file I/O."""

  def __init__(self, aliases: dict):
    self.aliases, self.scope, self.buffers, self.hits = aliases, [], [set()], []

  def _visit_scope(self, node):
    self.scope.append(node.name)
    self.buffers.append(set(self.buffers[-1]) if isinstance(node, ast.ClassDef) else set())
    self.generic_visit(node)
    self.buffers.pop()
    self.scope.pop()

  visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = _visit_scope

  def visit_Assign(self, node):
    if isinstance(node.value, ast.Call) and _dotted(node.value.func, self.aliases) in _BUFFERS:
      self.buffers[-1].update(t.id for t in node.targets if isinstance(t, ast.Name))
    self.generic_visit(node)

  def _to_buffer(self, node: ast.Call) -> bool:
    target = node.args[0] if node.args else next(
        (k.value for k in node.keywords if k.arg in ("file", "fname", "fp")), None)
    if isinstance(target, ast.Call):
      return _dotted(target.func, self.aliases) in _BUFFERS
    return isinstance(target, ast.Name) and target.id in self.buffers[-1]

  def visit_Call(self, node):
    name = _dotted(node.func, self.aliases)
    what = None
    if isinstance(node.func, ast.Name) and node.func.id == "open" and "open" not in self.aliases:
      what = "open"
    elif isinstance(node.func, ast.Attribute) and node.func.attr == "savefig":
      what = None if self._to_buffer(node) else "savefig"
    elif name is not None:
      module, _, attr = name.rpartition(".")
      if module == "shutil" or (module == "os" and attr in _OS_IO):
        what = name
      elif ((module == "numpy" and attr in _NUMPY_IO) or name == "json.dump"):
        what = None if self._to_buffer(node) else name
    if what:
      self.hits.append((".".join(self.scope) or "<module>", what, node.lineno))
    self.generic_visit(node)


def scan_source(source: str, filename: str = "<src>") -> list[tuple[str, str, int]]:
  """[(function, call, line)] of the direct file I/O in `source`."""
  tree = ast.parse(source, filename)
  scan = _Scan(_aliases(tree))
  scan.visit(tree)
  return scan.hits


def test_scan_finds_direct_file_io_and_spares_buffers():
  src = """
import io, json, os, shutil
import numpy as np
from shutil import rmtree as rm
def a(p, fig):
  open(p).read()
  os.makedirs(p, exist_ok=True)
  os.replace(p, p + "x")
  rm(p)
  np.savez_compressed(p, x=1)
  json.dump({}, open(p, "w"))
  fig.savefig(p, dpi=110)
def b(fig):
  buf = io.BytesIO()
  np.savez(buf, x=1)
  fig.savefig(buf, format="png")
  np.load(io.BytesIO(b""))
  json.dumps({})
  os.path.join("a", "b")
class C:
  def m(self, p):
    shutil.copy(p, p)
"""
  assert [(f, what) for f, what, _ in scan_source(src)] == [
      ("a", "open"), ("a", "os.makedirs"), ("a", "os.replace"), ("a", "shutil.rmtree"),
      ("a", "numpy.savez_compressed"), ("a", "json.dump"), ("a", "open"), ("a", "savefig"),
      ("C.m", "shutil.copy")]


def test_no_direct_file_io_outside_fs_except_the_allowlist():
  hits = {}
  for path in sorted((ROOT / "ctrl_jax").rglob("*.py")):
    rel = path.relative_to(ROOT).as_posix()
    if rel == "ctrl_jax/runtime/fs.py":
      continue
    for func, what, line in scan_source(path.read_text(), rel):
      hits.setdefault((rel, func), []).append(f"{what} (line {line})")
  unexpected = {k: v for k, v in hits.items() if k not in ALLOWED}
  assert not unexpected, ("direct file I/O outside ctrl_jax.runtime.fs (use fs, or allow it "
                          f"with a reason): {unexpected}")
  stale = sorted(set(ALLOWED) - set(hits))
  assert not stale, f"allowlist entries that match no call any more: {stale}"


# ----------------------------------------------------------------------------- fs on memory://


@pytest.fixture
def mem(tmp_path, monkeypatch):
  """A fresh memory:// folder, with the working directory moved to an empty tmp_path: a path
  that went to the local disk by mistake ("memory:/…") would appear there."""
  monkeypatch.chdir(tmp_path)
  root = f"memory://ctrl_jax_test_{uuid.uuid4().hex}"
  yield root
  fs.remove(root)
  assert not list(tmp_path.rglob("*")), f"local files written: {list(tmp_path.rglob('*'))}"


def test_memory_scheme_is_remote():
  assert fs.scheme("memory://a/b") == "memory" and fs.is_remote("memory://a/b")
  assert fs.local_path("memory://a/b") is None
  assert fs.orbax_path("memory://a/b") == "memory://a/b"
  assert fs.join("memory://a", "b", "c.json") == "memory://a/b/c.json"
  assert fs.dirname("memory://a/b/c.json") == "memory://a/b"


def test_json_jsonl_text_bytes_npz(mem):
  fs.write_json(fs.join(mem, "d", "x.json"), {"b": 1, "a": [1.5, "é"]})
  assert fs.read_json(fs.join(mem, "d", "x.json")) == {"b": 1, "a": [1.5, "é"]}
  # what json.dump(obj, f, indent=2) wrote before fs
  assert fs.read_text(fs.join(mem, "d", "x.json")) == json.dumps({"b": 1, "a": [1.5, "é"]},
                                                                  indent=2)
  rows = [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.25}]
  assert fs.read_jsonl(fs.join(mem, "absent.jsonl")) == []
  fs.write_jsonl(fs.join(mem, "log.jsonl"), rows)
  assert fs.read_jsonl(fs.join(mem, "log.jsonl")) == rows
  fs.write_bytes(fs.join(mem, "b.bin"), b"\x00\x01")
  fs.write_bytes(fs.join(mem, "b.bin"), b"\x02")  # replaced whole
  assert fs.read_bytes(fs.join(mem, "b.bin")) == b"\x02"
  fs.write_text(fs.join(mem, "t.md"), "| a |\n")
  assert fs.read_text(fs.join(mem, "t.md")) == "| a |\n"
  arrays = {"images": np.arange(24, dtype=np.float32).reshape(2, 3, 4), "c": np.arange(2)}
  fs.save_npz(fs.join(mem, "s.npz"), **arrays)
  back = fs.load_npz(fs.join(mem, "s.npz"))
  assert sorted(back) == ["c", "images"]
  for k, v in arrays.items():
    np.testing.assert_array_equal(back[k], v)
    assert back[k].dtype == v.dtype


def test_images_and_figures(mem):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  pixels = (np.arange(48).reshape(6, 8) * 5).astype(np.uint8)
  fs.save_image(fs.join(mem, "img.png"), Image.fromarray(pixels))
  data = fs.read_bytes(fs.join(mem, "img.png"))
  assert data.startswith(b"\x89PNG")
  np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(data))), pixels)
  fs.save_image(fs.join(mem, "img.jpg"), Image.fromarray(pixels))
  assert fs.read_bytes(fs.join(mem, "img.jpg")).startswith(b"\xff\xd8")
  fig, ax = plt.subplots(figsize=(2, 2))
  ax.plot([0, 1], [1, 0])
  fs.save_image(fs.join(mem, "fig.png"), fig)
  plt.close(fig)
  assert Image.open(io.BytesIO(fs.read_bytes(fs.join(mem, "fig.png")))).format == "PNG"


def test_listdir_exists_isdir_remove_move_walk(mem):
  assert fs.listdir(fs.join(mem, "absent")) == [] and not fs.exists(fs.join(mem, "absent"))
  fs.makedirs(fs.join(mem, "dir"))
  fs.write_text(fs.join(mem, "dir", "b.txt"), "b")
  fs.write_text(fs.join(mem, "dir", "sub", "a.txt"), "a")
  assert fs.isdir(fs.join(mem, "dir")) and not fs.isdir(fs.join(mem, "dir", "b.txt"))
  assert fs.exists(fs.join(mem, "dir", "b.txt"))
  assert fs.listdir(fs.join(mem, "dir")) == ["b.txt", "sub"]
  assert list(fs.walk_files(fs.join(mem, "dir"))) == ["b.txt", "sub/a.txt"]
  fs.move(fs.join(mem, "dir", "sub"), fs.join(mem, "moved"))
  assert not fs.exists(fs.join(mem, "dir", "sub"))
  assert fs.read_text(fs.join(mem, "moved", "a.txt")) == "a"
  fs.move(fs.join(mem, "dir", "b.txt"), fs.join(mem, "c.txt"))
  assert fs.read_text(fs.join(mem, "c.txt")) == "b" and fs.listdir(fs.join(mem, "dir")) == []
  fs.remove(fs.join(mem, "moved"))
  fs.remove(fs.join(mem, "c.txt"))
  fs.remove(fs.join(mem, "absent"))  # nothing to remove: no error
  assert not fs.exists(fs.join(mem, "moved")) and not fs.exists(fs.join(mem, "c.txt"))


def _masked_crc32c(data: bytes) -> int:
  crc = 0xFFFFFFFF
  for byte in data:
    crc ^= byte
    for _ in range(8):
      crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
  crc ^= 0xFFFFFFFF
  return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def _tfrecords(data: bytes) -> list[bytes]:
  """The records of a TFRecord (event) file, CRCs checked."""
  out, pos = [], 0
  while pos < len(data):
    header = data[pos:pos + 8]
    length, length_crc = struct.unpack("<QI", data[pos:pos + 12])
    assert length_crc == _masked_crc32c(header)
    record = data[pos + 12:pos + 12 + length]
    (record_crc,) = struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])
    assert record_crc == _masked_crc32c(record)
    out.append(record)
    pos += 16 + length
  return out


def _proto_fields(data: bytes) -> list[tuple[int, object]]:
  """(field number, value) of a protobuf message: varints as int, fixed32/64 as raw bytes,
  length-delimited as bytes."""
  out, pos = [], 0

  def varint():
    nonlocal pos
    shift = value = 0
    while True:
      b = data[pos]
      pos += 1
      value |= (b & 0x7F) << shift
      shift += 7
      if not b & 0x80:
        return value

  while pos < len(data):
    key = varint()
    field, wire = key >> 3, key & 7
    if wire == 0:
      out.append((field, varint()))
    elif wire == 1:
      out.append((field, data[pos:pos + 8]))
      pos += 8
    elif wire == 2:
      n = varint()
      out.append((field, data[pos:pos + n]))
      pos += n
    elif wire == 5:
      out.append((field, data[pos:pos + 4]))
      pos += 4
    else:
      raise ValueError(f"wire type {wire}")
  return out


def _scalars(event_file: bytes) -> list[tuple[int, str, float]]:
  """(step, tag, value) of the scalar summaries in an event file (Event: step = 2,
  summary = 5; Summary: value = 1; Summary.Value: tag = 1, simple_value = 2)."""
  out = []
  for record in _tfrecords(event_file):
    event = dict(_proto_fields(record))
    if 5 not in event:
      continue
    for field, value in _proto_fields(event[5]):
      if field == 1:
        v = dict(_proto_fields(value))
        out.append((event.get(2, 0), v[1].decode(), struct.unpack("<f", v[2])[0]))
  return out


def test_summary_writer_on_memory(mem):
  logdir = fs.join(mem, "tb", "x")
  writer = fs.summary_writer(logdir)
  writer.add_scalar("loss", 0.5, 3)
  writer.add_scalar("loss", 0.25, 4)
  writer.flush()
  writer.close()
  files = list(fs.walk_files(logdir))
  assert len(files) == 1 and files[0].startswith("events.out.tfevents.")
  assert _scalars(fs.read_bytes(fs.join(logdir, files[0]))) == [(3, "loss", 0.5),
                                                                (4, "loss", 0.25)]


def test_scalar_writer_on_memory(mem):
  from ctrl_jax.runtime import progress  # pylint: disable=g-import-not-at-top
  writer = progress.ScalarWriter(mem, "finetune")
  for step in (1, 2, 3):
    writer.write(step, {"reward": step / 2})
  writer.truncate_after(2)
  writer.close()
  assert fs.read_jsonl(fs.join(mem, "finetune.jsonl")) == [{"step": 1, "reward": 0.5},
                                                            {"step": 2, "reward": 1.0}]
  (events,) = fs.walk_files(fs.join(mem, "tb", "finetune"))
  assert [s for s, _, _ in _scalars(fs.read_bytes(fs.join(mem, "tb", "finetune", events)))] == [
      1, 2, 3]


# ----------------------------------------------------------------------------- our writers


def _rows(n=4):
  return [{"step": s, "reward": -1.0 + s / 10, "kl": s / 100, "grad_norm": 1.0 + s,
           "classifier_acc/ink3": s / n} for s in range(1, n + 1)]


def test_digits_figures_and_logs_on_memory(mem):
  # pylint: disable=g-import-not-at-top
  from ctrl_jax.problems.digits import evaluation as digits_eval
  from ctrl_jax.problems.digits import plots as digits_plots
  # pylint: enable=g-import-not-at-top
  fs.write_jsonl(fs.join(mem, "finetune.jsonl"), _rows())
  digits_plots.save_curves(fs.join(mem, "eval", "curves.png"), fs.join(mem, "finetune.jsonl"),
                           ["ink3"])
  assert fs.read_bytes(fs.join(mem, "eval", "curves.png")).startswith(b"\x89PNG")
  digits_plots.save_curves(fs.join(mem, "eval", "none.png"), fs.join(mem, "absent.jsonl"),
                           ["ink3"])
  assert not fs.exists(fs.join(mem, "eval", "none.png"))
  digits_plots.save_run_comparison(fs.join(mem, "runs.png"),
                                   {"a": fs.join(mem, "finetune.jsonl")})
  assert fs.read_bytes(fs.join(mem, "runs.png")).startswith(b"\x89PNG")
  with pytest.raises(FileNotFoundError, match="no training log"):
    digits_plots.save_run_comparison(fs.join(mem, "runs.png"), {"b": fs.join(mem, "x.jsonl")})
  for stage, t in (("pretrain", 5.0), ("finetune", 7.0)):
    fs.write_json(fs.join(mem, stage, "info.json"), {"wall_time_s": t})
  assert digits_eval.stage_wall_times(mem) == {"pretrain": 5.0, "finetune": 7.0}


def test_save_figure_writes_what_savefig_writes(tmp_path):
  """The digits figures keep their bytes: savefig to a buffer + fs equals savefig to the path."""
  from ctrl_jax.problems.digits import plots as digits_plots  # pylint: disable=g-import-not-at-top
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(3, 2))
  ax.plot([0, 1, 2], [2, 0, 1])
  fig.savefig(tmp_path / "direct.png", dpi=110)
  digits_plots.save_figure(str(tmp_path / "fs.png"), fig)
  assert (tmp_path / "direct.png").read_bytes() == (tmp_path / "fs.png").read_bytes()


def test_comparison_tables_grids_and_shared_stages_on_memory(mem):
  from ctrl_jax.baselines import compare  # pylint: disable=g-import-not-at-top
  from ctrl_jax.baselines import studies  # pylint: disable=g-import-not-at-top
  m = {"tasks": {"ink3": {"macro_f1": 0.5}}, "joint_accuracy": 0.5, "digit_accuracy": 0.9,
       "frechet_distance": 0.1, "unet_evals_per_sample": 20, "wall_time_per_100_samples_s": 1.0,
       "training_time_s": 2.0}
  text = compare.write_table(fs.join(mem, "compare", "results.md"), {"pretrained": m}, False)
  assert fs.read_text(fs.join(mem, "compare", "results.md")) == text
  images = np.random.default_rng(0).uniform(size=(30, 8, 8)).astype(np.float32)
  compare._save_grid(fs.join(mem, "compare", "grid_x.png"), images, np.repeat(np.arange(10), 3),
                     np.tile(np.arange(3), 10), 3)
  assert fs.read_bytes(fs.join(mem, "compare", "grid_x.png")).startswith(b"\x89PNG")
  vs = [studies.Variant("ctrl_gamma1", (("gamma", 1.0),), "ctrl", 1.0)]
  results = {"pretrained": m, "ctrl_gamma1": m}
  text = studies.write_table(fs.join(mem, "studies", "gamma", "results.md"), "gamma", vs, results)
  assert fs.read_text(fs.join(mem, "studies", "gamma", "results.md")) == text
  studies.plot(fs.join(mem, "studies", "gamma", "gamma.png"), "gamma", vs, results, "ink")
  assert fs.read_bytes(fs.join(mem, "studies", "gamma", "gamma.png")).startswith(b"\x89PNG")
  # A remote DIR's stages are shared by copying their outputs (no links on object stores),
  # without the training checkpoints.
  for name in ("info.json", "final/a", "ckpt/1/b"):
    fs.write_text(fs.join(mem, "pretrain", name), name)
  studies._share_stage(fs.join(mem, "pretrain"), fs.join(mem, "studies", "v", "pretrain"))
  assert list(fs.walk_files(fs.join(mem, "studies", "v", "pretrain"))) == ["final/a",
                                                                          "info.json"]
  assert fs.read_text(fs.join(mem, "studies", "v", "pretrain", "final", "a")) == "final/a"


# ----------------------------------------------------------------------------- file:// URIs


def test_file_uri_is_the_local_path(tmp_path, monkeypatch):
  from ctrl_jax.runtime import checkpoint  # pylint: disable=g-import-not-at-top
  uri = f"file://{tmp_path}"
  assert fs.scheme(uri) == "" and not fs.is_remote(uri)
  assert fs.local_path(uri) == str(tmp_path)
  assert fs.orbax_path(uri) == str(tmp_path)
  monkeypatch.chdir(tmp_path)
  assert fs.local_path("run") == "run" and fs.orbax_path("run") == str(tmp_path / "run")
  fs.write_json(fs.join(uri, "stage", "info.json"), {"a": 1})
  assert (tmp_path / "stage" / "info.json").read_text() == '{\n  "a": 1\n}'
  assert fs.exists(fs.join(uri, "stage")) and fs.isdir(fs.join(uri, "stage"))
  assert fs.listdir(uri) == ["stage"]
  fs.save_npz(fs.join(uri, "s.npz"), x=np.arange(3))
  with np.load(tmp_path / "s.npz") as data:
    np.testing.assert_array_equal(data["x"], np.arange(3))
  tree = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
  checkpoint.save_tree(fs.join(uri, "params"), tree)
  assert (tmp_path / "params").is_dir()
  back = checkpoint.load_tree(fs.join(uri, "params"), tree)
  np.testing.assert_array_equal(np.asarray(back["w"]), tree["w"])
  fs.remove(fs.join(uri, "stage"))
  assert not (tmp_path / "stage").exists()
  assert not any("file:" in p.name for p in tmp_path.rglob("*"))
