"""Tests of ``python -m gptfast.train`` on CPU with the tiny model: resume, DDP, accumulation, data, errors."""

import json
import os
import pathlib
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gptfast import train
from gptfast.models import GPTModel
from gptfast.training.token_cache import TokenWindows, build_token_cache, load_tokens
from gptfast.tokenizer import ENDOFTEXT_ID, get_tokenizer

REPO = pathlib.Path(__file__).resolve().parents[1]

BASE = ["--model", "tiny", "--context-length", "32", "--batch-size", "2", "--lr", "1e-3", "--warmup-steps", "2",
        "--min-lr", "1e-4", "--eval-every", "3", "--eval-batches", "2", "--no-progress", "--device", "cpu"]


def without(args, flag):
    """``args`` without ``flag`` and its value."""
    i = args.index(flag)
    return args[:i] + args[i + 2:]


@pytest.fixture(autouse=True)
def _test_process_keeps_its_malloc(monkeypatch):
    """CPU runs would set glibc's malloc for the whole process; the tests check the note instead."""
    monkeypatch.setenv("GPTFAST_KEEP_HOST_MEMORY", "0")


def run_main(out_dir, *extra):
    return train.main([*BASE, "--out-dir", str(out_dir), *extra])


def run_in_own_group(cmd, timeout, **kwargs):
    """Run ``cmd`` in a new session; on timeout kill the whole group (torchrun's workers included)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **kwargs)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"timed out after {timeout}s: {' '.join(cmd)}\n{stderr[-3000:]}")
    return proc.returncode, stdout, stderr


def losses(out_dir):
    return [row["loss"] for row in json.loads((out_dir / "metrics.json").read_text())]


def model_state(out_dir):
    return torch.load(out_dir / "ckpt.pt", weights_only=True)["model_state_dict"]


def test_resume_continues_bit_for_bit(tmp_path):
    # Dropout on, so the restored RNG state matters as well as weights, optimizer and schedule.
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert run_main(whole, "--max-steps", "6", "--dropout", "0.1") == 0
    assert run_main(split, "--max-steps", "6", "--dropout", "0.1", "--stop-at", "3") == 0
    assert len(losses(split)) == 3 and not (split / "model.pth").exists()
    assert run_main(split, "--max-steps", "6", "--dropout", "0.1", "--resume") == 0
    assert losses(split) == losses(whole)
    a, b = model_state(whole), model_state(split)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    full = torch.load(whole / "ckpt.pt", weights_only=True)
    assert full["step"] == 6 and full["scheduler_state_dict"]["last_epoch"] == 6
    assert {"torch", "python"} <= set(full["rng"]) and full["data_state"]["next_step"] == 6


def test_resume_with_more_steps_follows_the_new_schedule_from_its_first_step(tmp_path, capsys):
    """Continuing a 6-step run to 10 steps: steps 6-9 run at the learning rates a 10-step run has there (the
    checkpoint's saved rate is the old schedule's).  Fewer steps than the checkpoint ran is one line."""
    short, whole = tmp_path / "short", tmp_path / "whole"
    assert run_main(short, "--max-steps", "6") == 0
    assert run_main(whole, "--max-steps", "10") == 0
    rates = lambda out_dir: [row["lr"] for row in json.loads((out_dir / "metrics.json").read_text())]  # noqa: E731
    assert rates(short) != rates(whole)[:6]  # the two schedules differ
    capsys.readouterr()
    assert run_main(short, "--max-steps", "4", "--resume") == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "already run 6 steps, more than --max-steps 4" in err
    assert run_main(short, "--max-steps", "10", "--resume") == 0
    assert rates(short)[6:] == rates(whole)[6:]


def test_cpu_run_says_what_it_did_with_host_memory(tmp_path, capsys):
    assert run_main(tmp_path, "--max-steps", "1") == 0
    assert "host memory: malloc left as it is (GPTFAST_KEEP_HOST_MEMORY=0)" in capsys.readouterr().out


def test_outputs_metrics_plot_and_export(tmp_path):
    assert run_main(tmp_path, "--max-steps", "4") == 0
    rows = json.loads((tmp_path / "metrics.json").read_text())
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert all(r["tokens_per_s"] > 0 and r["mfu"] is None for r in rows)  # CPU: MFU n/a
    assert rows[2]["val_loss"] is not None and rows[3]["val_loss"] is not None
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0].split(",")
    assert header[:6] == ["step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu"]
    assert (tmp_path / "loss.png").stat().st_size > 1000
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["final_loss"] == rows[-1]["loss"]
    # model.pth has the real vocabulary and loads into a plain GPTModel, as `gptfast generate` does.
    exported = torch.load(tmp_path / "model.pth", weights_only=True)
    assert exported["config"]["vocab_size"] == 50257
    GPTModel(exported["config"]).load_state_dict(exported["model_state_dict"])


def test_peak_tflops_flag_gives_mfu(tmp_path):
    assert run_main(tmp_path, "--max-steps", "1", "--peak-tflops", "1.0") == 0
    row = json.loads((tmp_path / "metrics.json").read_text())[0]
    cfg = train.model_config(train.parse_config(BASE))
    expected = row["tokens_per_s"] * train.flops_per_token(cfg, 32) / 1e12
    assert row["mfu"] == pytest.approx(expected)


def test_loss_decreases_when_overfitting(tmp_path):
    assert run_main(tmp_path, "--max-steps", "15", "--eval-every", "15", "--lr", "1e-2", "--min-lr", "1e-3") == 0
    values = losses(tmp_path)
    assert np.mean(values[-3:]) < values[0] - 1.0


def test_grad_accumulation_matches_bigger_batch(tmp_path):
    big, accum = tmp_path / "big", tmp_path / "accum"
    base = without(BASE, "--batch-size")
    assert train.main([*base, "--out-dir", str(big), "--batch-size", "4", "--max-steps", "3"]) == 0
    assert train.main([*base, "--out-dir", str(accum), "--batch-size", "2", "--grad-accum", "2",
                       "--max-steps", "3"]) == 0
    np.testing.assert_allclose(losses(accum), losses(big), rtol=0, atol=1e-5)
    a, b = model_state(big), model_state(accum)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)


def test_bf16_autocast_on_cpu(tmp_path):
    assert run_main(tmp_path, "--max-steps", "2", "--dtype", "bf16") == 0
    rows = json.loads((tmp_path / "metrics.json").read_text())
    assert all(np.isfinite(r["loss"]) for r in rows)
    assert json.loads((tmp_path / "summary.json").read_text())["dtype"] == "bf16"


def test_ddp_two_processes_match_one_process(tmp_path):
    """torchrun with 2 gloo processes, batch 1 each, equals one process with batch 2."""
    one, two = tmp_path / "one", tmp_path / "two"
    common = without(BASE, "--batch-size") + ["--max-steps", "3"]
    assert train.main([*common, "--out-dir", str(one), "--batch-size", "2"]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "gptfast.train", *common, "--out-dir", str(two), "--batch-size", "1"]
    returncode, stdout, stderr = run_in_own_group(cmd, env=env, timeout=300, cwd=tmp_path)
    assert returncode == 0, stderr[-3000:]
    assert "2 process(es)" in stdout
    np.testing.assert_allclose(losses(two), losses(one), rtol=0, atol=2e-5)
    a, b = model_state(one), model_state(two)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=2e-5)


# ----------------------------------------------------------------------------- the model pieces


def test_vocab_is_padded_and_padded_rows_never_reach_the_loss():
    args = train.parse_config(BASE)
    cfg = train.model_config(args)
    assert cfg["vocab_size"] == 50304 and cfg["vocab_size"] % 64 == 0
    model = train.build_model(cfg, seed=0)
    assert torch.count_nonzero(model.out_head.weight[50257:]) == 0
    loss_module = train.LanguageModelLoss(model)
    x = torch.randint(0, 50257, (2, 8))
    y = torch.randint(0, 50257, (2, 8))
    with torch.no_grad():
        model.out_head.weight[50257:] = 100.0  # would dominate the softmax if padded logits were included
    loss = loss_module(x, y)
    expected = F.cross_entropy(model(x)[..., :50257].flatten(0, 1), y.flatten())
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert torch.count_nonzero(model.out_head.weight.grad[50257:]) == 0


def test_lr_schedule_warmup_then_cosine_to_min():
    args = train.parse_config(BASE + ["--max-steps", "20", "--warmup-steps", "4"])
    lrs = [train.lr_at(s, args) for s in range(20)]
    assert lrs[0] == pytest.approx(1e-3 / 4) and lrs[3] == pytest.approx(1e-3)
    assert all(a > b for a, b in zip(lrs[3:], lrs[4:]))
    assert lrs[-1] == pytest.approx(1e-4)
    short = train.parse_config(BASE + ["--max-steps", "2", "--warmup-steps", "4"])
    assert [train.lr_at(s, short) for s in range(2)] == pytest.approx([2.5e-4, 5e-4])


def test_flops_per_token_of_gpt2():
    cfg = train.model_config(train.parse_config(["--model", "gpt2"]))
    # 85M block matmul weights + 38.6M head = ~124M matmul parameters -> ~6 * 124M + attention.
    assert 6 * 123e6 < train.flops_per_token(cfg, 1024) < 6 * 126e6 + 12 * 12 * 768 * 1024 + 1


def test_init_from_exported_checkpoint(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    assert run_main(src, "--max-steps", "2") == 0
    exported = torch.load(src / "model.pth", weights_only=True)["model_state_dict"]
    assert run_main(dst, "--max-steps", "1", "--stop-at", "1", "--init-from", str(src / "model.pth"),
                    "--lr", "1e-12", "--min-lr", "0") == 0
    loaded = model_state(dst)
    torch.testing.assert_close(loaded["out_head.weight"][:50257], exported["out_head.weight"], atol=1e-6, rtol=0)
    assert torch.count_nonzero(loaded["out_head.weight"][50257:]) == 0


# ----------------------------------------------------------------------------- token data


def test_token_cache_folder_memmap_and_invalidation(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_text("Hello world.")
    (folder / "b.txt").write_text("Another file here.")
    (folder / "skip.bin").write_bytes(b"\x00\x01")
    cache = build_token_cache(folder, tmp_path / "cache")
    tokens = load_tokens(cache)
    tok = get_tokenizer()
    expected = tok.encode("Hello world.") + [ENDOFTEXT_ID] + tok.encode("Another file here.")
    assert tokens.dtype == np.uint16 and tokens.tolist() == expected
    assert build_token_cache(folder, tmp_path / "cache") == cache  # reused
    os.utime(folder / "a.txt", ns=(1, 1))
    assert build_token_cache(folder, tmp_path / "cache") != cache  # a changed source re-tokenises


def test_a_cut_short_token_cache_is_tokenised_again_not_used(tmp_path):
    """A cache file shorter than its record says (a copy stopped half-way, a full disk), or without its record,
    is rebuilt instead of training on part of the data."""
    data = tmp_path / "text.txt"
    data.write_text("Every effort moves you toward the end of the story. " * 20)
    cache = build_token_cache(data, tmp_path / "cache")
    expected = load_tokens(cache).tolist()
    for damage in ("truncated to an even size", "record missing"):
        if damage == "record missing":
            cache.with_suffix(".json").unlink()
        else:
            with open(cache, "r+b") as handle:
                handle.truncate(20)
        assert build_token_cache(data, tmp_path / "cache") == cache
        assert load_tokens(cache).tolist() == expected, damage


def test_windows_depend_only_on_seed_and_step():
    tokens = np.arange(1000, dtype=np.uint16)
    windows = TokenWindows(tokens, 16, seed=3)
    a, b = windows.step_offsets(5, 8), TokenWindows(tokens, 16, seed=3).step_offsets(5, 8)
    assert torch.equal(a, b) and not torch.equal(a, windows.step_offsets(6, 8))
    x, y = windows.gather(a)
    assert x.shape == (8, 16) and torch.equal(x[:, 1:], y[:, :-1]) and int(a.max()) + 16 < 1000


# ----------------------------------------------------------------------------- bad input


def error_of(capsys, out_dir, *extra):
    assert run_main(out_dir, *extra) == 2
    return capsys.readouterr().err


def test_missing_data_path(tmp_path, capsys):
    err = error_of(capsys, tmp_path, "--data", str(tmp_path / "nope.txt"))
    assert "--data path not found" in err and "nope.txt" in err


def test_data_shorter_than_one_window(tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("Just a few words.")
    err = error_of(capsys, tmp_path / "out", "--data", str(short))
    assert "shorter than one training window" in err and "--context-length 32" in err


def test_empty_data_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert "holds no text files" in error_of(capsys, tmp_path / "out", "--data", str(tmp_path / "empty"))


def test_unknown_model_name(tmp_path, capsys):
    assert train.main(["--model", "gpt5", "--out-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--model" in err and "gpt5" in err and "gpt2-medium" in err


@pytest.mark.parametrize("flag,value", [("--batch-size", "0"), ("--grad-accum", "0"), ("--max-steps", "0"),
                                        ("--lr", "-1"), ("--dropout", "1.5"), ("--peak-tflops", "0"),
                                        ("--peak-tflops", "-1"), ("--lr", "inf"), ("--min-lr", "nan"),
                                        ("--grad-clip", "nan"), ("--val-fraction", "1.0"),
                                        ("--seed", str(2**64 - 1)), ("--device", "nonsense"),
                                        ("--device", "meta")])
def test_bad_numbers(tmp_path, capsys, flag, value):
    assert flag in error_of(capsys, tmp_path, flag, value)


def test_resume_without_checkpoint(tmp_path, capsys):
    assert "no checkpoint" in error_of(capsys, tmp_path, "--resume")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_a_cuda_device_without_cuda_is_one_line_before_any_work(tmp_path, capsys):
    assert "CUDA is not available" in error_of(capsys, tmp_path, "--device", "cuda")
    assert not (tmp_path / "token_cache").exists()


def test_lr_schedule_edges():
    def rates(*flags, steps=12):
        config = train.parse_config([*BASE, *flags])
        return [train.lr_at(s, config) for s in range(steps)]

    no_warmup = rates("--warmup-steps", "0", "--max-steps", "10")
    assert no_warmup[0] == 1e-3 and no_warmup[9] == pytest.approx(1e-4)  # the peak is used, the end is min_lr
    assert no_warmup[10:] == [pytest.approx(1e-4)] * 2  # past the end it stays at min_lr
    assert rates("--warmup-steps", "0", "--max-steps", "1", steps=2) == [1e-3, 1e-3]  # no room to decay
    assert rates("--warmup-steps", "4", "--max-steps", "3", steps=6)[3:] == [1e-3] * 3  # never past the peak


def test_a_new_run_does_not_replace_a_checkpoint_and_outputs_must_be_files(tmp_path, capsys):
    assert run_main(tmp_path, "--max-steps", "2", "--stop-at", "1") == 0
    capsys.readouterr()
    assert run_main(tmp_path, "--max-steps", "2") == 2
    assert "already holds a training checkpoint" in capsys.readouterr().err
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 1
    (tmp_path / "other" / "model.pth").mkdir(parents=True)
    assert run_main(tmp_path / "other", "--max-steps", "1") == 2
    assert "model.pth is a folder" in capsys.readouterr().err and not (tmp_path / "other" / "token_cache").exists()


@pytest.mark.parametrize("changed,expected", [(("--context-length", "16"), "context_length"),
                                              (("--batch-size", "4"), "batch_size"), (("--lr", "2e-3"), "lr"),
                                              (("--min-lr", "2e-4"), "min_lr"),
                                              (("--warmup-steps", "1"), "warmup_steps"),
                                              (("--data", None), "data")])
def test_resume_with_mismatched_config(tmp_path, capsys, changed, expected):
    assert run_main(tmp_path, "--max-steps", "2", "--stop-at", "1") == 0
    capsys.readouterr()
    args = [*BASE, "--out-dir", str(tmp_path), "--max-steps", "2", "--resume"]
    if changed[0] == "--data":  # other text
        other = tmp_path / "other.txt"
        other.write_text("Some other text, long enough for a few windows of 32 tokens. " * 40)
        args += ["--data", str(other)]
    else:
        i = args.index(changed[0])
        args[i + 1] = changed[1]
    assert train.main(args) == 2
    err = capsys.readouterr().err
    assert "different configuration" in err and expected in err


def test_init_from_missing_or_mismatched(tmp_path, capsys):
    assert "--init-from path not found" in error_of(capsys, tmp_path, "--init-from", str(tmp_path / "x.pt"))
    other = GPTModel({**train.gpt2_config("tiny"), "emb_dim": 32})
    torch.save(other.state_dict(), tmp_path / "other.pt")
    assert "does not fit" in error_of(capsys, tmp_path, "--init-from", str(tmp_path / "other.pt"))


def test_module_entry_point_runs(tmp_path):
    result = subprocess.run([sys.executable, "-m", "gptfast.train", *BASE, "--out-dir", str(tmp_path),
                             "--max-steps", "1"], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "step      0" in result.stdout and "MFU n/a" in result.stdout


def test_log_every_still_logs_evaluations_and_the_last_step(tmp_path):
    assert run_main(tmp_path, "--max-steps", "3", "--log-every", "2", "--eval-every", "3") == 0
    rows = json.loads((tmp_path / "metrics.json").read_text())
    assert [r["step"] for r in rows] == [1, 2] and rows[-1]["val_loss"] is not None


# ----------------------------------------------------------------------------- reliability


def test_out_dir_that_is_a_file_or_below_one_fails_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for out_dir in (blocker, blocker / "sub"):
        assert run_main(out_dir, "--max-steps", "1") == 2
        err = capsys.readouterr()
        assert len(err.err.strip().splitlines()) == 1 and "--out-dir" in err.err and "is a file" in err.err
        assert "step" not in err.out


def test_token_cache_with_ids_outside_the_vocabulary_is_refused(tmp_path, capsys):
    from gptfast.resources import resource_path
    from gptfast.training.token_cache import cache_key, find_text_files

    data = resource_path("the-verdict.txt")
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    cache = cache_dir / f"{cache_key(find_text_files(data))}.bin"
    np.full(5000, 60000, dtype=np.uint16).tofile(cache)
    cache.with_suffix(".json").write_text('{"tokens": 5000}')  # complete as far as its record tells
    assert run_main(tmp_path / "out", "--cache-dir", str(cache_dir), "--max-steps", "1") == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "60000" in err and "outside the vocabulary" in err
    (cache_dir / "odd.bin").write_bytes(b"\x01\x02\x03")
    with pytest.raises(ValueError, match="odd size"):
        load_tokens(cache_dir / "odd.bin")


def test_checkpoints_carry_a_checksum_and_a_damaged_resume_is_one_line(tmp_path, capsys):
    from gptfast.training.checkpoints import read_checkpoint

    assert run_main(tmp_path, "--max-steps", "2", "--stop-at", "1") == 0
    capsys.readouterr()
    ckpt = tmp_path / train.CHECKPOINT_NAME
    assert "sha256" in read_checkpoint(ckpt)["checksum"]
    good = ckpt.read_bytes()
    for damaged in (good[: len(good) // 2], b"", b"text, not a checkpoint\n"):
        ckpt.write_bytes(damaged)
        assert run_main(tmp_path, "--max-steps", "2", "--resume") == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "--resume" in err and "Traceback" not in err
    exported = torch.save  # an exported model (no optimizer, scheduler, step) is not a training checkpoint
    model = GPTModel(train.model_config(train.parse_config(BASE)))
    exported({"model_state_dict": model.state_dict()}, ckpt)
    assert run_main(tmp_path, "--max-steps", "2", "--resume") == 2
    assert "not a training checkpoint" in capsys.readouterr().err


def test_corrupt_init_from_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(os.urandom(2048))
    assert run_main(tmp_path / "out", "--init-from", str(bad), "--max-steps", "1") == 2
    assert not (tmp_path / "out").exists()  # refused before the out-dir or its token cache was made
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--init-from" in err and "cannot be read" in err


def test_every_output_file_is_written_atomically(tmp_path, monkeypatch):
    """Checkpoint, export, metrics, summary, plot and token cache all go through gptfast.files."""
    import gptfast.files as files

    written = []
    real = files._new_temporary_file

    def recording(target):  # the temporary file atomic_write renames over target
        written.append(target.name)
        return real(target)

    monkeypatch.setattr(files, "_new_temporary_file", recording)
    assert run_main(tmp_path, "--max-steps", "3") == 0
    names = set(written)
    assert {"ckpt.pt", "model.pth", "metrics.csv", "metrics.json", "summary.json", "loss.png"} <= names
    assert any(n.endswith(".bin") for n in names) and any(n.endswith(".json") and len(n) == 21 for n in names)
    produced = {p.name for p in tmp_path.iterdir() if p.is_file()}
    assert produced <= names  # nothing in the out-dir was written another way


def test_no_module_writes_user_files_without_the_atomic_helper():
    """A guard: the package writes checkpoints, metrics and plots only through gptfast.files."""
    import re

    pattern = re.compile(r"torch\.save\(|\.savefig\(|\.write_text\(|\.write_bytes\(|\.tofile\(|open\([^)]*['\"][wa]b?['\"]")
    allowed = {"files.py", "weights.py"}  # weights.py: downloads of OpenAI's files, owned by the weights loaders
    offenders = []
    for path in (REPO / "gptfast").rglob("*.py"):
        if path.name in allowed or "ops" in path.relative_to(REPO / "gptfast").parts:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line) and "atomic" not in line:
                offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert not offenders, offenders


def test_the_validation_loss_weights_every_window_alike(tmp_path):
    """Windows in batches of 3 with a short last batch: the mean over windows, not over batch means."""
    config = train.parse_config([*BASE, "--out-dir", str(tmp_path), "--batch-size", "3", "--eval-batches", "3",
                                 "--val-fraction", "0.045"])
    trainer = train.Trainer(config, device=torch.device("cpu"))
    x_all, y_all = trainer.val_data.fixed_windows(9)
    assert x_all.shape[0] % 3 != 0  # the last batch is short
    trainer.model.eval()
    with torch.no_grad():
        per_window = [trainer.loss_module(x[None], y[None]).item() for x, y in zip(x_all, y_all)]
    assert trainer.evaluate() == pytest.approx(sum(per_window) / len(per_window), rel=1e-5)


def _strict_json(path):
    """The file's JSON, refusing the NaN and Infinity that Python writes but JSON does not have."""
    def refuse(constant):
        raise ValueError(f"{path.name} holds {constant}")
    return json.loads(path.read_text(), parse_constant=refuse)


def test_a_diverged_validation_loss_stops_the_run_before_anything_is_saved(tmp_path, capsys):
    """The first step's loss is finite (computed before the update), its validation loss is not."""
    args = without(without(without(BASE, "--lr"), "--min-lr"), "--eval-every")
    code = train.main([*args, "--lr", "3e38", "--min-lr", "0", "--eval-every", "1", "--max-steps", "3",
                       "--out-dir", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].endswith("error: val_loss became nan at step 0: lower --lr or check the data")
    assert not (tmp_path / "ckpt.pt").exists()
    if (tmp_path / "metrics.json").exists():
        _strict_json(tmp_path / "metrics.json")


def test_diverged_weights_never_replace_the_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    """Between logged steps no loss is looked at: the save itself refuses parameters that are no longer finite."""
    train_step = train.Trainer.train_step

    def diverging_after_the_first_step(self, step):
        loss = train_step(self, step)
        if step >= 1:
            with torch.no_grad():
                self.model.tok_emb.weight.fill_(float("nan"))
        return loss

    monkeypatch.setattr(train.Trainer, "train_step", diverging_after_the_first_step)
    code = run_main(tmp_path, "--max-steps", "3", "--eval-every", "10", "--log-every", "10", "--save-every", "1")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "training diverged: tok_emb.weight is no longer finite" in err[-1]
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert saved["step"] == 1
    assert all(bool(t.isfinite().all()) for t in saved["model_state_dict"].values())


def test_a_resume_with_no_steps_left_is_one_line_and_keeps_the_summary(tmp_path, capsys):
    """A checkpoint at step 4 of 6: ``--stop-at 3`` or ``4`` runs nothing, and a finished run has nothing left.
    Neither rewrites summary.json (a run of no steps would record no speed and the wrong step count)."""
    assert run_main(tmp_path, "--max-steps", "6", "--stop-at", "4") == 0
    summary = (tmp_path / "summary.json").read_text()
    capsys.readouterr()
    for stop_at in ("3", "4"):
        assert run_main(tmp_path, "--max-steps", "6", "--stop-at", stop_at, "--resume") == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"already run 4 steps, --stop-at {stop_at} leaves none to run" in err[0]
        assert (tmp_path / "summary.json").read_text() == summary
    assert run_main(tmp_path, "--max-steps", "6", "--resume") == 0
    summary = (tmp_path / "summary.json").read_text()
    assert json.loads(summary)["steps"] == 6
    capsys.readouterr()
    for extra in ([], ["--stop-at", "6"]):
        assert run_main(tmp_path, "--max-steps", "6", "--resume", *extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "already run all 6 steps of --max-steps 6: give a larger --max-steps" in err[0]
        assert (tmp_path / "summary.json").read_text() == summary


def test_a_validation_split_that_leaves_no_training_window_names_val_fraction(tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text("one two three four five six seven eight nine ten " * 8)  # 80 tokens: windows of 33 fit
    assert run_main(tmp_path / "run", "--data", str(text), "--val-fraction", "0.7", "--max-steps", "1") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gptfast.train: error: --val-fraction 0.7 leaves the training split")
    assert err[0].endswith("less than one window of 33 (--context-length 32): give a smaller --val-fraction")
    text.write_text("one two three")  # too short whatever the split: the text's error
    assert run_main(tmp_path / "run", "--data", str(text), "--val-fraction", "0.7", "--max-steps", "1") == 2
    err = capsys.readouterr().err
    assert f"error: --data {text} is shorter than one training window" in err and "--val-fraction" not in err


def test_a_context_longer_than_the_data_can_hold_is_refused_before_the_model_is_built(tmp_path, capsys, monkeypatch):
    from gptfast.training import pretrain

    def no_model(*args, **kwargs):
        raise AssertionError("the model was built")

    monkeypatch.setattr(pretrain, "build_model", no_model)
    data = tmp_path / "short.txt"
    data.write_text("x" * 100)
    assert run_main(tmp_path / "out", "--data", str(data), "--context-length", "100", "--max-steps", "1") == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "shorter than one training window: its 100 bytes" in err, err
    assert "--context-length 100 needs at least 101" in err
    assert not (tmp_path / "out").exists()


def test_a_batch_larger_than_the_training_windows_is_refused_before_training(tmp_path, capsys):
    data = tmp_path / "words.txt"
    data.write_text(" word" * 60)  # 60 tokens, 54 in the training split at --val-fraction 0.1
    assert run_main(tmp_path / "out", "--data", str(data), "--context-length", "16", "--batch-size", "39",
                    "--val-fraction", "0.1", "--max-steps", "1") == 2
    err = capsys.readouterr()
    assert len(err.err.strip().splitlines()) == 1 and "--batch-size 39 is more than the 38 windows" in err.err, err.err
    assert "step" not in err.out
