"""One error path: each of these bad inputs and faults, tried as a new user would from a fresh folder, ends in one line
`ddpo-train: error: ...` that names what was wrong and the fix (exit 2 for the configuration, 1 for the machine), no
traceback unless `--debug`, and nothing lost: a folder of the user's files keeps every byte."""
import pytest

from ddpo_course.train import main
from conftest import files_of

# (command-line arguments after the setup's {placeholders}, exit status, a phrase of the message)
PROBES = [
    (["tiny", "run.dir={precious}", "run.overwrite=true"], 2, "deletes only a folder that holds a run"),
    (["tiny", "run.dir={precious}"], 2, "choose a new or empty folder"),
    (["tiny", "run.dir="], 2, "run.dir='': is empty"),
    (["tiny", "run.dir=", "run.overwrite=true"], 2, "run.dir='': is empty"),
    (["tiny", "run.dir=.", "run.overwrite=true"], 2, "the current folder"),
    (["tiny", "run.dir={file}"], 2, "is a file, not a folder"),
    (["tiny", "run.dir={file}/run"], 2, "cannot be created or written"),
    (["tiny", "run.dir={new}", "train.max_grad_norm=-1"], 2, "train.max_grad_norm=-1.0: must be a finite number > 0"),
    (["tiny", "run.dir={new}", "train.max_grad_norm=0"], 2, "train.max_grad_norm=0.0: must be a finite number > 0"),
    (["tiny", "run.dir={new}", "train.learning_rate=.nan"], 2, "train.learning_rate=nan"),
    (["tiny", "run.dir={new}", "train.clip_range=-1"], 2, "train.clip_range=-1.0: must be > 0"),
    (["tiny", "run.dir={new}", "train.weight_decay=-1"], 2, "train.weight_decay=-1.0"),
    (["tiny", "run.dir={new}", "train.adam_beta2=1"], 2, "train.adam_beta2=1.0: must be in [0, 1)"),
    (["tiny", "run.dir={new}", "train.adam_eps=0"], 2, "train.adam_eps=0.0"),
    (["tiny", "run.dir={new}", "sample.guidance_scale=0.5"], 2, "sample.guidance_scale=0.5"),
    (["tiny", "run.dir={new}", "model.lora=true", "model.lora_alpha=-1"], 2, "model.lora_alpha=-1.0"),
    (["tiny", "run.dir={new}", "run.eval_prompts=[]"], 2, "run.eval_prompts=[]: is empty"),
    (["tiny", "run.dir={new}", "reward.prompts={empty}"], 2, "holds no prompts"),
    (["{list_yaml}", "run.dir={new}"], 2, "must be a mapping of sections"),
    (["{bad_yaml}", "run.dir={new}"], 2, "is not valid YAML"),
    (["{missing}.yaml"], 2, "nor an existing YAML file"),
    (["tiny", "run.dir={new}", "train.nope=1"], 2, "train.nope: unknown field"),
    (["tiny", "run.dir={new}", "nonsense"], 2, "is not of the form section.field=value"),
    (["tiny", "run.dir={new}", "reward.name=beauty"], 2, "unknown reward"),
    (["tiny", "run.dir={new}", "model.name={precious}"], 2, "not a diffusers pipeline (no model_index.json)"),
    (["tiny", "run.dir={new}", "run.resume=true"], 2, "no checkpoints folder to resume from"),
    (["tiny", "run.dir={new}", "run.resume=true", "run.overwrite=true"], 2, "cannot be combined with run.resume"),
    (["tiny", "--print-config", "run.dir={new}", "train.max_grad_norm=-1"], 2, "train.max_grad_norm=-1.0"),
    (["tiny", "run.dir={new}", "model.name=nobody/no-such-model"], 1, "OSError"),
]

@pytest.fixture
def places(tmp_path, monkeypatch):
    "A fresh folder to stand in: a folder of the user's files, a file, an empty prompt file, two bad YAML files."
    work = tmp_path/"work"; precious = work/"precious"; (precious/"data").mkdir(parents=True)
    (precious/"thesis.tex").write_text("years of work"); (precious/"data"/"a.csv").write_text("1,2")
    (work/"notes.txt").write_text("a file"); (work/"empty.txt").write_text("\n  \n")
    (work/"list.yaml").write_text("- model\n- train\n"); (work/"bad.yaml").write_text("train: {epochs: [\n")
    monkeypatch.chdir(work); monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return dict(precious=precious, file=work/"notes.txt", new=work/"runs"/"new", empty=work/"empty.txt",
                list_yaml=work/"list.yaml", bad_yaml=work/"bad.yaml", missing=work/"no-such"), work

@pytest.mark.parametrize("argv,code,phrase", PROBES, ids=[" ".join(a[1:]) or a[0] for a, _, _ in PROBES])
def test_every_probe_ends_in_one_clear_line_and_loses_nothing(places, capsys, argv, code, phrase):
    where, work = places
    before = files_of(work)
    assert main([a.format(**where) for a in argv]) == code
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ddpo-train: error: "), out.err
    assert phrase in lines[0] and "Traceback" not in out.err + out.out
    assert files_of(work) == before                                  # nothing lost, nothing written
    assert not where["new"].exists()

def test_debug_shows_the_traceback(places):
    from ddpo_course.config import ConfigError
    with pytest.raises(ConfigError, match="max_grad_norm"):
        main(["tiny", "--debug", "train.max_grad_norm=-1"])

def test_check_validates_and_loads_nothing(places, capsys):
    where, work = places
    assert main(["tiny", f"run.dir={where['new']}", "--check"]) == 0
    assert "configuration ok" in capsys.readouterr().out and not where["new"].exists()
    assert main(["tiny", f"run.dir={where['new']}", "train.adam_eps=0", "--check"]) == 2
