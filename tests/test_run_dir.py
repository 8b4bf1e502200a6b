"""Nothing lost: `run.overwrite` deletes only a run of this package, never a user's folder, the home folder or the
current one; a start that fails leaves nothing that blocks the same command from running again."""
from pathlib import Path

import pytest

from ddpo_course.config import ConfigError, RUN_MARKER, check_run_dir, load_config, run_dir_state
from ddpo_course.epoch import TrainingError
from ddpo_course.train import DDPOTrainer, main
from conftest import SMALL, files_of, small


def user_folder(d:Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d/"thesis.tex").write_text("years of work"); (d/"data").mkdir(exist_ok=True); (d/"data"/"a.csv").write_text("1,2")
    return d


@pytest.mark.parametrize("extra", [["run.overwrite=true"], []])
def test_a_folder_of_the_users_files_is_never_deleted_nor_written_into(tmp_path, capsys, extra):
    precious = user_folder(tmp_path/"precious"); before = files_of(precious)
    assert main(["tiny", f"run.dir={precious}", *extra]) == 2
    err = capsys.readouterr().err
    assert str(precious) in err or "precious" in err
    assert ("delete it yourself" if extra else "choose a new or empty folder") in err
    assert files_of(precious) == before


@pytest.mark.parametrize("run_dir,why", [("", "is empty"), (".", "the current folder"), ("..", "above the current"),
                                         ("~", "your home folder")])
def test_overwrite_refuses_the_current_home_and_empty_folders(tmp_path, monkeypatch, capsys, run_dir, why):
    home = user_folder(tmp_path/"home"); cwd = user_folder(home/"work"/"project")
    (cwd/RUN_MARKER).write_text("{}")     # even a folder that looks like a run is refused when it is where we stand
    monkeypatch.setenv("HOME", str(home)); monkeypatch.chdir(cwd)
    before = files_of(home)
    assert main(["tiny", f"run.dir={run_dir}", "run.overwrite=true"]) == 2
    assert why in capsys.readouterr().err
    assert files_of(home) == before


@pytest.mark.parametrize("run_dir", ["/", "~", str(Path.home())])
def test_the_root_and_the_real_home_folder_are_refused_by_the_check_alone(run_dir):
    # checked at the validation level only: no code path that could delete anything is reached here
    with pytest.raises(ConfigError, match="run.overwrite=True: would delete"):
        check_run_dir(load_config("tiny", [f"run.dir={run_dir}", "run.overwrite=true"]).run)


def test_a_marked_run_with_a_users_file_in_it_is_not_overwritten(tmp_path, capsys):
    run = tmp_path/"run"; DDPOTrainer(small(run, "train.epochs=1")).train()
    (run/"notes.txt").write_text("my notes on this run"); before = files_of(run)
    assert main(["tiny", f"run.dir={run}", *SMALL, "run.overwrite=true"]) == 2
    assert "also holds files no run writes ('notes.txt')" in capsys.readouterr().err
    assert files_of(run) == before


def test_overwrite_keeps_the_earlier_run_when_loading_fails(tmp_path, monkeypatch):
    run = tmp_path/"run"; DDPOTrainer(small(run, "train.epochs=1")).train()
    assert run_dir_state(run) == "run"; before = files_of(run)
    def broken(self): raise TrainingError("the model could not load")
    monkeypatch.setattr(DDPOTrainer, "load_model", broken)
    with pytest.raises(TrainingError, match="could not load"):
        DDPOTrainer(small(run, "train.epochs=1", "run.overwrite=true")).train()
    assert files_of(run) == before                       # nothing deleted: the folder is cleared only once loaded


def test_overwrite_replaces_a_run_of_this_package(tmp_path):
    run = tmp_path/"run"; DDPOTrainer(small(run, "train.epochs=2")).train()
    DDPOTrainer(small(run, "train.epochs=1", "run.overwrite=true")).train()
    assert [l.count('"epoch"') for l in (run/"metrics.jsonl").read_text().splitlines()] == [1]
    assert sorted(p.name for p in (run/"checkpoints").iterdir()) == ["epoch-0000"]


def test_a_start_that_fails_before_its_first_epoch_does_not_block_the_same_command(tmp_path, monkeypatch, capsys):
    run = tmp_path/"run"
    original = DDPOTrainer.evaluate
    def failing(self, epoch):
        raise TrainingError("before training, evaluation: the reward failed")
    monkeypatch.setattr(DDPOTrainer, "evaluate", failing)
    assert main(["tiny", f"run.dir={run}", *SMALL, "train.epochs=1"]) == 1
    assert run_dir_state(run) == "unstarted" and (run/"config.yaml").exists()
    monkeypatch.setattr(DDPOTrainer, "evaluate", original)
    assert main(["tiny", f"run.dir={run}", *SMALL, "train.epochs=1"]) == 0     # the same command, again
    assert run_dir_state(run) == "run" and len((run/"metrics.jsonl").read_text().splitlines()) == 1
    assert f"cleared {run}" in capsys.readouterr().out


def test_a_metrics_line_cut_short_by_a_kill_does_not_stop_a_resume(tmp_path):
    run = tmp_path/"run"
    DDPOTrainer(small(run, "train.epochs=2", "run.checkpoint_every=1")).train()
    with open(run/"metrics.jsonl", "a") as f: f.write('{"epoch": 2, "reward_mean": 0.')     # killed mid-write
    metrics = DDPOTrainer(small(run, "train.epochs=3", "run.resume=true")).train()
    assert [m["epoch"] for m in metrics] == [0, 1, 2]
    assert all(l.startswith("{") and l.endswith("}") for l in (run/"metrics.jsonl").read_text().splitlines())


def test_a_reader_never_sees_a_half_written_config(tmp_path):
    """The other ranks read `config.yaml` to check a resume while rank 0 rewrites it: every read is one whole version
    (a plain `write_text` truncates first, and a reader in between sees an empty or cut file)."""
    import threading
    from ddpo_course.config import write_text_atomic
    p, texts = tmp_path/"config.yaml", ["a: 1\n" * 200_000, "b: 2\n" * 150_000]
    write_text_atomic(p, texts[0])
    seen, done = [], threading.Event()
    def read():
        while not done.is_set(): seen.append(p.read_text())
    t = threading.Thread(target=read); t.start()
    for k in range(60): write_text_atomic(p, texts[k % 2])
    done.set(); t.join()
    assert len(seen) > 5 and all(s in texts for s in seen), {len(s) for s in seen if s not in texts}
    assert [q.name for q in tmp_path.iterdir()] == ["config.yaml"]


def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(tmp_path, capsys):
    "A resume whose newest checkpoint was cut short says so and continues from the previous one, to the same end."
    from ddpo_course.runlog import checkpoints
    run = tmp_path/"run"
    args = ["tiny", f"run.dir={run}", *SMALL, "run.checkpoint_every=1", "run.keep_checkpoints=2"]
    assert main(args + ["train.epochs=2"]) == 0
    newest = checkpoints(run)[-1]
    weights = sorted(newest.glob("*.safetensors"))[0]
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    capsys.readouterr()
    assert main(args + ["train.epochs=3", "run.resume=true"]) == 0
    out = capsys.readouterr().out
    assert f"checkpoint {newest.name} is damaged: {weights.name} has" in out and "resumed from" in out and "epoch 0" in out
    from ddpo_course.runlog import read_metrics
    assert [m["epoch"] for m in read_metrics(run)] == [0, 1, 2] and (run/"final").exists()


@pytest.mark.parametrize("fault", ["full disk", "write error"])
def test_a_checkpoint_that_cannot_be_written_stops_the_run_and_keeps_the_one_before(tmp_path, monkeypatch, capsys, fault):
    """A full disk is found before the write starts, a write error during it; either way the run stops with one
    line naming the epoch, the cause and the intact checkpoint, leaves no temporary folder, and resumes once fixed."""
    import shutil
    import ddpo_course.runlog as runlog
    from ddpo_course.runlog import checkpoints, read_metrics
    run = tmp_path/"run"
    args = ["tiny", f"run.dir={run}", *SMALL, "run.checkpoint_every=1"]
    assert main(args + ["train.epochs=1"]) == 0
    real_usage, real_fsync = shutil.disk_usage, runlog._fsync_tree
    if fault == "full disk":
        monkeypatch.setattr(runlog.shutil, "disk_usage", lambda p: real_usage(p)._replace(free=2**20))
    else:
        def broken(folder): raise OSError(28, "No space left on device")
        monkeypatch.setattr(runlog, "_fsync_tree", broken)
    capsys.readouterr()
    assert main(args + ["train.epochs=3", "run.resume=true"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ddpo-train: training stopped: epoch 1: checkpoint epoch-0001 was not written: ")
    assert ("only 1 MiB free" if fault == "full disk" else "No space left on device") in err[0]
    assert "The newest checkpoint, epoch-0000, is intact" in err[0]
    assert [c.name for c in checkpoints(run)] == ["epoch-0000"] and not list((run/"checkpoints").glob(".tmp-*"))
    monkeypatch.setattr(runlog.shutil, "disk_usage", real_usage); monkeypatch.setattr(runlog, "_fsync_tree", real_fsync)
    assert main(args + ["train.epochs=3", "run.resume=true"]) == 0            # the disk freed: the same command continues
    assert [m["epoch"] for m in read_metrics(run)] == [0, 1, 2]


def test_a_resume_continues_the_trackers_run(tmp_path, monkeypatch):
    "The tracker's run is the run folder's: a resume asks wandb for the same id (tensorboard appends by epoch)."
    from accelerate import Accelerator
    from ddpo_course.config import run_id
    seen = []
    real = Accelerator.init_trackers
    def record(self, project, config=None, init_kwargs=None):
        seen.append((init_kwargs or {}).get("wandb", {})); return real(self, project, config, init_kwargs)
    monkeypatch.setattr(Accelerator, "init_trackers", record)
    run = tmp_path/"run"
    args = ["tiny", f"run.dir={run}", *SMALL, "run.checkpoint_every=1", "run.trackers=[tensorboard]"]
    assert main(args + ["train.epochs=1"]) == 0
    assert main(args + ["train.epochs=2", "run.resume=true"]) == 0
    other = tmp_path/"other"
    assert main(["tiny", f"run.dir={other}", *SMALL, "train.epochs=1", "run.trackers=[tensorboard]"]) == 0
    assert seen[0] == seen[1] == dict(id=run_id(run), resume="allow", name="run") and len(run_id(run)) == 16
    assert seen[2]["id"] == run_id(other) != run_id(run)
