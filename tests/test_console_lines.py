"""Which lines of Ray's processes reach the console: toolkit's own, not Ray's bracketed chatter."""

from toolkit.execution.console import _TOOLKIT_LINE


def test_toolkit_lines_pass_and_ray_trains_failure_policy_lines_do_not():
    for line in ("[pretrain] epoch 1/5 loss 4.2", "[round 2/4] 5,000 accepted", "[warning] checkpoint damaged"):
        assert _TOOLKIT_LINE.match(line), line
    for line in ("[FailurePolicy] RAISE", "[FailurePolicy] RETRY\nDecision", "plain Ray output", "[] empty"):
        assert not _TOOLKIT_LINE.match(line), line
