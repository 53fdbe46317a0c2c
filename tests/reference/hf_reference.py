"""Reference side of the parity tests; runs in the PyTorch env, never in the project env.

Usage: python hf_reference.py JOB.json, where JOB is a list of actions:
  {"op": "make", "kind": K, "out": DIR, "seed": S, "config": {...}, "legacy_keys": bool}
      builds a random transformers model of kind K in {qwen2, llama, siglip, llava, longvila}
      and saves it the way its users find it on disk;
  {"op": "run", "kind": K, "model": DIR, "inputs": NPZ, "out": NPZ}
      loads DIR with transformers and writes float32 outputs for the inputs.
The LongVILA composite is assembled here from transformers parts plus a direct,
loop-based implementation of VILA's block merge, independent of the JAX code.
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    Qwen2Config,
    Qwen2ForCausalLM,
    SiglipVisionConfig,
    SiglipVisionModel,
)

torch.set_grad_enabled(False)

MERGES = {"mlp2x_gelu": (1, True), "mlp_downsample": (2, False),
          "mlp_downsample_2x2_fix": (2, True), "mlp_downsample_3x3_fix": (3, True)}


def llm_config(kind, cfg):
    return (Qwen2Config if kind == "qwen2" else LlamaConfig)(**cfg)


def projector(kind, c, d):
    """VILA's projector Sequential; index 0 of the downsample variants is the merge."""
    nn = torch.nn
    if kind == "mlp2x_gelu":
        return nn.Sequential(nn.Linear(c, d), nn.GELU(), nn.Linear(d, d))
    if kind in ("mlp_downsample", "mlp_downsample_2x2_fix"):
        return nn.Sequential(nn.Identity(), nn.LayerNorm(4 * c), nn.Linear(4 * c, d), nn.GELU(),
                             nn.Linear(d, d))
    return nn.Sequential(nn.Identity(), nn.LayerNorm(9 * c), nn.Linear(9 * c, 3 * c), nn.GELU(),
                         nn.LayerNorm(3 * c), nn.Linear(3 * c, d), nn.GELU(), nn.Linear(d, d))


def randomise(module, seed):
    """Random values everywhere (LayerNorm/biases too), so no weight hides behind 0 or 1."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        is_norm_scale = name.endswith("weight") and p.dim() == 1
        p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if is_norm_scale else 0.0))
    return module


def add_prefix(folder, prefix):
    file = Path(folder) / "model.safetensors"
    tensors = load_file(file)
    save_file({prefix + k: v.contiguous() for k, v in tensors.items()}, file,
              metadata={"format": "pt"})


def make(job):
    torch.manual_seed(job["seed"])
    kind, cfg, out = job["kind"], job["config"], Path(job["out"])
    if kind in ("qwen2", "llama"):
        model = randomise((Qwen2ForCausalLM if kind == "qwen2" else LlamaForCausalLM)(
            llm_config(kind, cfg)), job["seed"])
        model.save_pretrained(out)
    elif kind == "siglip":
        randomise(SiglipVisionModel(SiglipVisionConfig(**cfg)), job["seed"]).save_pretrained(out)
        if job.get("legacy_keys"):
            add_prefix(out, "vision_model.")
    elif kind == "llava":
        config = LlavaConfig(vision_config=SiglipVisionConfig(**cfg["vision"]),
                             text_config=Qwen2Config(**cfg["llm"]), **cfg["llava"])
        model = randomise(LlavaForConditionalGeneration(config), job["seed"])
        model.save_pretrained(out)
        if job.get("legacy_keys"):  # transformers 5.x in-memory names, as some folders hold
            file = out / "model.safetensors"
            tensors = load_file(file)
            rename = {"language_model.model.": "model.language_model.",
                      "language_model.lm_head.": "lm_head.",
                      "vision_tower.": "model.vision_tower.vision_model.",
                      "multi_modal_projector.": "model.multi_modal_projector."}
            renamed = {}
            for k, v in tensors.items():
                for old, new in rename.items():
                    if k.startswith(old):
                        k = new + k[len(old):]
                        break
                renamed[k] = v.contiguous()
            save_file(renamed, file, metadata={"format": "pt"})
    elif kind == "longvila":
        llm = randomise(Qwen2ForCausalLM(Qwen2Config(**cfg["llm"])), job["seed"])
        llm.save_pretrained(out / "llm")
        vision = randomise(SiglipVisionModel(SiglipVisionConfig(**cfg["vision"])),
                           job["seed"] + 1)
        vision.save_pretrained(out / "vision_tower")
        add_prefix(out / "vision_tower", "vision_model.")  # VILA's folders: 4.x layout
        ptype = cfg["projector"]
        proj = randomise(projector(ptype, cfg["vision"]["hidden_size"],
                                   cfg["llm"]["hidden_size"]), job["seed"] + 2)
        (out / "mm_projector").mkdir()
        save_file({f"layers.{k}": v.contiguous() for k, v in proj.state_dict().items()},
                  out / "mm_projector" / "model.safetensors", metadata={"format": "pt"})
        proj_cfg = {"mm_projector_type": ptype, "model_type": "v2l_projector",
                    "architectures": ["MultimodalProjector"]}
        (out / "mm_projector" / "config.json").write_text(json.dumps(proj_cfg))
        top = {"architectures": ["LlavaLlamaModel"], "model_type": "llava_llama",
               "llm_cfg": json.loads((out / "llm" / "config.json").read_text()),
               "vision_tower_cfg": json.loads((out / "vision_tower" / "config.json").read_text()),
               "mm_projector_cfg": proj_cfg, "mm_vision_select_layer": -2,
               "mm_vision_select_feature": "cls_patch"}
        (out / "config.json").write_text(json.dumps(top))
    else:
        raise ValueError(kind)


def merge_blocks(x, grid, block, row_major):
    """VILA's block merge written as loops over merged tokens: x [n, grid*grid, c]."""
    n, _, c = x.shape
    g = -(-grid // block)
    padded = torch.zeros(n, g * block, g * block, c)
    padded[:, :grid, :grid] = x.reshape(n, grid, grid, c)
    tokens = []
    for u in range(g):
        for w in range(g):
            i, j = (u, w) if row_major else (w, u)
            parts = [padded[:, block * i + a, block * j + b] for a in range(block)
                     for b in range(block)]
            tokens.append(torch.cat(parts, dim=-1))
    return torch.stack(tokens, dim=1)


def longvila_logits(folder, ids, pixels, media_id, newline_id):
    folder = Path(folder)
    llm = AutoModelForCausalLM.from_pretrained(folder / "llm").float().eval()
    vision = SiglipVisionModel.from_pretrained(folder / "vision_tower").float().eval()
    top = json.loads((folder / "config.json").read_text())
    ptype = top["mm_projector_cfg"]["mm_projector_type"]
    c, d = vision.config.hidden_size, llm.config.hidden_size
    proj = projector(ptype, c, d)
    proj.load_state_dict({k[len("layers."):]: v for k, v in
                          load_file(folder / "mm_projector" / "model.safetensors").items()})
    feats = vision(pixel_values=pixels, output_hidden_states=True).hidden_states[
        top["mm_vision_select_layer"]]
    grid = vision.config.image_size // vision.config.patch_size
    block, row_major = MERGES[ptype]
    merged = merge_blocks(feats, grid, block, row_major) if block > 1 else feats
    emb = proj(merged)
    table = llm.get_input_embeddings()
    if newline_id is not None:
        emb = torch.cat([emb, table(torch.full((emb.shape[0], 1), newline_id))], dim=1)
    embeds = table(ids).clone()
    embeds[ids == media_id] = emb.reshape(-1, d)
    return {"logits": llm(inputs_embeds=embeds).logits, "vision": feats}


def run(job):
    inputs = dict(np.load(job["inputs"]))
    kind, folder = job["kind"], job["model"]
    out = {}
    if kind == "causal_lm":
        model = AutoModelForCausalLM.from_pretrained(folder).float().eval()
        out["logits"] = model(input_ids=torch.from_numpy(inputs["ids"])).logits
    elif kind == "siglip":
        model = SiglipVisionModel.from_pretrained(folder).float().eval()
        hs = model(pixel_values=torch.from_numpy(inputs["pixels"]), output_hidden_states=True)
        out["features"] = hs.hidden_states[int(inputs["select_layer"])]
    elif kind == "llava":
        model = LlavaForConditionalGeneration.from_pretrained(folder).float().eval()
        out["logits"] = model(input_ids=torch.from_numpy(inputs["ids"]),
                              pixel_values=torch.from_numpy(inputs["pixels"])).logits
    elif kind == "longvila":
        newline = int(inputs["newline_id"])
        out = longvila_logits(folder, torch.from_numpy(inputs["ids"]),
                              torch.from_numpy(inputs["pixels"]), int(inputs["media_id"]),
                              None if newline < 0 else newline)
    else:
        raise ValueError(kind)
    np.savez(job["out"], **{k: v.float().numpy() for k, v in out.items()})


if __name__ == "__main__":
    for action in json.loads(Path(sys.argv[1]).read_text()):
        {"make": make, "run": run}[action["op"]](action)
