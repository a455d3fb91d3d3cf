"""The one Lightning set-up: DDP equals one process, a SIGKILLed run resumes to the same weights, every model
name the config accepts builds, stages run as independent jobs, and bad input gets one clear line."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import get_args

import pytest
import torch
import yaml
from typer.testing import CliRunner

from geomoe.cli import app
import lightning as L

from geomoe.config import UNSUPPORTED, Decoder, Encoder, TrainerConfig, load_config
from geomoe.trainer import FitJob, fit
from geomoe.experts.model import Expert, load_expert, save_expert
from geomoe.embedding.model import load_embedding

ROOT = Path(__file__).resolve().parents[1]
PAIRS = [(e, d) for e in get_args(Encoder) for d in get_args(Decoder) if (d, e) not in UNSUPPORTED]


@pytest.mark.parametrize(("encoder", "decoder"), PAIRS)
def test_every_encoder_and_decoder_the_config_accepts_builds_and_runs(encoder, decoder, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"experts": {"encoder": encoder, "decoder": decoder}}))
    x = load_config(cfg).experts
    m = Expert(x.encoder, x.decoder).eval()
    with torch.no_grad():
        y = m(torch.randint(0, 255, (1, 3, 70, 90), dtype=torch.uint8))
    assert y.shape == (1, 1, 70, 90) and torch.isfinite(y).all()


def test_config_rejects_unknown_names_and_impossible_pairs(tmp_path):
    for bad, word in (({"experts": {"encoder": "resnet9000"}}, "resnet9000"),
                      ({"experts": {"decoder": "SegNet"}}, "SegNet"),
                      ({"experts": {"encoder": "mit_b0", "decoder": "UnetPlusPlus"}}, "cannot be built"),
                      ({"trainer": {"strategy": "horovod"}}, "horovod")):
        p = tmp_path / "bad.yaml"
        p.write_text(yaml.safe_dump(bad))
        with pytest.raises(ValueError, match=word):
            load_config(p)
        res = CliRunner().invoke(app, ["train", str(tmp_path), "-o", str(tmp_path / "b"), "-c", str(p)])
        assert res.exit_code == 1 and "bad.yaml" in res.output and "Traceback" not in res.output, res.output


def test_model_files_refuse_other_kinds_and_old_versions(bundle_dir, tmp_path):
    with pytest.raises(ValueError, match="holds the 'embedding' model, expected the 'expert' model"):
        load_expert(bundle_dir / "embedding" / "embedding.pt")
    with pytest.raises(ValueError, match="holds the 'expert' model, expected the 'embedding' model"):
        load_embedding(bundle_dir / "experts" / "region_0.pt")
    torch.save({"state": {}, "encoder": "resnet18"}, tmp_path / "old.pt")
    with pytest.raises(ValueError, match="geomoe 0.1 .*retrain"):
        load_expert(tmp_path / "old.pt")
    e = Expert("resnet18")
    save_expert(e, tmp_path / "e.pt")
    state = torch.load(tmp_path / "e.pt", weights_only=False)
    state["meta"]["encoder"] = "resnet34"  # a checkpoint of another model than it claims
    torch.save(state, tmp_path / "e.pt")
    with pytest.raises(ValueError, match="e.pt: weights do not fit a Unet on resnet34"):
        load_expert(tmp_path / "e.pt")
    old = tmp_path / "oldbundle"
    shutil.copytree(bundle_dir, old, ignore=shutil.ignore_patterns("runs", "*.ckpt"))
    m = json.loads((old / "manifest.json").read_text())
    (old / "manifest.json").write_text(json.dumps({**m, "format": 1}))
    res = CliRunner().invoke(app, ["evaluate", str(old), "-b", str(old)])
    assert res.exit_code == 1 and "bundle format 1" in res.output and "retrain" in res.output, res.output


def test_loading_a_bundle_does_not_import_the_training_stack():
    code = ("import sys, geomoe.bundle, geomoe.pipelines.predict, geomoe.pipelines.evaluate;"
            "print(sorted(m for m in ('lightning', 'torchmetrics', 'geomoe.trainer') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


def test_stages_run_as_independent_jobs_then_assemble(synth_root, tmp_path):
    r = CliRunner()
    b = tmp_path / "b"
    args = ["train", str(synth_root), "-o", str(b), "-c", "tiny"]
    assert r.invoke(app, [*args, "--only", "embedding,regions"]).exit_code == 0
    assert (b / "regions" / "centroids.npy").exists() and not (b / "experts").exists()
    res = r.invoke(app, [*args, "--only", "assemble"])
    assert res.exit_code == 1 and "not finished: generalist, expert:0, expert:1, expert:2, baseline" in res.output, res.output
    res = r.invoke(app, [*args, "--only", "expert:0"])
    assert res.exit_code == 1 and "run --only generalist first" in " ".join(res.output.split()), res.output
    assert r.invoke(app, [*args, "--only", "generalist"]).exit_code == 0
    for job in ("expert:2", "expert:0"):  # as separate machines would, in any order
        assert r.invoke(app, [*args, "--only", job]).exit_code == 0
    assert (b / "experts" / "region_2.pt").exists() and not (b / "experts" / "region_1.pt").exists()
    res = r.invoke(app, [*args, "--only", "expert:7"])
    assert res.exit_code == 1 and "unknown stage" in res.output
    done = (b / "experts" / "region_0.pt").stat().st_mtime_ns
    assert r.invoke(app, [*args, "--only", "expert:1,baseline,assemble"]).exit_code == 0
    assert json.loads((b / "manifest.json").read_text())["k"] == 3
    assert (b / "experts" / "region_0.pt").stat().st_mtime_ns == done  # a finished part is never retrained


def test_devices_that_do_not_exist_get_one_line(synth_root, tmp_path):
    if torch.cuda.device_count() >= 4:
        pytest.skip("this machine has the GPUs asked for")
    res = CliRunner().invoke(app, ["train", str(synth_root), "-o", str(tmp_path / "b"), "-c", "tiny",
                                   "--accelerator", "gpu", "--devices", "4"])
    assert res.exit_code == 1 and "error:" in res.output and "Traceback" not in res.output, res.output


# --- DDP and kill/resume: real processes running the CLI, against one uninterrupted in-process run ---------------

LONGER = {"seed": 0, "data": {"patch_size": 64, "block_size": 128, "val_fraction": 0.25, "min_valid": 0.2},
          "embedding": {"encoder": "resnet18", "input_size": 64, "dim": 32, "batch_size": 6, "epochs": 1,
                        "steps_per_epoch": 2},
          "regions": {"k": 2, "sweep": [2]},
          "experts": {"encoder": "resnet18", "epochs": 4, "steps_per_epoch": 3, "batch_size": 4, "lr": 1e-3,
                      "init": "scratch", "min_expert_steps": 12},
          # float64, so that summing a batch in two halves (DDP) rounds ~1e-16 apart rather than ~1e-7: Adam's
          # first steps are nearly sign(gradient), and a float32 rounding flip on a near-zero gradient moves a
          # weight by a whole learning rate.
          "trainer": {"accelerator": "cpu", "precision": "64-true"}}


@pytest.fixture(scope="module")
def staged(synth_root, tmp_path_factory) -> tuple[Path, Path]:
    """A bundle directory with its embedding and regions done, and its config."""
    d = tmp_path_factory.mktemp("ddp")
    cfg = d / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(LONGER))
    res = CliRunner().invoke(app, ["train", str(synth_root), "-o", str(d / "base"), "-c", str(cfg),
                                   "--only", "embedding,regions"])
    assert res.exit_code == 0, res.output
    return d, cfg


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "geomoe.cli", *args]  # as a script: DDP's launcher reruns it for rank 1


def _last_weights(bundle: Path) -> dict[str, torch.Tensor]:
    ck = torch.load(bundle / "experts" / "runs" / "region_0" / "checkpoints" / "last.ckpt", weights_only=False)
    return ck["state_dict"]


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], tol: float) -> None:
    """Every weight and buffer within ``tol * (1 + |value|)``; integer buffers (batch counts) equal."""
    assert a.keys() == b.keys()
    for k in a:
        if a[k].is_floating_point():
            excess = ((a[k] - b[k]).abs() - tol * (1 + b[k].abs())).max().item()
            assert excess <= 0, f"{k} differs by more than {tol} relative"
        else:
            assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def reference(staged, synth_root) -> dict[str, torch.Tensor]:
    d, cfg = staged
    ref = d / "ref"
    shutil.copytree(d / "base", ref)
    res = CliRunner().invoke(app, ["train", str(synth_root), "-o", str(ref), "-c", str(cfg), "--only", "expert:0"])
    assert res.exit_code == 0, res.output
    return _last_weights(ref)


def test_two_process_ddp_gives_the_weights_of_one_process(staged, reference, synth_root):
    d, cfg = staged
    ddp = d / "ddp"
    shutil.copytree(d / "base", ddp)
    p = subprocess.run(_cli("train", str(synth_root), "-o", str(ddp), "-c", str(cfg), "--only", "expert:0",
                            "--devices", "2"), capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    _same(_last_weights(ddp), reference, 1e-6)


def test_reader_processes_that_live_for_the_whole_job_give_the_weights_of_none(staged, reference, synth_root):
    """Data workers persist across epochs and validations; every patch is still the one of the in-process reader."""
    d, _ = staged
    run = d / "workers"
    shutil.copytree(d / "base", run)
    cfg = d / "workers.yaml"
    cfg.write_text(yaml.safe_dump({**LONGER, "data": {**LONGER["data"], "workers": 2}}))
    res = CliRunner().invoke(app, ["train", str(synth_root), "-o", str(run), "-c", str(cfg), "--only", "expert:0"])
    assert res.exit_code == 0, res.output
    _same(_last_weights(run), reference, 1e-12)


@pytest.mark.parametrize("resume_devices", [1, 2])
def test_run_killed_mid_training_resumes_to_the_same_weights(staged, reference, synth_root, resume_devices):
    """Killed with SIGKILL, then resumed on the same or on another number of processes."""
    d, cfg = staged
    run = d / f"killed{resume_devices}"
    shutil.copytree(d / "base", run)
    cmd = _cli("train", str(synth_root), "-o", str(run), "-c", str(cfg), "--only", "expert:0")
    last = run / "experts" / "runs" / "region_0" / "checkpoints" / "last.ckpt"
    log_path = d / f"killed{resume_devices}.log"
    for attempt in range(2):  # a first run that dies on its own before its first checkpoint is shown, then retried
        with log_path.open("w") as log_file:
            p = subprocess.Popen(cmd, cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT)
            t0 = time.time()
            while not last.exists() and p.poll() is None and time.time() - t0 < 300:
                time.sleep(0.05)
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)  # right after the first epoch's checkpoint: inside the second epoch
            p.wait()
        if p.returncode == -signal.SIGKILL and last.exists():
            break
        msg = f"the run exited ({p.returncode}) before it was killed:\n" + log_path.read_text()[-3000:]
        assert attempt == 0 and not last.exists(), msg
        warnings.warn(msg, stacklevel=1)
    assert not (run / "experts" / "region_0.pt").exists()
    killed_at = torch.load(last, weights_only=False)["global_step"]
    p2 = subprocess.run([*cmd, "--devices", str(resume_devices)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p2.returncode == 0, p2.stdout[-3000:] + p2.stderr[-3000:]
    assert torch.load(last, weights_only=False)["global_step"] > killed_at
    # the module is float64 before the checkpoint is restored (geomoe/trainer.py: fit), so nothing rounds through
    # float32; resumed on two processes, a batch is summed in two halves (as in the DDP test)
    _same(_last_weights(run), reference, 1e-12 if resume_devices == 1 else 1e-6)


class _Knob(torch.nn.Module):
    """One weight; its validation score is -|w - 1|, and training pushes it away from 1 at a rate ``push``."""

    def __init__(self, w: float):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(float(w)))


class _KnobTask(L.LightningModule):
    def __init__(self, w: float, push: float):
        super().__init__()
        self.model, self.push = _Knob(w), push

    def training_step(self, batch, batch_idx):
        return -self.push * self.model.w  # gradient descent raises w: away from 1 when it starts at 1

    def validation_step(self, batch, batch_idx):
        self.log("val_score", -(self.model.w.detach() - 1).abs())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1.0)

    def export(self, path: Path) -> Path:
        torch.save({"w": float(self.model.w.detach())}, path)
        return path


class _KnobData(L.LightningDataModule):
    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.zeros(4, 1), batch_size=1)

    def val_dataloader(self):
        return torch.utils.data.DataLoader(torch.zeros(1, 1), batch_size=1)


@pytest.mark.parametrize("start, push, kept", [(1.0, 0.5, True), (-3.0, 0.5, False)])
def test_a_fine_tuning_job_keeps_its_start_when_no_checkpoint_beats_it(start, push, kept, tmp_path):
    """Fine-tuning that only moves away from the validation optimum exports the start; one that helps does not."""
    job = FitJob("knob", tmp_path / "run", tmp_path / "knob.pt", epochs=2, monitor="val_score", keep_start=True)
    fit(_KnobTask(start, push), _KnobData(), TrainerConfig(accelerator="cpu"), job, progress=False)
    w = torch.load(job.export)["w"]
    assert (w == start) is kept
    assert json.loads(job.start_score.read_text())["score"] == -abs(start - 1)
    if not kept:
        assert abs(w - 1) < abs(start - 1)  # the fine-tuned weights were better on validation and were kept


def test_weight_averaging_exports_and_checkpoints_the_moving_average(tmp_path):
    """``experts.ema_decay``: validation scores the exponential moving average of the weights, the best checkpoint
    (exported) holds it, and every checkpoint keeps the raw weights beside it for a resumed run to go on from."""
    from geomoe.config import ExpertConfig
    from geomoe.experts.train import weight_averaging

    assert weight_averaging(ExpertConfig()) == []
    job = FitJob("knob", tmp_path / "run", tmp_path / "knob.pt", epochs=2, monitor="val_score",
                 callbacks=weight_averaging(ExpertConfig(ema_decay=0.5)))
    fit(_KnobTask(0.0, 1.0), _KnobData(), TrainerConfig(accelerator="cpu"), job, progress=False)
    ema = []
    for w in range(1, 9):  # SGD at rate 1 raises w by 1 a step; the average starts at the first step's w
        ema.append(float(w) if not ema else 0.5 * ema[-1] + 0.5 * w)
    # validation after each epoch of 4 steps scores the average (-|w - 1|): the first epoch's is the best
    assert torch.load(job.export)["w"] == pytest.approx(ema[3])  # 3.125, where the raw weight was 4
    ck = torch.load(job.run_dir / "checkpoints" / "best.ckpt", weights_only=False)
    assert float(ck["state_dict"]["model.w"]) == pytest.approx(ema[3])
    assert float(ck["current_model_state"]["model.w"]) == pytest.approx(4.0)
    assert int(ck["averaging_state"]["n_averaged"]) == 4
