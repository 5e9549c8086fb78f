"""Member cache (reuse, corruption, two processes at once) and bring-your-own checkpoints."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from bench.config import load_config
from bench.data import load_data
from bench.errors import FusebenchError
from bench.members import MemberCache, get_members, member_key, member_seed
from bench.models import build_model
from fusebench import cli


@pytest.fixture
def cfg(tmp_path, one_thread):
    return load_config(
        None, [f"members.cache_dir={tmp_path / 'cache'}", "model.width=16", "members.epochs=2"]
    )


@pytest.fixture
def data(cfg):
    return load_data(cfg["data"], torch.device("cpu"))


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_second_run_trains_none_and_loads_same_weights(cfg, data, tmp_path):
    first = get_members(cfg, data)
    assert (first.trained, first.loaded) == (2, 0) and first.train_seconds > 0
    assert not _same_weights(first.models[0], first.models[1])  # different seeds
    second = get_members(cfg, data)
    assert (second.trained, second.loaded) == (0, 2) and second.train_seconds == 0
    assert all(_same_weights(a, b) for a, b in zip(first.models, second.models))
    # N=3 reuses the first two members and trains only the third.
    cfg["members"]["n"] = 3
    third = get_members(cfg, data)
    assert (third.trained, third.loaded) == (1, 2)
    # A different recipe is a different key: nothing is reused.
    cfg["members"]["lr"] = 0.01
    assert get_members(cfg, data).trained == 3
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 6
    assert not list((tmp_path / "cache").glob("*.tmp"))


def test_key_covers_what_determines_weights(cfg):
    k = member_key(cfg, 0)
    assert member_key(cfg, 0) == k and member_key(cfg, 1) != k
    for override in ["data.val_fraction=0.2", "data.image_size=16", "model.width=8", "members.epochs=3",
                     "members.batch_size=32", "members.momentum=0.5", "data.name=mnist"]:  # fmt: skip
        other = load_config(None, [f"members.cache_dir={cfg['members']['cache_dir']}", "model.width=16",
                                   "members.epochs=2", override])  # fmt: skip
        assert member_key(other, 0) != k, override
    for override in ["data.on_device=false", "data.batch_size=7", "finetune.epochs=9", "fusion.method=avg"]:
        other = load_config(None, [f"members.cache_dir={cfg['members']['cache_dir']}", "model.width=16",
                                   "members.epochs=2", override])  # fmt: skip
        assert member_key(other, 0) == k, override


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage"])
def test_corrupt_entry_is_detected_and_retrained(cfg, data, damage, capsys):
    cfg["members"]["n"] = 1
    good = get_members(cfg, data)
    path = MemberCache(cfg["members"]["cache_dir"]).path(member_key(cfg, member_seed(0, 0)))
    raw = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(raw[: len(raw) // 2])
    elif damage == "flip":  # a byte inside the tensor data: only the checksum sees it
        payload = torch.load(path, weights_only=True)
        payload["state_dict"]["1.weight"][0, 0] += 1.0
        torch.save(payload, path)
    else:
        path.write_bytes(b"not a checkpoint")
    again = get_members(cfg, data)
    assert (again.trained, again.loaded) == (1, 0)
    assert "ignoring bad entry" in capsys.readouterr().err
    assert _same_weights(good.models[0], again.models[0])  # deterministic retrain
    assert get_members(cfg, data).loaded == 1  # the rewritten entry is valid


def test_two_processes_same_member_train_once(cfg, tmp_path):
    script = textwrap.dedent(
        f"""
        import sys, time, torch
        torch.set_num_threads(1)
        from bench.config import load_config
        from bench.data import load_data
        from bench.members import get_members
        cfg = load_config(None, ["members.cache_dir={tmp_path / "cache"}", "model.width=16",
                                 "members.epochs=15", "members.n=1"])
        data = load_data(cfg["data"], torch.device("cpu"))
        barrier = __import__("pathlib").Path(sys.argv[1])
        (barrier / sys.argv[2]).touch()
        while len(list(barrier.iterdir())) < 2:  # start together, once both have imported everything
            time.sleep(0.005)
        ms = get_members(cfg, data)
        print("TRAINED", ms.trained, float(ms.models[0][1].weight.sum()))
        """
    )
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(barrier), f"p{i}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=180) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-500:] for o in outs]
    lines = [next(line for line in o[0].splitlines() if line.startswith("TRAINED")).split() for o in outs]
    assert sorted(int(line[1]) for line in lines) == [0, 1]  # one trained, the other waited and loaded
    assert lines[0][2] == lines[1][2]  # same weights
    files = list((tmp_path / "cache").glob("*.pt"))
    assert len(files) == 1 and not list((tmp_path / "cache").glob("*.tmp"))
    cfg1 = load_config(
        None, [f"members.cache_dir={tmp_path / 'cache'}", "model.width=16", "members.epochs=15"]
    )
    model = build_model(cfg1["model"], 1, 10, 8)
    assert MemberCache(tmp_path / "cache").load(member_key(cfg1, member_seed(0, 0)), model)


def test_checkpoints_bring_your_own(cfg, data, tmp_path):
    models = [build_model(cfg["model"], 1, 10, 8) for _ in range(2)]
    paths = []
    for i, m in enumerate(models):
        paths.append(str(tmp_path / f"m{i}.pt"))
        torch.save(m.state_dict() if i == 0 else {"state_dict": m.state_dict()}, paths[-1])
    cfg["members"]["checkpoints"] = paths
    ms = get_members(cfg, data)
    assert (ms.trained, ms.loaded) == (0, 2)
    assert all(_same_weights(a, b) for a, b in zip(models, ms.models))
    assert not (tmp_path / "cache").exists()


def test_bad_checkpoints_are_named(cfg, data, tmp_path, capsys, mlflow_uri):
    good = tmp_path / "good.pt"
    torch.save(build_model(cfg["model"], 1, 10, 8).state_dict(), good)
    wide = tmp_path / "wide.pt"  # another architecture: width 32
    torch.save(build_model({**cfg["model"], "width": 32}, 1, 10, 8).state_dict(), wide)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00garbage")
    pickled = tmp_path / "module.pt"  # a whole pickled module: refused by weights_only=True
    torch.save(build_model(cfg["model"], 1, 10, 8), pickled)
    for path, pattern in [
        (wide, r"wide.pt does not match model.arch 'mlp-16x2'"),
        (junk, r"junk.pt does not load"),
        (pickled, r"module.pt does not load with torch.load\(weights_only=True\)"),
    ]:
        cfg["members"]["checkpoints"] = [str(good), str(path)]
        with pytest.raises(FusebenchError, match=pattern):
            get_members(cfg, data)
    # At the command line: one line, exit 2, no traceback, nothing cached.
    config = tmp_path / "c.yaml"
    config.write_text(
        f"members:\n  checkpoints: [{good}, {wide}]\n  cache_dir: {tmp_path / 'cache'}\nmodel:\n  width: 16\n"
    )
    config.write_text(config.read_text() + f"tracking_uri: {mlflow_uri}\nexperiment: fusebench-tests\n")
    assert cli.main(["run", str(config)]) == 2
    err = capsys.readouterr().err
    assert "wide.pt does not match" in err and "Traceback" not in err
    assert cli.main(["run", str(config), f"members.checkpoints=[{junk}]"]) == 2
    assert "junk.pt does not load" in capsys.readouterr().err
    assert cli.main(["run", str(config), f"members.checkpoints=[{tmp_path / 'missing.pt'}]"]) == 2
    assert "missing.pt does not exist" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists()
