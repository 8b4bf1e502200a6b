"""The shipped toy world: its files are packaged and checked, a damaged file stops loading with a clear message, and
the toy model loads through diffusers alone."""
import ast, fnmatch, shutil

import pytest
import torch

import ddpo_course.models as models
from ddpo_course.models import ModelFileError, load_pipeline, toy_dir
from conftest import ROOT

def test_every_toy_file_is_packaged_and_checksummed():
    setup = ast.parse((ROOT/"setup.py").read_text())
    patterns = next(ast.literal_eval(k.value)["ddpo_course"] for node in ast.walk(setup) if isinstance(node, ast.Call)
                    for k in node.keywords if k.arg == "package_data")
    files = [p.relative_to(ROOT/"ddpo_course").as_posix() for p in toy_dir().rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    assert files and all(any(fnmatch.fnmatch(f, pat) and f.count("/") == pat.count("/") for pat in patterns) for f in files), files
    listed = {l.split("  ", 1)[1] for l in (toy_dir()/"SHA256SUMS").read_text().splitlines()}
    assert listed == {f[len("toy/"):] for f in files} - {"SHA256SUMS"}
    # the size budget of the shipped weights: three small pipelines (shapes, its early checkpoint, scenes) and three
    # small networks come to 49 MB; a wheel stays well under PyPI's 100 MB, and a fourth pipeline would need a reason
    assert sum((toy_dir()/f).stat().st_size for f in listed) < 52e6

def test_toy_pipeline_loads_with_diffusers_alone():
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(toy_dir()/"pipeline")
    assert models.same_weights(pipe.unet, load_pipeline("toy").unet)

@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_damaged_toy_file_names_the_file_and_the_fix(tmp_path, monkeypatch, damage):
    copy = tmp_path/"toy"; shutil.copytree(toy_dir(), copy)
    f = copy/"pipeline"/"vae"/"diffusion_pytorch_model.safetensors"
    if damage == "truncate": f.write_bytes(f.read_bytes()[:100])
    else: f.unlink()
    monkeypatch.setattr(models, "toy_dir", lambda: copy)
    with pytest.raises(ModelFileError, match=r"vae/diffusion_pytorch_model.safetensors is (damaged|missing).*00b_pretrain.ipynb --flags slow"):
        load_pipeline("toy")

def test_early_checkpoint_shares_the_vae_and_differs_in_the_denoiser():
    toy, early = load_pipeline("toy"), load_pipeline("toy-early")
    assert models.same_weights(toy.vae, early.vae) and not models.same_weights(toy.unet, early.unet)
    assert not models.same_weights(toy.text_encoder, early.text_encoder)
    assert all(p.dtype == torch.float32 for p in early.unet.parameters())     # stored in fp16, loaded in fp32

