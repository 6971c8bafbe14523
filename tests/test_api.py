"""The Python API: the README's notebook example runs as written, against a tiny pipeline."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
EXAMPLE_MODEL = '"stable-diffusion-v1-5/stable-diffusion-v1-5"'


def readme_example() -> str:
    section = README.read_text().split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_example_runs(tiny_model, tmp_path, monkeypatch, capsys):
    code = readme_example()
    assert EXAMPLE_MODEL in code
    monkeypatch.chdir(tmp_path)  # the example writes sd_cpu/ where it runs
    exec(compile(code.replace(EXAMPLE_MODEL, repr(str(tiny_model("sd")))), str(README), "exec"), {})
    out = capsys.readouterr().out
    assert "'unet': 'built'" in out and "StableDiffusionPipeline" in out
    assert "513" in out.splitlines()[-1] and "multiple of 8" in out.splitlines()[-1]  # ExportError's one sentence
    assert (tmp_path / "sd_cpu" / "manifest.json").is_file()


def test_export_returns_the_origin_of_each_component(tiny_model, tmp_path):
    import neuron_export

    first = neuron_export.export(
        "sd", model=str(tiny_model("sd")), backend="cpu", output=tmp_path / "a", components="vae_decoder"
    )
    again = neuron_export.export(
        "sd", model=str(tiny_model("sd")), backend="cpu", output=tmp_path / "b", components="vae_decoder"
    )
    assert (first.up_to_date, first.origins) == (False, {"vae_decoder": "built"})
    assert (again.up_to_date, again.origins) == (False, {"vae_decoder": "cached"})
    assert again.manifest.components["vae_decoder"].cache_key == first.manifest.components["vae_decoder"].cache_key
