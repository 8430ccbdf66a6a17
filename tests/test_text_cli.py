"""The command line on text-conditioned models saved as pipeline folders: prompts from a file or embeddings, and
the bad input of issue 30 refused in one line with exit status 2, nothing written."""
import numpy as np
import pytest

from conftest import tiny_flux_pipeline, tiny_pixart_pipeline, tiny_sd3_pipeline
from cqpolicy.cli import main
from test_text_models import prompt_table

BUILD = {"pixart": tiny_pixart_pipeline, "sd3": tiny_sd3_pipeline, "flux": tiny_flux_pipeline}


def saved(kind, root, **build):
    """A tiny pipeline of ``kind`` saved under ``root`` (no text encoders), its default size 8, and a prompt
    embeddings file beside it."""
    pipe = BUILD[kind](**build)
    pipe.save_pretrained(root / kind)
    prompt_table(kind).save(root / f"{kind}.safetensors")
    return root / kind, root / f"{kind}.safetensors"


def one_line_error(capsys, code):
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    return err[0]


def test_sampling_an_sd_pipeline_folder_encodes_a_prompt_file_with_its_own_text_encoder(tiny_sd_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a sneaker\n\nankle boot, xyzzy-qwv product shot\n")  # an unknown word too
    out = tmp_path / "out"
    assert main(["sample", "--model", str(tiny_sd_dir), "--prompts", str(prompts), "--steps", "2",
                 "--num-samples", "3", "--batch-size", "2", "--out", str(out)]) == 0
    saved_run = np.load(out / "samples.npz")
    assert saved_run["images"].shape == (3, 3, 16, 16) and saved_run["labels"].tolist() == [0, 1, 0]


@pytest.mark.parametrize("kind", ["pixart", "sd3", "flux"])
def test_sampling_a_text_transformer_folder_with_prompt_embeddings(kind, tmp_path):
    folder, embeds = saved(kind, tmp_path)
    out = tmp_path / "out"
    assert main(["sample", "--model", str(folder), "--prompts", str(embeds), "--steps", "2", "--num-samples", "2",
                 "--policy", "fora:interval=2", "--out", str(out)]) == 0
    assert np.load(out / "samples.npz")["images"].shape[0] == 2


@pytest.mark.parametrize("content", [b"", b"\n  \n", b"\x00\x01binary\xff"])
def test_an_empty_or_binary_prompt_file_is_refused(content, tiny_sd_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(content)
    code = main(["sample", "--model", str(tiny_sd_dir), "--prompts", str(prompts), "--steps", "2",
                 "--num-samples", "1", "--out", str(tmp_path / "out")])
    assert "prompts" in one_line_error(capsys, code)
    assert not (tmp_path / "out").exists()


def test_prompt_texts_without_a_text_encoder_are_refused(tmp_path, capsys):
    folder, _ = saved("pixart", tmp_path)
    (tmp_path / "p.txt").write_text("a sneaker\n")
    code = main(["sample", "--model", str(folder), "--prompts", str(tmp_path / "p.txt"), "--steps", "2",
                 "--num-samples", "1", "--out", str(tmp_path / "out")])
    assert "no text encoder" in one_line_error(capsys, code)


def test_guidance_asked_of_a_flux_without_a_guidance_input_is_refused(tmp_path, capsys):
    folder, embeds = saved("flux", tmp_path, guidance_embeds=False)  # FLUX.1-schnell's layout
    code = main(["sample", "--model", str(folder), "--prompts", str(embeds), "--steps", "2", "--num-samples", "1",
                 "--guidance-scale", "3.5", "--out", str(tmp_path / "out")])
    assert "takes no guidance" in one_line_error(capsys, code)
    assert main(["sample", "--model", str(folder), "--prompts", str(embeds), "--steps", "2", "--num-samples", "1",
                 "--out", str(tmp_path / "out")]) == 0  # its default: no guidance


def test_a_scheduler_of_the_other_family_is_refused(tmp_path, capsys):
    folder, embeds = saved("sd3", tmp_path)
    code = main(["sample", "--model", str(folder), "--prompts", str(embeds), "--steps", "2", "--num-samples", "1",
                 "--scheduler", "ddim", "--out", str(tmp_path / "out")])
    assert "trained for flow matching" in one_line_error(capsys, code)


def test_the_whole_loop_on_a_flow_matching_text_model(tmp_path):
    """trace -> train an MLP -> deploy it; fit a forecast -> deploy it; bench them beside FORA, on SD3's layout."""
    import json

    folder, embeds = saved("sd3", tmp_path)
    model = ["--model", str(folder), "--prompts", str(embeds), "--steps", "4"]
    for k, seed in enumerate(("20000000", "20000100")):
        assert main(["trace", *model, "--num-samples", "2", "--seed", seed, "--out", str(tmp_path / f"t{k}")]) == 0
    assert main(["train", "mlp", "--traces", str(tmp_path / "t0"), str(tmp_path / "t1"), "--max-epochs", "2",
                 "--out", str(tmp_path / "mlp")]) == 0
    assert main(["train", "forecast", *model, "--schedule", "fora:interval=2", "--out", str(tmp_path / "fc")]) == 0
    out = tmp_path / "bench"
    assert main(["bench", *model, "--num-samples", "2", "--repeats", "0", "--out", str(out), "--policies", "none",
                 "fora:interval=2", f"learned:path={tmp_path / 'mlp'},threshold=1", f"forecast:path={tmp_path / 'fc'}"
                 ]) == 0
    rows = {r["policy"]: r for r in json.loads((out / "results.json").read_text())}
    for spec in ("fora:interval=2", f"learned:path={tmp_path / 'mlp'},threshold=1", f"forecast:path={tmp_path / 'fc'}"):
        assert rows[spec]["macs_per_image"] < rows["none"]["macs_per_image"], spec


def test_the_clip_score_of_each_image_against_its_prompt(tiny_sd_dir, tiny_clip_model_dir, tmp_path):
    import json

    (tmp_path / "p.txt").write_text("a sneaker\nan ankle boot\n")
    assert main(["sample", "--model", str(tiny_sd_dir), "--prompts", str(tmp_path / "p.txt"), "--steps", "2",
                 "--num-samples", "2", "--clip-model", str(tiny_clip_model_dir), "--out", str(tmp_path / "out")]) == 0
    score = json.loads((tmp_path / "out" / "metrics.json").read_text())["clip_score"]
    assert 0.0 <= score <= 100.0


def test_a_forecast_fitted_to_another_scheduler_is_refused(tmp_path, capsys):
    folder, embeds = saved("pixart", tmp_path)  # PixArt's pipeline samples with DPM-Solver++: the default here
    model = ["--model", str(folder), "--prompts", str(embeds), "--steps", "3"]
    assert main(["train", "forecast", *model, "--schedule", "fora:interval=2", "--out", str(tmp_path / "fc")]) == 0
    capsys.readouterr()
    code = main(["sample", *model, "--scheduler", "ddim", "--num-samples", "1", "--policy",
                 f"forecast:path={tmp_path / 'fc'}", "--out", str(tmp_path / "out")])
    assert "scheduler" in one_line_error(capsys, code)
    assert not (tmp_path / "out").exists()


def test_a_text_pipeline_loads_from_the_local_hugging_face_cache_by_hub_id(tiny_sd_dir, tmp_path, monkeypatch):
    """Nothing is downloaded: a hub id resolves to its snapshot in the local cache, text encoders included."""
    import shutil

    import huggingface_hub.constants

    from cqpolicy.models import load_model

    repo = tmp_path / "hub" / "models--org--tiny-sd"
    shutil.copytree(tiny_sd_dir, repo / "snapshots" / ("0" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    model = load_model("org/tiny-sd", prompts=["a sneaker", "a bag"])
    assert type(model.transformer).__name__ == "UNet2DConditionModel" and model.num_classes == 2
    assert model.default_guidance_scale == 7.5  # StableDiffusionPipeline's own default


def test_a_search_on_a_flow_matching_text_model(tmp_path, capsys):
    import yaml

    folder, embeds = saved("flux", tmp_path)
    space = tmp_path / "s.yaml"
    space.write_text(yaml.safe_dump({"model": str(folder), "prompts": str(embeds), "resolution": 16, "steps": 4,
                                     "num_samples": 2, "batch_size": 2, "objectives": ["macs_speedup"],
                                     "families": {"fora": {"interval": {"int": [2, 3]}}}}))
    assert main(["search", "--config", str(space), "--n-trials", "2", "--storage", str(tmp_path / "j.log")]) == 0
    assert "Pareto-optimal trials" in capsys.readouterr().out
