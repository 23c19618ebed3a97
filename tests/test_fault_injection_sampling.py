"""Fault injection on sampling outputs and file writes: changed-argument
re-runs, byte flips, truncations, kills during a shard write, a full disk,
overwrites and file permissions."""

import errno
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from helpers import flip_bytes, tiny_model

from ddt_fast import _io, models, sampling

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


_tiny_model = tiny_model


def _sampler(guidance=2.0, steps=4):
    return sampling.EulerSampler(steps, guidance, 1.0, 0.3, 1.0, last_step=0.04)


CLASSES = [1, 2, 3, 4, 5, 6, 7]
SEEDS = [10, 11, 12, 13, 14, 15, 16]


class Counting:
    """Wraps a sampler; records the batch size of every call."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, model, noise, *a, **k):
        self.calls.append(noise.shape[0])
        return self.inner(model, noise, *a, **k)


def _run(out, model=None, sampler=None, classes=CLASSES, seeds=SEEDS, batch_size=3, **kw):
    return sampling.sample_to_folder(
        model or _tiny_model(),
        sampler or _sampler(),
        classes,
        seeds,
        str(out),
        batch_size=batch_size,
        latent_size=8,
        progress=False,
        **kw,
    )


def _latents(path):
    with np.load(path) as z:
        return z["arr_0"], z["classes"], z["seeds"]


def _direct(classes=CLASSES, seeds=SEEDS, model=None, sampler=None):
    return sampling.sample(model or _tiny_model(), classes, seeds, sampler=sampler or _sampler(), latent_size=8).numpy()


def _shards(out):
    folder = os.path.join(out, "shards")
    return sorted(os.path.join(folder, f) for f in os.listdir(folder))


# ---------------------------------------------------------------------------
# changed-argument re-runs


@pytest.mark.slow
@pytest.mark.parametrize(
    "change, named",
    [
        (dict(seeds=[s + 100 for s in SEEDS]), "seed"),
        (dict(classes=[c + 1 for c in CLASSES]), "class"),
        (dict(sampler=_sampler(guidance=3.0)), "sampler.guidance: 2.0 -> 3.0"),
        (dict(sampler=_sampler(steps=5)), "sampler.num_steps: 4 -> 5"),
        (dict(model=_tiny_model(seed=1)), "weights_sha256"),
    ],
)
def test_rerun_with_other_settings_is_refused_then_replaced(tmp_path, change, named):
    first = _run(tmp_path)
    before = _latents(first)[0]
    with pytest.raises(FileExistsError, match=named) as err:
        _run(tmp_path, **change)
    assert "overwrite=True" in str(err.value)
    np.testing.assert_array_equal(_latents(first)[0], before)  # nothing touched
    path = _run(tmp_path, overwrite=True, **change)
    arr, classes, seeds = _latents(path)
    np.testing.assert_allclose(arr, _direct(**{k: v for k, v in change.items()}), atol=1e-5, rtol=1e-5)
    assert list(classes) == change.get("classes", CLASSES) and list(seeds) == change.get("seeds", SEEDS)
    manifest = json.load(open(tmp_path / "manifest.json"))
    assert manifest["settings"]["weights_sha256"] == models.weights_digest(change.get("model", _tiny_model()))


def test_other_batch_size_reuses_every_sample(tmp_path):
    first = _run(tmp_path, batch_size=3)
    before = _latents(first)[0]
    counting = Counting(_sampler())
    path = _run(tmp_path, sampler=counting, batch_size=2)
    assert counting.calls == []
    np.testing.assert_array_equal(_latents(path)[0], before)


@pytest.mark.slow
def test_partial_run_resumed_with_other_batch_size_takes_the_right_indices(tmp_path):
    _run(tmp_path, batch_size=3)
    os.remove(_shards(tmp_path)[1])  # samples 3, 4, 5
    counting = Counting(_sampler())
    path = _run(tmp_path, sampler=counting, batch_size=2)
    assert counting.calls == [2, 1]
    np.testing.assert_allclose(_latents(path)[0], _direct(), atol=1e-5, rtol=1e-5)


def test_more_samples_extend_a_finished_run(tmp_path):
    _run(tmp_path, classes=CLASSES[:4], seeds=SEEDS[:4])
    counting = Counting(_sampler())
    path = _run(tmp_path, sampler=counting)
    assert counting.calls == [3]
    np.testing.assert_allclose(_latents(path)[0], _direct(), atol=1e-5, rtol=1e-5)


def test_shards_of_an_earlier_version_are_not_trusted(tmp_path):
    os.makedirs(tmp_path / "shards")
    sampling.save_npz(
        str(tmp_path / "shards" / "batch_000000.npz"),
        np.zeros((3, 4, 8, 8), np.float32),
        classes=np.asarray(CLASSES[:3]),
        seeds=np.asarray(SEEDS[:3]),
        index=np.arange(3),
    )
    with pytest.raises(FileExistsError, match="earlier ddt_fast version"):
        _run(tmp_path)
    _run(tmp_path, overwrite=True)
    assert not os.path.exists(tmp_path / "shards" / "batch_000000.npz")


def test_an_unfinished_rerun_leaves_no_stale_merged_file(tmp_path, monkeypatch):
    _run(tmp_path)
    assert os.path.exists(tmp_path / "latents.npz")

    class Boom(RuntimeError):
        pass

    def fail(*a, **k):
        raise Boom()

    sampler = _sampler(guidance=3.0)
    monkeypatch.setattr(sampler, "__class__", type("Failing", (type(sampler),), {"__call__": fail}))
    with pytest.raises(Boom):
        _run(tmp_path, sampler=sampler, overwrite=True)
    # the old merged result would name the old run: it is gone until the new run finishes
    assert not os.path.exists(tmp_path / "latents.npz") and not os.path.exists(tmp_path / "manifest.json")


# ---------------------------------------------------------------------------
# corruption: byte flips, truncation, leftovers of killed writes


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["flip", "truncate", "empty"])
def test_damaged_shard_is_detected_and_sampled_again(tmp_path, damage, caplog):
    first = _run(tmp_path)
    expected = _latents(first)[0]
    victim = _shards(tmp_path)[1]
    size = os.path.getsize(victim)
    if damage == "flip":  # two bytes inside the latents' data
        flip_bytes(victim, [size // 2, size // 2 + 7])
    elif damage == "truncate":
        with open(victim, "r+b") as f:
            f.truncate(size - 100)
    else:
        open(victim, "wb").close()
    counting = Counting(_sampler())
    with caplog.at_level("WARNING", logger="ddt_fast"):
        path = _run(tmp_path, sampler=counting)
    assert counting.calls == [3]
    assert os.path.basename(victim) in caplog.text and "corrupt" in caplog.text
    np.testing.assert_allclose(_latents(path)[0], expected, atol=1e-6, rtol=1e-6)


def test_leftover_temporaries_are_removed(tmp_path):
    _run(tmp_path)
    junk = tmp_path / "shards" / ".samples_00000000_00000002.npz.ab12cd34.tmp"
    junk.write_bytes(b"half a shard")
    _run(tmp_path)
    assert not junk.exists()


SAMPLE_SCRIPT = textwrap.dedent("""
    import os, sys, time
    import numpy as np
    import torch
    sys.path.insert(0, {root!r})
    from ddt_fast import models, sampling
    import ddt_fast.sampling.outputs as outputs

    slow = os.environ.get("SLOW_WRITE") == "1"
    real = np.savez
    def savez(f, **kw):  # write half, then wait to be killed
        if slow and kw["index"][0] > 0:
            f.write(b"PK" + b"x" * 1000)
            f.flush()
            print("writing", flush=True)
            time.sleep(60)
        return real(f, **kw)
    outputs.np.savez = savez
    torch.manual_seed(0)
    m = models.create("DDT-tiny/2")
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    s = sampling.EulerSampler(4, 2.0, 1.0, 0.3, 1.0, last_step=0.04)
    sampling.sample_to_folder(m.eval(), s, {classes!r}, {seeds!r}, sys.argv[1], batch_size=3, latent_size=8,
                              progress=False)
    print("done", flush=True)
""")


@pytest.mark.slow
def test_kill_during_a_shard_write_then_rerun_equals_an_uninterrupted_run(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(SAMPLE_SCRIPT.format(root=ROOT, classes=CLASSES, seeds=SEEDS))
    out = tmp_path / "out"
    env = dict(os.environ, SLOW_WRITE="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(script), str(out)], env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    leftovers = [f for f in os.listdir(out / "shards") if f.endswith(".tmp")]
    assert leftovers, "the kill should have left a temporary file"
    assert len([f for f in os.listdir(out / "shards") if f.endswith(".npz")]) == 1
    env["SLOW_WRITE"] = "0"
    subprocess.run([sys.executable, str(script), str(out)], env=env, check=True, stdout=subprocess.DEVNULL)
    assert not [f for f in os.listdir(out / "shards") if f.endswith(".tmp")]
    # (the child runs one thread: equal up to the float rounding of another reduction order)
    np.testing.assert_allclose(
        _latents(out / "latents.npz")[0], _latents(_run(tmp_path / "ref"))[0], atol=1e-5, rtol=1e-5
    )


@pytest.mark.slow
def test_disk_full_during_a_shard_write_keeps_what_was_written(tmp_path, monkeypatch):
    import ddt_fast.sampling.outputs as outputs

    real = np.savez
    state = {"calls": 0}

    def savez(f, **kw):
        state["calls"] += 1
        if state["calls"] == 2:
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(f, **kw)

    monkeypatch.setattr(outputs.np, "savez", savez)
    with pytest.raises(OSError, match="No space left"):
        _run(tmp_path)
    names = os.listdir(tmp_path / "shards")
    assert names == ["samples_00000000_00000002.npz"]  # the first shard, and no temporary file
    monkeypatch.setattr(outputs.np, "savez", real)
    counting = Counting(_sampler())
    path = _run(tmp_path, sampler=counting)
    assert counting.calls == [3, 1]
    np.testing.assert_allclose(_latents(path)[0], _direct(), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------
# no overwrite without asking; permissions


def _writers(tmp_path):
    m = _tiny_model()
    sched = sampling.EulerSampler(4, 1.0).schedule
    cal = sampling.Calibration(np.eye(4))
    img = np.zeros((4, 4, 3), np.uint8)
    return {
        "save_pretrained": (
            str(tmp_path / "model" / "config.json"),
            lambda ow: m.save_pretrained(str(tmp_path / "model"), overwrite=ow),
        ),
        "Schedule.save": (str(tmp_path / "s.json"), lambda ow: sched.save(str(tmp_path / "s.json"), overwrite=ow)),
        "Calibration.save": (str(tmp_path / "c.json"), lambda ow: cal.save(str(tmp_path / "c.json"), overwrite=ow)),
        "save_png": (str(tmp_path / "i.png"), lambda ow: sampling.save_png(img, str(tmp_path / "i.png"), overwrite=ow)),
        "save_npz": (str(tmp_path / "a.npz"), lambda ow: sampling.save_npz(str(tmp_path / "a.npz"), img, overwrite=ow)),
    }


@pytest.mark.parametrize("name", ["save_pretrained", "Schedule.save", "Calibration.save", "save_png", "save_npz"])
def test_writers_refuse_to_overwrite_unless_asked(tmp_path, name):
    path, write = _writers(tmp_path)[name]
    write(False)
    with open(path, "rb") as f:
        before = f.read()
    os.utime(path, (1, 1))
    with pytest.raises(FileExistsError, match="nothing is overwritten without asking"):
        write(False)
    assert os.stat(path).st_mtime == 1
    with open(path, "rb") as f:
        assert f.read() == before
    write(True)
    assert os.stat(path).st_mtime > 1


def test_no_overwrite_rename_does_not_replace_a_file_that_appears_meanwhile(tmp_path):
    target = tmp_path / "t.txt"

    def write(tmp):
        target.write_text("someone else's")  # appears while we write
        with open(tmp, "w") as f:
            f.write("ours")

    with pytest.raises(FileExistsError):
        _io.atomic_write(str(target), write, overwrite=False)
    assert target.read_text() == "someone else's"
    assert os.listdir(tmp_path) == ["t.txt"]


def test_no_overwrite_without_hard_links(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    _io.atomic_write_text(str(tmp_path / "a"), "1", overwrite=False)
    with pytest.raises(FileExistsError):
        _io.atomic_write_text(str(tmp_path / "a"), "2", overwrite=False)
    assert (tmp_path / "a").read_text() == "1" and os.listdir(tmp_path) == ["a"]


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_written_files_follow_the_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        _io.atomic_write_text(str(tmp_path / "a.txt"), "x", overwrite=False)
        with open(tmp_path / "plain.txt", "w") as f:
            f.write("x")
    finally:
        os.umask(old)
    mode = stat.S_IMODE(os.stat(tmp_path / "a.txt").st_mode)
    assert mode == 0o666 & ~mask == stat.S_IMODE(os.stat(tmp_path / "plain.txt").st_mode)


def test_remove_stale_temps_only_takes_temporaries(tmp_path):
    keep = ["a.npz", ".hidden", ".a.npz.tmp", "x.tmp"]
    drop = [".a.npz.abcd_123.tmp", ".step_00000010.ckpt.zz99yy88.tmp"]
    for name in keep + drop:
        (tmp_path / name).write_text("")
    removed = _io.remove_stale_temps(str(tmp_path))
    assert sorted(os.path.basename(p) for p in removed) == sorted(drop)
    assert sorted(os.listdir(tmp_path)) == sorted(keep)


@pytest.mark.slow
def test_calibration_records_what_made_it(tmp_path):
    m = _tiny_model()
    cal = sampling.calibrate(m, _sampler(), num_samples=2, latent_size=8)
    assert cal.settings["weights_sha256"] == models.weights_digest(m)
    cal.save(str(tmp_path / "c.json"))
    again = sampling.Calibration.load(str(tmp_path / "c.json"))
    same = sampling.calibration_settings(m, _sampler(), num_samples=2, latent_size=8)
    assert again.differences(same) == {}
    other = sampling.calibration_settings(_tiny_model(seed=1), _sampler(guidance=3.0), num_samples=2, latent_size=8)
    assert set(again.differences(other)) == {"guidance", "weights_sha256"}


def test_weights_digest_sees_every_byte_and_ignores_the_device():
    m = _tiny_model()
    d = models.weights_digest(m)
    assert d == models.weights_digest(m.state_dict()) == models.weights_digest(_tiny_model())
    with torch.no_grad():
        p = next(m.parameters())
        p.view(-1)[5] = torch.nextafter(p.view(-1)[5], torch.tensor(float("inf")))
    assert models.weights_digest(m) != d
    assert models.weights_digest(m.to(torch.bfloat16)) != d


def test_demo_refuses_a_folder_it_did_not_write(tmp_path):
    from ddt_fast.demo import check_out_dir

    check_out_dir(str(tmp_path / "new"))  # absent: fine
    (tmp_path / "grids").mkdir()
    (tmp_path / "metrics.json").write_text("{}")
    check_out_dir(str(tmp_path))  # an earlier demo's outputs: rewritten
    (tmp_path / "thesis.tex").write_text("")
    with pytest.raises(FileExistsError, match="thesis.tex"):
        check_out_dir(str(tmp_path))
    with pytest.raises(FileExistsError, match="is a file"):
        check_out_dir(str(tmp_path / "thesis.tex"))
