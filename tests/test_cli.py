"""The `longvila-jax` command end to end, in subprocesses: exit codes, one-line errors.

Each call pays the JAX import (~3 s), so the checkpoint and its HF export are made once.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from longvila_jax.checkpoint import load_config, load_params

ROOT = Path(__file__).resolve().parents[1]
TINY = "tiny"
SFT = "stages/sft"


def cli(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "longvila_jax.cli", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=300)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def assert_one_line_error(result: subprocess.CompletedProcess, *names):
    """Exit status 2; stderr ends with `longvila-jax: error: ...` naming each of `names`."""
    assert result.returncode == 2, result.stderr[-4000:]
    assert "Traceback" not in result.stderr, result.stderr[-4000:]
    last = [line for line in result.stderr.splitlines() if line.strip()][-1]
    assert last.startswith("longvila-jax: error:"), result.stderr[-4000:]
    for name in names:
        assert str(name) in last, (name, last)


def assert_only_line_error(result: subprocess.CompletedProcess, *names):
    """`assert_one_line_error`, with nothing else on stderr (no FATAL, no hint, no log)."""
    assert_one_line_error(result, *names)
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr[-4000:]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    dst = tmp_path_factory.mktemp("cli") / "ckpt"
    result = ok(cli("init", f"--config={TINY}", dst))
    assert f"wrote {dst}" in result.stdout
    return dst


@pytest.fixture(scope="module")
def hf(ckpt):
    out = ckpt.parent / "hf"
    # 2e-5 GB = 20 kB: several shards per component, so the index path is exercised.
    ok(cli("export-hf", "--quiet", "--max_shard_gb=0.00002", ckpt, out))
    return out


def test_init_writes_a_checkpoint(ckpt):
    config = load_config(ckpt)
    assert config.model.llm.hidden_size == 64 and config.model.vision.enabled
    params = load_params(ckpt)
    assert params and all(np.isfinite(v).all() for v in params.values())


def test_export_import_round_trip_is_bit_exact(ckpt, hf, tmp_path):
    assert len(list((hf / "llm").glob("*.safetensors"))) > 1
    assert (hf / "llm" / "model.safetensors.index.json").exists()
    back = tmp_path / "back"
    result = ok(cli("import-hf", "--quiet", hf, back))
    assert f"wrote {back}" in result.stdout
    a, b = load_params(ckpt), load_params(back)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and np.array_equal(a[key], b[key]), key
    assert load_config(ckpt).to_json() == load_config(back).to_json()


def test_show_config_1m_variant():
    result = ok(cli("show-config", "--config=qwen2_7b:1m"))
    llm = yaml.safe_load(result.stdout)["model"]["llm"]
    assert llm["rope_theta"] == 1_062_356_830
    assert llm["rope_scaling"]["type"] == "linear" and llm["rope_scaling"]["factor"] == 4.0


def test_missing_src_folder(tmp_path):
    result = cli("import-hf", "--quiet", tmp_path / "nowhere", tmp_path / "dst")
    assert_one_line_error(result, tmp_path / "nowhere")
    assert not (tmp_path / "dst").exists()


def test_truncated_safetensors(hf, tmp_path):
    src = Path(shutil.copytree(hf, tmp_path / "src"))
    shard = sorted((src / "vision_tower").glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-7])
    result = cli("import-hf", "--quiet", src, tmp_path / "dst")
    assert_one_line_error(result, shard)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_existing_dst(hf, tmp_path):
    (tmp_path / "dst").mkdir()
    result = cli("import-hf", "--quiet", hf, tmp_path / "dst")
    assert_one_line_error(result, tmp_path / "dst", "already exists")
    assert list((tmp_path / "dst").iterdir()) == []


def test_invalid_config_value_names_the_key(tmp_path):
    config = tmp_path / "bad.py"
    config.write_text(
        "from longvila_jax.config import base_config\n\n\n"
        "def get_config():\n"
        "    config = base_config()\n"
        "    config.model.llm.update(num_heads=4, num_kv_heads=3)\n"
        "    return config\n")
    result = cli("init", f"--config={config}", tmp_path / "dst")
    assert_one_line_error(result, "model.llm.num_kv_heads", "invalid value 3")
    assert not (tmp_path / "dst").exists()


@pytest.mark.parametrize("flags, names", [
    ([f"--config={SFT}:tiny", "--config.train.learning_rat=1e-3"],
     ["train.learning_rat", "did you mean optim.learning_rate?"]),
    ([f"--config={SFT}:tiny", "--config.train.batch_size=four"],
     ["--config.train.batch_size=four"]),
    ([f"--config={SFT}:qwen9_99b"], ["unknown model 'qwen9_99b'; known: [", "'tiny'"]),
    ([f"--config={ROOT / 'nope.py'}"], [ROOT / "nope.py", "does not exist"]),
    (["--config=stages/stf:tiny"], ["'stages/stf' is not a packaged one",
                                    "did you mean 'stages/sft'?", "stages/pipeline"]),
    ([f"--config={SFT}:tiny", "--frobnicate"], ["frobnicate"]),
], ids=["unknown-key", "wrong-type", "unknown-model", "missing-file", "near-name", "flag"])
def test_a_bad_flag_is_one_line_before_anything_runs(flags, names, tmp_path):
    began = time.monotonic()
    result = cli("train", f"--workdir={tmp_path / 'run'}", *flags)
    assert_only_line_error(result, *names)
    assert time.monotonic() - began < 30  # the JAX import at most: flags fail before main
    assert not (tmp_path / "run").exists()


def test_missing_training_data_is_one_line_before_the_model_is_built(tmp_path):
    """The stage config's placeholder source (`data/sft.jsonl`, relative to the working
    folder) does not exist; only the tokenizer is given."""
    (tmp_path / "tokenizer.json").write_text("{}")
    result = cli("train", f"--config={SFT}:tiny", f"--workdir={tmp_path / 'run'}",
                 f"--config.data.tokenizer={tmp_path / 'tokenizer.json'}", cwd=tmp_path)
    assert_only_line_error(result, "data.sources[0].jsonl", "data/sft.jsonl")
    assert not (tmp_path / "run").exists()


def test_helpfull_lists_the_config_flag():
    result = cli("--helpfull")
    assert "--config: Config: a packaged one by name" in result.stdout
    assert "Traceback" not in result.stderr


def test_unknown_command_suggests_the_nearest():
    assert_only_line_error(cli("trian", "--config=tiny"), "unknown command 'trian'",
                           "did you mean 'train'?")
    assert_only_line_error(cli("frobnicate"), "unknown command 'frobnicate'", "serve")
    assert_only_line_error(cli("frobnicate", "--help"), "unknown command 'frobnicate'")
    assert_only_line_error(cli(), "usage: longvila-jax COMMAND")


def test_help_lists_the_commands_and_each_commands_own_flags():
    from longvila_jax.cli import COMMANDS

    for flag in ("--help", "-h"):
        result = cli(flag)
        assert result.returncode == 0, result.stderr
        for name, (_, summary, _) in COMMANDS.items():
            assert f"  {name}" in result.stdout and summary in result.stdout
    result = cli("serve", "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: longvila-jax serve")
    for flag in ("--media-root", "--api-key", "--port", "--host", "--compilation-cache"):
        assert f"\n  {flag}: " in result.stdout, flag
    assert "--frame-counts" not in result.stdout and "xla" not in result.stdout.lower()\
        .replace("longvila-jax/xla", "")
    assert len(result.stdout.splitlines()) < 40  # not absl's dump of every library's flags
    train = cli("train", "-h").stdout
    assert "--workdir" in train and "--media-root" not in train


@pytest.fixture(scope="module")
def media(ckpt):
    """A tokenizer with the tiny model's special ids, and a short needle video."""
    from longvila_jax.data.demo_corpus import build_tokenizer
    from longvila_jax.data.synthetic import write_needle_video

    root = ckpt.parent / "media"
    tokenizer = build_tokenizer(root, ["What colour is the shape shown in the video? red blue "
                                       "circle square the digit 7"] * 3)
    video = root / "clip.mp4"
    write_needle_video(video, 8, needle_index=3, needle_seed=5, haystack_seed=6, width=56,
                       height=56, fps=4.0)
    return {"tokenizer": tokenizer, "video": video}


def test_a_second_generate_compiles_nothing(ckpt, media, tmp_path):
    """The persistent compilation cache: the second run writes no new entry (every program
    came from the cache) and starts faster."""
    cache = tmp_path / "xla"
    args = ["generate", f"--checkpoint={ckpt}", f"--tokenizer={media['tokenizer']}",
            f"--video={media['video']}", "--prompt=What colour?", "--num-frames=4",
            "--max-new-tokens=6", "--quiet", f"--compilation-cache={cache}"]
    seconds = []
    for _ in range(2):
        began = time.perf_counter()
        result = ok(cli(*args))
        seconds.append(time.perf_counter() - began)
        entries = sorted(p.name for p in cache.iterdir())
        if len(seconds) == 1:
            first, answer = entries, result.stdout
    assert first and entries == first
    assert result.stdout == answer
    print(f"generate: {seconds[0]:.1f} s cold, {seconds[1]:.1f} s from the cache")


def test_generate_prints_what_the_python_api_returns(ckpt, media):
    import jax

    from longvila_jax.infer.generate import Generator
    from longvila_jax.parallel.mesh import make_mesh

    prompts = ["What colour is the shape?", "Describe the video."]
    result = ok(cli("generate", f"--checkpoint={ckpt}", f"--tokenizer={media['tokenizer']}",
                    f"--video={media['video']}", *[f"--prompt={p}" for p in prompts],
                    "--num-frames=4", "--max-new-tokens=6", "--mesh=1,2", "--quiet"))
    generator = Generator.from_checkpoint(ckpt, tokenizer=media["tokenizer"],
                                          mesh=make_mesh(1, 1, 1, jax.devices()[:1]))
    answers = generator.generate(prompts, video=media["video"], num_frames=4, max_new_tokens=6)
    assert result.stdout == "\n".join(answers) + "\n"


def test_eval_needle_writes_the_grid_and_heatmap(ckpt, media, tmp_path):
    result = ok(cli("eval-needle", f"--checkpoint={ckpt}", f"--tokenizer={media['tokenizer']}",
                    f"--out={tmp_path}", "--frame-counts=4,8", "--depths=0,1",
                    "--num-needles=2", "--generate", "--quiet"))
    grid = json.loads((tmp_path / "needle.json").read_text())
    assert grid["frame_counts"] == [4, 8] and grid["depths"] == [0.0, 1.0]
    assert np.array(grid["accuracy"]).shape == np.array(grid["generation_accuracy"]).shape \
        == (2, 2)
    assert len(grid["per_sample"]) == 8 and (tmp_path / "needle_heatmap.png").stat().st_size
    assert "accuracy by frames: 4:" in result.stdout


def test_eval_mcq_prints_the_table(ckpt, media, tmp_path):
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps(
        {"video": str(media["video"]), "question": f"Which colour? ({i})",
         "options": ["red", "blue", "green", "yellow"], "answer": "A", "category": c}) + "\n"
        for i, c in enumerate(["colour", "colour", "count"])))
    result = ok(cli("eval-mcq", f"--checkpoint={ckpt}", f"--tokenizer={media['tokenizer']}",
                    f"--questions={questions}", f"--out={tmp_path / 'out'}", "--num-frames=4",
                    "--max-new-tokens=4", "--quiet"))
    scored = json.loads((tmp_path / "out" / "mcq.json").read_text())
    assert scored["num_questions"] == 3 and set(scored["per_category"]) == {"colour", "count"}
    assert "overall" in result.stdout


def test_inference_bad_input_is_one_line(ckpt, media, tmp_path):
    base = ("generate", f"--checkpoint={ckpt}", f"--tokenizer={media['tokenizer']}",
            "--prompt=hi")
    assert_one_line_error(cli(*base, f"--video={tmp_path / 'none.mp4'}"), "none.mp4")
    assert_one_line_error(cli(*base, "--mesh=2"), "--mesh", "'2'")
    assert_one_line_error(cli(*base, "--top-p=0"), "top_p")
    assert_one_line_error(cli("eval-needle", f"--checkpoint={ckpt}", f"--out={tmp_path}",
                              f"--tokenizer={media['tokenizer']}", "--depths=0,2"), "depths")
