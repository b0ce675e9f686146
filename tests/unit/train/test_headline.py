"""A complete run's last line (lowrank.train.finish.headline): its headline metric, on how much test data, after how
many steps, in how long, and where."""
from lowrank.train.finish import headline


def test_a_classifier_gives_its_accuracy_and_a_causal_lm_its_loss_and_perplexity():
    common = {"status": "complete", "steps": 1000, "wall_seconds": 41.4}
    assert headline(common | {"eval_accuracy": 0.8123, "eval_loss": 0.4, "eval_examples": 1000}, "runs/x") == (
        "complete: eval_accuracy 0.812 (1,000 test examples) after 1,000 steps in 41 s -> runs/x")
    assert headline(common | {"eval_loss": 2.0691, "eval_perplexity": 7.918, "eval_examples": 64}, "runs/y") == (
        "complete: eval_loss 2.0691, perplexity 7.92 (64 test sequences) after 1,000 steps in 41 s -> runs/y")
