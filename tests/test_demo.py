"""tools/demo.py (`make demo`): the commands it runs, without running them."""
import pytest
import torch

from helpers import load_tool


@pytest.mark.parametrize("cuda,amp", [(False, "True"), (True, "False")])
def test_demo_commands(monkeypatch, tmp_path, capsys, cuda, amp):
    demo = load_tool("demo")
    commands = []
    monkeypatch.setattr(demo, "run", lambda cmd: commands.append(cmd[1:]))
    monkeypatch.setattr(demo, "final_metrics", lambda out: {m: 45.0 for m in demo.METRICS})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    out = str(tmp_path / "demo")
    demo.main(["--output-dir", out])

    assert commands[0] == ["tools/generate_digits.py"]
    assert commands[1] == ["tools/pretrain_backbone.py", "--depth", "18"]
    fp32 = ["tools/train_net.py", "--config-file", "configs/retina_r18_fp32.py", "--resume"]
    assert commands[2] == fp32 + [f"train.output_dir={out}/retina_r18_fp32"]
    # the QAT stage fine-tunes the FP32 stage's model; bfloat16 integer codes on the CPU only
    # (QAT refuses AMP on CUDA)
    assert commands[3] == [
        "tools/train_net.py",
        "--config-file",
        "configs/retina_r18_aqd_w4_hqod.py",
        "--resume",
        f"train.init_checkpoint={out}/retina_r18_fp32/model_final.pth",
        f"train.amp.enabled={amp}",
        f"train.output_dir={out}/retina_r18_aqd_w4_hqod",
    ]
    assert len(commands) == 4
    assert "| AQD W4A4 + HQOD RetinaNet-R18 | 45.0 | 45.0 | 45.0 | 45.0 | 45.0 | 45.0 |" in capsys.readouterr().out
