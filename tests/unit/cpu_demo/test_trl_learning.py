"""benchmarks/trl_learning.py hands TRL the demo's base as an HF folder: made again when the
base checkpoint changed (it was kept, and TRL trained the previous base after the demo re-made
its own), and TRL's results name the base they started from. A base is known by what keys the
demo's own runs on it (``stage.inputs``)."""
import importlib.util
import json
from pathlib import Path

_PATH = Path(__file__).resolve().parents[3] / "benchmarks" / "trl_learning.py"
_spec = importlib.util.spec_from_file_location("trl_learning", _PATH)
trl_learning = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(trl_learning)


def test_the_hf_base_is_made_again_when_the_base_checkpoint_changes(tmp_path, monkeypatch):
    demo = tmp_path / "demo"
    ckpt = demo / "runs" / "base" / "ckpt"
    (ckpt / "iter_0000010").mkdir(parents=True)
    (ckpt / "iter_0000010" / "__0_0.distcp").write_bytes(b"weights-1")
    (ckpt.parent / "final.json").write_text('{"wall_s": 283.0}')  # the base stage finished
    (demo / "data").mkdir()
    (demo / "data" / "eval.jsonl").write_text("{}\n")
    made = []

    def convert(cmd, **kw):  # tools/convert_mcore_to_hf.py, recorded
        hf = Path(cmd[cmd.index("--out-dir") + 1])
        hf.mkdir(parents=True, exist_ok=True)
        source = Path(cmd[cmd.index("--mcore-dir") + 1])
        (hf / "config.json").write_text(json.dumps({"from": (source / "iter_0000010" /
                                                             "__0_0.distcp").read_text()}))
        made.append(hf)

    monkeypatch.setattr(trl_learning.subprocess, "run", convert)
    out = tmp_path / "bench"
    _, hf, first = trl_learning.export_base(out, str(ckpt))
    _, _, again = trl_learning.export_base(out, str(ckpt))
    assert len(made) == 1 and again == first  # the same base: the folder is kept
    # the base made again: its stage writes a new checkpoint and a new final.json
    (ckpt / "iter_0000010" / "__0_0.distcp").write_bytes(b"weights-2")
    (ckpt.parent / "final.json").write_text('{"wall_s": 281.5}')
    _, _, second = trl_learning.export_base(out, str(ckpt))
    assert len(made) == 2 and second != first
    assert json.loads((hf / "config.json").read_text()) == {"from": "weights-2"}
