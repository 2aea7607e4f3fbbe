"""Issue 32: nothing already written is lost under races, links, nested folders, kills at the wrong instant and
hostile files; a recorded configuration is the one that produced the numbers; bad files give one `error:` line."""
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, one_error, run_script
from test_safety import snapshot
from utils import files
from utils.finqa_data import PROCESSED_SET
from utils.runs import read_manifest, stage_run

DRIVER = "12_driver.py"


def drive(runner, *args: str) -> int:
    return run_script(DRIVER, "--method", "none", "--quick_test", *runner.base, *args)


# ----------------------------------------------------------------------------------------------------------
# 1-2. the driver's own files follow the folder rule

def test_driver_never_replaces_user_files_in_its_run_folder(run_stage, tmp_path, capsys):
    user_root = tmp_path / "u"
    (user_root / "p" / "driver_logs").mkdir(parents=True)
    (user_root / "p" / "run_manifest.json").write_text('{"mine": 1}')
    (user_root / "p" / "driver_logs" / "00_data_validation.log").write_text("notes")
    before = snapshot(user_root)
    assert drive(run_stage, "--run_id", "p", "--stages", "00", "--set", f"paths.outputs_dir={user_root}") == 1
    one_error(capsys, str(user_root / "p" / "run_manifest.json"), "not a run manifest this driver wrote")
    assert snapshot(user_root) == before
    assert sorted(p.name for p in (user_root / "p").iterdir()) == ["driver_logs", "run_manifest.json"]

    # the same through outputs/<run> as a link to a folder of the user's files; a user's log alone is refused too
    (user_root / "p" / "run_manifest.json").unlink()
    before = snapshot(user_root)
    outputs = run_stage.root / "outputs"
    outputs.mkdir(exist_ok=True)
    (outputs / "linked").symlink_to(user_root / "p")
    assert drive(run_stage, "--run_id", "linked", "--stages", "00") == 1
    one_error(capsys, "driver_logs", "holds files this driver did not write (00_data_validation.log)")
    assert snapshot(user_root) == before


def test_driver_log_that_is_a_link_is_never_followed(run_stage, tmp_path, capsys):
    precious = tmp_path / "precious.txt"
    precious.write_text("years of work")
    logs = run_stage.root / "outputs" / "X" / "driver_logs"
    logs.mkdir(parents=True)
    (logs / "00_data_validation.log").symlink_to(precious)
    assert drive(run_stage, "--run_id", "X", "--stages", "00") == 1
    one_error(capsys, "holds files this driver did not write")
    assert precious.read_text() == "years of work"
    # a driver_logs folder that is itself a link is refused the same way
    (logs / "00_data_validation.log").unlink()
    logs.rmdir()
    (tmp_path / "elsewhere").mkdir()
    logs.symlink_to(tmp_path / "elsewhere")
    assert drive(run_stage, "--run_id", "X", "--stages", "00") == 1
    one_error(capsys, "not a folder the driver can write its logs to")
    assert not any((tmp_path / "elsewhere").iterdir())
    # and a log is opened without following links even past those checks (a link planted mid-run)
    planted = logs.parent / "planted.log"
    planted.symlink_to(precious)
    with pytest.raises(files.StageError, match="cannot write"):
        files.open_no_follow(planted)
    assert precious.read_text() == "years of work"


def test_driver_runs_and_reruns_in_its_own_folder(run_stage):
    """Its own run_manifest.json and logs are its to replace: a second invocation works as before."""
    assert drive(run_stage, "--stages", "00") == 0
    assert drive(run_stage, "--stages", "00", "--rerun", "00") == 0
    run_dir = run_stage.root / "outputs" / "run_001"
    assert json.loads((run_dir / "run_manifest.json").read_text())["status"] == "completed"
    assert (run_dir / "driver_logs" / "00_data_validation.log").read_text().startswith("# ")


# ----------------------------------------------------------------------------------------------------------
# 3. one writer per stage folder: single stages and the driver share the lock

def test_a_stage_being_replaced_cannot_be_taken_by_another_run(run_stage, capsys, tmp_path):
    assert run_stage("00_check_data.py") == 0
    folder = run_stage.stage_dir("00_data_validation")
    before = snapshot(folder)
    # the `00 --overwrite` run that will fail is in progress (its folder moved aside, the new one running) when a
    # plain `00` on the same run starts: the plain run is refused and touches nothing
    with pytest.raises(RuntimeError, match="the overwrite run fails"):
        with stage_run("00_check_data", folder, {}, 42, overwrite=True):
            assert (folder.parent / ".00_data_validation.previous").is_dir()
            assert run_stage("00_check_data.py") == 1
            one_error(capsys, str(folder), "being written by another process")
            raise RuntimeError("the overwrite run fails")
    assert snapshot(folder) == before and read_manifest(folder)["status"] == "completed"
    assert not (folder.parent / ".00_data_validation.previous").exists()


def test_two_writers_never_share_a_folder_and_kill_9_frees_it(run_stage, capsys):
    folder = run_stage.stage_dir("00_data_validation")
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; sys.path.insert(0, sys.argv[1]); from utils.files import FolderLock; "
        "lock = FolderLock(sys.argv[2]).__enter__(); print('locked', flush=True); time.sleep(600)"),
        str(REPO), str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert run_stage("00_check_data.py") == 1  # a second writer while the first one runs
        one_error(capsys, "being written by another process")
        assert not folder.exists()
        # the driver's stage is refused the same way, and the driver stops there
        assert drive(run_stage, "--stages", "00") == 1
        assert not folder.exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert run_stage("00_check_data.py") == 0  # the kernel released the dead process's lock


# ----------------------------------------------------------------------------------------------------------
# 4. nested stage folders

def test_no_stage_folder_inside_another(prepared, capsys, tmp_path):
    rewards = prepared.stage_dir("02_rewards")
    before = snapshot(rewards)
    assert prepared("10_evaluate.py", "--base", "--quick_test", "--output_dir", str(rewards / "my_eval")) == 1
    one_error(capsys, "inside the folder of another stage", str(rewards))
    assert snapshot(rewards) == before  # (no lock file for my_eval made inside it either)
    assert prepared("02_build_rewards.py", "--overwrite") == 0 and read_manifest(rewards)["status"] == "completed"

    # 11's default output folder is outputs/11_comparison: a run of that name is never made inside it
    assert prepared("10_evaluate.py", "--base", "--quick_test") == 0
    assert run_script("11_compare_runs.py", str(prepared.root / "outputs" / "run_001"), "--output_dir",
                      str(prepared.root / "outputs" / "11_comparison")) == 0
    comparison = snapshot(prepared.root / "outputs" / "11_comparison")
    assert prepared("00_check_data.py", "--run_id", "11_comparison") == 1
    one_error(capsys, "inside the folder of another stage")
    assert snapshot(prepared.root / "outputs" / "11_comparison") == comparison


def test_a_folder_holding_another_stage_is_never_deleted(prepared, capsys):
    rewards = prepared.stage_dir("02_rewards")
    nested = rewards / "old_eval"  # as an earlier version could leave it
    shutil.copytree(prepared.stage_dir("01_preprocessing"), nested)
    before = snapshot(rewards)
    assert prepared("02_build_rewards.py", "--overwrite") == 1
    one_error(capsys, "holds the folder of another stage", str(nested))
    assert snapshot(rewards) == before


# ----------------------------------------------------------------------------------------------------------
# 5. kill -9 at the wrong instant

def deletion_order(folder: Path) -> list[str]:
    removed: list[str] = []
    real_unlink, real_rmtree = Path.unlink, shutil.rmtree
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Path, "unlink", lambda self, missing_ok=False: (removed.append(self.name),
                                                                      real_unlink(self, missing_ok))[1])
        patch.setattr(shutil, "rmtree", lambda path, *a, **k: (removed.append(Path(path).name),
                                                               real_rmtree(path, *a, **k))[1])
        files.remove_folder_manifest_last(folder)
    return removed


def test_a_deletion_killed_at_any_instant_leaves_a_recoverable_folder(prepared, capsys, tmp_path):
    rewards = prepared.stage_dir("02_rewards")
    previous = rewards.parent / ".02_rewards.previous"
    order = deletion_order(shutil.copytree(rewards, tmp_path / "copy"))
    assert order[-1] == "manifest.json" and len(order) >= 3  # the manifest goes last, so a kill keeps it

    for killed_after in range(len(order)):  # a kill after each deletion: what is left of the old result
        shutil.copytree(rewards, previous)
        real_unlink, real_rmtree, done = Path.unlink, shutil.rmtree, []

        def dying(real):
            def call(target, *args, **kwargs):
                if len(done) == killed_after:
                    raise KeyboardInterrupt  # the process dies here
                done.append(target)
                return real(target, *args, **kwargs)
            return call
        with pytest.MonkeyPatch.context() as patch, pytest.raises(KeyboardInterrupt):
            patch.setattr(Path, "unlink", dying(real_unlink))
            patch.setattr(shutil, "rmtree", dying(real_rmtree))
            files.remove_folder_manifest_last(previous)
        assert read_manifest(previous)["stage"] == "02_build_rewards"  # still provably the stage's own
        assert prepared("02_build_rewards.py", "--overwrite") == 0, capsys.readouterr().err
        assert not previous.exists() and read_manifest(rewards)["status"] == "completed"


def test_a_split_set_cut_by_a_kill_is_never_read(run_stage, capsys):
    processed = run_stage.root / "processed"
    assert run_stage("01_prepare_dataset.py") == 0
    import utils.finqa_data as finqa_data
    real_write, written = finqa_data.write_jsonl, []

    def killed_after_train(path, rows):
        if written:
            raise KeyboardInterrupt  # kill -9 between the train and val writes
        written.append(path)
        real_write(path, rows)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(finqa_data, "write_jsonl", killed_after_train)
        assert run_stage("01_prepare_dataset.py", "--overwrite", "--set", "data.context_mode=full") == 130
    assert written == [processed / "train.jsonl"]
    capsys.readouterr()
    # train is now in the full setting, val/test in gold: no reader takes either setting's view of it
    for mode in ("gold", "full"):
        assert run_stage("10_evaluate.py", "--base", "--quick_test", "--label", f"b_{mode}",
                         "--set", f"data.context_mode={mode}", "--set", "evaluation.split=train") == 1
        one_error(capsys, "train.jsonl", "processed_set.json")
    assert run_stage("01_prepare_dataset.py", "--overwrite", "--set", "data.context_mode=full") == 0
    assert run_stage("10_evaluate.py", "--base", "--quick_test", "--set", "data.context_mode=full") == 0


def test_a_previous_that_is_a_link_is_refused(prepared, capsys, tmp_path):
    rewards = prepared.stage_dir("02_rewards")
    target = shutil.copytree(rewards, tmp_path / "someone_elses")
    (rewards.parent / ".02_rewards.previous").symlink_to(target)
    before = snapshot(target)
    assert prepared("02_build_rewards.py", "--overwrite") == 1
    one_error(capsys, ".02_rewards.previous", "move it away")
    assert snapshot(target) == before


# ----------------------------------------------------------------------------------------------------------
# the recorded configuration is the one that produced the numbers

def test_evaluation_in_another_context_mode_than_the_rows_is_refused(prepared, capsys):
    assert prepared("10_evaluate.py", "--base", "--quick_test", "--set", "data.context_mode=full") == 1
    one_error(capsys, "data.context_mode is 'full' here but 'gold' there", PROCESSED_SET)
    assert not (prepared.stage_dir("10_evaluation") / "base" / "metrics.json").exists()
    assert prepared("03_sft_train.py", "--quick_test", "--set", "data.retrieval_top_k=3") == 1
    one_error(capsys, "data.retrieval_top_k")


def test_processed_set_of_someone_else_is_never_replaced(run_stage, capsys):
    processed = run_stage.root / "processed"
    processed.mkdir()
    (processed / PROCESSED_SET).write_text('{"mine": true}')
    assert run_stage("01_prepare_dataset.py") == 1
    one_error(capsys, PROCESSED_SET, "not a processed set 01_prepare_dataset.py wrote")
    assert (processed / PROCESSED_SET).read_text() == '{"mine": true}'
    assert sorted(p.name for p in processed.iterdir()) == [PROCESSED_SET]


# ----------------------------------------------------------------------------------------------------------
# bounded input

ALIAS_BOMB = "{" + ", ".join(
    f"{name}: &{name} [" + ", ".join([f"*{prev}" if prev else '"lol"'] * 9) + "]"
    for prev, name in zip([None, "a", "b", "c", "d", "e", "f"], "abcdefg")) + "}"


def test_yaml_alias_bombs_are_refused_before_anything_is_written(run_stage, capsys, tmp_path):
    assert len(ALIAS_BOMB) < 400  # 9**7 = 4.8 million strings once written out
    started = time.time()
    assert run_stage("00_check_data.py", "--set", f"model.name={ALIAS_BOMB}") == 1
    one_error(capsys, "--set model.name", "expands to more than")
    config = tmp_path / "bomb.yaml"
    config.write_text((REPO / "configs" / "models" / "smollm2-135m.yaml").read_text() + f"\nbomb: {ALIAS_BOMB}\n")
    assert run_stage("00_check_data.py", "--config", str(config)) == 1
    one_error(capsys, str(config), "expands to more than")
    assert time.time() - started < 10 and not (run_stage.root / "outputs").exists()


def test_an_input_path_of_the_root_is_refused_quickly(prepared, capsys):
    folder = prepared.stage_dir("02_rewards")
    manifest = read_manifest(folder)
    manifest["inputs"]["everything"] = {"path": "/", "sha256": "0" * 64}
    files.write_json_atomic(folder / "manifest.json", manifest)
    started = time.time()
    assert drive(prepared, "--stages", "02", "--dry_run") == 1
    one_error(capsys, "input /")  # (too many files, or an entry it may not read: either way one line)
    assert time.time() - started < 60


# ----------------------------------------------------------------------------------------------------------
# files as a user would expect them

def test_written_files_get_the_usual_mode(prepared):
    umask = os.umask(0)
    os.umask(umask)
    expected = 0o666 & ~umask
    for path in (prepared.root / "processed" / "train.jsonl", prepared.root / "processed" / PROCESSED_SET,
                 prepared.stage_dir("02_rewards") / "manifest.json", prepared.stage_dir("02_rewards") / "reward_spec.yaml"):
        assert path.stat().st_mode & 0o777 == expected, path


@pytest.mark.parametrize("content", ['{"stage": "02_build_rewards", "status": "completed", "n": ' + "9" * 5000 + "}",
                                     "[1, 2]", '{"stage": "02_build_rewards", "status": "completed", "inputs": "x"}',
                                     '{"stage": "02_build_rewards", "status": "completed", "config": [1]}'])
def test_manifests_that_cannot_be_read_or_have_the_wrong_shape(prepared, capsys, content):
    rewards = prepared.stage_dir("02_rewards")
    (rewards / "manifest.json").write_text(content)
    before = snapshot(rewards)
    assert prepared("02_build_rewards.py", "--overwrite") == 1  # not provably 02's folder any more: left alone
    one_error(capsys, str(rewards), "holds no readable manifest.json")
    assert drive(prepared, "--stages", "02") == 1
    assert snapshot(rewards) == before
    sft = prepared.stage_dir("03_sft")  # a reader that needs the stage completed: one error line
    (sft / "ckpt_sft" / "best").mkdir(parents=True)
    (sft / "manifest.json").write_text(content.replace("02_build_rewards", "03_sft_train"))
    assert prepared("10_evaluate.py", "--label", "sft", "--quick_test") == 1
    one_error(capsys, "03_sft is not a completed stage")


def test_json_integers_past_pythons_limit(run_stage, finqa_dir, capsys, tmp_path):
    huge = "9" * 5000
    good = (finqa_dir / "dev.json").read_text()
    (finqa_dir / "dev.json").write_text(good.replace('"exe_ans": ', f'"exe_ans": {huge}, "x": ', 1))
    assert run_stage("01_prepare_dataset.py") == 1
    one_error(capsys, "dev.json", "not valid JSON")
    (finqa_dir / "dev.json").write_text(good)
    assert run_stage("01_prepare_dataset.py") == 0
    predictions = tmp_path / "predictions.jsonl"
    predictions.write_text('{"id": "x", "completion": "c", "n_tokens": ' + huge + '}\n')
    assert run_stage("10_evaluate.py", "--predictions_jsonl", str(predictions), "--label", "p") == 1
    one_error(capsys, "predictions.jsonl:1", "not valid JSON")


def failing_write_errno(run_stage, errno_: int) -> None:
    """Every temp file the stage would write fails as on a read-only folder or a full disk."""
    def refuse(*args, **kwargs):
        raise OSError(errno_, os.strerror(errno_))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(files.tempfile, "mkstemp", refuse)
        return run_stage("02_build_rewards.py", "--overwrite")


@pytest.mark.parametrize("errno_", [13, 28, 30])  # EACCES, ENOSPC, EROFS
def test_writes_that_fail_keep_the_completed_result(prepared, capsys, errno_):
    rewards = prepared.stage_dir("02_rewards")
    before = snapshot(rewards)
    assert failing_write_errno(prepared, errno_) == 1
    one_error(capsys, "cannot write", str(rewards / "manifest.json"), os.strerror(errno_))
    assert snapshot(rewards) == before and read_manifest(rewards)["status"] == "completed"


def test_a_file_too_large_is_one_error_line(run_stage, finqa_dir, tmp_path):
    """A real failing write: the file-size limit makes the kernel refuse the manifest (EFBIG)."""
    def limit():  # pragma: no cover - runs in the child
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024))
    out = tmp_path / "outputs"
    result = subprocess.run([sys.executable, str(REPO / "00_check_data.py"), "--finqa_dir", str(finqa_dir),
                             "--set", f"paths.outputs_dir={out}"], capture_output=True, text=True,
                            preexec_fn=limit, cwd=REPO, timeout=120)
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert "Traceback" not in result.stderr and len(errors) == 1, result.stderr
    assert "manifest.json" in errors[0] and "File too large" in errors[0]


def test_gpu_run_never_replaces_a_bundle_it_did_not_write(tmp_path):
    import importlib.util
    spec = importlib.util.spec_from_file_location("gpu_run", REPO / "scripts" / "gpu_run.py")
    gpu_run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_run)
    run_dir = tmp_path / "gpu"
    run_dir.mkdir()
    (run_dir / "run_manifest.json").write_text("{}")
    bundle = gpu_run.write_bundle(run_dir, {"device": "cpu"})
    assert gpu_run.is_bundle(bundle, "gpu")
    assert gpu_run.write_bundle(run_dir, {"device": "cpu"}) == bundle  # its own: replaced
    bundle.write_text("my own archive")
    with pytest.raises(files.StageError, match="not a bundle this script wrote"):
        gpu_run.write_bundle(run_dir, {"device": "cpu"})
    assert bundle.read_text() == "my own archive"
