"""Control you can trust, with real processes and real signals: a slow evaluation under
a supervisor is work, not a freeze."""

from conftest import FAST_TRAIN, finish, read_json, spawn


# ------------------------------------------------------------------ a healthy trainer
def test_a_supervised_evaluation_longer_than_the_stall_timeout_is_not_killed(small_data,
                                                                             tmp_path):
    # Every chunk of held-out windows beats the heartbeat: ~4 chunks x 1.5 s, against a
    # supervisor's budget of 2 s (+ 2 s grace) without a sign of life.
    run = tmp_path / "run"
    proc = spawn("supervise", "--data", small_data, "--run-dir", run, *FAST_TRAIN,
                 "--eval-windows", "1000", "--val-fraction", "0.5", "--epochs", "1",
                 "--max-steps", "10", "--stall-timeout", "2", fault="slow_eval",
                 extra_env={"LNSP_TEST_EVAL_SECONDS": "1.5"})
    code, out = finish(proc, timeout=120)
    assert code == 0, out
    log = (run / "training.log").read_text()
    assert "[SUPERVISOR]" not in log and "Eval epoch 1" in log, log
    assert read_json(run / "goodput.json")["seconds"]["evaluation"] > 4.0
