"""`modelnet demo`, the README's main command, run as a user would."""

from __future__ import annotations

from cli_util import modelnet


def test_demo_runs_and_exits_zero():
    out = modelnet("demo", timeout=120)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "2. Discovery over the DHT" in text
    assert "task=text-generation: 4 peers" in text
    assert "answered by" in text
    assert "label 'math' -> arithmetic answered" in text
    assert "draft and verify: 87 after" in text
    assert "majority vote 3/4: 87" in text
    assert "each once and in order: True" in text
    assert "every peer has stopped" in text
    assert "Traceback" not in out.stderr


def test_demo_models_is_a_thin_re_export():
    """`modelnet serve modelnet_p2p.demo_models:NAME` keeps working: the same objects as demo.models."""
    from modelnet_p2p import demo_models
    from modelnet_p2p.demo import models

    assert demo_models.__all__ == models.__all__
    for name in models.__all__:
        assert getattr(demo_models, name) is getattr(models, name)
    assert set(demo_models.ALL) >= {"echo", "arithmetic", "translate", "summarize"}
    for handler in demo_models.ALL.values():
        assert handler.capability.name
