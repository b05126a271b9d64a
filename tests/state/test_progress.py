"""The loop state read back from a checkpoint is one the loop writes, or the reason it is not."""

import json

import pytest

from loop.state.progress import LoopState, from_json


def test_what_the_loop_writes_reads_back_and_the_old_key_is_renamed():
    state = LoopState(step=6, epoch=1, step_in_epoch=1, tokens_seen=900, tokens_trained=800, samples_seen=40,
                      skipped_steps=1, world_size=2, data_fingerprint="ab", eval_losses=[[0, 8.1], [6, float("nan")]])
    back = from_json(state.to_json(), folder_step=6)
    assert back.step == 6 and back.eval_losses[0] == [0, 8.1] and back.world_size == 2
    saved = json.loads(state.to_json())
    saved["evals"] = saved.pop("eval_losses")  # its name before 2026-12
    assert from_json(json.dumps(saved)).eval_losses[0] == [0, 8.1]


@pytest.mark.parametrize("changes, reason", [
    ({"step": -5}, "step: -5 is out of range"),
    ({"step": 1e9}, "step: 1000000000.0 is not a whole number"),
    ({"step": "4"}, "step: '4' is not a whole number"),
    ({"step": True}, "step: True is not a whole number"),
    ({"world_size": 0}, "world_size: 0 is out of range"),
    ({"tokens_seen": [1]}, "tokens_seen: [1] is not a whole number"),
    ({"data_fingerprint": 3}, "data_fingerprint: 3 is not a string"),
    ({"extra": 1}, "unknown key(s) 'extra'"),
    ({"skipped_steps": 9}, "skipped_steps: 9 is more than the step, 4"),
    ({"tokens_trained": 10**6}, "tokens_trained: 1000000 is more than tokens_seen, 100"),
    ({"eval_losses": [[5, 1.0]]}, "eval_losses: not a list of [step, loss] pairs up to step 4"),
    ({"eval_losses": {"0": 1.0}}, "eval_losses: not a list of [step, loss] pairs"),
])
def test_a_state_the_loop_would_not_write_is_refused_with_the_reason(changes, reason):
    good = json.loads(LoopState(step=4, epoch=0, step_in_epoch=4, tokens_seen=100, tokens_trained=90).to_json())
    with pytest.raises(ValueError, match=reason.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        from_json(json.dumps(good | changes), folder_step=4)


@pytest.mark.parametrize("text, reason", [("[1, 2]", "not a JSON object but list"), ("{\"step\": 4", "not JSON"),
                                          ("{}", "no 'step'")])
def test_what_is_not_a_state_at_all(text, reason):
    with pytest.raises(ValueError, match=reason):
        from_json(text)


def test_the_step_must_be_the_folders():
    with pytest.raises(ValueError, match="step: 4, but the checkpoint's folder is step 5's"):
        from_json(LoopState(step=4).to_json(), folder_step=5)
