"""Broken Hugging Face folders fail with one line naming the file and key, leaving nothing behind.

Every folder is written by our own exporter from the tiny model (no torch), sharded small so
each component spans several files, then broken one way per test. The happy paths guard the
bad ones: unbroken folders (f32, bf16, LLaVA, text-only) import and round-trip bit for bit.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from longvila_jax import checkpoint
from longvila_jax.checkpoint import (
    build_model,
    load_config,
    load_params,
    model_params,
    save_checkpoint,
)
from longvila_jax.configs import model_config
from longvila_jax.interop import hf_export
from longvila_jax.interop.hf_export import export_hf
from longvila_jax.interop.hf_import import import_hf
from longvila_jax.interop.safetensors_io import INDEX_NAME, CheckpointError
from longvila_jax.models.projector import Projector

SHARD_BYTES = 20_000  # every component of the tiny model spans several shards
COMPONENTS = ("llm", "vision_tower", "mm_projector")
FORMATS = {"longvila": "longvila", "text": "longvila", "bf16": "longvila", "llava": "llava"}


def tiny_config():
    return model_config("tiny")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """`{name: HF folder}` and `{name-ckpt: checkpoint}`, built once; copy before mutating."""
    root = tmp_path_factory.mktemp("hf")
    out = {}

    def add(name, config, params, max_shard_bytes=SHARD_BYTES):
        ckpt = save_checkpoint(root / f"{name}-ckpt", config, params)
        out[f"{name}-ckpt"] = ckpt
        out[name] = export_hf(ckpt, root / name, fmt=FORMATS.get(name, "longvila"),
                              max_shard_bytes=max_shard_bytes, progress=False)

    config = tiny_config()
    params = {k: np.asarray(v) for k, v in model_params(build_model(config)).items()}
    add("longvila", config, params)

    text = tiny_config()
    text.model.vision.enabled = False
    text_params = {k: v for k, v in params.items() if k[0] == "llm"}
    add("text", text, text_params)
    add("text-single", text, text_params, max_shard_bytes=10**9)

    bf16 = tiny_config()
    bf16.model.param_dtype = "bfloat16"
    add("bf16", bf16, {k: v.astype(ml_dtypes.bfloat16) for k, v in params.items()})

    llava = tiny_config()
    llava.model.projector.type = "mlp2x_gelu"
    projector = Projector(llava.model, rngs=nnx.Rngs(1))
    llava_params = {k: v for k, v in params.items() if k[0] != "projector"}
    llava_params.update({("projector", *k): np.asarray(v)
                         for k, v in model_params(projector).items()})
    add("llava", llava, llava_params)
    return out


# ----------------------------------------------------------------------------- helpers


def copy(folders, name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folders[name], tmp_path / "src"))


def weight_map(folder: Path) -> dict:
    return json.loads((folder / INDEX_NAME).read_text())["weight_map"]


def write_weight_map(folder: Path, mapping: dict):
    index = json.loads((folder / INDEX_NAME).read_text())
    index["weight_map"] = mapping
    (folder / INDEX_NAME).write_text(json.dumps(index))


def pick(rng, items):
    items = sorted(items)
    return items[int(rng.integers(len(items)))]


def assert_nothing_left(dst: Path):
    assert not dst.exists()
    leftovers = [p.name for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}.tmp")]
    assert not leftovers, leftovers


def import_fails(src: Path, dst: Path, *names) -> str:
    """Import must raise a one-line `CheckpointError` naming each of `names`; return it."""
    with pytest.raises(CheckpointError) as info:
        import_hf(src, dst, progress=False)
    message = str(info.value)
    assert "\n" not in message, message
    for name in names:
        assert str(name) in message, (name, message)
    assert_nothing_left(dst)
    return message


def assert_same_params(ckpt_a, ckpt_b):
    a, b = load_params(ckpt_a), load_params(ckpt_b)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert a[key].shape == b[key].shape, key
        assert np.array_equal(a[key].view(np.uint8), b[key].view(np.uint8)), key


# Saved-key prefixes of each layout, longest first; the importer names keys without them.
PREFIXES = ("language_model.model.", "language_model.", "vision_tower.vision_model.",
            "vision_tower.", "multi_modal_projector.", "vision_model.", "model.")


def local_key(saved: str) -> str:
    for prefix in PREFIXES:
        if saved.startswith(prefix):
            return saved[len(prefix):]
    return saved


# ----------------------------------------------------------------------------- happy paths


@pytest.mark.parametrize("name", ["longvila", "text", "bf16", "llava"])
def test_sharded_folder_round_trip_is_bit_exact(folders, tmp_path, name):
    hf = folders[name]
    components = COMPONENTS if name in ("longvila", "bf16") else ("",)
    for component in components:
        files = set(weight_map(hf / component).values())
        assert len(files) > 1 and all((hf / component / f).exists() for f in files)

    first = import_hf(hf, tmp_path / "first", progress=False)
    assert_same_params(folders[f"{name}-ckpt"], first)
    original, imported = load_config(folders[f"{name}-ckpt"]), load_config(first)
    # LLaVA has no per-frame newline and a text-only model no media: compare media elsewhere.
    media = ("media",) if name in ("longvila", "bf16") else ()
    for part in ("llm", "vision", "projector", *media):
        assert imported.model[part].to_dict() == original.model[part].to_dict(), part
    # The storage dtype survives, so loading a bf16 import does not upcast it.
    assert imported.model.param_dtype == original.model.param_dtype

    again = export_hf(first, tmp_path / "hf", fmt=FORMATS[name], max_shard_bytes=SHARD_BYTES,
                      progress=False)
    second = import_hf(again, tmp_path / "second", progress=False)
    assert_same_params(first, second)
    assert load_config(first).to_json() == load_config(second).to_json()


def test_bf16_streams_through_safetensors_as_bf16(folders):
    hf = folders["bf16"]
    for component in ("llm", "vision_tower"):
        assert json.loads((hf / component / "config.json").read_text())["dtype"] == "bfloat16"
    for component in COMPONENTS:
        for file in sorted((hf / component).glob("*.safetensors")):
            with safe_open(str(file), framework="np") as f:
                for key in f.keys():
                    assert f.get_tensor(key).dtype == ml_dtypes.bfloat16, (file, key)


def test_ignored_tensors_are_skipped(folders, tmp_path, rng):
    src = copy(folders, "longvila", tmp_path)
    llm, mapping = src / "llm", weight_map(src / "llm")
    file = pick(rng, set(mapping.values()))
    tensors = load_file(str(llm / file))
    key = f"model.layers.{int(rng.integers(2))}.self_attn.rotary_emb.inv_freq"
    tensors[key] = rng.standard_normal(8).astype(np.float32)
    save_file(tensors, str(llm / file))
    write_weight_map(llm, {**mapping, key: file})
    assert_same_params(folders["longvila-ckpt"], import_hf(src, tmp_path / "dst", progress=False))


# ----------------------------------------------------------------------------- bad folders


def test_missing_shard_names_the_file(folders, tmp_path, rng):
    src = copy(folders, "longvila", tmp_path)
    component = pick(rng, COMPONENTS)
    shard = src / component / pick(rng, set(weight_map(src / component).values()))
    shard.unlink()
    import_fails(src, tmp_path / "dst", shard, "missing shard")


def test_wrong_shape_names_file_and_key(folders, tmp_path, rng):
    src = copy(folders, "longvila", tmp_path)
    component = pick(rng, COMPONENTS)
    mapping = weight_map(src / component)
    key = pick(rng, mapping)
    file = src / component / mapping[key]
    tensors = load_file(str(file))
    shape = list(tensors[key].shape)
    shape[int(rng.integers(len(shape)))] += int(rng.integers(1, 4))
    tensors[key] = rng.standard_normal(shape).astype(tensors[key].dtype)
    save_file(tensors, str(file))  # the other tensors of the shard are kept
    import_fails(src, tmp_path / "dst", file, f"'{key}'", "shape")


@pytest.mark.parametrize("name, config_file, section", [
    ("longvila", "llm/config.json", None),
    ("longvila", "vision_tower/config.json", None),
    ("text", "config.json", None),
    ("llava", "config.json", "text_config"),
])
def test_unknown_model_type_names_config_and_value(folders, tmp_path, rng, name, config_file,
                                                   section):
    src = copy(folders, name, tmp_path)
    path = src / config_file
    config = json.loads(path.read_text())
    value = pick(rng, ["gpt2", "mistral", "bert", "clip_vision_model"])
    (config[section] if section else config)["model_type"] = value
    path.write_text(json.dumps(config))
    import_fails(src, tmp_path / "dst", path, repr(value), "model_type")


@pytest.mark.parametrize("name, file", [("longvila", None), ("text-single", "model.safetensors")])
def test_truncated_safetensors_names_the_file(folders, tmp_path, rng, name, file):
    src = copy(folders, name, tmp_path)
    if file is None:
        component = pick(rng, COMPONENTS)
        path = src / component / pick(rng, set(weight_map(src / component).values()))
    else:
        path = src / file
    data = path.read_bytes()
    path.write_bytes(data[:-int(rng.integers(1, min(len(data), 512)))])
    import_fails(src, tmp_path / "dst", path)


@pytest.mark.parametrize("name, config_file", [
    ("longvila", "config.json"),
    ("longvila", "llm/config.json"),
    ("longvila", "vision_tower/config.json"),
    ("longvila", f"llm/{INDEX_NAME}"),
    ("text", "config.json"),
    ("llava", "config.json"),
])
def test_corrupt_json_names_the_file(folders, tmp_path, rng, name, config_file):
    src = copy(folders, name, tmp_path)
    path = src / config_file
    text = path.read_text().rstrip()
    path.write_text(text[:int(rng.integers(1, len(text)))])  # never the closing brace
    import_fails(src, tmp_path / "dst", path)


@pytest.mark.parametrize("name", ["longvila", "text-single", "llava"])
def test_missing_tensor_names_the_key(folders, tmp_path, rng, name):
    src = copy(folders, name, tmp_path)
    folder = src / pick(rng, COMPONENTS) if name == "longvila" else src
    if (folder / INDEX_NAME).exists():
        mapping = weight_map(folder)
        key = pick(rng, mapping)
        file = folder / mapping.pop(key)
        write_weight_map(folder, mapping)
    else:
        file = folder / "model.safetensors"
        key = pick(rng, load_file(str(file)))
    tensors = load_file(str(file))
    del tensors[key]
    if tensors:
        save_file(tensors, str(file))
    else:
        file.unlink()
    message = import_fails(src, tmp_path / "dst", "missing tensor")
    assert f"'{local_key(key)}'" in message and str(folder) in message, message


@pytest.mark.parametrize("name, component, extra", [
    ("longvila", "llm", "model.layers.0.mlp.extra_proj.weight"),
    ("longvila", "vision_tower", "vision_model.encoder.layers.1.mlp.fc3.weight"),
    ("longvila", "mm_projector", "layers.7.weight"),
    ("text-single", "", "model.layers.2.self_attn.q_proj.weight"),
    ("llava", "", "multi_modal_projector.linear_3.weight"),
    ("llava", "", "image_newline"),
])
def test_unexpected_tensor_names_it(folders, tmp_path, rng, name, component, extra):
    src = copy(folders, name, tmp_path)
    folder = src / component
    indexed = (folder / INDEX_NAME).exists()
    file = folder / (pick(rng, set(weight_map(folder).values())) if indexed
                     else "model.safetensors")
    tensors = load_file(str(file))
    tensors[extra] = rng.standard_normal(int(rng.integers(1, 9))).astype(np.float32)
    save_file(tensors, str(file))
    if indexed:
        write_weight_map(folder, {**weight_map(folder), extra: file.name})
    import_fails(src, tmp_path / "dst", file, f"'{extra}'", "unexpected tensor")


def test_wrongly_typed_config_value_names_config_and_key(folders, tmp_path):
    src = copy(folders, "longvila", tmp_path)
    path = src / "llm" / "config.json"
    config = json.loads(path.read_text())
    config["hidden_size"] = str(config["hidden_size"])
    path.write_text(json.dumps(config))
    import_fails(src, tmp_path / "dst", path, "hidden_size")


def test_patch_kernel_of_wrong_rank_names_file_and_key(folders, tmp_path):
    src = copy(folders, "longvila", tmp_path)
    folder, key = src / "vision_tower", "vision_model.embeddings.patch_embedding.weight"
    file = folder / weight_map(folder)[key]
    tensors = load_file(str(file))
    tensors[key] = tensors[key].reshape(tensors[key].shape[0], -1)
    save_file(tensors, str(file))
    import_fails(src, tmp_path / "dst", file, f"'{key}'")


def test_existing_dst_is_refused_and_untouched(folders, tmp_path):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=re.escape(str(dst))):
        import_hf(folders["longvila"], dst, progress=False)
    assert [p.name for p in dst.iterdir()] == ["keep.txt"]
    assert (dst / "keep.txt").read_text() == "mine"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".dst.tmp")]


def test_failure_while_writing_checkpoint_leaves_nothing(folders, tmp_path, monkeypatch):
    def disk_full(_):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "flat_to_nested", disk_full)
    with pytest.raises(OSError, match="disk full"):
        import_hf(folders["longvila"], tmp_path / "dst", progress=False)
    assert_nothing_left(tmp_path / "dst")


# ----------------------------------------------------------------------------- export failures


def test_export_llava_needs_mlp2x_gelu(folders, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(CheckpointError) as info:
        export_hf(folders["longvila-ckpt"], out, fmt="llava", progress=False)
    message = str(info.value)
    assert "\n" not in message
    assert str(folders["longvila-ckpt"]) in message and "mlp_downsample" in message
    assert_nothing_left(out)


@pytest.mark.parametrize("fmt", ["longvila", "llava"])
def test_export_to_existing_folder_is_refused_and_untouched(folders, tmp_path, fmt):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=re.escape(str(out))):
        export_hf(folders["llava-ckpt"], out, fmt=fmt, progress=False)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")]


@pytest.mark.parametrize("name", ["longvila", "text"])
def test_failure_while_exporting_leaves_nothing(folders, tmp_path, monkeypatch, name):
    real = hf_export.write_sharded

    def write_then_fail(tensors, folder, **kwargs):
        real(tensors, folder, **kwargs)  # some shards are on disk when the failure hits
        raise OSError("disk full")

    monkeypatch.setattr(hf_export, "write_sharded", write_then_fail)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="disk full"):
        export_hf(folders[f"{name}-ckpt"], out, max_shard_bytes=SHARD_BYTES, progress=False)
    assert_nothing_left(out)


@pytest.mark.parametrize("index", [[], {"weight_map": []}, {"weight_map": {"a": 3}}])
def test_malformed_index_names_the_file(folders, tmp_path, index):
    src = copy(folders, "text", tmp_path)
    (src / INDEX_NAME).write_text(json.dumps(index))
    import_fails(src, tmp_path / "dst", src / INDEX_NAME)


def test_directory_in_place_of_a_shard_names_it(folders, tmp_path, rng):
    src = copy(folders, "text", tmp_path)
    shard = src / pick(rng, set(weight_map(src).values()))
    shard.unlink()
    shard.mkdir()
    import_fails(src, tmp_path / "dst", shard.name)


def test_mixed_dtypes_are_widened_not_rounded(folders, tmp_path, rng):
    src = copy(folders, "text-single", tmp_path)
    file = src / "model.safetensors"
    tensors = load_file(str(file))
    key = f"model.layers.{int(rng.integers(2))}.self_attn.q_proj.weight"
    tensors[key] = tensors[key].astype(np.float16)
    save_file(tensors, str(file))
    params = load_params(import_hf(src, tmp_path / "dst", progress=False))
    stacked = params[("llm", "layers", "q_proj", "kernel")]
    assert stacked.dtype == np.float32
    layer = int(key.split(".")[2])
    assert np.array_equal(stacked[layer], tensors[key].T.astype(np.float32))


def test_existing_dst_is_refused_before_any_conversion(folders, tmp_path):
    src = copy(folders, "text-single", tmp_path)
    (src / "model.safetensors").write_bytes(b"broken")  # would fail if it were read
    (tmp_path / "dst").mkdir()
    with pytest.raises(FileExistsError, match="dst"):
        import_hf(src, tmp_path / "dst", progress=False)
